//! The public JSON messages of intake. Every type here derives `JsonSchema`; the committed
//! schemas in `schemas/` are generated from them (`tests/schemas.rs` fails when they drift).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Durable submissions: `intake.submit.<channel>`, captured by the SUBMISSIONS stream.
pub const SUBJECT_SUBMIT_PREFIX: &str = "intake.submit.";
/// Every durable submission subject.
pub const SUBJECT_SUBMIT_ALL: &str = "intake.submit.*";
/// Request/reply submissions: the reply is the [`Receipt`].
pub const SUBJECT_REQUEST: &str = "intake.request";
/// Receipts of durable submissions are announced on `intake.receipts.<submission_id>`.
pub const SUBJECT_RECEIPTS_PREFIX: &str = "intake.receipts.";
/// Ask for a stored receipt by submission id.
pub const SUBJECT_QUERY_RECEIPT: &str = "intake.query.receipt";
/// Erase a reporter's contact details (personal-information law).
pub const SUBJECT_CONTACT_ERASE: &str = "intake.contact.erase";
/// Per-incident status updates: `incidents.status.<incident_id>`.
pub use codecs::status::SUBJECT_STATUS_PREFIX;
/// Query one incident by id.
pub const SUBJECT_QUERY_INCIDENT: &str = "incidents.query.get";

/// What the resident wants (the Sanming "single intake": 咨询、建议、问题反映、投诉).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SubmissionKind {
    Consultation,
    Suggestion,
    ProblemReport,
    Complaint,
}

/// Where the submission came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// The resident app (随手拍, snap-and-report).
    App,
    /// The 12345 hotline desk, entering a caller's report.
    Hotline,
    /// A grid worker on patrol.
    Patrol,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::App => "app",
            Channel::Hotline => "hotline",
            Channel::Patrol => "patrol",
        }
    }
}

/// A WGS84 point in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// Longitude, -180..=180.
    #[schemars(range(min = -180, max = 180))]
    pub lon: f64,
    /// Latitude, -90..=90.
    #[schemars(range(min = -90, max = 90))]
    pub lat: f64,
}

/// Where the problem is: a point, or a building registered in the grid registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Location {
    Point(Point),
    /// A building id of the grid registry, 1 to 64 bytes.
    BuildingId(#[schemars(length(min = 1, max = 64))] String),
}

/// A photo or recording kept elsewhere: no blobs travel on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MediaRef {
    /// An `https://` (or `http://`) URL, at most 2,048 bytes.
    Url(
        #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
        String,
    ),
    /// The SHA-256 of the content in the media store, 64 lowercase hex digits.
    Sha256(#[schemars(regex(pattern = r"^[0-9a-f]{64}$"))] String),
}

/// Contact details. Personal information: kept only in an erasable KV bucket keyed by
/// reporter id, never in events or on public subjects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    /// At most 128 bytes.
    #[serde(default)]
    #[schemars(length(max = 128))]
    pub name: Option<String>,
    /// At most 128 bytes.
    #[serde(default)]
    #[schemars(length(max = 128))]
    pub phone: Option<String>,
}

// The literal bounds in the schema attributes below are the decoder's.
const _: () = assert!(
    crate::decode::SUBMISSION_ID_BYTES_MIN == 8
        && crate::decode::SUBMISSION_ID_BYTES_MAX == 64
        && crate::decode::DESCRIPTION_CHARS_MAX == 4000
        && crate::decode::MEDIA_REFS_MAX == 9
        && crate::decode::MEDIA_URL_BYTES_MAX == 2048
        && crate::decode::BUILDING_ID_BYTES_MAX == 64
        && crate::decode::CONTACT_FIELD_BYTES_MAX == 128
);

/// One submission, as an app publishes it (`intake.submit.<channel>` with header
/// `Nats-Msg-Id: <submission_id>`, or a request on `intake.request`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Submission {
    /// Client-chosen idempotency key, 8..=64 characters of `A-Z a-z 0-9 _ -` (a UUID is a
    /// good choice). A resubmission with the same id returns the original receipt.
    #[schemars(length(min = 8, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub submission_id: String,
    pub kind: SubmissionKind,
    /// A category code of the taxonomy (`config/categories.toml`), e.g. `"0103"`.
    pub category: String,
    pub location: Location,
    /// At most 4,000 characters (and the domain's byte bound, see docs/INTAKE.md); not empty.
    #[schemars(length(min = 1, max = 4000))]
    pub description: String,
    /// At most 9 references.
    #[serde(default)]
    #[schemars(length(max = 9))]
    pub media: Vec<MediaRef>,
    pub channel: Channel,
    /// The reporter's account id in the identity system (UUID).
    pub reporter_id: uuid::Uuid,
    /// When the reporter saw the problem, RFC 3339 (at most an hour after the report
    /// arrives).
    #[schemars(length(min = 1))]
    pub occurred_at: String,
    #[serde(default)]
    pub contact: Option<Contact>,
}

/// Why a submission was refused. Stable, machine-readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// The payload is not JSON.
    MalformedJson,
    /// JSON, but not a submission (missing or mistyped field, unknown field, bad id, bad
    /// coordinates, bad media reference, bad timestamp).
    SchemaViolation,
    /// The category is not a fileable category of the taxonomy.
    UnknownCategory,
    /// The location is outside every community with grids.
    OutsideCommunities,
    /// No grid of the grid registry holds the building id, or two communities hold it.
    UnknownBuilding,
    DescriptionTooLong,
    TooManyMedia,
    PayloadTooLarge,
    /// The reporter sent more than the configured rate.
    RateLimited,
    /// The incident decider refused the report (message says why).
    Refused,
    /// Only in answers to `intake.query.receipt`: no submission with this id was received.
    NotFound,
    /// Durable path: the `Nats-Msg-Id` header and the body's `submission_id` differ. (New
    /// codes go last: stored rejections encode the code by its position.)
    IdMismatch,
    /// Durable path: the subject's channel (`intake.submit.<channel>`) and the body's
    /// `channel` differ.
    ChannelMismatch,
}

