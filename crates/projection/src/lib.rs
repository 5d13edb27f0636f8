//! projection: the read models of wangge, folded from the event log into NATS KV.
//!
//! WHY it looks like this:
//! - **Read models are a pure fold** ([`fold::Projector`]): every aggregate model (totals,
//!   grid / community / street statistics, department and street scorecards, department
//!   boards) is a sum of per-incident contributions, each a function of that incident's fold
//!   state alone. A commit subtracts the incident's old contribution and adds the new one.
//! - **The checkpoint lives with the read model.** Each incident's KV value carries the
//!   stream sequence it reflects and the fold state behind it; a restarted builder loads
//!   those, *recomputes* the aggregates from them (never trusting aggregate values a crash
//!   may have half-written), and skips any redelivered commit its incident already reflects.
//!   Commits are acknowledged only after the flush that covers them is stored (aggregates,
//!   then incidents, then the `checkpoint` key). So nothing is counted twice or lost.
//! - **Generations.** All models of one build live in one bucket `PROJ_G<n>`; the meta bucket
//!   `PROJECTION` names the current one. A rebuild claims `n+1` ([`claim`]: one rebuild at a
//!   time), folds the streams from sequence 0 into `PROJ_G<n+1>` and swaps the pointer
//!   (compare-and-set); a running builder follows the swap. An as-of replay writes `PROJ_ASOF_<label>` for audits and swaps nothing.
//! - **Queries** (`projection.query.<model>`, JSON, queue group `projection`) read KV, so any
//!   instance answers, and an answer always names the generation and checkpoint it reflects.
//! - **One builder, any number of standbys** ([`lease`]): instances compete for a lease key
//!   in `PROJECTION`; the holder folds, the others answer queries and take over within a
//!   bounded time when it dies, resuming from the KV checkpoint like any restart.
//!
//! See docs/PROJECTION.md.
#![forbid(unsafe_code)]

pub mod bench;
pub mod claim;
pub mod compare;
pub mod fold;
pub mod keys;
pub mod lease;
pub mod reader;
pub mod rebuild;
pub mod service;
pub mod store;
pub mod synthetic;
pub mod wire;

pub use fold::{Applied, Held, Projector, StoredIncident};
pub use lease::{BUILDER_LEASE_TTL, LeaseTiming, LeaseValue, Role};
pub use reader::ReadModels;
pub use rebuild::{
    NoProgress, ProgressSink, RebuildError, RebuildOptions, RebuildReport, Until, as_of,
    as_of_buckets, drop_as_of, rebuild,
};
pub use service::{Progress, ProjectionConfig, ProjectionService, ServiceError};
pub use store::{Pointer, StoreError};
pub use wire::{
    AreaStats, Checkpoint, CommunityCompliance, DeadlineCompliance, DepartmentBoard, IncidentView,
    QueryReply, ScoreWeights, Scorecard, Tally, Totals, WhistleCount,
};
