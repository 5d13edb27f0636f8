//! The registry's JSON Schemas in `schemas/` are generated from `registry::api`; this test fails
//! when they drift (regenerate with `UPDATE_SCHEMAS=1 cargo test -p registry --test schemas`)
//! and checks that the AsyncAPI document lists its subjects, commands and schemas.

use std::path::PathBuf;

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

#[test]
fn schemas_match_the_rust_types() {
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut drifted = Vec::new();
    for (name, schema) in registry::api::schemas() {
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
fn asyncapi_lists_every_subject_command_and_schema() {
    let document = std::fs::read_to_string(schemas_dir().join("asyncapi.yaml"))
        .expect("schemas/asyncapi.yaml");
    let mut missing: Vec<String> = [
        registry::api::SUBJECT_LOCATE,
        "grids.cmd.{command}",
        registry::api::SUBJECT_QUERY_COMMUNITY,
    ]
    .iter()
    .filter(|subject| !document.contains(&format!("address: {subject}")))
    .map(|subject| subject.to_string())
    .collect();
    for command in [
        "register_community",
        "update_community",
        "import_buildings",
        "partition",
        "assign_grid_worker",
    ] {
        // Every command the parser knows is listed in the channel's enum.
        assert!(
            registry::api::parse_command(command, b"{}")
                .err()
                .is_none_or(|rejected| rejected.reason_code != "unknown_command"),
            "{command} is a command"
        );
        if !document.contains(command) {
            missing.push(format!("command {command}"));
        }
    }
    for (name, _) in registry::api::schemas() {
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
