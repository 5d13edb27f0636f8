//! Frozen stored encodings of incident events.
//!
//! WHY: the event log outlives every version of the code. Stored payloads are postcard (compact,
//! not self-describing: field order IS the format), so they are written from *wire types* in
//! versioned modules ([`v1`]) that are never edited once released. Today's domain types can
//! change freely; [`decode_event`] reads any released version and upcasts it to today's type.
//! The committed golden bytes under `crates/domain/tests/golden/` must decode forever.
//!
//! To change an event: add `v2::<Event>`, bump its entry in [`encode_event`] to write v2, keep
//! the v1 decoder, and add an upcast `v1 → v2 → today`. Never reorder or edit a `v1` item.

use serde::{Deserialize, Serialize};

use crate::calendar::Clock;
use crate::ids::{
    Actor, ActorId, CategoryCode, DepartmentId, GridCode, IncidentId, Role, Timestamp,
};
use crate::incident::{
    Channel, DeadlineKind, Handler, IncidentEvent, Level, Position, RejectReason, ReturnReason,
    RouteSource, Satisfaction, SubmissionKind, Summoned, WhistleCause,
};
use crate::routing::WhistleKind;

/// An event ready to store: its type and schema version go in message headers.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EncodedEvent {
    pub event_type: &'static str,
    pub schema_version: u16,
    pub payload: Vec<u8>,
}

/// Why stored bytes could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {event_type:?} at schema version {schema_version}")]
    UnknownType {
        event_type: String,
        schema_version: u16,
    },
    #[error("payload of {event_type} v{schema_version} is not valid postcard: {source}")]
    Payload {
        event_type: String,
        schema_version: u16,
        source: postcard::Error,
    },
    #[error("payload of {event_type} v{schema_version} has {bytes} trailing bytes")]
    TrailingBytes {
        event_type: String,
        schema_version: u16,
        bytes: usize,
    },
    #[error("payload of {event_type} v{schema_version} holds an invalid value: {detail}")]
    Invalid {
        event_type: String,
        schema_version: u16,
        detail: String,
    },
}

/// Every event type name, in declaration order.
pub const EVENT_TYPES: &[&str] = &[
    "incident.reported",
    "incident.filed",
    "incident.report_rejected",
    "incident.dispatched",
    "incident.acknowledged",
    "incident.resolved",
    "incident.verification_failed",
    "incident.verified",
    "incident.closed",
    "incident.rated",
    "incident.reopened",
    "incident.returned",
    "incident.extension_requested",
    "incident.extension_approved",
    "incident.extension_denied",
    "incident.parked",
    "incident.unparked",
    "incident.duplicate_merged",
    "incident.merged_into",
    "incident.cancelled",
    "incident.deadline_missed",
    "incident.whistle_blown",
    "incident.whistle_reported",
    "incident.whistle_report_missed",
    "incident.whistle_escalated",
    "incident.submission_taken",
    "incident.whistle_summons_withdrawn",
];

