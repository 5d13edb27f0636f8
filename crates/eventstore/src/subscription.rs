//! Catch-up subscriptions: a durable pull consumer with explicit acks, read in bounded
//! batches, that survives the pull stream ending (`RequestLimitExceeded`, missed heartbeats)
//! and server restarts by re-creating the stream or the consumer. A consumer with one reader
//! ([`Readers::One`]) is also *in order with nothing skipped*: what the server sent to a pull
//! stream that broke is lost with it, and only a rewind brings it back before newer commits.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use tracing::{debug, warn};

use crate::codec::EventCodec;
use crate::envelope::{DecodeCommitError, RecordedCommit, datetime_to_ms, decode_commit};
use crate::store::EventStore;

/// Longest wait between attempts to re-establish a broken subscription.
const RESUBSCRIBE_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// First wait before re-establishing a broken subscription.
const RESUBSCRIBE_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// With [`Acks::Cumulative`], at most this many settled deliveries go without an ack on the
/// wire (one ack then covers them all).
pub const CUMULATIVE_ACK_EVERY_DELIVERIES: usize = 256;
/// With [`Acks::Cumulative`], a caught-up subscription acks what it settled at most this
/// long after the first delivery the ack covers: sent from [`Subscription::settle`] or, when
/// no more deliveries come, from [`Subscription::next`] while it waits. At a moderate rate a
/// follower is caught up after almost every delivery; acking each then would cost the server
/// one ack per commit per follower, as explicit acks do.
pub const CUMULATIVE_ACK_LINGER: Duration = Duration::from_millis(100);

/// Who reads a durable consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readers {
    /// Only this subscription: it then hands out commits in stream order with nothing
    /// skipped. A delivery the server made but this process never received (lost with a
    /// pull stream that broke, e.g. while a cluster elected a new leader) shows as a gap in
    /// the consumer sequence; the subscription then *rewinds*: it deletes the consumer and
    /// makes it again after the last stream sequence it handed out. Without this a lost
    /// delivery would come back only after `ack_wait`, behind newer commits (a fold that
    /// skips what its aggregate already reflects would drop it), or, with
    /// [`Acks::Cumulative`], never: a later ack covers it.
    One,
    /// Several processes share the consumer (a work queue): each sees gaps by design, so
    /// order is not checked; a lost delivery comes back after `ack_wait`.
    Shared,
}

/// How a subscription acknowledges what it has applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// One ack per delivery (`AckPolicy::Explicit`): for consumers that may leave a delivery
    /// unacknowledged on purpose while acking later ones.
    EachMessage,
    /// `AckPolicy::All`: an ack covers every earlier delivery, so [`Subscription::settle`]
    /// sends one every [`CUMULATIVE_ACK_EVERY_DELIVERIES`] and whenever it is caught up. For
    /// subscribers whose fold skips what it already holds: a lost or skipped ack only costs a
    /// redelivery after `ack_wait`. Saves the server an ack per commit per follower.
    Cumulative,
}

#[derive(Debug, Clone)]
pub struct SubscriptionConfig {
    /// Durable consumer name; the server keeps its position across restarts.
    pub durable_name: String,
    /// Subject filter; defaults to every aggregate of the context.
    pub filter_subject: Option<String>,
    /// Start after this stream sequence when the consumer is created (a checkpoint kept with a
    /// read model). Ignored when the durable consumer already exists: the server's position wins.
    pub start_after_sequence: u64,
    /// Messages per pull request.
    pub batch_max: usize,
    /// Unacknowledged messages the server lets this consumer have out.
    pub ack_pending_max: i64,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Remove the consumer when no one has pulled from it for this long (a private consumer
    /// of a service instance that crashed). `None`: the consumer lives until deleted.
    pub inactive_threshold: Option<Duration>,
    /// One ack per delivery, or cumulative acks (see [`Acks`]).
    pub acks: Acks,
    /// One reader (in order, rewinds on a lost delivery) or shared (see [`Readers`]).
    pub readers: Readers,
}

/// Turns free text (an instance name) into a valid consumer-name fragment: `[A-Za-z0-9_-]`,
/// other characters replaced by `_`, at most 64 characters.
pub fn consumer_name_fragment(name: &str) -> String {
    const FRAGMENT_CHARS_MAX: usize = 64;
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(FRAGMENT_CHARS_MAX)
        .collect()
}

impl SubscriptionConfig {
    /// A follower private to one service instance: a durable consumer named after the
    /// instance plus a fresh UUID, starting after `start_after_sequence` (where the instance's
    /// start-up replay ended). The server removes it `inactive_threshold` after the instance
    /// stopped pulling, so a crashed instance leaves nothing behind; a clean stop deletes it
    /// with [`EventStore::delete_consumer`].
    pub fn private_follower(
        instance: &str,
        start_after_sequence: u64,
        inactive_threshold: Duration,
    ) -> SubscriptionConfig {
        let name = format!(
            "{}-{}",
            consumer_name_fragment(instance),
            uuid::Uuid::now_v7().simple()
        );
        let mut config = SubscriptionConfig::durable(name);
        config.start_after_sequence = start_after_sequence;
        config.inactive_threshold = Some(inactive_threshold);
        // A private follower folds into memory and skips what it holds: cumulative acks.
        config.acks = Acks::Cumulative;
        config.readers = Readers::One;
        config
    }

