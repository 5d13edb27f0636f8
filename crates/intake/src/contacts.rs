//! Reporters' contact details in their erasable KV bucket.
//!
//! Why a write is more than a `put`: a batch writes its contact details beside the next batch,
//! another intake instance may be writing at the same moment, and a submission can come back
//! (a redelivery) long after it arrived. So a write can land after `intake.contact.erase`
//! purged the key, or after a later submission of the same reporter wrote newer details. A
//! plain put would then put back details the office was asked to erase (the
//! personal-information law's right to erasure), or older ones over newer. So each value
//! holds the arrival of the submission that gave it, and a write first reads the key:
//! - its last entry is an erasure (the purge marker) made at or after the submission
//!   arrived: the details stay erased;
//! - it holds details of a submission that arrived later: those stay;
//! - otherwise it writes at the revision it read, so that a write or an erasure landing
//!   between the read and the write fails it, and it reads again.
//!
//! A submission that arrives after an erasure writes its details: the reporter gave them again.

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use serde::{Deserialize, Serialize};

use crate::wire::Contact;

/// Read-then-write rounds for one contact write while other writes to the same key keep
/// landing between its read and its write.
pub const CONTACT_WRITE_ATTEMPTS_MAX: usize = 4;

/// A reporter's contact details as the bucket holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredContact {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    /// When the submission that gave them arrived (Unix milliseconds; 0 in values written
    /// before it was kept: older than any submission).
    #[serde(default)]
    pub arrived_ms: i64,
}

/// What a contact write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContactWrite {
    Written,
    /// Not written: the reporter's details were erased at or after the submission arrived.
    ErasedSince,
    /// Not written: the bucket holds details of a submission that arrived later.
    Superseded,
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
    #[error("encode the contact details of {reporter}: {source}")]
    Encode {
        reporter: uuid::Uuid,
        source: serde_json::Error,
    },
    #[error(
        "write the contact details of {reporter}: other writes to the key won \
         {CONTACT_WRITE_ATTEMPTS_MAX} times"
    )]
    Contended { reporter: uuid::Uuid },
}

/// Writes `contact` for `reporter`, given by a submission that arrived at `arrived_ms` (Unix
/// milliseconds, wall clock: the stream's timestamp for a durable submission, so a
/// redelivery keeps its first arrival), unless the key holds an erasure made since or the
/// details of a later submission.
pub async fn write_contact(
    bucket: &kv::Store,
    reporter: uuid::Uuid,
    contact: &Contact,
    arrived_ms: i64,
) -> Result<ContactWrite, ContactWriteError> {
    let key = reporter.to_string();
    let value = serde_json::to_vec(&StoredContact {
        name: contact.name.clone(),
        phone: contact.phone.clone(),
        arrived_ms,
    })
    .map_err(|source| ContactWriteError::Encode { reporter, source })?;
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
            Some(entry) => {
                // A value that does not read as details is overwritten.
                let held_arrived_ms = serde_json::from_slice::<StoredContact>(&entry.value)
                    .map_or(i64::MIN, |held| held.arrived_ms);
                if held_arrived_ms > arrived_ms {
                    return Ok(ContactWrite::Superseded);
                }
                entry.revision
            }
            // Never written: the write expects no message on the key (revision 0).
            None => 0,
        };
        match bucket
            .update(key.as_str(), value.clone().into(), revision)
            .await
        {
            Ok(_) => return Ok(ContactWrite::Written),
            Err(error) if error.kind() == UpdateErrorKind::WrongLastRevision => continue,
            Err(source) => return Err(ContactWriteError::Write { reporter, source }),
        }
    }
    Err(ContactWriteError::Contended { reporter })
}
