//! The KV side: generation buckets, the pointer to the current one, bulk loads and bounded
//! concurrent writes.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use futures::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};

use crate::fold::Rendered;
use crate::keys;
use crate::wire::Checkpoint;

/// KV puts awaited concurrently in one flush.
pub const KV_WRITES_IN_FLIGHT_MAX: usize = 1_024;
/// Longest wait for one message while loading a bucket.
const LOAD_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages per pull request while loading a bucket.
const LOAD_BATCH_MAX: usize = 1_000;
/// How long the server keeps a load consumer whose reader is gone.
const LOAD_CONSUMER_INACTIVE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bucket {bucket}: {action}: {reason}")]
    Bucket {
        bucket: String,
        action: &'static str,
        reason: String,
    },
    #[error("bucket {bucket}: write {key}: {reason}")]
    Write {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error("bucket {bucket}: value of {key} does not decode: {reason}")]
    Decode {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error(
        "bucket {bucket}: the checkpoint is no longer at revision {expected:?}: another builder wrote it"
    )]
    Fenced {
        bucket: String,
        expected: Option<u64>,
    },
    #[error(
        "the current generation changed under us (expected revision {expected:?}): another writer swapped first (a first service start, or a rebuild that took over this one's claim)"
    )]
    SwapConflict { expected: Option<u64> },
    #[error(
        "another rebuild ({holder}) is building generation {generation} (claim renewed {silent_s} s \
         ago, key `rebuild` of bucket PROJECTION); a second one would empty its bucket. Wait for \
         it; if it died, its claim is taken over once it has not been renewed for {} s",
        crate::claim::REBUILD_CLAIM_STALE_AFTER.as_secs()
    )]
    RebuildClaimed {
        generation: u64,
        holder: String,
        silent_s: i64,
    },
    #[error(
        "the rebuild of generation {generation} lost its claim: it was not renewed for {} s and \
         another rebuild took it over; this one stops",
        crate::claim::REBUILD_CLAIM_STALE_AFTER.as_secs()
    )]
    RebuildClaimLost { generation: u64 },
}

fn bucket_error<'a>(bucket: &'a str, action: &'static str) -> impl Fn(String) -> StoreError + 'a {
    move |reason| StoreError::Bucket {
        bucket: bucket.to_owned(),
        action,
        reason,
    }
}

/// What the meta bucket's `current` key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    pub generation: u64,
    /// When this generation became current, UTC milliseconds.
    pub swapped_at_ms: i64,
}

