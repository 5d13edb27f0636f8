//! The JSON Schemas in `schemas/` are generated from the Rust types of `projection::wire`; this
//! test fails when they drift (regenerate with `UPDATE_SCHEMAS=1 cargo test -p projection --test
//! schemas`), and checks that the AsyncAPI document names every query subject and schema.

use testkit::schemas::{assert_schemas_match, missing_from_asyncapi};

fn generated() -> Vec<(&'static str, String)> {
    projection::wire::schemas()
        .into_iter()
        .map(|(name, schema)| {
            let rendered = serde_json::to_string_pretty(&schema).expect("schema serialises");
            (name, rendered)
        })
        .collect()
}

fn stems() -> Vec<&'static str> {
    generated().into_iter().map(|(name, _)| name).collect()
}

#[test]
fn schemas_match_the_rust_types() {
    assert_schemas_match(generated());
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
        &stems(),
    );
    assert!(
        missing.is_empty(),
        "missing from asyncapi.yaml: {missing:?}"
    );
}
