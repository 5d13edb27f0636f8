//! The JSON Schemas in `schemas/` are generated from the Rust types of `intake::wire`; this
//! test fails when they drift (regenerate with `UPDATE_SCHEMAS=1 cargo test -p intake --test
//! schemas`), and checks that the AsyncAPI document names every subject and schema.

use testkit::schemas::{assert_schemas_match, missing_from_asyncapi};

#[test]
fn schemas_match_the_rust_types() {
    assert_schemas_match(&intake::wire::schemas());
}

#[test]
fn asyncapi_lists_every_subject_and_schema() {
    use intake::wire::*;
    let missing = missing_from_asyncapi(
        &[
            "intake.submit.{channel}",
            SUBJECT_REQUEST,
            "intake.receipts.{submission_id}",
            SUBJECT_QUERY_RECEIPT,
            SUBJECT_CONTACT_ERASE,
            "incidents.status.{incident_id}",
            SUBJECT_QUERY_INCIDENT,
        ],
        &intake::wire::schemas(),
    );
    assert!(
        missing.is_empty(),
        "missing from asyncapi.yaml: {missing:?}"
    );
}