fn kv_config(bucket: &str, replicas: usize, description: &str) -> kv::Config {
    kv::Config {
        bucket: bucket.to_owned(),
        description: description.to_owned(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Longest wait for a bucket just created (or opened while its stream elects a leader) to
/// answer a read: on a cluster, a replicated bucket's reads find no responders until its
/// replicas are up.
pub const BUCKET_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two reads of a bucket that is not answering yet.
const BUCKET_READY_POLL: Duration = Duration::from_millis(50);
/// The key read to learn that a bucket answers (it need not exist).
const READY_PROBE_KEY: &str = "ready-probe";

/// Returns `store` once it answers a read, or the last read's error after
/// [`BUCKET_READY_TIMEOUT`].
async fn answering(store: kv::Store, bucket: &str) -> Result<kv::Store, StoreError> {
    let deadline = tokio::time::Instant::now() + BUCKET_READY_TIMEOUT;
    loop {
        match store.entry(READY_PROBE_KEY).await {
            Ok(_) => return Ok(store),
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(bucket_error(bucket, "wait for it to answer reads")(
                    format!("{error} (still after {BUCKET_READY_TIMEOUT:?})"),
                ));
            }
            Err(_) => tokio::time::sleep(BUCKET_READY_POLL).await,
        }
    }
}

/// Opens (creating if needed) a bucket, once it answers reads.
pub async fn open_bucket(
    jetstream: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<kv::Store, StoreError> {
    let store = match jetstream.get_key_value(bucket).await {
        Ok(store) => store,
        Err(_) => jetstream
            .create_key_value(kv_config(bucket, replicas, "wangge read models"))
            .await
            .map_err(|error| bucket_error(bucket, "create")(error.to_string()))?,
    };
    answering(store, bucket).await
}

/// Opens an existing bucket (readers never create one).
pub async fn existing_bucket(
    jetstream: &jetstream::Context,
    bucket: &str,
) -> Result<kv::Store, StoreError> {
    jetstream
        .get_key_value(bucket)
        .await
        .map_err(|error| bucket_error(bucket, "open")(error.to_string()))
}

/// Deletes `bucket` if it exists, then creates it empty.
pub async fn fresh_bucket(
    jetstream: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<kv::Store, StoreError> {
    if jetstream.get_key_value(bucket).await.is_ok() {
        delete_bucket(jetstream, bucket).await?;
    }
    let store = jetstream
        .create_key_value(kv_config(bucket, replicas, "wangge read models"))
        .await
        .map_err(|error| bucket_error(bucket, "create")(error.to_string()))?;
    answering(store, bucket).await
}

pub async fn delete_bucket(jetstream: &jetstream::Context, bucket: &str) -> Result<(), StoreError> {
    jetstream
        .delete_key_value(bucket)
        .await
        .map(|_| ())
        .map_err(|error| bucket_error(bucket, "delete")(error.to_string()))
}

/// The current generation and the meta key's revision (for the swap's compare-and-set).
pub async fn read_pointer(meta: &kv::Store) -> Result<Option<(Pointer, u64)>, StoreError> {
    let entry = meta
        .entry(keys::CURRENT)
        .await
        .map_err(|error| bucket_error(keys::META_BUCKET, "read current")(error.to_string()))?;
    let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
        return Ok(None);
    };
    let pointer = serde_json::from_slice(&entry.value).map_err(|error| StoreError::Decode {
        bucket: keys::META_BUCKET.to_owned(),
        key: keys::CURRENT.to_owned(),
        reason: error.to_string(),
    })?;
    Ok(Some((pointer, entry.revision)))
}

/// Points `current` at `pointer` if the key is still at `expected` (`None`: absent).
pub async fn swap_pointer(
    meta: &kv::Store,
    pointer: Pointer,
    expected: Option<u64>,
) -> Result<u64, StoreError> {
    let value: bytes::Bytes = serde_json::to_vec(&pointer)
        .expect("pointer serialises")
        .into();
    let result = match expected {
        None => meta.create(keys::CURRENT, value).await.map_err(|error| {
            (
                error.kind() == kv::CreateErrorKind::AlreadyExists,
                error.to_string(),
            )
        }),
        Some(revision) => meta
            .update(keys::CURRENT, value, revision)
            .await
            .map_err(|error| {
                (
                    error.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    error.to_string(),
                )
            }),
    };
    match result {
        Ok(revision) => Ok(revision),
        Err((true, _)) => Err(StoreError::SwapConflict { expected }),
        Err((false, reason)) => Err(bucket_error(keys::META_BUCKET, "swap current")(reason)),
    }
}

/// The latest value of every key under `prefix` (`""`: every key), read with one ephemeral
/// pull consumer on the bucket's stream (last message per subject).
pub async fn load_prefix(
    jetstream: &jetstream::Context,
    bucket: &str,
    prefix: &str,
) -> Result<Vec<(String, bytes::Bytes)>, StoreError> {
    let error = bucket_error(bucket, "load");
    let stream = jetstream
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| error(e.to_string()))?;
    let subject_prefix = format!("$KV.{bucket}.");
    let filter_subject = if prefix.is_empty() {
        format!("{subject_prefix}>")
    } else {
        format!("{subject_prefix}{prefix}.>")
    };
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject,
            ack_policy: consumer::AckPolicy::None,
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            inactive_threshold: LOAD_CONSUMER_INACTIVE,
            ..Default::default()
        })
        .await
        .map_err(|e| error(e.to_string()))?;
    let pending = consumer.cached_info().num_pending;
    let mut values = Vec::with_capacity(usize::try_from(pending).unwrap_or(0));
    if pending > 0 {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(LOAD_BATCH_MAX)
            .messages()
            .await
            .map_err(|e| error(e.to_string()))?;
        while (values.len() as u64) < pending {
            let message = tokio::time::timeout(LOAD_MESSAGE_TIMEOUT, messages.next())
                .await
                .map_err(|_| error(format!("no message within {LOAD_MESSAGE_TIMEOUT:?}")))?
                .ok_or_else(|| error("message stream ended".to_owned()))?
                .map_err(|e| error(e.to_string()))?;
            let deleted = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() != "PUT");
            let pending_after = message.info().map(|info| info.pending).unwrap_or(1);
            if !deleted {
                let key = message
                    .subject
                    .as_str()
                    .strip_prefix(&subject_prefix)
                    .unwrap_or(message.subject.as_str())
                    .to_owned();
                values.push((key, message.payload.clone()));
            } else {
                values.push((String::new(), bytes::Bytes::new()));
            }
            if pending_after == 0 {
                break;
            }
        }
        values.retain(|(key, _)| !key.is_empty());
    }
    let _ = stream.delete_consumer(&consumer.cached_info().name).await;
    Ok(values)
}

