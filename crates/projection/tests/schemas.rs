//! The projection's JSON Schemas in `schemas/` are generated from `projection::wire`; this
//! test fails when they drift (regenerate with `UPDATE_SCHEMAS=1 cargo test -p projection
//! --test schemas`) and checks that the AsyncAPI document lists every query subject and schema.

use std::path::PathBuf;

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

#[test]
fn schemas_match_the_rust_types() {
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut drifted = Vec::new();
    for (name, schema) in projection::wire::schemas() {
        let path = schemas_dir().join(format!("{name}.schema.json"));
        let generated = serde_json::to_string_pretty(&schema).expect("schema serialises") + "\n";
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != generated {
            if update {
                std::fs::write(&path, &generated).expect("write schema");
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

#[test]
fn asyncapi_lists_every_query_subject_and_schema() {
    let document = std::fs::read_to_string(schemas_dir().join("asyncapi.yaml"))
        .expect("schemas/asyncapi.yaml");
    use projection::wire::*;
    let subjects = [
        SUBJECT_QUERY_INCIDENT,
        SUBJECT_QUERY_BOARD,
        SUBJECT_QUERY_AREA,
        SUBJECT_QUERY_SCORECARDS,
        SUBJECT_QUERY_TOTALS,
        SUBJECT_QUERY_COMPLIANCE,
        SUBJECT_QUERY_CHECKPOINT,
    ];
    let mut missing: Vec<String> = subjects
        .iter()
        .filter(|subject| !document.contains(&format!("address: {subject}")))
        .map(|subject| subject.to_string())
        .collect();
    for (name, _) in schemas() {
        let file = format!("./{name}.schema.json");
        if !document.contains(&file) {
            missing.push(file);
        }
    }
    assert!(
        missing.is_empty(),
        "missing from asyncapi.yaml: {missing:?}"
    );
}
