//! The event store: every decision wangge makes is a commit on a NATS JetStream subject.
//!
//! Why it looks the way it does:
//! - **One subject per aggregate, one message per commit.** All events that one command
//!   produced travel in one NATS message, so a multi-event commit is atomic without JetStream's
//!   (slow) atomic batch publish.
//! - **Optimistic concurrency by the server.** Every append carries
//!   `Nats-Expected-Last-Subject-Sequence` (0 when the aggregate is new); a writer that lost a
//!   race gets [`AppendError::Conflict`], never a silent overwrite.
//! - **Idempotency by the server.** Every append carries a `Nats-Msg-Id` derived from the
//!   command or input id, so a redelivered input is reported as a duplicate and not applied
//!   twice; the same id with different content is a conflict. Beyond JetStream's duplicate
//!   window the expected sequence still refuses the second write.
//! - **Tamper evidence.** Each commit carries the SHA-256 of the aggregate's previous commit and
//!   its own, so an edited, reordered or deleted commit is found by [`EventStore::verify`].
//! - **Frozen encodings.** The store never serialises domain types itself: an [`EventCodec`]
//!   turns each event into `(event_type, schema_version, bytes)` and back, so old bytes keep
//!   decoding through the codec's upcasts.
//!
//! Headers carry the envelope (event types, schema versions, gap-free aggregate version,
//! correlation and causation ids, actor, occurred-at, W3C `traceparent`, hashes) so that tools
//! can route and audit without decoding bodies.
#![forbid(unsafe_code)]

mod aggregate;
pub mod bus;
mod codec;
mod envelope;
mod error;
mod replay;
mod snapshot;
mod store;
mod subscription;
mod verify;

pub use aggregate::{AggregateId, AggregateIdError};
pub use codec::{CodecError, EncodedEvent, EventCodec, PostcardCodec};
pub use envelope::{
    BODY_MAGIC, Commit, CommitFormat, CommitMeta, EncodeCommitError, Position, RecordedCommit,
    RecordedEvent, carries_envelope, command_uuid, headers, stored_event_count,
};
pub use error::{AppendError, ConflictReason, LoadError, OpenError};
pub use replay::ReplayRange;
pub use snapshot::{SnapshotError, SnapshotRead, SnapshotStore};
pub use store::{
    Appended, BoundedContext, ChainBreak, EventStore, ExistingStream, Inspected, Loaded,
    StreamSpec, ensure_stream,
};
pub use subscription::{
    Acks, CUMULATIVE_ACK_EVERY_DELIVERIES, CUMULATIVE_ACK_LINGER, DeleteConsumerError, Delivery,
    Readers, SubscribeError, Subscription, SubscriptionConfig, consumer_name_fragment,
};
pub use verify::{ChainHead, Finding, SavedHeads, VERIFY_AGGREGATES_MAX, VerifyReport};

/// Most events one commit may hold.
pub const COMMIT_EVENTS_MAX: usize = 256;
/// Largest encoded commit body; stays below the server's default 1 MiB `max_payload`
/// with room for headers.
pub const COMMIT_BODY_BYTES_MAX: usize = 960 * 1024;
