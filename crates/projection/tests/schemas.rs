//! The JSON Schemas in `schemas/` are generated from the Rust types of `projection::wire`; this
//! test fails when they drift (regenerate with `UPDATE_SCHEMAS=1 cargo test -p projection --test
//! schemas`), and checks that the AsyncAPI document names every query subject and schema.

use testkit::schemas::{assert_schemas_match, missing_from_asyncapi};

#[test]
fn schemas_match_the_rust_types() {
    assert_schemas_match(&projection::wire::schemas());
}

#[test]
fn asyncapi_lists_every_query_subject_and_schema() {
    use projection::wire::*;
    let missing = missing_from_asyncapi(
        &[
            SUBJECT_QUERY_INCIDENT,
            SUBJECT_QUERY_BOARD,
            SUBJECT_QUERY_AREA,
            SUBJECT_QUERY_SCORECARDS,
            SUBJECT_QUERY_TOTALS,
            SUBJECT_QUERY_COMPLIANCE,
            SUBJECT_QUERY_CHECKPOINT,
        ],
        &projection::wire::schemas(),
    );
    assert!(
        missing.is_empty(),
        "missing from asyncapi.yaml: {missing:?}"
    );
}
