//! Bulk replay for rebuilds and audits: an ephemeral pull consumer without acks, read in
//! bounded batches up to a sequence fixed before reading starts, so a replay always ends.

use std::ops::ControlFlow;
use std::time::Duration;

use async_nats::jetstream::consumer;
use async_nats::jetstream::stream::RawMessageErrorKind;
use futures::StreamExt as _;
use tracing::warn;

use crate::codec::EventCodec;
use crate::envelope::{RecordedCommit, carries_envelope, datetime_to_ms, decode_commit};
use crate::error::LoadError;
use crate::store::EventStore;

/// Longest wait for one message during a replay.
const REPLAY_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the stream leader to say which message follows a sequence.
const SEQUENCE_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
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

    /// When the server stored the message at `sequence` (UTC milliseconds, whether it is a
    /// commit or not), asked of the stream leader; `None` when no message is stored there.
    pub async fn stored_at_ms(&self, sequence: u64) -> Result<Option<i64>, LoadError> {
        match self.stream.get_raw_message(sequence).await {
            Ok(message) => Ok(Some(datetime_to_ms(message.time))),
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(LoadError::Read {
                subject: self.spec.all_subjects(),
                reason: format!("read sequence {sequence}: {error}"),
            }),
        }
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
    /// or rebuild must not silently skip history. A message that is not a commit at all (neither
    /// a `Wangge-Version` header nor a commit body) is logged and skipped.
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
    /// read the rest of the stream). Returns the last sequence read: the last one handed to
    /// `apply`, or a message after it that was skipped as not a commit.
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
        let consumer_name = consumer.cached_info().name.clone();
        // Nothing stored in the range (its sequences were deleted): nothing to wait for.
        if consumer.cached_info().num_pending == 0 {
            let _ = self.stream.delete_consumer(&consumer_name).await;
            return Ok(range.after_sequence);
        }
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(range.batch_max)
            .messages()
            .await
            .map_err(|error| read_error(error.to_string()))?;
        let no_headers = async_nats::HeaderMap::new();
        let mut last = range.after_sequence;
        // The replay ends on what the server says, not on a silence: when a message says
        // nothing is pending after it, or one past `until` arrives. The last sequences of
        // the range may have been deleted (or lost from a damaged block file), and waiting for
        // them ended in a timeout error. A silence is checked with the stream leader: nothing
        // stored up to `until` ends the replay too; anything else is an error.
        while last < until {
            let message = match tokio::time::timeout(REPLAY_MESSAGE_TIMEOUT, messages.next()).await
            {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => return Err(read_error(error.to_string())),
                Ok(None) => return Err(read_error("message stream ended".to_owned())),
                Err(_) => match self.first_stored_from(last + 1).await {
                    Ok(Some(stored)) if stored <= until => {
                        return Err(read_error(format!(
                            "no message within {REPLAY_MESSAGE_TIMEOUT:?} after sequence {last} \
                             although the server holds sequence {stored}"
                        )));
                    }
                    Ok(_) => break,
                    Err(reason) => {
                        return Err(read_error(format!(
                            "no message within {REPLAY_MESSAGE_TIMEOUT:?} after sequence \
                             {last}, and asking the server what follows failed: {reason}"
                        )));
                    }
                },
            };
            let info = message
                .info()
                .map_err(|error| read_error(error.to_string()))?;
            let sequence = info.stream_sequence;
            let stored_at_ms = datetime_to_ms(info.published);
            if sequence > until {
                break;
            }
            let headers = message.headers.as_ref().unwrap_or(&no_headers);
            if !carries_envelope(Some(headers), &message.payload) {
                // Not history: a message some other client published on the stream's
                // subjects. Stopping on it stopped every rebuild and audit replay for good
                // (the streams deny deletes); `wangge audit verify` reports it.
                warn!(subject = %message.subject, sequence, "a message that is not a commit (no Wangge-Version header, no commit body) skipped");
                last = sequence;
                if info.pending == 0 {
                    break;
                }
                continue;
            }
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
            if apply(commit).is_break() || info.pending == 0 {
                break;
            }
        }
        let _ = self.stream.delete_consumer(&consumer_name).await;
        Ok(last)
    }

    /// The sequence of the first message stored at or after `sequence`, asked of the stream
    /// leader (not a replica's direct get: an audit takes the leader's word); `None` when
    /// there is none. Tells a deleted tail from a stalled consumer.
    pub(crate) async fn first_stored_from(&self, sequence: u64) -> Result<Option<u64>, String> {
        let request = self
            .stream
            .raw_message_builder()
            .sequence(sequence)
            .next_by_subject(self.spec.all_subjects())
            .send();
        match tokio::time::timeout(SEQUENCE_PROBE_TIMEOUT, request).await {
            Ok(Ok(message)) => Ok(Some(message.sequence)),
            Ok(Err(error)) if error.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {SEQUENCE_PROBE_TIMEOUT:?}")),
        }
    }
}
