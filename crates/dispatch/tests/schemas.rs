//! The JSON Schemas in `schemas/` are generated from the Rust types of `dispatch::wire`; this
//! test fails when they drift (regenerate with `UPDATE_SCHEMAS=1 cargo test -p dispatch --test
//! schemas`), and checks that the AsyncAPI document names the command and notification
//! subjects, every action and role scope, and every schema.

use testkit::schemas::{assert_schemas_match, asyncapi, missing_from_asyncapi};

#[test]
fn schemas_match_the_rust_types() {
    assert_schemas_match(&dispatch::wire::schemas());
}

#[test]
fn asyncapi_lists_every_command_and_notification_subject_and_schema() {
    let mut missing = missing_from_asyncapi(
        &[
            "dispatch.cmd.department.{department}.{action}",
            "dispatch.cmd.{role}.{action}",
            "dispatch.notify.department.{department}",
            "dispatch.notify.{level}.{code}",
        ],
        &dispatch::wire::schemas(),
    );
    let document = asyncapi();
    for token in dispatch::wire::ACTIONS
        .iter()
        .chain(dispatch::wire::SCOPES_OTHER)
    {
        if !document.contains(token) {
            missing.push((*token).to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "missing from asyncapi.yaml: {missing:?}"
    );
}