/// Schema version 1: frozen. Never edit; add `v2` instead.
pub mod v1 {
    #![allow(missing_docs)]
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Position {
        pub lat_e7: i32,
        pub lon_e7: i32,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum Role {
        Resident,
        GridWorker,
        Community,
        Street,
        District,
        City,
        Department(String),
        System,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Actor {
        pub role: Role,
        pub id: [u8; 16],
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum Handler {
        GridWorker,
        Community,
        Street,
        Department(String),
    }
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum Clock {
        Working,
        Wall,
    }
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum RejectReason {
        OutsideJurisdiction,
        NotAGovernmentMatter,
        InsufficientInformation,
        Malicious,
    }
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum ReturnReason {
        NotOurDuty,
        WrongLocation,
        WrongCategory,
    }
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum RouteSource {
        Table,
        StreetOverride,
        Fallback,
        Street,
        Manual,
    }
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum Satisfaction {
        Satisfied,
        BasicallySatisfied,
        Unsatisfied,
    }
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum DeadlineKind {
        Response,
        Resolution,
    }
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum WhistleKind {
        Routine,
        Tough,
        Emergency,
    }
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum Level {
        Grid,
        Community,
        Street,
        District,
        City,
    }
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum WhistleCause {
        Emergency,
        DeadlineMissed(DeadlineKind),
        BeyondPowers,
        ReportsMissed,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Summoned {
        pub department: String,
        pub report_by_ms: i64,
    }

    /// `category` is class * 100 + subclass; `grid` the 15-digit code as an integer.
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Reported {
        pub incident: [u8; 16],
        pub by: Actor,
        pub description: String,
        pub position: Option<Position>,
        pub category_hint: Option<u16>,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Filed {
        pub by: Actor,
        pub grid: u64,
        pub category: u16,
        pub emergency: bool,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct ReportRejected {
        pub by: Actor,
        pub reason: RejectReason,
        pub note: String,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Dispatched {
        pub by: Actor,
        pub handler: Handler,
        pub source: RouteSource,
        pub clock: Clock,
        pub response_due_ms: i64,
        pub resolution_due_ms: i64,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Acknowledged {
        pub by: Actor,
        pub late: bool,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Resolved {
        pub by: Actor,
        pub late: bool,
        pub note: String,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct VerificationFailed {
        pub by: Actor,
        pub note: String,
        pub resolution_due_ms: i64,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct By {
        pub by: Actor,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Rated {
        pub by: Actor,
        pub satisfaction: Satisfaction,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Reopened {
        pub by: Actor,
        pub reason: String,
        pub response_due_ms: i64,
        pub resolution_due_ms: i64,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Returned {
        pub by: Actor,
        pub handler: Handler,
        pub reason: ReturnReason,
        pub note: String,
        pub rerouted_to: Handler,
        pub source: RouteSource,
        pub response_due_ms: i64,
        pub resolution_due_ms: i64,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct ExtensionRequested {
        pub by: Actor,
        pub minutes: u32,
        pub reason: String,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct ExtensionApproved {
        pub by: Actor,
        pub minutes: u32,
        pub resolution_due_ms: i64,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct ByWithText {
        pub by: Actor,
        pub text: String,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct Unparked {
        pub by: Actor,
        pub response_due_ms: i64,
        pub resolution_due_ms: i64,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct DuplicateMerged {
        pub by: Actor,
        pub duplicate: [u8; 16],
        pub reporter: [u8; 16],
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct MergedInto {
        pub by: Actor,
        pub original: [u8; 16],
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct DeadlineMissed {
        pub handler: Handler,
        pub deadline: DeadlineKind,
        pub due_ms: i64,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct WhistleBlown {
        pub kind: WhistleKind,
        pub level: Level,
        pub cause: WhistleCause,
        pub summoned: Vec<Summoned>,
        pub resolution_due_ms: Option<i64>,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct WhistleReported {
        pub by: Actor,
        pub department: String,
        pub late: bool,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct WhistleReportMissed {
        pub department: String,
        pub due_ms: i64,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct WhistleEscalated {
        pub kind: WhistleKind,
        pub from: Level,
        pub to: Level,
        pub cause: WhistleCause,
        pub summoned: Vec<Summoned>,
        pub resolution_due_ms: Option<i64>,
    }
    // Added after the first release (a new event type starts at v1; nothing above changed).
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum SubmissionKind {
        Consultation,
        Suggestion,
        ProblemReport,
        Complaint,
    }
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub enum Channel {
        App,
        Hotline,
        Patrol,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct SubmissionTaken {
        pub submission_id: String,
        pub kind: SubmissionKind,
        pub channel: Channel,
        pub occurred_at_ms: i64,
        pub media: u8,
        pub respond_by_ms: i64,
    }
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub struct WhistleSummonsWithdrawn {
        pub by: Actor,
        pub department: String,
    }
}

macro_rules! same_enum {
    ($today:ty, $wire:ty, [$($v:ident),*]) => {
        impl From<$today> for $wire {
            fn from(x: $today) -> $wire {
                match x { $(<$today>::$v => <$wire>::$v),* }
            }
        }
        impl From<$wire> for $today {
            fn from(x: $wire) -> $today {
                match x { $(<$wire>::$v => <$today>::$v),* }
            }
        }
    };
}
same_enum!(Clock, v1::Clock, [Working, Wall]);
same_enum!(
    RejectReason,
    v1::RejectReason,
    [
        OutsideJurisdiction,
        NotAGovernmentMatter,
        InsufficientInformation,
        Malicious
    ]
);
same_enum!(
    ReturnReason,
    v1::ReturnReason,
    [NotOurDuty, WrongLocation, WrongCategory]
);
same_enum!(
    RouteSource,
    v1::RouteSource,
    [Table, StreetOverride, Fallback, Street, Manual]
);
same_enum!(
    Satisfaction,
    v1::Satisfaction,
    [Satisfied, BasicallySatisfied, Unsatisfied]
);
same_enum!(DeadlineKind, v1::DeadlineKind, [Response, Resolution]);
same_enum!(
    SubmissionKind,
    v1::SubmissionKind,
    [Consultation, Suggestion, ProblemReport, Complaint]
);
same_enum!(Channel, v1::Channel, [App, Hotline, Patrol]);
same_enum!(WhistleKind, v1::WhistleKind, [Routine, Tough, Emergency]);
same_enum!(Level, v1::Level, [Grid, Community, Street, District, City]);

impl From<WhistleCause> for v1::WhistleCause {
    fn from(x: WhistleCause) -> Self {
        match x {
            WhistleCause::Emergency => v1::WhistleCause::Emergency,
            WhistleCause::DeadlineMissed(k) => v1::WhistleCause::DeadlineMissed(k.into()),
            WhistleCause::BeyondPowers => v1::WhistleCause::BeyondPowers,
            WhistleCause::ReportsMissed => v1::WhistleCause::ReportsMissed,
        }
    }
}
impl From<v1::WhistleCause> for WhistleCause {
    fn from(x: v1::WhistleCause) -> Self {
        match x {
            v1::WhistleCause::Emergency => WhistleCause::Emergency,
            v1::WhistleCause::DeadlineMissed(k) => WhistleCause::DeadlineMissed(k.into()),
            v1::WhistleCause::BeyondPowers => WhistleCause::BeyondPowers,
            v1::WhistleCause::ReportsMissed => WhistleCause::ReportsMissed,
        }
    }
}

fn w_actor(a: &Actor) -> v1::Actor {
    let role = match a.role {
        Role::Resident => v1::Role::Resident,
        Role::GridWorker => v1::Role::GridWorker,
        Role::Community => v1::Role::Community,
        Role::Street => v1::Role::Street,
        Role::District => v1::Role::District,
        Role::City => v1::Role::City,
        Role::Department(d) => v1::Role::Department(d.as_str().to_owned()),
        Role::System => v1::Role::System,
    };
    v1::Actor {
        role,
        id: *a.id.0.as_bytes(),
    }
}
fn w_handler(h: &Handler) -> v1::Handler {
    match h {
        Handler::GridWorker => v1::Handler::GridWorker,
        Handler::Community => v1::Handler::Community,
        Handler::Street => v1::Handler::Street,
        Handler::Department(d) => v1::Handler::Department(d.as_str().to_owned()),
    }
}
fn w_category(c: CategoryCode) -> u16 {
    u16::from(c.class()) * 100 + u16::from(c.subclass())
}
fn w_summoned(s: &[Summoned]) -> Vec<v1::Summoned> {
    s.iter()
        .map(|s| v1::Summoned {
            department: s.department.as_str().to_owned(),
            report_by_ms: s.report_by.0,
        })
        .collect()
}

fn postcard_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing plain structs of integers, strings, vecs and enums into a Vec cannot fail.
    postcard::to_allocvec(value).unwrap_or_default()
}

/// The stored type name of an event (`incident.dispatched`), without encoding it: what
/// status updates and logs name a change by. Always equal to `encode_event(event).event_type`.
pub fn event_type(event: &IncidentEvent) -> &'static str {
    use IncidentEvent as E;
    match event {
        E::Reported { .. } => "incident.reported",
        E::Filed { .. } => "incident.filed",
        E::ReportRejected { .. } => "incident.report_rejected",
        E::Dispatched { .. } => "incident.dispatched",
        E::Acknowledged { .. } => "incident.acknowledged",
        E::Resolved { .. } => "incident.resolved",
        E::VerificationFailed { .. } => "incident.verification_failed",
        E::Verified { .. } => "incident.verified",
        E::Closed { .. } => "incident.closed",
        E::Rated { .. } => "incident.rated",
        E::Reopened { .. } => "incident.reopened",
        E::Returned { .. } => "incident.returned",
        E::ExtensionRequested { .. } => "incident.extension_requested",
        E::ExtensionApproved { .. } => "incident.extension_approved",
        E::ExtensionDenied { .. } => "incident.extension_denied",
        E::Parked { .. } => "incident.parked",
        E::Unparked { .. } => "incident.unparked",
        E::DuplicateMerged { .. } => "incident.duplicate_merged",
        E::MergedInto { .. } => "incident.merged_into",
        E::Cancelled { .. } => "incident.cancelled",
        E::DeadlineMissed { .. } => "incident.deadline_missed",
        E::WhistleBlown { .. } => "incident.whistle_blown",
        E::WhistleReported { .. } => "incident.whistle_reported",
        E::WhistleReportMissed { .. } => "incident.whistle_report_missed",
        E::WhistleEscalated { .. } => "incident.whistle_escalated",
        E::SubmissionTaken { .. } => "incident.submission_taken",
        E::WhistleSummonsWithdrawn { .. } => "incident.whistle_summons_withdrawn",
    }
}

/// Encodes an event in today's schema version of its type.
pub fn encode_event(event: &IncidentEvent) -> EncodedEvent {
    use IncidentEvent as E;
    let (event_type, payload) = match event {
        E::Reported {
            incident,
            by,
            description,
            position,
            category_hint,
        } => (
            "incident.reported",
            postcard_bytes(&v1::Reported {
                incident: *incident.0.as_bytes(),
                by: w_actor(by),
                description: description.clone(),
                position: position.map(|p| v1::Position {
                    lat_e7: p.lat_e7,
                    lon_e7: p.lon_e7,
                }),
                category_hint: category_hint.map(w_category),
            }),
        ),
        E::Filed {
            by,
            grid,
            category,
            emergency,
        } => (
            "incident.filed",
            postcard_bytes(&v1::Filed {
                by: w_actor(by),
                grid: grid.value(),
                category: w_category(*category),
                emergency: *emergency,
            }),
        ),
        E::ReportRejected { by, reason, note } => (
            "incident.report_rejected",
            postcard_bytes(&v1::ReportRejected {
                by: w_actor(by),
                reason: (*reason).into(),
                note: note.clone(),
            }),
        ),
        E::Dispatched {
            by,
            handler,
            source,
            clock,
            response_due,
            resolution_due,
        } => (
            "incident.dispatched",
            postcard_bytes(&v1::Dispatched {
                by: w_actor(by),
                handler: w_handler(handler),
                source: (*source).into(),
                clock: (*clock).into(),
                response_due_ms: response_due.0,
                resolution_due_ms: resolution_due.0,
            }),
        ),
        E::Acknowledged { by, late } => (
            "incident.acknowledged",
            postcard_bytes(&v1::Acknowledged {
                by: w_actor(by),
                late: *late,
            }),
        ),
        E::Resolved { by, late, note } => (
            "incident.resolved",
            postcard_bytes(&v1::Resolved {
                by: w_actor(by),
                late: *late,
                note: note.clone(),
            }),
        ),
        E::VerificationFailed {
            by,
            note,
            resolution_due,
        } => (
            "incident.verification_failed",
            postcard_bytes(&v1::VerificationFailed {
                by: w_actor(by),
                note: note.clone(),
                resolution_due_ms: resolution_due.0,
            }),
        ),
        E::Verified { by } => (
            "incident.verified",
            postcard_bytes(&v1::By { by: w_actor(by) }),
        ),
        E::Closed { by } => (
            "incident.closed",
            postcard_bytes(&v1::By { by: w_actor(by) }),
        ),
        E::Rated { by, satisfaction } => (
            "incident.rated",
            postcard_bytes(&v1::Rated {
                by: w_actor(by),
                satisfaction: (*satisfaction).into(),
            }),
        ),
        E::Reopened {
            by,
            reason,
            response_due,
            resolution_due,
        } => (
            "incident.reopened",
            postcard_bytes(&v1::Reopened {
                by: w_actor(by),
                reason: reason.clone(),
                response_due_ms: response_due.0,
                resolution_due_ms: resolution_due.0,
            }),
        ),
        E::Returned {
            by,
            handler,
            reason,
            note,
            rerouted_to,
            source,
            response_due,
            resolution_due,
        } => (
            "incident.returned",
            postcard_bytes(&v1::Returned {
                by: w_actor(by),
                handler: w_handler(handler),
                reason: (*reason).into(),
                note: note.clone(),
                rerouted_to: w_handler(rerouted_to),
                source: (*source).into(),
                response_due_ms: response_due.0,
                resolution_due_ms: resolution_due.0,
            }),
        ),
        E::ExtensionRequested {
            by,
            minutes,
            reason,
        } => (
            "incident.extension_requested",
            postcard_bytes(&v1::ExtensionRequested {
                by: w_actor(by),
                minutes: *minutes,
                reason: reason.clone(),
            }),
        ),
        E::ExtensionApproved {
            by,
            minutes,
            resolution_due,
        } => (
            "incident.extension_approved",
            postcard_bytes(&v1::ExtensionApproved {
                by: w_actor(by),
                minutes: *minutes,
                resolution_due_ms: resolution_due.0,
            }),
        ),
        E::ExtensionDenied { by, note } => (
            "incident.extension_denied",
            postcard_bytes(&v1::ByWithText {
                by: w_actor(by),
                text: note.clone(),
            }),
        ),
        E::Parked { by, reason } => (
            "incident.parked",
            postcard_bytes(&v1::ByWithText {
                by: w_actor(by),
                text: reason.clone(),
            }),
        ),
        E::Unparked {
            by,
            response_due,
            resolution_due,
        } => (
            "incident.unparked",
            postcard_bytes(&v1::Unparked {
                by: w_actor(by),
                response_due_ms: response_due.0,
                resolution_due_ms: resolution_due.0,
            }),
        ),
        E::DuplicateMerged {
            by,
            duplicate,
            reporter,
        } => (
            "incident.duplicate_merged",
            postcard_bytes(&v1::DuplicateMerged {
                by: w_actor(by),
                duplicate: *duplicate.0.as_bytes(),
                reporter: *reporter.0.as_bytes(),
            }),
        ),
        E::MergedInto { by, original } => (
            "incident.merged_into",
            postcard_bytes(&v1::MergedInto {
                by: w_actor(by),
                original: *original.0.as_bytes(),
            }),
        ),
        E::Cancelled { by } => (
            "incident.cancelled",
            postcard_bytes(&v1::By { by: w_actor(by) }),
        ),
        E::DeadlineMissed {
            handler,
            deadline,
            due,
        } => (
            "incident.deadline_missed",
            postcard_bytes(&v1::DeadlineMissed {
                handler: w_handler(handler),
                deadline: (*deadline).into(),
                due_ms: due.0,
            }),
        ),
        E::WhistleBlown {
            kind,
            level,
            cause,
            summoned,
            resolution_due,
        } => (
            "incident.whistle_blown",
            postcard_bytes(&v1::WhistleBlown {
                kind: (*kind).into(),
                level: (*level).into(),
                cause: (*cause).into(),
                summoned: w_summoned(summoned),
                resolution_due_ms: resolution_due.map(|t| t.0),
            }),
        ),
        E::WhistleReported {
            by,
            department,
            late,
        } => (
            "incident.whistle_reported",
            postcard_bytes(&v1::WhistleReported {
                by: w_actor(by),
                department: department.as_str().to_owned(),
                late: *late,
            }),
        ),
        E::WhistleReportMissed { department, due } => (
            "incident.whistle_report_missed",
            postcard_bytes(&v1::WhistleReportMissed {
                department: department.as_str().to_owned(),
                due_ms: due.0,
            }),
        ),
        E::WhistleSummonsWithdrawn { by, department } => (
            "incident.whistle_summons_withdrawn",
            postcard_bytes(&v1::WhistleSummonsWithdrawn {
                by: w_actor(by),
                department: department.as_str().to_owned(),
            }),
        ),
        E::WhistleEscalated {
            kind,
            from,
            to,
            cause,
            summoned,
            resolution_due,
        } => (
            "incident.whistle_escalated",
            postcard_bytes(&v1::WhistleEscalated {
                kind: (*kind).into(),
                from: (*from).into(),
                to: (*to).into(),
                cause: (*cause).into(),
                summoned: w_summoned(summoned),
                resolution_due_ms: resolution_due.map(|t| t.0),
            }),
        ),
        E::SubmissionTaken {
            submission_id,
            kind,
            channel,
            occurred_at,
            media,
            respond_by,
        } => (
            "incident.submission_taken",
            postcard_bytes(&v1::SubmissionTaken {
                submission_id: submission_id.clone(),
                kind: (*kind).into(),
                channel: (*channel).into(),
                occurred_at_ms: occurred_at.0,
                media: *media,
                respond_by_ms: respond_by.0,
            }),
        ),
    };
    EncodedEvent {
        event_type,
        schema_version: 1,
        payload,
    }
}

/// Upcasts v1 wire values to today's types; the only fallible part is re-validating ids.
struct Upcast<'a> {
    event_type: &'a str,
    schema_version: u16,
}

impl Upcast<'_> {
    fn invalid(&self, detail: String) -> DecodeError {
        DecodeError::Invalid {
            event_type: self.event_type.to_owned(),
            schema_version: self.schema_version,
            detail,
        }
    }
    fn department(&self, s: &str) -> Result<DepartmentId, DecodeError> {
        s.parse().map_err(|e| self.invalid(format!("{e}")))
    }
    fn actor(&self, a: v1::Actor) -> Result<Actor, DecodeError> {
        let role = match a.role {
            v1::Role::Resident => Role::Resident,
            v1::Role::GridWorker => Role::GridWorker,
            v1::Role::Community => Role::Community,
            v1::Role::Street => Role::Street,
            v1::Role::District => Role::District,
            v1::Role::City => Role::City,
            v1::Role::Department(d) => Role::Department(self.department(&d)?),
            v1::Role::System => Role::System,
        };
        Ok(Actor {
            role,
            id: ActorId(uuid::Uuid::from_bytes(a.id)),
        })
    }
    fn handler(&self, h: v1::Handler) -> Result<Handler, DecodeError> {
        Ok(match h {
            v1::Handler::GridWorker => Handler::GridWorker,
            v1::Handler::Community => Handler::Community,
            v1::Handler::Street => Handler::Street,
            v1::Handler::Department(d) => Handler::Department(self.department(&d)?),
        })
    }
    fn category(&self, c: u16) -> Result<CategoryCode, DecodeError> {
        let major = u8::try_from(c / 100)
            .map_err(|_| self.invalid(format!("category {c} is not a two-level code")))?;
        CategoryCode::new(major, (c % 100) as u8).map_err(|e| self.invalid(format!("{e}")))
    }
    fn grid(&self, g: u64) -> Result<GridCode, DecodeError> {
        GridCode::new(g).map_err(|e| self.invalid(format!("{e}")))
    }
    fn summoned(&self, s: Vec<v1::Summoned>) -> Result<Vec<Summoned>, DecodeError> {
        s.into_iter()
            .map(|s| {
                Ok(Summoned {
                    department: self.department(&s.department)?,
                    report_by: Timestamp(s.report_by_ms),
                })
            })
            .collect()
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, payload: &[u8]) -> Result<T, DecodeError> {
        let (value, rest) =
            postcard::take_from_bytes::<T>(payload).map_err(|source| DecodeError::Payload {
                event_type: self.event_type.to_owned(),
                schema_version: self.schema_version,
                source,
            })?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes {
                event_type: self.event_type.to_owned(),
                schema_version: self.schema_version,
                bytes: rest.len(),
            });
        }
        Ok(value)
    }

    fn v1(&self, payload: &[u8]) -> Result<IncidentEvent, DecodeError> {
        use IncidentEvent as E;
        Ok(match self.event_type {
            "incident.reported" => {
                let w: v1::Reported = self.read(payload)?;
                E::Reported {
                    incident: IncidentId(uuid::Uuid::from_bytes(w.incident)),
                    by: self.actor(w.by)?,
                    description: w.description,
                    position: w.position.map(|p| Position {
                        lat_e7: p.lat_e7,
                        lon_e7: p.lon_e7,
                    }),
                    category_hint: w.category_hint.map(|c| self.category(c)).transpose()?,
                }
            }
            "incident.filed" => {
                let w: v1::Filed = self.read(payload)?;
                E::Filed {
                    by: self.actor(w.by)?,
                    grid: self.grid(w.grid)?,
                    category: self.category(w.category)?,
                    emergency: w.emergency,
                }
            }
            "incident.report_rejected" => {
                let w: v1::ReportRejected = self.read(payload)?;
                E::ReportRejected {
                    by: self.actor(w.by)?,
                    reason: w.reason.into(),
                    note: w.note,
                }
            }
            "incident.dispatched" => {
                let w: v1::Dispatched = self.read(payload)?;
                E::Dispatched {
                    by: self.actor(w.by)?,
                    handler: self.handler(w.handler)?,
                    source: w.source.into(),
                    clock: w.clock.into(),
                    response_due: Timestamp(w.response_due_ms),
                    resolution_due: Timestamp(w.resolution_due_ms),
                }
            }
            "incident.acknowledged" => {
                let w: v1::Acknowledged = self.read(payload)?;
                E::Acknowledged {
                    by: self.actor(w.by)?,
                    late: w.late,
                }
            }
            "incident.resolved" => {
                let w: v1::Resolved = self.read(payload)?;
                E::Resolved {
                    by: self.actor(w.by)?,
                    late: w.late,
                    note: w.note,
                }
            }
            "incident.verification_failed" => {
                let w: v1::VerificationFailed = self.read(payload)?;
                E::VerificationFailed {
                    by: self.actor(w.by)?,
                    note: w.note,
                    resolution_due: Timestamp(w.resolution_due_ms),
                }
            }
            "incident.verified" => E::Verified {
                by: self.actor(self.read::<v1::By>(payload)?.by)?,
            },
            "incident.closed" => E::Closed {
                by: self.actor(self.read::<v1::By>(payload)?.by)?,
            },
            "incident.rated" => {
                let w: v1::Rated = self.read(payload)?;
                E::Rated {
                    by: self.actor(w.by)?,
                    satisfaction: w.satisfaction.into(),
                }
            }
            "incident.reopened" => {
                let w: v1::Reopened = self.read(payload)?;
                E::Reopened {
                    by: self.actor(w.by)?,
                    reason: w.reason,
                    response_due: Timestamp(w.response_due_ms),
                    resolution_due: Timestamp(w.resolution_due_ms),
                }
            }
            "incident.returned" => {
                let w: v1::Returned = self.read(payload)?;
                E::Returned {
                    by: self.actor(w.by)?,
                    handler: self.handler(w.handler)?,
                    reason: w.reason.into(),
                    note: w.note,
                    rerouted_to: self.handler(w.rerouted_to)?,
                    source: w.source.into(),
                    response_due: Timestamp(w.response_due_ms),
                    resolution_due: Timestamp(w.resolution_due_ms),
                }
            }
            "incident.extension_requested" => {
                let w: v1::ExtensionRequested = self.read(payload)?;
                E::ExtensionRequested {
                    by: self.actor(w.by)?,
                    minutes: w.minutes,
                    reason: w.reason,
                }
            }
            "incident.extension_approved" => {
                let w: v1::ExtensionApproved = self.read(payload)?;
                E::ExtensionApproved {
                    by: self.actor(w.by)?,
                    minutes: w.minutes,
                    resolution_due: Timestamp(w.resolution_due_ms),
                }
            }
            "incident.extension_denied" => {
                let w: v1::ByWithText = self.read(payload)?;
                E::ExtensionDenied {
                    by: self.actor(w.by)?,
                    note: w.text,
                }
            }
            "incident.parked" => {
                let w: v1::ByWithText = self.read(payload)?;
                E::Parked {
                    by: self.actor(w.by)?,
                    reason: w.text,
                }
            }
            "incident.unparked" => {
                let w: v1::Unparked = self.read(payload)?;
                E::Unparked {
                    by: self.actor(w.by)?,
                    response_due: Timestamp(w.response_due_ms),
                    resolution_due: Timestamp(w.resolution_due_ms),
                }
            }
            "incident.duplicate_merged" => {
                let w: v1::DuplicateMerged = self.read(payload)?;
                E::DuplicateMerged {
                    by: self.actor(w.by)?,
                    duplicate: IncidentId(uuid::Uuid::from_bytes(w.duplicate)),
                    reporter: ActorId(uuid::Uuid::from_bytes(w.reporter)),
                }
            }
            "incident.merged_into" => {
                let w: v1::MergedInto = self.read(payload)?;
                E::MergedInto {
                    by: self.actor(w.by)?,
                    original: IncidentId(uuid::Uuid::from_bytes(w.original)),
                }
            }
            "incident.cancelled" => E::Cancelled {
                by: self.actor(self.read::<v1::By>(payload)?.by)?,
            },
            "incident.deadline_missed" => {
                let w: v1::DeadlineMissed = self.read(payload)?;
                E::DeadlineMissed {
                    handler: self.handler(w.handler)?,
                    deadline: w.deadline.into(),
                    due: Timestamp(w.due_ms),
                }
            }
            "incident.whistle_blown" => {
                let w: v1::WhistleBlown = self.read(payload)?;
                E::WhistleBlown {
                    kind: w.kind.into(),
                    level: w.level.into(),
                    cause: w.cause.into(),
                    summoned: self.summoned(w.summoned)?,
                    resolution_due: w.resolution_due_ms.map(Timestamp),
                }
            }
            "incident.whistle_reported" => {
                let w: v1::WhistleReported = self.read(payload)?;
                E::WhistleReported {
                    by: self.actor(w.by)?,
                    department: self.department(&w.department)?,
                    late: w.late,
                }
            }
            "incident.whistle_report_missed" => {
                let w: v1::WhistleReportMissed = self.read(payload)?;
                E::WhistleReportMissed {
                    department: self.department(&w.department)?,
                    due: Timestamp(w.due_ms),
                }
            }
            "incident.whistle_summons_withdrawn" => {
                let w: v1::WhistleSummonsWithdrawn = self.read(payload)?;
                E::WhistleSummonsWithdrawn {
                    by: self.actor(w.by)?,
                    department: self.department(&w.department)?,
                }
            }
            "incident.whistle_escalated" => {
                let w: v1::WhistleEscalated = self.read(payload)?;
                E::WhistleEscalated {
                    kind: w.kind.into(),
                    from: w.from.into(),
                    to: w.to.into(),
                    cause: w.cause.into(),
                    summoned: self.summoned(w.summoned)?,
                    resolution_due: w.resolution_due_ms.map(Timestamp),
                }
            }
            "incident.submission_taken" => {
                let w: v1::SubmissionTaken = self.read(payload)?;
                E::SubmissionTaken {
                    submission_id: w.submission_id,
                    kind: w.kind.into(),
                    channel: w.channel.into(),
                    occurred_at: Timestamp(w.occurred_at_ms),
                    media: w.media,
                    respond_by: Timestamp(w.respond_by_ms),
                }
            }
            other => {
                return Err(DecodeError::UnknownType {
                    event_type: other.to_owned(),
                    schema_version: self.schema_version,
                });
            }
        })
    }
}

/// Decodes a stored event of any released schema version into today's type.
pub fn decode_event(
    event_type: &str,
    schema_version: u16,
    payload: &[u8],
) -> Result<IncidentEvent, DecodeError> {
    let upcast = Upcast {
        event_type,
        schema_version,
    };
    match schema_version {
        1 => upcast.v1(payload),
        _ => Err(DecodeError::UnknownType {
            event_type: event_type.to_owned(),
            schema_version,
        }),
    }
}
