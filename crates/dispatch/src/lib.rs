//! dispatch: the whistle-and-report service — takes department consoles' commands, fires
//! deadlines and escalates, and tells each console what it must do. Intake routes a new filing
//! in its filing commit; dispatch routes a filing stored without a dispatch (logs written before
//! that, or a filing intake could not route).
//!
//! WHY it looks like this: every rule lives in `domain` (pure `decide`/`evolve`); this crate is
//! the imperative shell around it. The working state of every incident is held in memory
//! ([`book::Book`], ~300-500 bytes per open incident), folded from the INCIDENTS stream, so a
//! command costs one decide and one append, never a read of history. Deadlines are not timers
//! owned by a process: they are fields of the stored events, and the deadline index is rebuilt
//! from the states at every start, so they survive restarts of dispatch and of nats-server.
//! An escalation is appended at the incident's expected stream position with a deterministic
//! command id, so two instances (or a restarted one) can never escalate the same deadline twice.
//! See docs/DISPATCH.md.
#![forbid(unsafe_code)]

pub mod book;
pub mod clock;
pub mod notify;
pub mod service;
pub mod wire;

pub use book::{Book, BookStats, incident_aggregate};
pub use clock::{ManualTime, TimeSource};
pub use codecs::IncidentCodec;
pub use notify::{Notification, Recipient};
pub use service::{DispatchConfig, DispatchService, IncidentStore, Progress, ServiceError};
pub use wire::{CommandReply, CommandRequest};
