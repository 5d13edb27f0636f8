//! intake: turns resident reports into filed incidents, exactly once.
//!
//! Why it looks the way it does:
//! - **Two ways in, one path through.** Apps publish to `intake.submit.<channel>` with the
//!   submission id as `Nats-Msg-Id` (the SUBMISSIONS stream keeps it even while intake is
//!   down), or request on `intake.request`. Both feed the same batches through the same
//!   decoder ([`decode`]) and core ([`core`]); a durable submission is acked only after its
//!   decision is stored.
//! - **Exactly once without locks.** The incident id is a UUID v8 hashed from the submission
//!   id, event ids and commit ids are derived the same way, and the decision uses the stream
//!   message's timestamp as `now`: a redelivery after a crash re-decides identically and the
//!   event store reports the repeat as a duplicate. A filing's receipt is its incident
//!   commit (`SubmissionTaken`: one stored message per filing); a merge's or a refusal's is
//!   stored on INTAKE (aggregate = submission id, created at expected sequence 0). So a
//!   resubmission returns the original receipt, and two instances racing on one id agree on
//!   the first receipt.
//! - **Pure core, thin shell.** [`core::Core`] decides (rate limit, locate, duplicate merge,
//!   `domain::decide` for report + file) in memory; [`service::IntakeService`] is one
//!   `tokio::select!` loop that stores, acks and answers.
//! - **Personal information stays out of the log.** Contact details go only to an erasable
//!   KV bucket keyed by reporter id; events and public subjects carry ids, never names or
//!   phone numbers; the SUBMISSIONS stream has work-queue retention, so a submission is
//!   deleted once acknowledged.
//!
//! See docs/INTAKE.md for subjects, reason codes, figures and limits.
#![forbid(unsafe_code)]

pub mod contacts;
pub mod core;
pub mod decode;
pub mod service;
pub mod status;
pub mod wire;

/// The INCIDENTS codec intake writes with (re-exported for binaries that start intake).
pub use codecs::IncidentCodec;
pub use core::{Core, CoreConfig, IntakeEvent, Locate, Located, Routing, incident_id_for};
pub use decode::{Limits, decode_submission};
pub use service::{
    BATCH_FILL_WAIT, BATCH_FILL_WAIT_MAX, DecisionTime, INTAKE_EVENT_TYPE, IntakeCodec,
    IntakeService, SUBMISSIONS_MAX_AGE, ServiceConfig, ServiceError, ensure_submissions_stream,
};
pub use wire::{Receipt, Submission};
