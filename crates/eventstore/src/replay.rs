//! Bulk replay for rebuilds and audits: an ephemeral pull consumer without acks, read in
//! bounded batches up to a sequence fixed before reading starts, so a replay always ends.

use std::ops::ControlFlow;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::StreamExt as _;

use crate::codec::EventCodec;
use crate::envelope::{RecordedCommit, datetime_to_ms, decode_commit};
use crate::error::LoadError;
use crate::store::EventStore;

/// Longest wait for one message during a replay.
const REPLAY_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server keeps an idle replay consumer after its reader is gone.
const REPLAY_CONSUMER_INACTIVE: Duration = Duration::from_secs(30);

/// Which part of the stream to replay.
#[derive(Debug, Clone, Copy)]
pub struct ReplayRange {
    /// Start after this stream sequence (0: from the beginning).
    pub after_sequence: u64,
    /// Stop at this sequence (`None`: the stream's last sequence when the replay starts).
    pub until_sequence: Option<u64>,
    /// Messages per pull request.
    pub batch_max: usize,
}

impl Default for ReplayRange {
    fn default() -> Self {
        ReplayRange {
            after_sequence: 0,
            until_sequence: None,
            batch_max: 1_000,
        }
    }
}

impl<C: EventCodec> EventStore<C> {
    /// The stream's last sequence now.
    pub async fn last_sequence(&self) -> Result<u64, LoadError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|error| LoadError::Read {
                subject: self.spec.all_subjects(),
                reason: error.to_string(),
            })?;
        Ok(info.state.last_sequence)
    }

    /// The first stream sequence the server stored at or after `time_ms` (UTC milliseconds),
    /// or `None` when nothing was stored since. Lets audits and exports start at a time
    /// without reading the history before it.
    pub async fn first_sequence_since(&self, time_ms: i64) -> Result<Option<u64>, LoadError> {
        let subject = self.spec.all_subjects();
        let read_error = |reason: String| LoadError::Read {
            subject: subject.clone(),
            reason,
        };
        let start_time =
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(time_ms) * 1_000_000)
                .map_err(|error| read_error(format!("time {time_ms} ms: {error}")))?;
        let consumer = self
            .stream
            .create_consumer(consumer::pull::Config {
                filter_subject: subject.clone(),
                ack_policy: consumer::AckPolicy::None,
                deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
                inactive_threshold: REPLAY_CONSUMER_INACTIVE,
                ..Default::default()
            })
            .await
            .map_err(|error| read_error(error.to_string()))?;
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .messages()
            .await
            .map_err(|error| read_error(error.to_string()))?;
        let first = match tokio::time::timeout(REPLAY_MESSAGE_TIMEOUT, batch.next()).await {
            Err(_) => return Err(read_error("no answer to a one-message fetch".to_owned())),
            Ok(None) => None,
            Ok(Some(message)) => {
                let message = message.map_err(|error| read_error(error.to_string()))?;
                let info = message
                    .info()
                    .map_err(|error| read_error(error.to_string()))?;
                Some(info.stream_sequence)
            }
        };
        let _ = self
            .stream
            .delete_consumer(&consumer.cached_info().name)
            .await;
        Ok(first)
    }

    /// Calls `apply` with every commit in `range`, in stream order; returns the last sequence
    /// replayed. A commit that does not decode stops the replay with its sequence: an audit
    /// or rebuild must not silently skip history.
    pub async fn replay(
        &self,
        range: ReplayRange,
        mut apply: impl FnMut(RecordedCommit<C::Event>),
    ) -> Result<u64, LoadError> {
        self.replay_until_break(range, |commit| {
            apply(commit);
            ControlFlow::Continue(())
        })
        .await
    }

    /// [`EventStore::replay`] that `apply` can stop: after it returns
    /// [`ControlFlow::Break`] nothing more is read (an export whose reader went away must not
    /// read the rest of the stream). Returns the last sequence handed to `apply`.
    pub async fn replay_until_break(
        &self,
        range: ReplayRange,
        mut apply: impl FnMut(RecordedCommit<C::Event>) -> ControlFlow<()>,
    ) -> Result<u64, LoadError> {
        let subject = self.spec.all_subjects();
        let read_error = |reason: String| LoadError::Read {
            subject: subject.clone(),
            reason,
        };
        let until = match range.until_sequence {
            Some(until) => until,
            None => self.last_sequence().await?,
        };
        if until <= range.after_sequence {
            return Ok(range.after_sequence);
        }
        let consumer = self
            .stream
            .create_consumer(consumer::pull::Config {
                filter_subject: subject.clone(),
                ack_policy: consumer::AckPolicy::None,
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: range.after_sequence + 1,
                },
                inactive_threshold: REPLAY_CONSUMER_INACTIVE,
                ..Default::default()
            })
            .await
            .map_err(|error| read_error(error.to_string()))?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(range.batch_max)
            .messages()
            .await
            .map_err(|error| read_error(error.to_string()))?;
        let no_headers = async_nats::HeaderMap::new();
        let mut last = range.after_sequence;
        while last < until {
            let message = tokio::time::timeout(REPLAY_MESSAGE_TIMEOUT, messages.next())
                .await
                .map_err(|_| {
                    read_error(format!(
                        "no message within {REPLAY_MESSAGE_TIMEOUT:?} at sequence {last}"
                    ))
                })?
                .ok_or_else(|| read_error("message stream ended".to_owned()))?
                .map_err(|error| read_error(error.to_string()))?;
            let info = message
                .info()
                .map_err(|error| read_error(error.to_string()))?;
            let sequence = info.stream_sequence;
            let stored_at_ms = datetime_to_ms(info.published);
            if sequence > until {
                break;
            }
            let headers = message.headers.as_ref().unwrap_or(&no_headers);
            let commit = decode_commit(
                &self.codec,
                sequence,
                stored_at_ms,
                &message.subject,
                headers,
                &message.payload,
            )
            .map_err(|source| LoadError::Corrupt {
                subject: message.subject.to_string(),
                sequence,
                source,
            })?;
            last = sequence;
            if apply(commit).is_break() {
                break;
            }
        }
        let _ = self
            .stream
            .delete_consumer(&consumer.cached_info().name)
            .await;
        Ok(last)
    }
}