impl ReasonCode {
    /// The code of a request refusal shared by every service ([`observe::refusal`]).
    pub fn from_refusal(reason_code: &str) -> ReasonCode {
        match reason_code {
            observe::refusal::PAYLOAD_TOO_LARGE => ReasonCode::PayloadTooLarge,
            observe::refusal::SCHEMA_VIOLATION => ReasonCode::SchemaViolation,
            _ => ReasonCode::MalformedJson,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::MalformedJson => "malformed_json",
            ReasonCode::SchemaViolation => "schema_violation",
            ReasonCode::UnknownCategory => "unknown_category",
            ReasonCode::OutsideCommunities => "outside_communities",
            ReasonCode::UnknownBuilding => "unknown_building",
            ReasonCode::DescriptionTooLong => "description_too_long",
            ReasonCode::TooManyMedia => "too_many_media",
            ReasonCode::PayloadTooLarge => "payload_too_large",
            ReasonCode::RateLimited => "rate_limited",
            ReasonCode::Refused => "refused",
            ReasonCode::NotFound => "not_found",
            ReasonCode::IdMismatch => "id_mismatch",
            ReasonCode::ChannelMismatch => "channel_mismatch",
        }
    }
}

/// The outcome of a submission: the reply on `intake.request`, the message on
/// `intake.receipts.<submission_id>`, and the answer of `intake.query.receipt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Receipt {
    /// A new incident was filed.
    Filed {
        submission_id: String,
        incident_id: uuid::Uuid,
        grid_code: String,
        /// Expected response deadline, RFC 3339 UTC, and the same in Unix milliseconds.
        respond_by: String,
        respond_by_ms: i64,
    },
    /// The report duplicates an open incident: the reporter was added to it.
    Merged {
        submission_id: String,
        incident_id: uuid::Uuid,
        grid_code: String,
        respond_by: String,
        respond_by_ms: i64,
    },
    Rejected {
        /// Absent when the payload did not carry a usable id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        submission_id: Option<String>,
        reason_code: ReasonCode,
        message: String,
    },
    /// Not an outcome: intake could not store or read the decision (`store_unavailable`).
    /// Send again with the same id, as after any `error`.
    Error {
        reason_code: String,
        message: String,
    },
}

impl Receipt {
    pub fn incident_id(&self) -> Option<uuid::Uuid> {
        match self {
            Receipt::Filed { incident_id, .. } | Receipt::Merged { incident_id, .. } => {
                Some(*incident_id)
            }
            _ => None,
        }
    }
}

/// `intake.query.receipt` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiptQuery {
    pub submission_id: String,
}

/// `intake.contact.erase` request. Intake records the erasure on INTAKE (reporter id and
/// reference, never the details) before it erases, so an auditor can see it was done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EraseContact {
    pub reporter_id: uuid::Uuid,
    /// The personal-information office's reference for the request (its case number), kept
    /// in the erasure record: 1 to 128 characters without control characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub request_reference: Option<String>,
}

/// Longest `request_reference` of an erasure request, in characters.
pub const REQUEST_REFERENCE_CHARS_MAX: usize = 128;
// The schema's `maxLength` above is a literal: keep the two in step.
const _: () = assert!(REQUEST_REFERENCE_CHARS_MAX == 128);

/// `intake.contact.erase` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EraseReply {
    Erased {
        reporter_id: uuid::Uuid,
    },
    Rejected {
        /// `malformed_json`, `schema_violation` or `payload_too_large` (the request refusals
        /// every service shares).
        reason_code: String,
        message: String,
    },
    /// The contact bucket could not be reached (`store_unavailable`): ask again.
    Error {
        reason_code: String,
        message: String,
    },
}

pub use codecs::status::IncidentStatus;

/// `incidents.query.get` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IncidentQuery {
    pub incident_id: uuid::Uuid,
}

/// `incidents.query.get` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum IncidentQueryReply {
    Found {
        incident: IncidentStatus,
    },
    NotFound {
        incident_id: uuid::Uuid,
    },
    Rejected {
        /// `malformed_json`, `schema_violation` or `payload_too_large` (the request refusals
        /// every service shares).
        reason_code: String,
        message: String,
    },
    /// The event store could not be read (`store_unavailable`): ask again.
    Error {
        reason_code: String,
        message: String,
    },
}

/// Every public message with its schema file name (without `.json`).
pub fn schemas() -> Vec<(&'static str, schemars::schema::RootSchema)> {
    use schemars::schema_for;
    vec![
        ("submission", schema_for!(Submission)),
        ("receipt", schema_for!(Receipt)),
        ("receipt_query", schema_for!(ReceiptQuery)),
        ("erase_contact", schema_for!(EraseContact)),
        ("erase_reply", schema_for!(EraseReply)),
        ("incident_status", schema_for!(IncidentStatus)),
        ("incident_query", schema_for!(IncidentQuery)),
        ("incident_query_reply", schema_for!(IncidentQueryReply)),
    ]
}
