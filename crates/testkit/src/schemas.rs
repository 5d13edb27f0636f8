//! The public-message contract checks every service crate runs: its JSON Schemas in
//! `schemas/` equal the ones generated from its Rust types, and the AsyncAPI document names
//! its subjects and schemas.

use std::path::PathBuf;

/// The workspace's `schemas/` folder.
pub fn schemas_dir() -> PathBuf {
    crate::workspace_root().join("schemas")
}

/// Compares each generated schema (file stem, schema) with `schemas/<stem>.schema.json`;
/// with `UPDATE_SCHEMAS` set, rewrites the files that differ. Panics naming the files that
/// drifted.
pub fn assert_schemas_match<S: serde::Serialize>(generated: &[(&str, S)]) {
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut drifted = Vec::new();
    for (name, schema) in generated {
        let path = schemas_dir().join(format!("{name}.schema.json"));
        let text = serde_json::to_string_pretty(schema).expect("schema serialises") + "\n";
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != text {
            if update {
                std::fs::write(&path, &text).expect("write schema");
            } else {
                drifted.push(path.display().to_string());
            }
        }
    }
    assert!(
        drifted.is_empty(),
        "schemas drifted from the Rust types (run with UPDATE_SCHEMAS=1): {drifted:?}"
    );
}

/// The AsyncAPI document (`schemas/asyncapi.yaml`), checked to be AsyncAPI 3.
pub fn asyncapi() -> String {
    let document = std::fs::read_to_string(schemas_dir().join("asyncapi.yaml"))
        .expect("schemas/asyncapi.yaml");
    assert!(
        document.starts_with("asyncapi: 3."),
        "an AsyncAPI 3 document"
    );
    document
}

/// What the AsyncAPI document lacks: channels with these `addresses`, and references to the
/// schemas' files (`./<stem>.schema.json`).
pub fn missing_from_asyncapi<S>(addresses: &[&str], schemas: &[(&str, S)]) -> Vec<String> {
    let document = asyncapi();
    let mut missing: Vec<String> = addresses
        .iter()
        .filter(|address| !document.contains(&format!("address: {address}")))
        .map(|address| address.to_string())
        .collect();
    for (stem, _) in schemas {
        let file = format!("./{stem}.schema.json");
        if !document.contains(&file) {
            missing.push(file);
        }
    }
    missing
}
