//! domain: the pure core of wangge — incidents, whistle-and-report, deadlines and routing.
//!
//! WHY a separate crate with no IO: every decision the system takes about an incident (who
//! handles it, when it is late, when to blow the whistle, who is to blame) must be replayable
//! from the event log and testable without a server. So this crate reads no clock (`now` is
//! an argument), draws no random numbers (ids are passed in), and does no IO (configuration
//! files are embedded with `include_str!` or handed over as text by the caller).
//!
//! The services call:
//! - [`policy::Policy::embedded`] / [`policy::Policy::parse`] once at start-up;
//! - [`incident::decide`] for every command, appending the returned events as one commit;
//! - [`incident::evolve`] (or [`incident::IncidentState::apply`]) for every stored event;
//! - [`incident::next_deadline`] to schedule the next `DeadlineElapsed`;
//! - [`encoding::encode_event`] / [`encoding::decode_event`] to store and read events.
//!
//! Events carry the deadlines the decider computed (so replay never depends on today's
//! configuration) but not their own occurrence time: the shell stores the `now` it passed to
//! `decide` as the commit's occurred-at header.
//!
//! Memory: an [`incident::IncidentState`] is 216 bytes inline; its three short lists are
//! bounded (`CO_REPORTERS_MAX`, `RETURNS_MAX`, `WHISTLE_SUMMONS_MAX`) and grown exactly, so the
//! worst case is 924 bytes with heap and a typical open incident 216-480 bytes (measured in
//! `tests/decider.rs` and `tests/simulation.rs`), within the dispatch budget of 1,024 bytes.
//! `IncidentState` derives serde for snapshots; snapshots are a cache, not a frozen format —
//! rebuild from events when one does not decode.
#![forbid(unsafe_code)]

pub mod calendar;
pub mod describe;
pub mod encoding;
pub mod ids;
pub mod incident;
pub mod policy;
pub mod routing;
pub mod taxonomy;

pub use calendar::{BusinessCalendar, Clock};
pub use ids::{
    Actor, ActorId, CategoryCode, DepartmentId, GridCode, IncidentId, Role, StreetCode, Timestamp,
};
pub use incident::{
    Action, IncidentCommand, IncidentEvent, IncidentState, Rejection, decide, evolve, next_deadline,
};
pub use policy::Policy;