    /// A durable consumer that may be shared ([`Readers::Shared`]) with explicit acks; set
    /// `readers` to [`Readers::One`] when one process at a time reads it.
    pub fn durable(name: impl Into<String>) -> SubscriptionConfig {
        SubscriptionConfig {
            durable_name: name.into(),
            filter_subject: None,
            start_after_sequence: 0,
            batch_max: 1_000,
            ack_pending_max: 10_000,
            ack_wait: Duration::from_secs(30),
            inactive_threshold: None,
            acks: Acks::EachMessage,
            readers: Readers::Shared,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("delete consumer {consumer} of stream {stream}: {reason}")]
pub struct DeleteConsumerError {
    pub stream: String,
    pub consumer: String,
    pub reason: String,
}

impl<C: EventCodec> EventStore<C> {
    /// Deletes a consumer of this store's stream (a private follower, at a clean stop).
    pub async fn delete_consumer(&self, consumer: &str) -> Result<(), DeleteConsumerError> {
        let stream_name = &self.spec().stream_name;
        let error = |reason: String| DeleteConsumerError {
            stream: stream_name.clone(),
            consumer: consumer.to_owned(),
            reason,
        };
        let stream = self
            .jetstream()
            .get_stream(stream_name)
            .await
            .map_err(|e| error(e.to_string()))?;
        stream
            .delete_consumer(consumer)
            .await
            .map(|_| ())
            .map_err(|e| error(e.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("subscribe {durable}: create consumer: {reason}")]
    Consumer { durable: String, reason: String },
    #[error("subscribe {durable}: message at sequence {sequence} does not decode: {source}")]
    Decode {
        durable: String,
        sequence: u64,
        source: DecodeCommitError,
        message: Box<jetstream::Message>,
    },
    #[error("subscribe {durable}: message has no JetStream metadata: {reason}")]
    Metadata { durable: String, reason: String },
}

impl SubscribeError {
    /// A message on the stream's subjects that is not a commit at all (neither a
    /// `Wangge-Version` header nor a body that starts with [`crate::BODY_MAGIC`]: nothing
    /// wangge's event store writes lacks both), as opposed to a commit this
    /// build cannot read (an event type or body format from a newer build). A reader skips
    /// the first; what it does with the second is its own decision.
    pub fn is_foreign(&self) -> bool {
        match self {
            SubscribeError::Decode { message, .. } => {
                !crate::envelope::carries_envelope(message.headers.as_ref(), &message.payload)
            }
            _ => false,
        }
    }

    /// Skips a message that [is foreign](Self::is_foreign): logs it and acknowledges it (so it
    /// does not come back after every ack wait; under cumulative acks this covers the
    /// deliveries before it, which a reader handles in order). Any other error is handed back.
    pub async fn skip_if_foreign(self) -> Result<(), SubscribeError> {
        if !self.is_foreign() {
            return Err(self);
        }
        warn!(error = %self, "a message that is not a commit skipped");
        if let SubscribeError::Decode { message, .. } = self
            && let Err(error) = message.ack().await
        {
            debug!(%error, "ack of a skipped message lost; it comes back and is skipped again");
        }
        Ok(())
    }
}

/// One delivered commit; acknowledge it after its effects are stored.
#[derive(Debug)]
pub struct Delivery<E> {
    pub commit: RecordedCommit<E>,
    /// Messages the server still holds for this consumer after this one.
    pub pending: u64,
    /// The consumer's count of deliveries, this one included (redeliveries count).
    pub consumer_sequence: u64,
    message: jetstream::Message,
}

impl<E> Delivery<E> {
    /// Acknowledge: the server will not deliver this commit again (with [`Acks::Cumulative`],
    /// nor any delivered before it). A follower in a loop calls [`Subscription::settle`].
    pub async fn ack(&self) -> Result<(), async_nats::Error> {
        self.message.ack().await
    }

    /// Acknowledge and wait for the server to confirm; use where a lost ack would cost a
    /// redelivery that the caller cannot detect as already applied.
    pub async fn ack_confirmed(&self) -> Result<(), async_nats::Error> {
        self.message.double_ack().await
    }
}

/// A running catch-up subscription. Call [`Subscription::next`] in a loop.
pub struct Subscription<C: EventCodec> {
    store: EventStore<C>,
    config: SubscriptionConfig,
    consumer: Option<consumer::PullConsumer>,
    messages: Option<consumer::pull::Stream>,
    backoff: Duration,
    /// Deliveries settled since the last cumulative ack went out.
    settled_unacked: usize,
    /// [`Acks::Cumulative`]: the reply subject of the last settled delivery not yet acked
    /// (its ack covers every earlier one), and when that ack is due
    /// ([`CUMULATIVE_ACK_LINGER`] after the first delivery it covers was settled).
    lingering_ack: Option<(async_nats::Subject, tokio::time::Instant)>,
    /// [`Readers::One`]: consumer sequence of the last delivery received from the current
    /// consumer (`None` right after it was made).
    last_consumer_sequence: Option<u64>,
    /// [`Readers::One`]: highest stream sequence handed out (or the start position).
    last_stream_sequence: u64,
    /// [`Readers::One`]: a delivery was lost; remake the consumer after this stream sequence.
    rewind_after: Option<u64>,
    /// How many times the consumer was remade after a lost delivery.
    rewinds: u64,
}

impl<C: EventCodec> std::fmt::Debug for Subscription<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("config", &self.config)
            .field("connected", &self.messages.is_some())
            .finish_non_exhaustive()
    }
}

impl<C: EventCodec> EventStore<C> {
    /// Opens (creating if needed) a durable catch-up subscription on this context's stream.
    pub async fn subscribe(
        &self,
        config: SubscriptionConfig,
    ) -> Result<Subscription<C>, SubscribeError> {
        let config_start = config.start_after_sequence;
        let mut subscription = Subscription {
            store: self.clone(),
            config,
            consumer: None,
            messages: None,
            backoff: RESUBSCRIBE_BACKOFF_MIN,
            settled_unacked: 0,
            lingering_ack: None,
            last_consumer_sequence: None,
            last_stream_sequence: config_start,
            rewind_after: None,
            rewinds: 0,
        };
        subscription.ensure_consumer().await?;
        Ok(subscription)
    }
}

impl<C: EventCodec> Subscription<C> {
    async fn ensure_consumer(&mut self) -> Result<consumer::PullConsumer, SubscribeError> {
        if let Some(consumer) = &self.consumer {
            return Ok(consumer.clone());
        }
        let config = &self.config;
        let deliver_policy = if config.start_after_sequence == 0 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: config.start_after_sequence + 1,
            }
        };
        let consumer = self
            .store
            .stream
            .get_or_create_consumer(
                &config.durable_name,
                consumer::pull::Config {
                    durable_name: Some(config.durable_name.clone()),
                    filter_subject: config
                        .filter_subject
                        .clone()
                        .unwrap_or_else(|| self.store.spec.all_subjects()),
                    ack_policy: match config.acks {
                        Acks::EachMessage => consumer::AckPolicy::Explicit,
                        Acks::Cumulative => consumer::AckPolicy::All,
                    },
                    deliver_policy,
                    ack_wait: config.ack_wait,
                    max_ack_pending: config.ack_pending_max,
                    inactive_threshold: config.inactive_threshold.unwrap_or_default(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|error| SubscribeError::Consumer {
                durable: config.durable_name.clone(),
                reason: error.to_string(),
            })?;
        self.consumer = Some(consumer.clone());
        self.last_consumer_sequence = None;
        Ok(consumer)
    }

    /// Deletes the consumer (a missing one is fine) so that the next [`Self::ensure_consumer`]
    /// makes it afresh after `after`.
    async fn remake_after(&mut self, after: u64) -> Result<(), String> {
        let name = &self.config.durable_name;
        match self.store.stream.delete_consumer(name).await {
            Ok(_) => {}
            Err(error)
                if matches!(error.kind(), jetstream::stream::ConsumerErrorKind::JetStream(ref inner)
                    if inner.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) => {}
            Err(error) => return Err(format!("delete consumer {name}: {error}")),
        }
        self.messages = None;
        self.consumer = None;
        self.settled_unacked = 0;
        // (Its consumer is gone: an ack would be refused.)
        self.lingering_ack = None;
        self.config.start_after_sequence = after;
        self.last_stream_sequence = after;
        self.rewinds += 1;
        Ok(())
    }

    /// [`Readers::One`]: makes the consumer afresh after stream sequence `after`, so that
    /// every later commit is delivered again in order. Takes effect at the next
    /// [`Self::next`]; of two pending rewinds the earlier position wins.
    fn rewind(&mut self, after: u64) {
        assert_eq!(
            self.config.readers,
            Readers::One,
            "only a consumer with one reader may be rewound"
        );
        self.rewind_after = Some(
            self.rewind_after
                .map_or(after, |pending| pending.min(after)),
        );
    }

    /// How many times the consumer was made afresh after a lost delivery.
    pub fn rewinds(&self) -> u64 {
        self.rewinds
    }

    /// Drops the pull stream and opens a new one at the next [`Self::next`], as after a
    /// transport error: deliveries the server already sent to the old one are lost (the
    /// way a broken connection loses them). For tests of that recovery.
    #[doc(hidden)]
    pub fn break_pull_stream(&mut self) {
        self.messages = None;
    }

    /// The next commit. Waits for new commits when caught up; re-establishes the pull stream
    /// (and the consumer, if the server lost it) after errors, with bounded backoff, forever:
    /// wrap the call in a `select!` with the shutdown signal.
    pub async fn next(&mut self) -> Result<Delivery<C::Event>, SubscribeError> {
        loop {
            if let Some(after) = self.rewind_after {
                match self.remake_after(after).await {
                    Ok(()) => {
                        self.rewind_after = None;
                        warn!(durable = %self.config.durable_name, after, "consumer made afresh: commits after this stream sequence come again, in order");
                    }
                    Err(reason) => {
                        warn!(durable = %self.config.durable_name, %reason, "rewind failed; retrying");
                        self.pause().await;
                        continue;
                    }
                }
            }
            if self.messages.is_none() {
                match self.open_messages().await {
                    Ok(messages) => self.messages = Some(messages),
                    Err(reason) => {
                        warn!(durable = %self.config.durable_name, %reason, "subscription broken; retrying");
                        self.pause().await;
                        continue;
                    }
                }
            }
            let messages = self.messages.as_mut().expect("opened above");
            let next = match self.lingering_ack.as_ref().map(|(_, due)| *due) {
                None => messages.next().await,
                Some(due) => match tokio::time::timeout_at(due, messages.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        self.send_lingering_ack().await;
                        continue;
                    }
                },
            };
            match next {
                Some(Ok(message)) => {
                    self.backoff = RESUBSCRIBE_BACKOFF_MIN;
                    let decoded = self.decode(message);
                    // A commit that does not decode takes its place in the order too: the
                    // caller may skip it (ack it and go on), and unrecorded, the next delivery
                    // would look like one after lost deliveries and rewind to it, forever.
                    let sequences = match &decoded {
                        Ok(delivery) => {
                            Some((delivery.consumer_sequence, delivery.commit.sequence))
                        }
                        Err(SubscribeError::Decode {
                            sequence, message, ..
                        }) => message
                            .info()
                            .ok()
                            .map(|info| (info.consumer_sequence, *sequence)),
                        Err(_) => None,
                    };
                    if self.config.readers == Readers::One
                        && let Some((consumer_sequence, stream_sequence)) = sequences
                        && !self.in_order(consumer_sequence, stream_sequence)
                    {
                        continue;
                    }
                    return decoded;
                }
                Some(Err(error)) => {
                    let kind = error.kind();
                    if matches!(kind, consumer::pull::MessagesErrorKind::ConsumerDeleted) {
                        self.consumer = None;
                    }
                    warn!(durable = %self.config.durable_name, %error, "pull stream ended; re-creating it");
                    self.messages = None;
                    self.pause().await;
                }
                None => {
                    self.messages = None;
                    self.pause().await;
                }
            }
        }
    }

    /// Marks a delivery applied. [`Acks::EachMessage`]: acks it. [`Acks::Cumulative`]: acks
    /// it (and with it every earlier delivery) once [`CUMULATIVE_ACK_EVERY_DELIVERIES`] have
    /// been settled since the last ack, or, when the subscription is caught up, at most
    /// [`CUMULATIVE_ACK_LINGER`] later (from here or from [`Self::next`]); otherwise a later
    /// ack covers it. Call it for every delivery, in order.
    pub async fn settle(&mut self, delivery: &Delivery<C::Event>) -> Result<(), async_nats::Error> {
        match self.config.acks {
            Acks::EachMessage => delivery.ack().await,
            Acks::Cumulative => {
                self.settled_unacked += 1;
                let now = tokio::time::Instant::now();
                let due = self
                    .lingering_ack
                    .take()
                    .map_or(now + CUMULATIVE_ACK_LINGER, |(_, due)| due);
                if self.settled_unacked >= CUMULATIVE_ACK_EVERY_DELIVERIES
                    || (delivery.pending == 0 && due <= now)
                {
                    self.settled_unacked = 0;
                    delivery.ack().await
                } else {
                    // The latest settled delivery's ack covers the earlier ones; the due time
                    // stays that of the first, so the linger bounds the oldest unacked one.
                    if let Some(reply) = &delivery.message.reply {
                        self.lingering_ack = Some((reply.clone(), due));
                    }
                    Ok(())
                }
            }
        }
    }

    /// Sends the ack [`Self::settle`] left lingering (it covers every delivery settled so far).
    async fn send_lingering_ack(&mut self) {
        // Cleared only once the send completed: `next` may be dropped mid-send (`select!`,
        // `next_ready`), and the next call sends it then.
        if let Some((reply, _)) = self.lingering_ack.clone() {
            // What `jetstream::Message::ack` sends: an empty message to the delivery's reply
            // subject (`AckPolicy::All`: it covers every earlier delivery).
            let sent = self
                .store
                .jetstream()
                .client()
                .publish(reply, bytes::Bytes::new())
                .await;
            self.lingering_ack = None;
            self.settled_unacked = 0;
            if let Err(error) = sent {
                tracing::debug!(durable = %self.config.durable_name, %error, "cumulative ack lost; the server redelivers after ack_wait, and the reader skips what it holds");
            }
        }
    }

    /// The next commit if one is already here (delivered and buffered), without waiting:
    /// lets a service fold a run of deliveries in one turn of its loop.
    pub fn next_ready(&mut self) -> Option<Result<Delivery<C::Event>, SubscribeError>> {
        use futures::FutureExt as _;
        self.next().now_or_never()
    }

    async fn open_messages(&mut self) -> Result<consumer::pull::Stream, String> {
        let consumer = self
            .ensure_consumer()
            .await
            .map_err(|error| error.to_string())?;
        match consumer
            .stream()
            .max_messages_per_batch(self.config.batch_max)
            .messages()
            .await
        {
            Ok(messages) => Ok(messages),
            Err(error) => {
                // The consumer may be gone (server restarted without it): make it again next time.
                self.consumer = None;
                Err(error.to_string())
            }
        }
    }

    /// [`Readers::One`]: whether a delivery may be handed out. A consumer sequence that skips
    /// ahead means deliveries were lost on the way: the delivery is dropped and a rewind to
    /// the last stream sequence handed out is scheduled (a first delivery is never earlier
    /// in the stream than one handed out before it, so nothing lost lies at or below it). A
    /// consumer sequence that goes back (a new cluster leader with an older view of what was
    /// delivered) only repeats deliveries, which the caller skips.
    fn in_order(&mut self, consumer_sequence: u64, stream_sequence: u64) -> bool {
        let expected = self.last_consumer_sequence.map_or(1, |last| last + 1);
        if consumer_sequence > expected {
            warn!(
                durable = %self.config.durable_name,
                expected_consumer_sequence = expected,
                consumer_sequence,
                after_stream_sequence = self.last_stream_sequence,
                "deliveries lost on the way; making the consumer afresh"
            );
            self.rewind(self.last_stream_sequence);
            return false;
        }
        self.last_consumer_sequence = Some(consumer_sequence);
        self.last_stream_sequence = self.last_stream_sequence.max(stream_sequence);
        true
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(RESUBSCRIBE_BACKOFF_MAX);
    }

    fn decode(&self, message: jetstream::Message) -> Result<Delivery<C::Event>, SubscribeError> {
        let durable = || self.config.durable_name.clone();
        let (sequence, consumer_sequence, pending, stored_at_ms) = {
            let info = message.info().map_err(|error| SubscribeError::Metadata {
                durable: durable(),
                reason: error.to_string(),
            })?;
            (
                info.stream_sequence,
                info.consumer_sequence,
                info.pending,
                datetime_to_ms(info.published),
            )
        };
        let no_headers = async_nats::HeaderMap::new();
        let headers = message.headers.as_ref().unwrap_or(&no_headers);
        match decode_commit(
            &self.store.codec,
            sequence,
            stored_at_ms,
            &message.subject,
            headers,
            &message.payload,
        ) {
            Ok(commit) => Ok(Delivery {
                commit,
                pending,
                consumer_sequence,
                message,
            }),
            Err(source) => Err(SubscribeError::Decode {
                durable: durable(),
                sequence,
                source,
                message: Box::new(message),
            }),
        }
    }
}
