//! The JSON Schemas in `schemas/` are generated from the Rust types of `registry::api`; this
//! test fails when they drift (regenerate with `UPDATE_SCHEMAS=1 cargo test -p registry --test
//! schemas`), and checks that the AsyncAPI document names its subjects, every command and
//! every schema.

use testkit::schemas::{assert_schemas_match, asyncapi, missing_from_asyncapi};

#[test]
fn schemas_match_the_rust_types() {
    assert_schemas_match(&registry::api::schemas());
}

#[test]
fn asyncapi_lists_every_subject_command_and_schema() {
    let mut missing = missing_from_asyncapi(
        &[
            registry::api::SUBJECT_LOCATE,
            "grids.cmd.{command}",
            registry::api::SUBJECT_QUERY_COMMUNITY,
        ],
        &registry::api::schemas(),
    );
    let document = asyncapi();
    for command in [
        "register_community",
        "update_community",
        "import_buildings",
        "partition",
        "assign_grid_worker",
    ] {
        // Each is a command the parser knows, and the channel's enum names it.
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
    assert!(
        missing.is_empty(),
        "missing from asyncapi.yaml: {missing:?}"
    );
}
