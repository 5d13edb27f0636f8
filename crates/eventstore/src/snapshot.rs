//! Snapshots of state in a NATS KV bucket, written with revision compare-and-set so two
//! instances never overwrite each other's newer snapshot. A snapshot that no longer decodes
//! (the state type changed) is treated as absent: the caller replays from the start.

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tracing::warn;

use crate::envelope::Position;
use crate::error::OpenError;

/// Largest snapshot value; below the server's default 1 MiB `max_payload`. Larger states
/// must be split over several keys by the caller.
pub const SNAPSHOT_BYTES_MAX: usize = 1000 * 1024;

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotEnvelopeV1 {
    /// The caller's state format; a mismatch means "replay instead".
    state_format: u16,
    position: Position,
    state: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {key}: encode: {reason}")]
    Encode { key: String, reason: String },
    #[error("snapshot {key}: {bytes} bytes, more than {SNAPSHOT_BYTES_MAX}")]
    TooLarge { key: String, bytes: usize },
    #[error(
        "snapshot {key}: someone else wrote revision {current:?} first (expected {expected:?})"
    )]
    Conflict {
        key: String,
        expected: Option<u64>,
        current: Option<u64>,
    },
    #[error("snapshot {key}: {reason}")]
    Kv { key: String, reason: String },
}

/// What [`SnapshotStore::read`] found.
#[derive(Debug)]
pub struct SnapshotRead<S> {
    /// The state and the stream position it reflects; `None` when absent or undecodable.
    pub snapshot: Option<(S, Position)>,
    /// The KV revision to pass to the next [`SnapshotStore::write`].
    pub revision: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct SnapshotStore {
    bucket: String,
    kv: kv::Store,
}

impl SnapshotStore {
    pub async fn open(
        jetstream: &jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<SnapshotStore, OpenError> {
        let kv = match jetstream.get_key_value(bucket).await {
            Ok(kv) => kv,
            Err(_) => jetstream
                .create_key_value(kv::Config {
                    bucket: bucket.to_owned(),
                    description: "wangge snapshots".to_owned(),
                    history: 1,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|error| OpenError::Bucket {
                    bucket: bucket.to_owned(),
                    reason: error.to_string(),
                })?,
        };
        Ok(SnapshotStore {
            bucket: bucket.to_owned(),
            kv,
        })
    }

    /// The keys of the bucket that begin with `prefix` (at most `keys_max`; more is an
    /// error, so a caller never works on part of a list it believes whole).
    pub async fn keys_with_prefix(
        &self,
        prefix: &str,
        keys_max: usize,
    ) -> Result<Vec<String>, SnapshotError> {
        use futures::StreamExt as _;
        let kv_error = |reason: String| SnapshotError::Kv {
            key: format!("{prefix}*"),
            reason,
        };
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|error| kv_error(format!("list keys: {error}")))?;
        let mut found = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|error| kv_error(format!("list keys: {error}")))?;
            if key.starts_with(prefix) {
                if found.len() == keys_max {
                    return Err(kv_error(format!("more than {keys_max} keys")));
                }
                found.push(key);
            }
        }
        Ok(found)
    }

    /// Removes `key` with its history.
    pub async fn purge(&self, key: &str) -> Result<(), SnapshotError> {
        self.kv.purge(key).await.map_err(|error| SnapshotError::Kv {
            key: key.to_owned(),
            reason: format!("purge: {error}"),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub async fn read<S: DeserializeOwned>(
        &self,
        key: &str,
        state_format: u16,
    ) -> Result<SnapshotRead<S>, SnapshotError> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|error| SnapshotError::Kv {
                key: key.to_owned(),
                reason: error.to_string(),
            })?;
        let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
            return Ok(SnapshotRead {
                snapshot: None,
                revision: None,
            });
        };
        let revision = Some(entry.revision);
        let decoded = postcard::from_bytes::<SnapshotEnvelopeV1>(&entry.value)
            .map_err(|error| error.to_string())
            .and_then(|envelope| {
                if envelope.state_format != state_format {
                    return Err(format!(
                        "state format {} is not {state_format}",
                        envelope.state_format
                    ));
                }
                let state = postcard::from_bytes::<S>(&envelope.state)
                    .map_err(|error| error.to_string())?;
                Ok((state, envelope.position))
            });
        match decoded {
            Ok(snapshot) => Ok(SnapshotRead {
                snapshot: Some(snapshot),
                revision,
            }),
            Err(reason) => {
                warn!(bucket = %self.bucket, %key, %reason, "snapshot does not decode; falling back to full replay");
                Ok(SnapshotRead {
                    snapshot: None,
                    revision,
                })
            }
        }
    }

    /// Writes a snapshot if the key is still at `expected_revision` (`None`: must not exist).
    /// Returns the new revision.
    pub async fn write<S: Serialize>(
        &self,
        key: &str,
        state_format: u16,
        state: &S,
        position: Position,
        expected_revision: Option<u64>,
    ) -> Result<u64, SnapshotError> {
        let encode = |error: postcard::Error| SnapshotError::Encode {
            key: key.to_owned(),
            reason: error.to_string(),
        };
        let state = postcard::to_allocvec(state).map_err(encode)?;
        let value = postcard::to_allocvec(&SnapshotEnvelopeV1 {
            state_format,
            position,
            state,
        })
        .map_err(encode)?;
        if value.len() > SNAPSHOT_BYTES_MAX {
            return Err(SnapshotError::TooLarge {
                key: key.to_owned(),
                bytes: value.len(),
            });
        }
        self.write_raw(key, value.into(), expected_revision).await
    }

    /// Writes raw bytes under CAS (also used by tests to plant a corrupt snapshot).
    pub async fn write_raw(
        &self,
        key: &str,
        value: bytes::Bytes,
        expected_revision: Option<u64>,
    ) -> Result<u64, SnapshotError> {
        let result = match expected_revision {
            None => self.kv.create(key, value).await.map_err(|error| {
                (
                    error.kind() == kv::CreateErrorKind::AlreadyExists,
                    error.to_string(),
                )
            }),
            Some(revision) => self.kv.update(key, value, revision).await.map_err(|error| {
                (
                    error.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    error.to_string(),
                )
            }),
        };
        match result {
            Ok(revision) => Ok(revision),
            Err((true, _)) => {
                let current = self
                    .kv
                    .entry(key)
                    .await
                    .ok()
                    .flatten()
                    .map(|entry| entry.revision);
                Err(SnapshotError::Conflict {
                    key: key.to_owned(),
                    expected: expected_revision,
                    current,
                })
            }
            Err((false, reason)) => Err(SnapshotError::Kv {
                key: key.to_owned(),
                reason,
            }),
        }
    }
}
