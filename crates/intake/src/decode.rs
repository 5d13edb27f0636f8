//! The intake decoder: bytes in, a valid submission or a typed refusal out. Pure and total —
//! it never panics, whatever the bytes (`tests/decoder_props.rs` feeds it arbitrary input).

use domain::CategoryCode;
use domain::taxonomy::Taxonomy;

use crate::wire::{Channel, Contact, Location, MediaRef, ReasonCode, Submission, SubmissionKind};

/// Largest submission payload, in bytes (a 4,000-character description is at most 16 KB,
/// media references at most 9 × 2 KB).
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Longest description, in characters (the issue's public contract).
pub const DESCRIPTION_CHARS_MAX: usize = 4_000;
/// Most media references per submission.
pub const MEDIA_REFS_MAX: usize = 9;
/// Longest media URL, in bytes.
pub const MEDIA_URL_BYTES_MAX: usize = 2_048;
/// Shortest and longest submission id, in bytes.
pub const SUBMISSION_ID_BYTES_MIN: usize = 8;
pub const SUBMISSION_ID_BYTES_MAX: usize = 64;
/// Longest building id, in bytes: the registry's, so an id it could never hold is refused
/// as malformed rather than looked up.
pub const BUILDING_ID_BYTES_MAX: usize = registry::domain::BUILDING_ID_BYTES_MAX;
/// Longest contact name or phone, in bytes.
pub const CONTACT_FIELD_BYTES_MAX: usize = 128;
/// Longest refusal message taken from a parser error, in bytes.
const MESSAGE_BYTES_MAX: usize = 300;

/// Limits of the decoder (defaults: the named constants above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub payload_bytes_max: usize,
    pub description_chars_max: usize,
    pub media_refs_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            payload_bytes_max: PAYLOAD_BYTES_MAX,
            description_chars_max: DESCRIPTION_CHARS_MAX,
            media_refs_max: MEDIA_REFS_MAX,
        }
    }
}

/// Where the problem is, after validation.
#[derive(Debug, Clone, PartialEq)]
pub enum Place {
    Point { lon: f64, lat: f64 },
    Building(String),
}

/// A submission that passed schema and taxonomy validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSubmission {
    pub submission_id: String,
    pub kind: SubmissionKind,
    pub category: CategoryCode,
    pub place: Place,
    pub description: String,
    pub media: Vec<MediaRef>,
    pub channel: Channel,
    pub reporter_id: uuid::Uuid,
    pub occurred_at_ms: i64,
    pub contact: Option<Contact>,
}

/// A refusal by the decoder, with whatever identification could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub submission_id: Option<String>,
    pub reporter_id: Option<uuid::Uuid>,
    pub channel: Option<Channel>,
    pub reason_code: ReasonCode,
    pub message: String,
}

/// On the durable path the stream drops a resend by its `Nats-Msg-Id` header while intake
/// keys the receipt by the body's `submission_id`: the two must be one id, or a resend would
/// be dropped by one and filed again by the other. A mismatch is refused under the header's
/// id (the one the app published with, so its receipt arrives on
/// `intake.receipts.<header id>`). No header: nothing to compare.
pub fn check_message_id(
    valid: ValidSubmission,
    header_id: Option<&str>,
) -> Result<ValidSubmission, Refusal> {
    match header_id {
        Some(header_id) if header_id != valid.submission_id => Err(Refusal {
            submission_id: Some(header_id.to_owned()).filter(|id| is_valid_submission_id(id)),
            reporter_id: Some(valid.reporter_id),
            channel: Some(valid.channel),
            reason_code: ReasonCode::IdMismatch,
            message: clip(format!(
                "header Nats-Msg-Id {header_id:?} differs from the body's submission_id {:?}; \
                 send the same id in both",
                valid.submission_id
            )),
        }),
        _ => Ok(valid),
    }
}

/// Durable path: the channel of the subject a submission was published on
/// (`intake.submit.<channel>`) must be the body's `channel`, so that the two never disagree
/// in the record, and a deployment that grants each channel's subject to its own users
/// (hotline desk, patrol devices) can rely on it. It is no security boundary by itself: the
/// generated accounts let the resident app publish on every channel, and the request path
/// (`intake.request`) takes the body's channel as it is.
pub fn check_channel(valid: ValidSubmission, subject: &str) -> Result<ValidSubmission, Refusal> {
    let subject_channel = subject
        .strip_prefix(crate::wire::SUBJECT_SUBMIT_PREFIX)
        .unwrap_or(subject);
    if subject_channel == valid.channel.as_str() {
        return Ok(valid);
    }
    Err(Refusal {
        submission_id: Some(valid.submission_id),
        reporter_id: Some(valid.reporter_id),
        channel: Some(valid.channel),
        reason_code: ReasonCode::ChannelMismatch,
        message: clip(format!(
            "published on {subject:?} but the body's channel is {:?}; publish on \
             intake.submit.{}",
            valid.channel.as_str(),
            valid.channel.as_str()
        )),
    })
}

