//! The refusal codes every service answers a bad request with, whatever it asked.
//!
//! A resident app, a console or an audit tool talks to four services. Before this module each
//! had its own words for the same mistake (`bad_request`, `malformed_request`, `too_large`,
//! `payload_too_large`), so a client needed a table per service to tell "fix the request"
//! from "try again". Now a request that cannot be read is refused with one of three codes,
//! and the same message shape (`reason_code` plus a human-readable `message`), by every
//! service:
//!
//! - [`PAYLOAD_TOO_LARGE`]: more bytes than the subject accepts (the message names the limit);
//! - [`MALFORMED_JSON`]: not JSON at all (a syntax error or a truncated document);
//! - [`SCHEMA_VIOLATION`]: JSON, but not the shape the subject's schema describes (a missing
//!   or unknown field, a wrong type, a value outside its set).
//!
//! Business refusals keep their own codes (`unknown_category`, `not_handler`, ...).

use serde::de::DeserializeOwned;

/// The request has more bytes than the subject accepts.
pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
/// The request is not JSON (a syntax error, or the document ends early).
pub const MALFORMED_JSON: &str = "malformed_json";
/// The request is JSON but does not have the shape of the subject's schema.
pub const SCHEMA_VIOLATION: &str = "schema_violation";

/// Why a request could not be read: a code from this module and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason_code: &'static str,
    pub message: String,
}

impl Refusal {
    /// A request whose shape is wrong in a way serde could not see (a value outside its set).
    pub fn schema_violation(message: impl Into<String>) -> Self {
        Refusal {
            reason_code: SCHEMA_VIOLATION,
            message: message.into(),
        }
    }

    /// A request of `length` bytes on a subject that accepts at most `bytes_max`.
    pub fn too_large(what: &str, length: usize, bytes_max: usize) -> Self {
        Refusal {
            reason_code: PAYLOAD_TOO_LARGE,
            message: format!("{what} is {length} bytes, more than {bytes_max}"),
        }
    }

    /// The refusal for a JSON decoding error: syntax errors and an early end are
    /// [`MALFORMED_JSON`], the rest (missing field, wrong type, unknown variant) is
    /// [`SCHEMA_VIOLATION`].
    pub fn from_json_error(error: &serde_json::Error) -> Self {
        let reason_code = match error.classify() {
            serde_json::error::Category::Data => SCHEMA_VIOLATION,
            serde_json::error::Category::Syntax
            | serde_json::error::Category::Eof
            | serde_json::error::Category::Io => MALFORMED_JSON,
        };
        Refusal {
            reason_code,
            message: error.to_string(),
        }
    }

    /// [`Refusal::from_json_error`] for an error met reading `payload`, telling valid JSON
    /// that serde files under syntax (a number out of range, nesting past its limit, a map
    /// key that must be a number) from JSON that does not parse: the first is JSON of the
    /// wrong shape, [`SCHEMA_VIOLATION`].
    pub fn from_json_error_in(error: &serde_json::Error, payload: &[u8]) -> Self {
        let refusal = Refusal::from_json_error(error);
        if refusal.reason_code == MALFORMED_JSON
            && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
        {
            return Refusal {
                reason_code: SCHEMA_VIOLATION,
                message: refusal.message,
            };
        }
        refusal
    }
}

/// Refuses a body that is not a JSON object (an array, a bare value): serde reads an array as
/// a struct's fields in order, which no client means. `what` names it in the message.
pub fn require_object(what: &str, payload: &[u8]) -> Result<(), Refusal> {
    match payload.iter().find(|byte| !byte.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        _ => Err(Refusal::schema_violation(format!(
            "the {what} must be a JSON object"
        ))),
    }
}

/// Reads a JSON request of at most `bytes_max` bytes (`what` names it in the message). A
/// request is an object: serde would also read a struct from an array of its fields in
/// order, which no schema allows, so an array is refused.
pub fn parse_json<T: DeserializeOwned>(
    what: &str,
    payload: &[u8],
    bytes_max: usize,
) -> Result<T, Refusal> {
    if payload.len() > bytes_max {
        return Err(Refusal::too_large(what, payload.len(), bytes_max));
    }
    let value: T = serde_json::from_slice(payload)
        .map_err(|error| Refusal::from_json_error_in(&error, payload))?;
    require_object(what, payload)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Query {
        id: u32,
    }

    fn check(payload: &str, expect: expect_test::Expect) {
        let actual = match parse_json::<Query>("query", payload.as_bytes(), 16) {
            Ok(query) => format!("ok {query:?}"),
            Err(refusal) => format!("{}: {}", refusal.reason_code, refusal.message),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn a_bad_request_gets_one_of_three_codes() {
        use expect_test::expect;
        check(r#"{"id":7}"#, expect!["ok Query { id: 7 }"]);
        check(
            r#"{"id":7"#,
            expect!["malformed_json: EOF while parsing an object at line 1 column 7"],
        );
        check(
            "id=7",
            expect!["malformed_json: expected value at line 1 column 1"],
        );
        check(
            r#"{"id":"7"}"#,
            expect![[
                r#"schema_violation: invalid type: string "7", expected u32 at line 1 column 9"#
            ]],
        );
        check(
            "{}",
            expect!["schema_violation: missing field `id` at line 1 column 2"],
        );
        check(
            r#"{"id":7,"x":1}"#,
            expect!["schema_violation: unknown field `x`, expected `id` at line 1 column 11"],
        );
        check(
            "[7]",
            expect!["schema_violation: the query must be a JSON object"],
        );
        // Valid JSON that serde files under syntax errors: of the wrong shape, not malformed.
        check(
            r#"{"id":1e400}"#,
            expect!["schema_violation: number out of range at line 1 column 11"],
        );
        check(
            r#"{"id":7,     "x":1}"#,
            expect!["payload_too_large: query is 19 bytes, more than 16"],
        );
    }
}