/// Reads and decodes one key; `None` when absent.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    store: &kv::Store,
    bucket: &str,
    key: &str,
) -> Result<Option<T>, StoreError> {
    let value = store
        .get(key)
        .await
        .map_err(|error| bucket_error(bucket, "get")(format!("{key}: {error}")))?;
    value
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|error| StoreError::Decode {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                reason: error.to_string(),
            })
        })
        .transpose()
}

/// Writes `values` with at most [`KV_WRITES_IN_FLIGHT_MAX`] puts in flight.
pub async fn put_all(
    store: &kv::Store,
    bucket: &str,
    values: Vec<(String, bytes::Bytes)>,
) -> Result<(), StoreError> {
    futures::stream::iter(values.into_iter().map(|(key, value)| async move {
        store
            .put(&key, value)
            .await
            .map(|_| ())
            .map_err(|error| StoreError::Write {
                bucket: bucket.to_owned(),
                key,
                reason: error.to_string(),
            })
    }))
    .buffer_unordered(KV_WRITES_IN_FLIGHT_MAX)
    .try_collect::<Vec<()>>()
    .await
    .map(|_| ())
}

/// Writes one flush in the order recovery relies on: aggregates, incident values, then the
/// checkpoint. Each write is acknowledged by the server before the next group starts.
pub async fn write_flush(
    store: &kv::Store,
    bucket: &str,
    rendered: Rendered,
    checkpoint: Option<Checkpoint>,
) -> Result<(), StoreError> {
    put_all(store, bucket, rendered.models).await?;
    put_all(store, bucket, rendered.incidents).await?;
    if let Some(checkpoint) = checkpoint {
        let value = serde_json::to_vec(&checkpoint).expect("checkpoint serialises");
        put_all(
            store,
            bucket,
            vec![(keys::CHECKPOINT.to_owned(), value.into())],
        )
        .await?;
    }
    Ok(())
}

/// The checkpoint's value and revision (`None`, `None`: never written).
pub async fn checkpoint_entry(
    store: &kv::Store,
    bucket: &str,
) -> Result<(Option<Checkpoint>, Option<u64>), StoreError> {
    let entry = store
        .entry(keys::CHECKPOINT)
        .await
        .map_err(|error| bucket_error(bucket, "get")(format!("{}: {error}", keys::CHECKPOINT)))?;
    let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
        return Ok((None, None));
    };
    let checkpoint = serde_json::from_slice(&entry.value).map_err(|error| StoreError::Decode {
        bucket: bucket.to_owned(),
        key: keys::CHECKPOINT.to_owned(),
        reason: error.to_string(),
    })?;
    Ok((Some(checkpoint), Some(entry.revision)))
}

/// [`write_flush`] for the builder: the checkpoint is written only if it is still at
/// `expected` (`None`: absent), so a builder that lost its lease and still writes is refused
/// ([`StoreError::Fenced`]) as soon as another builder has stored a checkpoint. Returns the
/// checkpoint's new revision.
pub async fn write_flush_fenced(
    store: &kv::Store,
    bucket: &str,
    rendered: Rendered,
    checkpoint: Checkpoint,
    expected: Option<u64>,
) -> Result<u64, StoreError> {
    put_all(store, bucket, rendered.models).await?;
    put_all(store, bucket, rendered.incidents).await?;
    let value: bytes::Bytes = serde_json::to_vec(&checkpoint)
        .expect("checkpoint serialises")
        .into();
    let written = match expected {
        None => store
            .create(keys::CHECKPOINT, value)
            .await
            .map_err(|error| {
                (
                    error.kind() == kv::CreateErrorKind::AlreadyExists,
                    error.to_string(),
                )
            }),
        Some(revision) => store
            .update(keys::CHECKPOINT, value, revision)
            .await
            .map_err(|error| {
                (
                    error.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    error.to_string(),
                )
            }),
    };
    match written {
        Ok(revision) => Ok(revision),
        Err((true, _)) => Err(StoreError::Fenced {
            bucket: bucket.to_owned(),
            expected,
        }),
        Err((false, reason)) => Err(StoreError::Write {
            bucket: bucket.to_owned(),
            key: keys::CHECKPOINT.to_owned(),
            reason,
        }),
    }
}