/// Whether `id` is a usable submission id (it becomes a NATS subject token).
pub fn is_valid_submission_id(id: &str) -> bool {
    (SUBMISSION_ID_BYTES_MIN..=SUBMISSION_ID_BYTES_MAX).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn clip(mut text: String) -> String {
    if text.len() > MESSAGE_BYTES_MAX {
        let mut end = MESSAGE_BYTES_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Decodes and validates one payload. `fallback_id` is the `Nats-Msg-Id` of a durable
/// submission, used to identify a refusal when the body carries no usable id.
pub fn decode_submission(
    bytes: &[u8],
    fallback_id: Option<&str>,
    limits: &Limits,
    taxonomy: &Taxonomy,
) -> Result<ValidSubmission, Refusal> {
    let fallback = fallback_id
        .filter(|id| is_valid_submission_id(id))
        .map(str::to_owned);
    let refuse = |submission_id: Option<String>, reason_code, message: String| Refusal {
        submission_id,
        reporter_id: None,
        channel: None,
        reason_code,
        message: clip(message),
    };
    if bytes.len() > limits.payload_bytes_max {
        return Err(refuse(
            fallback,
            ReasonCode::PayloadTooLarge,
            format!(
                "payload is {} bytes, more than {}",
                bytes.len(),
                limits.payload_bytes_max
            ),
        ));
    }
    // Fast path: a well-formed submission parses straight into its type. Anything else is
    // parsed again through `Value`, to tell malformed JSON from a schema violation and to
    // find the submission id for the refusal record (same outcome and message as before).
    // Objects only: serde would also take a positional array, whose id the refusal record
    // must not trust.
    let is_object = observe::refusal::require_object("submission", bytes).is_ok();
    if is_object && let Ok(submission) = serde_json::from_slice::<Submission>(bytes) {
        let known_id = if is_valid_submission_id(&submission.submission_id) {
            Some(submission.submission_id.clone())
        } else {
            fallback
        };
        return validate(submission, known_id, limits, taxonomy);
    }
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(value) => value,
        // Well-formed JSON that `Value` cannot hold (a number beyond a 64-bit float such as
        // `1e400`, nesting deeper than serde_json's 128 levels) is a schema violation, as in
        // every other service (`observe::refusal::from_json_error_in`); the ignoring parser
        // checks the grammar alone. Its id, if any, is read the same way.
        Err(error) if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() => {
            #[derive(serde::Deserialize)]
            struct IdOnly {
                submission_id: Option<String>,
            }
            let body_id = serde_json::from_slice::<IdOnly>(bytes)
                .ok()
                .filter(|_| is_object)
                .and_then(|body| body.submission_id)
                .filter(|id| is_valid_submission_id(id));
            return Err(refuse(
                body_id.or(fallback),
                ReasonCode::SchemaViolation,
                format!("not a submission: {error}"),
            ));
        }
        Err(error) => {
            return Err(refuse(
                fallback,
                ReasonCode::MalformedJson,
                format!("payload is not JSON: {error}"),
            ));
        }
    };
    // Identification for the refusal record, read before the full parse can fail.
    let body_id = value
        .get("submission_id")
        .and_then(serde_json::Value::as_str)
        .filter(|id| is_valid_submission_id(id))
        .map(str::to_owned);
    let known_id = body_id.or(fallback);
    let submission: Submission = match serde_json::from_value(value) {
        Ok(submission) => submission,
        Err(error) => {
            return Err(refuse(
                known_id,
                ReasonCode::SchemaViolation,
                format!("not a submission: {error}"),
            ));
        }
    };
    validate(submission, known_id, limits, taxonomy)
}

fn validate(
    submission: Submission,
    known_id: Option<String>,
    limits: &Limits,
    taxonomy: &Taxonomy,
) -> Result<ValidSubmission, Refusal> {
    let refuse = |reason_code, message: String| Refusal {
        submission_id: known_id.clone(),
        reporter_id: Some(submission.reporter_id),
        channel: Some(submission.channel),
        reason_code,
        message: clip(message),
    };
    use ReasonCode as R;
    if !is_valid_submission_id(&submission.submission_id) {
        return Err(refuse(
            R::SchemaViolation,
            format!(
                "submission_id must be {SUBMISSION_ID_BYTES_MIN}..={SUBMISSION_ID_BYTES_MAX} characters of A-Z a-z 0-9 _ -"
            ),
        ));
    }
    let description_chars = submission.description.chars().count();
    if description_chars > limits.description_chars_max {
        return Err(refuse(
            R::DescriptionTooLong,
            format!(
                "description is {description_chars} characters, more than {}",
                limits.description_chars_max
            ),
        ));
    }
    // 4,000 characters of UTF-8 always fit the incident record (`DESCRIPTION_BYTES_MAX`).
    const _: () = assert!(DESCRIPTION_CHARS_MAX * 4 <= domain::incident::DESCRIPTION_BYTES_MAX);
    if submission.description.trim().is_empty() {
        return Err(refuse(
            R::SchemaViolation,
            "description must not be empty".to_owned(),
        ));
    }
    if submission.media.len() > limits.media_refs_max {
        return Err(refuse(
            R::TooManyMedia,
            format!(
                "{} media references, more than {}",
                submission.media.len(),
                limits.media_refs_max
            ),
        ));
    }
    for (index, media) in submission.media.iter().enumerate() {
        let ok = match media {
            MediaRef::Url(url) => {
                url.len() <= MEDIA_URL_BYTES_MAX
                    && (url.starts_with("https://") || url.starts_with("http://"))
                    && !url.chars().any(char::is_whitespace)
            }
            MediaRef::Sha256(hash) => {
                hash.len() == 64
                    && hash
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            }
        };
        if !ok {
            return Err(refuse(
                R::SchemaViolation,
                format!(
                    "media[{index}] must be an http(s) URL of at most {MEDIA_URL_BYTES_MAX} bytes or 64 lowercase hex digits"
                ),
            ));
        }
    }
    let category: CategoryCode = match submission.category.parse() {
        Ok(code) => code,
        Err(error) => return Err(refuse(R::UnknownCategory, error.to_string())),
    };
    if !taxonomy.is_leaf(category) {
        return Err(refuse(
            R::UnknownCategory,
            format!("category {category} is not a fileable category of the taxonomy"),
        ));
    }
    let place = match &submission.location {
        Location::Point(point) => {
            let ok = point.lon.is_finite()
                && point.lat.is_finite()
                && (-180.0..=180.0).contains(&point.lon)
                && (-90.0..=90.0).contains(&point.lat);
            if !ok {
                return Err(refuse(
                    R::SchemaViolation,
                    "location.point must have lon in -180..=180 and lat in -90..=90".to_owned(),
                ));
            }
            Place::Point {
                lon: point.lon,
                lat: point.lat,
            }
        }
        Location::BuildingId(id) => {
            if id.is_empty() || id.len() > BUILDING_ID_BYTES_MAX {
                return Err(refuse(
                    R::SchemaViolation,
                    format!("location.building_id must be 1..={BUILDING_ID_BYTES_MAX} bytes"),
                ));
            }
            Place::Building(id.clone())
        }
    };
    let occurred_at_ms = match time::OffsetDateTime::parse(
        &submission.occurred_at,
        &time::format_description::well_known::Rfc3339,
    ) {
        Ok(at) => (at.unix_timestamp_nanos() / 1_000_000) as i64,
        Err(error) => {
            return Err(refuse(
                R::SchemaViolation,
                format!("occurred_at is not RFC 3339: {error}"),
            ));
        }
    };
    if let Some(contact) = &submission.contact {
        let too_long = [&contact.name, &contact.phone]
            .into_iter()
            .flatten()
            .any(|field| field.len() > CONTACT_FIELD_BYTES_MAX);
        if too_long {
            return Err(refuse(
                R::SchemaViolation,
                format!("contact fields must be at most {CONTACT_FIELD_BYTES_MAX} bytes"),
            ));
        }
    }
    Ok(ValidSubmission {
        submission_id: submission.submission_id,
        kind: submission.kind,
        category,
        place,
        description: submission.description,
        media: submission.media,
        channel: submission.channel,
        reporter_id: submission.reporter_id,
        occurred_at_ms,
        contact: submission.contact,
    })
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};
    use serde_json::{Value, json};

    use super::*;

    fn valid() -> Value {
        json!({
            "submission_id": "sub-00000001",
            "kind": "suggestion",
            "category": "0101",
            "location": {"point": {"lon": 117.63, "lat": 26.26}},
            "description": "路灯不亮",
            "media": [{"url": "https://media.example/1.jpg"}],
            "channel": "patrol",
            "reporter_id": "0193a1b2-0000-7000-8000-000000000001",
            "occurred_at": "2026-11-20T08:30:00+08:00"
        })
    }

    fn check(edit: impl FnOnce(&mut Value), expect: Expect) {
        let mut body = valid();
        edit(&mut body);
        let taxonomy = Taxonomy::default_embedded();
        let actual = match decode_submission(
            body.to_string().as_bytes(),
            None,
            &Limits::default(),
            &taxonomy,
        ) {
            Ok(valid) => format!(
                "ok {} {} {:?} at {}",
                valid.submission_id, valid.category, valid.place, valid.occurred_at_ms
            ),
            Err(refusal) => format!(
                "{} ({:?}): {}",
                refusal.reason_code.as_str(),
                refusal.submission_id,
                refusal.message
            ),
        };
        expect.assert_eq(&actual);
    }

    /// A number beyond a 64-bit float is well-formed JSON out of range: a schema violation.
    #[test]
    fn an_out_of_range_number_is_a_schema_violation() {
        let taxonomy = Taxonomy::default_embedded();
        let body = valid().to_string().replace("117.63", "1e400");
        let refusal = decode_submission(body.as_bytes(), None, &Limits::default(), &taxonomy)
            .expect_err("refused");
        expect![[r#"schema_violation (Some("sub-00000001")): not a submission: number out of range at line 1 column 131"#]].assert_eq(&format!(
            "{} ({:?}): {}",
            refusal.reason_code.as_str(),
            refusal.submission_id,
            refusal.message
        ));
        // Malformed after the number, or cut short: malformed, whatever the number.
        for body in [&b"{\"lon\": 1e400"[..], b"{\"lon\": 1e400,,}", b"[1e400"] {
            let refusal =
                decode_submission(body, None, &Limits::default(), &taxonomy).expect_err("refused");
            assert_eq!(
                refusal.reason_code.as_str(),
                "malformed_json",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Nested past serde_json's depth: well-formed, so a schema violation.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let refusal = decode_submission(deep.as_bytes(), None, &Limits::default(), &taxonomy)
            .expect_err("refused");
        assert_eq!(refusal.reason_code.as_str(), "schema_violation");
    }

    #[test]
    fn decoding() {
        check(
            |_| {},
            expect!["ok sub-00000001 0101 Point { lon: 117.63, lat: 26.26 } at 1795134600000"],
        );
        check(
            |b| b["location"] = json!({"building_id": "b-17"}),
            expect![[r#"ok sub-00000001 0101 Building("b-17") at 1795134600000"#]],
        );
        // A positional array (which serde would take for the struct) is decided as before the
        // fast path: its id is not trusted for the refusal record.
        check(
            |b| {
                let o = b.as_object().expect("object").clone();
                let field = |name: &str| o[name].clone();
                *b = json!([
                    field("submission_id"),
                    field("kind"),
                    field("category"),
                    field("location"),
                    "字".repeat(4_001),
                    field("media"),
                    field("channel"),
                    field("reporter_id"),
                    field("occurred_at")
                ]);
            },
            expect!["description_too_long (None): description is 4001 characters, more than 4000"],
        );
        check(
            |b| b["submission_id"] = json!("short"),
            expect![[
                r#"schema_violation (None): submission_id must be 8..=64 characters of A-Z a-z 0-9 _ -"#
            ]],
        );
        check(
            |b| b["kind"] = json!("praise"),
            expect![[
                r#"schema_violation (Some("sub-00000001")): not a submission: unknown variant `praise`, expected one of `consultation`, `suggestion`, `problem_report`, `complaint`"#
            ]],
        );
        check(
            |b| b["category"] = json!("01"),
            expect![[
                r#"unknown_category (Some("sub-00000001")): category 01 is not a fileable category of the taxonomy"#
            ]],
        );
        check(
            |b| b["category"] = json!("x"),
            expect![[
                r#"unknown_category (Some("sub-00000001")): category code "x" must be 2 digits (class) or 4 digits (class + subclass), not 00"#
            ]],
        );
        check(
            |b| b["location"] = json!({"point": {"lon": 200.0, "lat": 26.0}}),
            expect![[
                r#"schema_violation (Some("sub-00000001")): location.point must have lon in -180..=180 and lat in -90..=90"#
            ]],
        );
        check(
            |b| b["media"] = json!([{"url": "ftp://x"}]),
            expect![[
                r#"schema_violation (Some("sub-00000001")): media[0] must be an http(s) URL of at most 2048 bytes or 64 lowercase hex digits"#
            ]],
        );
        check(
            |b| b["description"] = json!("字".repeat(4_001)),
            expect![[
                r#"description_too_long (Some("sub-00000001")): description is 4001 characters, more than 4000"#
            ]],
        );
        check(
            |b| b["description"] = json!("  "),
            expect![[r#"schema_violation (Some("sub-00000001")): description must not be empty"#]],
        );
        check(
            |b| b["occurred_at"] = json!("yesterday"),
            expect![[
                r#"schema_violation (Some("sub-00000001")): occurred_at is not RFC 3339: the 'year' component could not be parsed"#
            ]],
        );
        check(
            |b| b["contact"] = json!({"phone": "1".repeat(200)}),
            expect![[
                r#"schema_violation (Some("sub-00000001")): contact fields must be at most 128 bytes"#
            ]],
        );
    }
}
