//! Dispatch's JSON Schemas in `schemas/` are generated from `dispatch::wire`; this test fails
//! when they drift (regenerate with `UPDATE_SCHEMAS=1 cargo test -p dispatch --test schemas`)
//! and checks that the AsyncAPI document lists the command and notification subjects and
//! every schema.

use std::path::PathBuf;

fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

#[test]
fn schemas_match_the_rust_types() {
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut drifted = Vec::new();
    for (name, schema) in dispatch::wire::schemas() {
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
fn asyncapi_lists_every_command_and_notification_subject_and_schema() {
    let document = std::fs::read_to_string(schemas_dir().join("asyncapi.yaml"))
        .expect("schemas/asyncapi.yaml");
    let subjects = [
        "dispatch.cmd.department.{department}.{action}",
        "dispatch.cmd.{role}.{action}",
        "dispatch.notify.department.{department}",
        "dispatch.notify.{level}.{code}",
    ];
    let mut missing: Vec<String> = subjects
        .iter()
        .filter(|subject| !document.contains(&format!("address: {subject}")))
        .map(|subject| subject.to_string())
        .collect();
    for action in dispatch::wire::ACTIONS {
        if !document.contains(action) {
            missing.push(format!("action {action}"));
        }
    }
    for scope in dispatch::wire::SCOPES_OTHER {
        if !document.contains(scope) {
            missing.push(format!("scope {scope}"));
        }
    }
    for (name, _) in dispatch::wire::schemas() {
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
