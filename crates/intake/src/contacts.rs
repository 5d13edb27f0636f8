//! Reporters' contact details in their erasable KV bucket.
//!
//! Why a write is more than a `put`: a batch writes its contact details beside the next batch,
//! and another intake instance may be writing at the same moment, so a write can land after
//! `intake.contact.erase` purged the key. A plain put would then put back details the office
//! was asked to erase (the personal-information law's right to erasure). So a write first
//! reads the key: when its last entry is an erasure (the purge marker) made at or after the
//! submission arrived, the details stay erased; otherwise it writes at the revision it read,
//! so that an erasure landing between the read and the write fails the write, which then
//! reads again. A submission that arrives after an erasure writes its details: the reporter
//! gave them again.

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use bytes::Bytes;

/// Read-then-write rounds for one contact write while other writes to the same key keep
/// landing between its read and its write.
pub const CONTACT_WRITE_ATTEMPTS_MAX: usize = 4;

/// What a contact write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContactWrite {
    Written,
    /// Not written: the reporter's details were erased at or after the submission arrived.
    ErasedSince,
}

#[derive(Debug, thiserror::Error)]
pub enum ContactWriteError {
    #[error("read the contact entry of {reporter}: {source}")]
    Read {
        reporter: uuid::Uuid,
        source: kv::EntryError,
    },
    #[error("write the contact details of {reporter}: {source}")]
    Write {
        reporter: uuid::Uuid,
        source: kv::UpdateError,
    },
    #[error(
        "write the contact details of {reporter}: other writes to the key won \
         {CONTACT_WRITE_ATTEMPTS_MAX} times"
    )]
    Contended { reporter: uuid::Uuid },
}

/// Writes `details` (the contact JSON) for `reporter`, unless they were erased at or after
/// `arrived_ms` (the submission's arrival, Unix milliseconds, wall clock: the stream's
/// timestamp for a durable submission, so a redelivery after a crash keeps its first arrival).
pub async fn write_contact(
    bucket: &kv::Store,
    reporter: uuid::Uuid,
    details: Bytes,
    arrived_ms: i64,
) -> Result<ContactWrite, ContactWriteError> {
    let key = reporter.to_string();
    for _ in 0..CONTACT_WRITE_ATTEMPTS_MAX {
        let entry = bucket
            .entry(key.as_str())
            .await
            .map_err(|source| ContactWriteError::Read { reporter, source })?;
        let revision = match entry {
            Some(entry) if matches!(entry.operation, Operation::Purge | Operation::Delete) => {
                let erased_ms = (entry.created.unix_timestamp_nanos() / 1_000_000) as i64;
                if erased_ms >= arrived_ms {
                    return Ok(ContactWrite::ErasedSince);
                }
                entry.revision
            }
            Some(entry) => entry.revision,
            // Never written: the write expects no message on the key (revision 0).
            None => 0,
        };
        match bucket.update(key.as_str(), details.clone(), revision).await {
            Ok(_) => return Ok(ContactWrite::Written),
            Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => continue,
            Err(source) => return Err(ContactWriteError::Write { reporter, source }),
        }
    }
    Err(ContactWriteError::Contended { reporter })
}
