use crate::envelope::{DecodeCommitError, EncodeCommitError, Position};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("create or update stream {stream}: {source}")]
    Stream {
        stream: String,
        source: async_nats::jetstream::context::CreateStreamError,
    },
    #[error("open stream {stream}: {reason}")]
    GetStream { stream: String, reason: String },
    #[error("create or open key-value bucket {bucket}: {reason}")]
    Bucket { bucket: String, reason: String },
}

/// Why an append was refused because of what is already stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConflictReason {
    /// Another writer appended first: the aggregate is no longer at the expected position.
    StaleVersion { expected: Position },
    /// The command id was already used on this aggregate for a commit with other content.
    CommandIdReused {
        command_id: String,
        stored_sequence: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("append to {subject}: conflict: {reason:?}")]
    Conflict {
        subject: String,
        reason: ConflictReason,
    },
    #[error("append to {subject}: {source}")]
    Encode {
        subject: String,
        source: EncodeCommitError,
    },
    #[error("append to {subject}: publish failed after {attempts} attempts: {source}")]
    Publish {
        subject: String,
        attempts: usize,
        source: async_nats::jetstream::context::PublishError,
    },
    #[error("append to {subject}: check stored duplicate at sequence {sequence}: {reason}")]
    DuplicateCheck {
        subject: String,
        sequence: u64,
        reason: String,
    },
}

impl AppendError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, AppendError::Conflict { .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("load {subject}: read last commit: {reason}")]
    LastCommit { subject: String, reason: String },
    #[error("load {subject}: read commits: {reason}")]
    Read { subject: String, reason: String },
    #[error("load {subject}: commit at sequence {sequence} is corrupt: {source}")]
    Corrupt {
        subject: String,
        sequence: u64,
        source: DecodeCommitError,
    },
    #[error("load {subject}: chain broken at sequence {sequence}: {detail}")]
    ChainBroken {
        subject: String,
        sequence: u64,
        detail: String,
    },
}
