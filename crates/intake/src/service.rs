//! The NATS shell of intake: one `tokio::select!` loop over the SUBMISSIONS consumer, the
//! request subjects, the INCIDENTS follower and the shutdown signal. Submissions are taken in
//! bounded batches: decided one by one in memory, then stored with all appends of a phase in
//! flight at once (incident commits, then receipts), then acknowledged or answered.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind, consumer, kv, stream};
use async_nats::service::endpoint::Endpoint;
use bytes::Bytes;
use codecs::IncidentCodec;
use domain::incident::{IncidentEvent, IncidentState};
use domain::{IncidentId, Policy, Timestamp};
use eventstore::{
    AggregateId, AppendError, Commit, CommitMeta, EventStore, Position, PostcardCodec, ReplayRange,
    SubscribeError, Subscription, SubscriptionConfig,
};
use futures::StreamExt as _;
use futures::stream::{ReadyChunks, SelectAll};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tracing::{debug, info, info_span, warn};

use crate::contacts::{self, ContactWrite};
use crate::core::{
    Core, CoreConfig, Folded, IntakeEvent, Locate, Plan, Routing, incident_id_for,
    intake_aggregate, receipt_in_history, refusal_event,
};
use crate::decode::{
    Limits, check_channel, check_message_id, decode_submission, is_valid_submission_id,
};
use crate::status;
use crate::wire::{self, EraseContact, EraseReply, IncidentQuery, IncidentQueryReply, Receipt};

/// The INTAKE stream's codec: one frozen v1 postcard type.
pub type IntakeCodec = PostcardCodec<IntakeEvent>;
/// Event type of INTAKE records.
pub const INTAKE_EVENT_TYPE: &str = "intake.submission";
/// Submissions (durable or requests) decided and stored as one batch.
pub const SUBMISSION_BATCH_MAX: usize = 512;
/// Submissions read at once from the stream or the request subscription; under load a batch
/// is filled with several chunks (see [`BATCH_FILL_FROM`]).
pub const SUBMISSION_CHUNK_MAX: usize = 128;
const _: () = assert!(SUBMISSION_CHUNK_MAX <= SUBMISSION_BATCH_MAX);
/// Unacknowledged submissions the server lets the intake consumer have out.
pub const SUBMISSIONS_ACK_PENDING_MAX: i64 = 4_096;
/// How long the server waits for an ack before redelivering a submission.
pub const SUBMISSION_ACK_WAIT: Duration = Duration::from_secs(30);
/// Delay before a submission whose decision could not be stored is redelivered.
const NAK_DELAY: Duration = Duration::from_secs(1);
/// Longest wait before a submission that could not be decided is delivered again: the wait
/// doubles from [`NAK_DELAY`] with each delivery, so a long outage of the store is not met
/// by a storm of redeliveries (before, every such submission came back every second).
const NAK_DELAY_MAX: Duration = Duration::from_secs(60);

/// The wait before delivering again a submission delivered `delivered` times (1 = first).
fn nak_delay(delivered: i64) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    NAK_DELAY.saturating_mul(1 << doublings).min(NAK_DELAY_MAX)
}
/// A chunk of at least this many inputs (under load; durable: with more submissions pending
/// on the consumer) waits up to `ServiceConfig::batch_fill_wait` for more, up to
/// [`SUBMISSION_BATCH_MAX`]. Fewer and larger batches store more submissions per second
/// (their appends share the round trips); at a low rate nothing waits.
pub const BATCH_FILL_FROM: usize = 16;
/// Default of `ServiceConfig::batch_fill_wait`.
pub const BATCH_FILL_WAIT: Duration = Duration::from_millis(2);
/// Longest `ServiceConfig::batch_fill_wait` the command line accepts: a longer wait would
/// hold every submission of a busy minute for no gain in batch size.
pub const BATCH_FILL_WAIT_MAX: Duration = Duration::from_secs(1);
/// The longest a submission may have waited (from its arrival to its decision) and still be
/// routed in its filing commit, with deadlines counted from its arrival. One that waited
/// longer (intake down, a redelivery) is filed undispatched and dispatch routes it on its own
/// clock, so its handler is not given a deadline already partly spent by intake's delay.
pub const ROUTE_AT_FILING_WAITED_MAX: Duration = Duration::from_secs(60);
/// How long unprocessed submissions are kept (work-queue retention removes them on ack).
pub const SUBMISSIONS_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// The server drops the private follower consumer of a crashed instance after this.
const CONSUMER_INACTIVE_THRESHOLD: Duration = Duration::from_secs(300);
/// Appends of an erasure record tried when other instances record the same reporter's.
const ERASURE_RECORD_ATTEMPTS_MAX: u32 = 3;
/// Longest wait for already-delivered requests at shutdown.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest query request body.
const QUERY_BYTES_MAX: usize = 1024;
/// Back-off after the submissions pull stream broke.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(200);
/// Most incidents held forgotten until they can be read again (see [`IntakeService::reload`]);
/// past it one is left to the follower, which reads it when its next commit arrives.
const RELOADS_PENDING_MAX: usize = 4_096;
/// Most of those read again before one batch is decided, so a store still unreadable does not
/// hold a batch for long.
const RELOADS_PER_BATCH_MAX: usize = 16;

/// How one intake instance runs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub core: CoreConfig,
    pub limits: Limits,
    /// Queue group of the request subjects, shared by all instances.
    pub queue_group: String,
    /// This instance's name (its private follower consumer's name starts with it).
    pub instance: String,
    /// Stream capturing `intake.submit.*`.
    pub submissions_stream: String,
    /// Durable consumer shared by all instances.
    pub submissions_durable: String,
    pub replicas: usize,
    pub duplicate_window: Duration,
    /// KV bucket with reporters' contact details (erasable).
    pub contacts_bucket: String,
    /// Longest wait for a batch to fill under load (see [`BATCH_FILL_FROM`]); zero never
    /// waits.
    pub batch_fill_wait: Duration,
    /// Metrics and health of this instance ([`observe::Observer::disabled`] by default).
    pub observer: observe::Observer,
    /// The clock decisions are taken on ([`DecisionTime::Wall`] but in tests and demos).
    pub time: DecisionTime,
}

/// The clock intake decides on. A decision is dated at the submission's stream timestamp (a
/// request's arrival), whenever it is taken; only the receipt of a submission decided long
/// after it arrived counts its `respond_by` from the moment it is taken
/// ([`Routing::ByDispatch`]); compressed time maps that instant as dispatch's compressed clock does,
/// so a deadline set at filing means the same instant to both services (dispatch escalates
/// it). `wangge demo` and the crash tests run dispatch on compressed time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecisionTime {
    #[default]
    Wall,
    /// `origin_ms + (wall - origin_ms) * scale`, as `dispatch::TimeSource::Scaled`.
    Compressed { origin_ms: i64, scale: u32 },
}

impl DecisionTime {
    /// The decision time of an input that arrived at `wall_ms` (Unix milliseconds).
    pub fn at(self, wall_ms: i64) -> Timestamp {
        match self {
            DecisionTime::Wall => Timestamp(wall_ms),
            DecisionTime::Compressed { origin_ms, scale } => {
                Timestamp::compressed(wall_ms, origin_ms, scale)
            }
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            core: CoreConfig::default(),
            limits: Limits::default(),
            queue_group: "intake".to_owned(),
            instance: "intake".to_owned(),
            submissions_stream: "SUBMISSIONS".to_owned(),
            submissions_durable: "intake".to_owned(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            contacts_bucket: "INTAKE_CONTACTS".to_owned(),
            batch_fill_wait: BATCH_FILL_WAIT,
            observer: observe::Observer::disabled(),
            time: DecisionTime::Wall,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("create or update stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("create contacts bucket {bucket}: {reason}")]
    Bucket { bucket: String, reason: String },
    #[error("replay {stream}: {reason}")]
    Replay { stream: String, reason: String },
    #[error("create consumer {durable}: {reason}")]
    Consumer { durable: String, reason: String },
    #[error(transparent)]
    Subscription(#[from] SubscribeError),
    #[error("subscribe to {subject}: {reason}")]
    Subscribe { subject: String, reason: String },
}

/// Creates (or opens) the durable pull consumer on SUBMISSIONS shared by every intake instance
/// (also run by `wangge up`, so that instances starting together never race to create it).
pub async fn ensure_submissions_consumer(
    submissions_stream: &stream::Stream,
    config: &ServiceConfig,
) -> Result<consumer::PullConsumer, ServiceError> {
    submissions_stream
        .get_or_create_consumer(
            &config.submissions_durable,
            consumer::pull::Config {
                durable_name: Some(config.submissions_durable.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: SUBMISSION_ACK_WAIT,
                max_ack_pending: SUBMISSIONS_ACK_PENDING_MAX,
                ..Default::default()
            },
        )
        .await
        .map_err(|error| ServiceError::Consumer {
            durable: config.submissions_durable.clone(),
            reason: error.to_string(),
        })
}

/// Creates (or opens) the KV bucket of reporters' contact details (also run by `wangge up`,
/// so that intake's restricted credentials never have to create it under load).
pub async fn ensure_contacts_bucket(
    jetstream: &jetstream::Context,
    config: &ServiceConfig,
) -> Result<kv::Store, ServiceError> {
    if let Ok(store) = jetstream.get_key_value(&config.contacts_bucket).await {
        return Ok(store);
    }
    jetstream
        .create_key_value(kv::Config {
            bucket: config.contacts_bucket.clone(),
            description: "wangge: reporters' contact details (erasable)".to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await
        .map_err(|error| ServiceError::Bucket {
            bucket: config.contacts_bucket.clone(),
            reason: error.to_string(),
        })
}

/// Opens the SUBMISSIONS stream, created when missing: work-queue retention, so a
/// submission (which may hold contact details) is removed once intake acknowledged it. An
/// existing stream is kept as it is (a service starting) or updated (`wangge up`), as
/// `existing` says.
pub async fn ensure_submissions_stream(
    jetstream: &jetstream::Context,
    config: &ServiceConfig,
    existing: eventstore::ExistingStream,
) -> Result<stream::Stream, ServiceError> {
    eventstore::ensure_stream(
        jetstream,
        stream::Config {
            name: config.submissions_stream.clone(),
            subjects: vec![wire::SUBJECT_SUBMIT_ALL.to_owned()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            duplicate_window: config.duplicate_window,
            max_age: SUBMISSIONS_MAX_AGE,
            description: Some("wangge: submissions waiting for intake".to_owned()),
            ..Default::default()
        },
        existing,
    )
    .await
    .map_err(|error| ServiceError::Stream {
        stream: config.submissions_stream.clone(),
        reason: error.to_string(),
    })
}

type Chunks<S> = Pin<Box<ReadyChunks<S>>>;

/// One submission waiting to be decided.
struct Input {
    payload: Bytes,
    fallback_id: Option<String>,
    /// The date its decision carries ([`DecisionTime`] of its arrival).
    now: Timestamp,
    /// When it arrived, wall clock (Unix milliseconds): its answer's latency is timed from it.
    arrived_ms: i64,
    origin: Origin,
    /// W3C trace context: the sender's `traceparent` header, or a new one.
    traceparent: String,
}

enum Origin {
    Durable(jetstream::Message),
    Request(Box<async_nats::service::Request>),
}

/// A started intake instance; call [`IntakeService::run`].
pub struct IntakeService {
    client: async_nats::Client,
    incidents: EventStore<IncidentCodec>,
    intake: EventStore<IntakeCodec>,
    policy: Policy,
    locator: Box<dyn Locate + Send + Sync>,
    core: Core,
    config: ServiceConfig,
    contacts: kv::Store,
    submissions_consumer: consumer::PullConsumer,
    /// The SUBMISSIONS stream, to make the consumer again if it was deleted.
    submissions_stream: stream::Stream,
    /// Whether the pull stream was opened before (a reopen checks the consumer first).
    submissions_opened_before: bool,
    submissions: Option<Chunks<consumer::pull::Stream>>,
    follower: Subscription<IncidentCodec>,
    follower_durable: String,
    /// `submit` endpoint of the `wangge-intake` micro service, in batches.
    requests: Chunks<Endpoint>,
    /// `receipt`, `incident` and `erase` endpoints.
    queries: SelectAll<Endpoint>,
    micro: Option<async_nats::service::Service>,
    /// Batches storing their receipts and answering (at most [`BATCHES_FINISHING_MAX`]).
    finishing: tokio::task::JoinSet<Finished>,
    /// Incidents forgotten because they could not be read after a failed append (at most
    /// [`RELOADS_PENDING_MAX`]), read again before the next batches are decided.
    reloads_pending: std::collections::BTreeSet<IncidentId>,
    /// Submission ids whose INTAKE record (a merge or a refusal) a finishing batch may still be
    /// storing, with how many batches: their receipts are in memory but may yet be forgotten.
    /// Each batch takes its ids out when it finishes (all are dropped when no batch is
    /// finishing, after a task that failed), so at most `BATCHES_FINISHING_MAX` ×
    /// `SUBMISSION_BATCH_MAX`.
    records_in_flight: HashMap<String, u32>,
}

impl std::fmt::Debug for IntakeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntakeService")
            .field("config", &self.config)
            .field("open_incidents", &self.core.open_incidents())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The `reason_code` of an `error` answer when a store or bucket could not be reached: the
/// same request may succeed later (the code dispatch and the registry use too).
const STORE_UNAVAILABLE: &str = "store_unavailable";

fn to_json<T: serde::Serialize>(value: &T) -> Bytes {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .unwrap_or_else(|error| {
            Bytes::from(format!(
                r#"{{"status":"error","reason_code":"encode","message":"encode reply: {error}"}}"#
            ))
        })
}

fn uuid_from(text: &str) -> uuid::Uuid {
    let digest = Sha256::digest(text.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

fn meta(correlation: &str, now: Timestamp, traceparent: &str) -> CommitMeta {
    let id = uuid_from(correlation);
    CommitMeta {
        correlation_id: id,
        causation_id: id,
        actor: "system:intake".to_owned(),
        occurred_at_ms: now.0,
        traceparent: Some(traceparent.to_owned()),
    }
}

/// Micro endpoints: (name, subject). The first is the submission path, batched.
const ENDPOINTS: [(&str, &str); 4] = [
    ("submit", wire::SUBJECT_REQUEST),
    ("receipt", wire::SUBJECT_QUERY_RECEIPT),
    ("incident", wire::SUBJECT_QUERY_INCIDENT),
    ("erase", wire::SUBJECT_CONTACT_ERASE),
];

fn request_input(request: async_nats::service::Request, time: DecisionTime) -> Input {
    let arrived_ms = now_ms();
    Input {
        payload: request.message.payload.clone(),
        fallback_id: None,
        now: time.at(arrived_ms),
        arrived_ms,
        traceparent: observe::traceparent_or_new(request.message.headers.as_ref()),
        origin: Origin::Request(Box::new(request)),
    }
}

fn incident_aggregate(id: IncidentId) -> AggregateId {
    // A hyphenated UUID is always a valid aggregate id.
    AggregateId::new(id.0.to_string()).unwrap_or_else(|_| unreachable_aggregate())
}

#[allow(clippy::panic)]
fn unreachable_aggregate() -> AggregateId {
    panic!("a UUID is a valid aggregate id")
}

impl IntakeService {
    /// Opens the streams, rebuilds the state from INTAKE and INCIDENTS, opens the consumers
    /// and subscribes to the request subjects. Requests sent after it returns are answered.
    pub async fn start(
        client: async_nats::Client,
        incidents: EventStore<IncidentCodec>,
        intake: EventStore<IntakeCodec>,
        policy: Policy,
        locator: Box<dyn Locate + Send + Sync>,
        config: ServiceConfig,
    ) -> Result<IntakeService, ServiceError> {
        config
            .observer
            .metrics()
            .declare_submission_kinds(&["filed", "merged", "rejected", "error"]);
        // A filing routed in its own commit may blow an emergency whistle.
        config
            .observer
            .metrics()
            .declare_whistle_kinds(&domain::routing::WhistleKind::ALL.map(|kind| kind.name()));
        let jetstream = incidents.jetstream().clone();
        let submissions_stream =
            ensure_submissions_stream(&jetstream, &config, eventstore::ExistingStream::Keep)
                .await?;
        let contacts = ensure_contacts_bucket(&jetstream, &config).await?;

        let started = std::time::Instant::now();
        let mut core = Core::new(config.core);
        let mut receipts = 0u64;
        intake
            .replay(ReplayRange::default(), |commit| {
                for recorded in &commit.events {
                    if let (Some(id), Some(receipt)) =
                        (recorded.event.submission_id(), recorded.event.receipt())
                    {
                        core.remember(id, receipt);
                        receipts += 1;
                    }
                }
            })
            .await
            .map_err(|error| ServiceError::Replay {
                stream: intake.spec().stream_name.clone(),
                reason: error.to_string(),
            })?;
        let mut gaps = Vec::new();
        let reached = incidents
            .replay(ReplayRange::default(), |commit| {
                if core.fold(&commit) == Folded::Gap
                    && let Ok(id) = uuid::Uuid::parse_str(commit.aggregate.as_str())
                {
                    gaps.push(IncidentId(id));
                }
            })
            .await
            .map_err(|error| ServiceError::Replay {
                stream: incidents.spec().stream_name.clone(),
                reason: error.to_string(),
            })?;
        // A private follower of INCIDENTS from where the replay ended.
        let follower_config = SubscriptionConfig::private_follower(
            &config.instance,
            reached,
            CONSUMER_INACTIVE_THRESHOLD,
        );
        let follower_durable = follower_config.durable_name.clone();
        let follower = incidents.subscribe(follower_config).await?;
        let submissions_consumer =
            ensure_submissions_consumer(&submissions_stream, &config).await?;
        let subscribe_error = |subject: &str, reason: String| ServiceError::Subscribe {
            subject: subject.to_owned(),
            reason,
        };
        let (micro, mut endpoints) = observe::start_micro(
            &client,
            "intake",
            "wangge incident intake: submissions, receipts, incident status",
            &config.queue_group,
            &config.instance,
            &ENDPOINTS,
        )
        .await
        .map_err(|error| subscribe_error("$SRV", error.to_string()))?;
        let queries = futures::stream::select_all(endpoints.split_off(1));
        let requests = Box::pin(endpoints.remove(0).ready_chunks(SUBMISSION_CHUNK_MAX));
        config
            .observer
            .metrics()
            .reached(&incidents.spec().stream_name, reached);
        let mut service = IntakeService {
            client,
            incidents,
            intake,
            policy,
            locator,
            core,
            config,
            contacts,
            submissions_consumer,
            submissions_stream: submissions_stream.clone(),
            submissions_opened_before: false,
            submissions: None,
            follower,
            follower_durable,
            requests,
            queries,
            micro: Some(micro),
            finishing: tokio::task::JoinSet::new(),
            reloads_pending: std::collections::BTreeSet::new(),
            records_in_flight: HashMap::new(),
        };
        for id in gaps {
            service.reload(id).await;
        }
        info!(
            receipts,
            open_incidents = service.core.open_incidents(),
            incidents_sequence = reached,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "intake state rebuilt"
        );
        Ok(service)
    }

    async fn open_submissions(&mut self) -> Option<()> {
        if self.submissions.is_some() {
            return Some(());
        }
        if self.submissions_opened_before {
            // The pull stream broke: if the durable consumer is gone (deleted by an operator,
            // or lost with a stream restored from a backup), pulling from it again would fail
            // forever; make it again (the stream keeps every submission not yet acked).
            match ensure_submissions_consumer(&self.submissions_stream, &self.config).await {
                Ok(consumer) => self.submissions_consumer = consumer,
                Err(error) => {
                    warn!(%error, "check the submissions consumer; retrying");
                    tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
                    return None;
                }
            }
        }
        self.submissions_opened_before = true;
        match self
            .submissions_consumer
            .stream()
            .max_messages_per_batch(SUBMISSION_BATCH_MAX)
            .messages()
            .await
        {
            Ok(messages) => {
                self.submissions = Some(Box::pin(messages.ready_chunks(SUBMISSION_CHUNK_MAX)));
                Some(())
            }
            Err(error) => {
                warn!(%error, "open the submissions pull stream; retrying");
                tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
                None
            }
        }
    }

    /// Serves until `shutdown` turns true (or its sender is dropped), then drains and returns.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ServiceError> {
        info!(queue_group = %self.config.queue_group, "intake serving");
        self.config.observer.watch_connection(&self.client);
        self.config.observer.set_started();
        let result = loop {
            if *shutdown.borrow() {
                break Ok(());
            }
            if self.submissions.is_none() && self.open_submissions().await.is_none() {
                continue;
            }
            let Some(submissions) = self.submissions.as_mut() else {
                continue;
            };
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break Ok(());
                    }
                }
                batch = submissions.next() => match batch {
                    Some(mut batch) => {
                        if batch.len() >= BATCH_FILL_FROM && submissions_pending(&batch) {
                            let wait = self.config.batch_fill_wait;
                            fill_batch(&mut batch, submissions, wait).await;
                        }
                        self.on_submissions(batch).await;
                    }
                    None => {
                        self.submissions = None;
                        tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
                    }
                },
                Some(mut batch) = self.requests.next() => {
                    if batch.len() >= BATCH_FILL_FROM {
                        let wait = self.config.batch_fill_wait;
                        fill_batch(&mut batch, &mut self.requests, wait).await;
                    }
                    let inputs = batch.into_iter().map(|request| request_input(request, self.config.time)).collect();
                    self.decide_and_store(inputs).await;
                }
                Some(message) = self.queries.next() => self.on_query(message).await,
                Some(done) = self.finishing.join_next() => self.on_finished(done),
                delivery = self.follower.next() => {
                    if let Err(error) = self.on_follow(delivery).await {
                        break Err(error);
                    }
                }
            }
        };
        self.stop().await;
        result
    }

    async fn stop(mut self) {
        // Stop taking requests (unsubscribe); answer the ones already delivered to us.
        self.config.observer.set_stopping();
        // Stop pulling submissions: the unsubscribe reaches the server with the flush below,
        // so that no submission is delivered to this instance's pull request once it is gone
        // (it would wait `SUBMISSION_ACK_WAIT` for redelivery).
        self.submissions = None;
        if let Err(error) = Pin::get_mut(self.requests.as_mut()).get_mut().stop().await {
            warn!(%error, "stop the submit endpoint");
        }
        for endpoint in self.queries.iter_mut() {
            if let Err(error) = endpoint.stop().await {
                warn!(%error, "stop a query endpoint");
            }
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN_TIMEOUT;
        let mut answered = 0usize;
        while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, self.requests.next()).await {
            answered += batch.len();
            let inputs = batch
                .into_iter()
                .map(|request| request_input(request, self.config.time))
                .collect();
            self.decide_and_store(inputs).await;
        }
        while let Some(done) = self.finishing.join_next().await {
            self.on_finished(done);
        }
        if let Some(micro) = self.micro.take()
            && let Err(error) = micro.stop().await
        {
            warn!(%error, "stop the micro service");
        }
        if let Err(error) = self.client.flush().await {
            warn!(%error, "flush at shutdown");
        }
        if let Err(error) = self.incidents.delete_consumer(&self.follower_durable).await {
            warn!(%error, "delete private consumer");
        }
        info!(answered_while_draining = answered, "intake stopped");
    }

    async fn on_submissions(
        &mut self,
        batch: Vec<Result<jetstream::Message, consumer::pull::MessagesError>>,
    ) {
        let mut inputs = Vec::with_capacity(batch.len());
        let mut broken = false;
        for item in batch {
            match item {
                Ok(message) => {
                    let published_ms = message
                        .info()
                        .map(|info| (info.published.unix_timestamp_nanos() / 1_000_000) as i64)
                        .unwrap_or_else(|_| now_ms());
                    let fallback_id = message
                        .headers
                        .as_ref()
                        .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
                        .map(|value| value.as_str().to_owned());
                    let traceparent = observe::traceparent_or_new(message.headers.as_ref());
                    inputs.push(Input {
                        payload: message.payload.clone(),
                        fallback_id,
                        now: self.config.time.at(published_ms),
                        arrived_ms: published_ms,
                        origin: Origin::Durable(message),
                        traceparent,
                    });
                }
                Err(error) => {
                    warn!(%error, "submissions pull stream failed; re-creating it");
                    broken = true;
                }
            }
        }
        if !inputs.is_empty() {
            self.decide_and_store(inputs).await;
        }
        if broken {
            self.submissions = None;
            tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
        }
    }

    /// Decides every input in order, stores the incident commits (all aggregates in flight,
    /// commits of one aggregate in order), then the receipts, then acks or answers. Inputs
    /// whose incident commit lost to a concurrent writer (dispatch, another intake instance)
    /// are decided again at once on the re-read incident, at most [`CONFLICT_RETRIES_MAX`]
    /// times; after that a request is answered `error` (`store_unavailable`) and a durable
    /// submission is redelivered later.
    async fn decide_and_store(&mut self, mut inputs: Vec<Input>) {
        assert!(
            inputs.len() <= SUBMISSION_BATCH_MAX,
            "batch over SUBMISSION_BATCH_MAX"
        );
        if !self.reloads_pending.is_empty() {
            self.retry_pending_reloads().await;
        }
        for retry in 0..=CONFLICT_RETRIES_MAX {
            let retry_allowed = retry < CONFLICT_RETRIES_MAX;
            inputs = self.decide_and_store_once(inputs, retry_allowed).await;
            if inputs.is_empty() {
                return;
            }
            debug!(
                inputs = inputs.len(),
                retry = retry + 1,
                "incident commits lost to a concurrent writer; deciding them again"
            );
        }
        debug_assert!(inputs.is_empty(), "the last attempt answers every input");
    }

    /// One attempt of [`Self::decide_and_store`]. Returns the inputs to decide again (only
    /// when `retry_allowed`): those whose incident commit met a concurrent write, with the
    /// inputs answered from their plans.
    async fn decide_and_store_once(
        &mut self,
        mut inputs: Vec<Input>,
        retry_allowed: bool,
    ) -> Vec<Input> {
        let batch_started = std::time::Instant::now();
        let mut plans: Vec<Plan> = Vec::with_capacity(inputs.len());
        // A retry of a submission can land in the same batch as the first attempt (a client
        // that timed out while this instance waited on the store). The later input is then
        // answered from the receipt the earlier one planned; if the earlier one's writes fail,
        // the later one must not be told "filed" either. (later input, earlier input)
        let mut planned_here: HashMap<String, usize> = HashMap::new();
        let mut answered_from: Vec<(usize, usize)> = Vec::new();
        let mut contacts = Vec::new();
        // Inputs left undecided because the store could not be read.
        let mut undecided = Vec::new();
        for (index, input) in inputs.iter().enumerate() {
            let decoded = decode_submission(
                &input.payload,
                input.fallback_id.as_deref(),
                &self.config.limits,
                &self.policy.taxonomy,
            )
            .and_then(|valid| match &input.origin {
                Origin::Durable(message) => check_message_id(valid, input.fallback_id.as_deref())
                    .and_then(|valid| check_channel(valid, message.subject.as_str())),
                Origin::Request(_) => Ok(valid),
            });
            // Receipts were evicted from memory: an id not held may have been decided long ago,
            // so it is looked up in the store first. A look-up that fails leaves the input
            // undecided (nak'ed, or answered `error`): decided as new, an old merge or refusal
            // could be decided again differently, and an old filing whose body no longer
            // decodes would get a refusal record beside its incident.
            let known_id = match &decoded {
                Ok(valid) => Some(valid.submission_id.as_str()),
                Err(refusal) => refusal.submission_id.as_deref(),
            };
            if let Some(id) = known_id
                && self.core.receipt(id).is_none()
                && self.core.receipts_evicted()
                && !planned_here.contains_key(id)
                && self.look_up_receipt(id).await.is_err()
            {
                undecided.push(index);
                plans.push(Plan {
                    receipt: Receipt::Error {
                        reason_code: STORE_UNAVAILABLE.to_owned(),
                        message: "could not read whether this submission was decided before; \
                                  send again with the same submission_id"
                            .to_owned(),
                    },
                    record: None,
                    incident: None,
                });
                continue;
            }
            let plan = match decoded {
                Ok(valid) => {
                    if self.records_in_flight.contains_key(&valid.submission_id) {
                        // A resend of a submission whose record an earlier batch is still
                        // storing: answered from memory now, it could be told a decision that
                        // is then not stored. Let the finishing batches end first.
                        self.wait_for_finishing().await;
                    }
                    if let Some(earlier) = planned_here.get(&valid.submission_id) {
                        answered_from.push((index, *earlier));
                    }
                    let submission_id = valid.submission_id.clone();
                    if let Some(contact) = &valid.contact
                        && self.core.receipt(&valid.submission_id).is_none()
                    {
                        contacts.push((index, valid.reporter_id, contact.clone()));
                    }
                    // Routed in its filing commit only while its deadlines, counted from its
                    // arrival, are still whole.
                    let decided_ms = now_ms();
                    let waited_ms = decided_ms.saturating_sub(input.arrived_ms);
                    let routing = if waited_ms <= ROUTE_AT_FILING_WAITED_MAX.as_millis() as i64 {
                        Routing::AtFiling
                    } else {
                        Routing::ByDispatch {
                            decided_at: self.config.time.at(decided_ms),
                        }
                    };
                    let plan = self.core.plan(
                        valid,
                        &input.payload,
                        input.now,
                        routing,
                        self.locator.as_ref(),
                        &self.policy,
                    );
                    if plan.record.is_some() || plan.incident.is_some() {
                        planned_here.insert(submission_id, index);
                    }
                    plan
                }
                Err(refusal) => {
                    if let Some(earlier) = refusal
                        .submission_id
                        .as_ref()
                        .and_then(|id| planned_here.get(id))
                    {
                        answered_from.push((index, *earlier));
                    }
                    let known = refusal
                        .submission_id
                        .as_deref()
                        .and_then(|id| self.core.receipt(id));
                    match known {
                        Some(receipt) => Plan {
                            receipt: receipt.clone(),
                            record: None,
                            incident: None,
                        },
                        None => {
                            let event = refusal_event(&refusal, &input.payload);
                            let receipt = refusal.receipt();
                            if let Some(id) = &refusal.submission_id {
                                self.core.remember(id, receipt.clone());
                                planned_here.insert(id.clone(), index);
                            }
                            let aggregate = intake_aggregate(
                                refusal.submission_id.as_deref(),
                                &Sha256::digest(&input.payload).into(),
                            );
                            Plan {
                                receipt,
                                record: Some((aggregate, event)),
                                incident: None,
                            }
                        }
                    }
                }
            };
            plans.push(plan);
        }
        let decided = batch_started.elapsed();
        let mut failed = vec![false; plans.len()];
        for index in undecided {
            failed[index] = true;
        }
        // Phase 1: incident commits, one chain per aggregate.
        let mut chains: Vec<(IncidentId, Vec<usize>)> = Vec::new();
        let mut chain_of: HashMap<IncidentId, usize> = HashMap::new();
        for (index, plan) in plans.iter().enumerate() {
            if let Some(write) = &plan.incident {
                let chain = *chain_of.entry(write.incident).or_insert_with(|| {
                    chains.push((write.incident, Vec::new()));
                    chains.len() - 1
                });
                chains[chain].1.push(index);
            }
        }
        let appends = chains.iter().map(|(incident, indices)| {
            let store = &self.incidents;
            let plans = &plans;
            let inputs = &inputs;
            let start = self
                .core
                .tracked(incident)
                .map_or(Position::NEW, |tracked| tracked.position);
            let aggregate = incident_aggregate(*incident);
            async move {
                let mut position = start;
                let mut repeated = false;
                for (done, index) in indices.iter().enumerate() {
                    let Some(write) = &plans[*index].incident else {
                        continue;
                    };
                    let commit = Commit {
                        command_id: write.command_id.clone(),
                        event_ids: crate::core::event_ids_for(
                            &write.command_id,
                            write.events.len(),
                        ),
                        events: write.events.clone(),
                        meta: meta(
                            &write.command_id,
                            inputs[*index].now,
                            &inputs[*index].traceparent,
                        ),
                    };
                    match store.append(&aggregate, &position, &commit).await {
                        Ok(appended) => {
                            repeated |= appended.duplicate;
                            position = appended.position;
                        }
                        Err(error) => return Err((done, error)),
                    }
                }
                Ok((position, repeated))
            }
        });
        let results = futures::future::join_all(appends).await;
        let mut reload = Vec::new();
        let mut repeated = Vec::new();
        let mut conflicted = vec![false; plans.len()];
        for ((incident, indices), result) in chains.iter().zip(results) {
            match result {
                Ok((_, true)) => {
                    // Part of the chain was already stored (a redelivered or resent submission
                    // whose first decision was stored before a crash or a lost reply): it was
                    // announced then. Re-read the incident so memory matches the store, and
                    // answer with the receipt the store holds.
                    reload.push(*incident);
                    repeated.extend(indices.iter().copied());
                }
                Ok((position, false)) => {
                    let metrics = self.config.observer.metrics();
                    metrics.commits_appended.inc_by(indices.len() as u64);
                    // A filing routed in its own commit counts where dispatch's would have:
                    // `wangge_dispatched_total`, and an emergency's whistle in
                    // `wangge_whistles_blown_total{kind="emergency"}`.
                    for event in indices
                        .iter()
                        .filter_map(|index| plans[*index].incident.as_ref())
                        .flat_map(|write| write.events.iter())
                    {
                        match event {
                            IncidentEvent::Dispatched { .. } => {
                                metrics.dispatched.inc();
                            }
                            IncidentEvent::WhistleBlown { kind, .. } => {
                                metrics.whistle(kind.name())
                            }
                            _ => {}
                        }
                    }
                    self.core.appended(*incident, position);
                    if let Some(tracked) = self.core.tracked(incident) {
                        let events = indices
                            .iter()
                            .filter_map(|index| plans[*index].incident.as_ref())
                            .flat_map(|write| write.events.iter())
                            .map(|event| domain::encoding::event_type(event).to_owned())
                            .collect();
                        let now = indices
                            .last()
                            .map_or(self.config.time.at(now_ms()), |i| inputs[*i].now);
                        let public = status::view(
                            *incident,
                            &tracked.state,
                            position.version,
                            events,
                            now.0,
                        );
                        self.publish_status(&public).await;
                    }
                }
                Err((done, error)) => {
                    let trace_id = indices
                        .get(done)
                        .and_then(|index| observe::trace_id(&inputs[*index].traceparent))
                        .unwrap_or("");
                    let conflict = matches!(error, AppendError::Conflict { .. });
                    if conflict {
                        self.config.observer.metrics().append_conflicts.inc();
                        debug!(%incident, trace_id, %error, "incident commit met a concurrent write");
                    } else {
                        warn!(%incident, trace_id, %error, "store incident commit");
                    }
                    for index in &indices[done..] {
                        failed[*index] = true;
                        conflicted[*index] = conflict;
                        // Not stored: the submission is not charged for this attempt.
                        if let Some(reporter) = plans[*index]
                            .incident
                            .as_ref()
                            .and_then(|write| write.charged_reporter)
                        {
                            self.core.refund_token(reporter);
                        }
                        // Not stored: no later batch may be answered from this receipt.
                        if let Some(id) = receipt_id(&plans[*index].receipt) {
                            self.core.forget_receipt(&id);
                        }
                    }
                    reload.push(*incident);
                }
            }
        }
        for incident in reload {
            self.reload(incident).await;
        }
        // A filing stored before (by an earlier attempt or another instance) may have promised
        // a different `respond_by` (decided at another `now`): the stored filing commit wins.
        for index in repeated {
            if let Some(stored) = receipt_id(&plans[index].receipt)
                .and_then(|id| self.core.receipt(&id))
                .filter(|stored| matches!(stored, Receipt::Filed { .. }))
            {
                plans[index].receipt = stored.clone();
            }
        }
        // Inputs to decide again: every conflicted one, and every input answered from one.
        let mut again = Vec::new();
        if retry_allowed && conflicted.contains(&true) {
            for (later, earlier) in &answered_from {
                if conflicted[*earlier] {
                    conflicted[*later] = true;
                }
            }
            let mut kept_index = vec![usize::MAX; plans.len()];
            let mut kept_inputs = Vec::with_capacity(inputs.len());
            let mut kept_plans = Vec::with_capacity(plans.len());
            let mut kept_failed = Vec::with_capacity(plans.len());
            for (index, ((input, plan), failed)) in
                inputs.into_iter().zip(plans).zip(failed).enumerate()
            {
                if conflicted[index] {
                    again.push(input);
                } else {
                    kept_index[index] = kept_inputs.len();
                    kept_inputs.push(input);
                    kept_plans.push(plan);
                    kept_failed.push(failed);
                }
            }
            answered_from = answered_from
                .into_iter()
                .filter(|(later, earlier)| !conflicted[*later] && !conflicted[*earlier])
                .map(|(later, earlier)| (kept_index[later], kept_index[earlier]))
                .collect();
            // A conflicted input's contact details are written when it is decided again.
            contacts = contacts
                .into_iter()
                .filter(|(index, _, _)| !conflicted[*index])
                .map(|(index, reporter, contact)| (kept_index[index], reporter, contact))
                .collect();
            inputs = kept_inputs;
            plans = kept_plans;
            failed = kept_failed;
        }
        let incidents_stored = batch_started.elapsed();
        debug!(
            target: "intake::batch",
            batch_size = inputs.len(),
            decided_us = decided.as_micros() as u64,
            incidents_stored_us = incidents_stored.as_micros() as u64,
            "incident commits of a batch stored"
        );
        // Phases 2 and 3 (receipts, then acknowledgements and answers) run beside the next
        // batch: every "filed" or "merged" answer is already backed by its stored incident
        // commit, so the next batch may decide on the state this one left.
        while self.finishing.len() >= BATCHES_FINISHING_MAX {
            if let Some(done) = self.finishing.join_next().await {
                self.on_finished(done);
            }
        }
        let mut records = Vec::new();
        for (plan, failed) in plans.iter().zip(&failed) {
            if let (Some((submission_id, _)), false) = (&plan.record, failed) {
                *self
                    .records_in_flight
                    .entry(submission_id.clone())
                    .or_default() += 1;
                records.push(submission_id.clone());
            }
        }
        let finish = Finish {
            intake: self.intake.clone(),
            contacts_bucket: self.contacts.clone(),
            client: self.client.clone(),
            observer: self.config.observer.clone(),
            inputs,
            plans,
            failed,
            answered_from,
            contacts,
            records,
            started: batch_started,
        };
        debug_assert!(
            self.records_in_flight.len() <= BATCHES_FINISHING_MAX * SUBMISSION_BATCH_MAX,
            "records in flight are cleared when no batch is finishing"
        );
        self.finishing.spawn(finish.run());
        again
    }

    /// Applies what a finished batch learned about receipts to the in-memory state.
    fn on_finished(&mut self, done: Result<Finished, tokio::task::JoinError>) {
        match done {
            Ok(Finished { records, fixes }) => {
                for id in records {
                    if let Some(batches) = self.records_in_flight.get_mut(&id) {
                        *batches -= 1;
                        if *batches == 0 {
                            self.records_in_flight.remove(&id);
                        }
                    }
                }
                for fix in fixes {
                    match fix {
                        ReceiptFix::StoredEarlier(id, receipt) => self.core.remember(&id, receipt),
                        ReceiptFix::NotStored(id) => self.core.forget_receipt(&id),
                    }
                }
            }
            Err(error) => warn!(%error, "a batch's receipts task failed"),
        }
        if self.finishing.is_empty() {
            self.records_in_flight.clear();
        }
    }

    /// Waits until every finishing batch has stored its records and answered.
    async fn wait_for_finishing(&mut self) {
        while let Some(done) = self.finishing.join_next().await {
            self.on_finished(done);
        }
        self.records_in_flight.clear();
    }

    /// Finds a receipt no longer held in memory: a merge or refusal on INTAKE, or a filing in
    /// the commit of the incident the submission id names. The error is a store that could
    /// not be read (the receipt may exist).
    async fn look_up_receipt(&mut self, submission_id: &str) -> Result<(), String> {
        let Ok(aggregate) = AggregateId::new(submission_id) else {
            return Ok(());
        };
        let loaded = self.intake.load(&aggregate).await.map_err(|error| {
            warn!(%error, "look up an old receipt");
            error.to_string()
        })?;
        if let Some(receipt) = loaded.events().next().and_then(IntakeEvent::receipt) {
            self.core.remember(submission_id, receipt);
            return Ok(());
        }
        let incident = incident_id_for(submission_id);
        let loaded = self
            .incidents
            .load(&incident_aggregate(incident))
            .await
            .map_err(|error| {
                warn!(%error, "look up an old filing");
                error.to_string()
            })?;
        if let Some(receipt) = receipt_in_history(submission_id, incident, loaded.events()) {
            self.core.remember(submission_id, receipt);
        }
        Ok(())
    }

    async fn publish_status(&self, public: &wire::IncidentStatus) {
        let subject = format!("{}{}", wire::SUBJECT_STATUS_PREFIX, public.incident_id);
        if let Err(error) = self.client.publish(subject, to_json(public)).await {
            warn!(incident = %public.incident_id, %error, "publish incident status");
        }
    }

    /// Reads `incident` again, so memory holds what the store holds. A plan applies its
    /// effects in memory before its append, so after a failed append memory may hold effects
    /// that were never stored (a filing, a merged reporter). When the store cannot be read
    /// either, the incident is forgotten rather than decided on from such effects (a
    /// redelivered submission would otherwise be answered "filed" from an incident that was
    /// never stored), and read again before the next batches.
    async fn reload(&mut self, incident: IncidentId) -> bool {
        match self.incidents.load(&incident_aggregate(incident)).await {
            Ok(loaded) => {
                self.core.reload(incident, &loaded.commits);
                self.reloads_pending.remove(&incident);
                true
            }
            Err(error) => {
                self.core.forget(incident);
                let held = self.reloads_pending.len() < RELOADS_PENDING_MAX
                    || self.reloads_pending.contains(&incident);
                if held {
                    self.reloads_pending.insert(incident);
                } else {
                    self.reloads_pending.remove(&incident);
                }
                warn!(
                    %incident,
                    %error,
                    read_again = held,
                    "reload incident: forgotten until it can be read again"
                );
                false
            }
        }
    }

    /// Reads again up to [`RELOADS_PER_BATCH_MAX`] incidents forgotten by [`Self::reload`];
    /// stops at the first that still cannot be read.
    async fn retry_pending_reloads(&mut self) {
        let pending: Vec<IncidentId> = self
            .reloads_pending
            .iter()
            .take(RELOADS_PER_BATCH_MAX)
            .copied()
            .collect();
        for incident in pending {
            if !self.reload(incident).await {
                break;
            }
        }
    }

    async fn on_follow(
        &mut self,
        delivery: Result<eventstore::Delivery<IncidentEvent>, SubscribeError>,
    ) -> Result<(), ServiceError> {
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(SubscribeError::Decode {
                sequence,
                source,
                message,
                ..
            }) => {
                warn!(sequence, %source, "INCIDENTS commit does not decode; skipped");
                if let Err(error) = message.ack().await {
                    warn!(%error, "ack undecodable commit");
                }
                return Ok(());
            }
            Err(error) => return Err(error.into()),
        };
        let metrics = self.config.observer.metrics();
        metrics.reached(&self.incidents.spec().stream_name, delivery.commit.sequence);
        metrics.commits_folded.inc();
        // Other services' commits are announced by their writers (dispatch): intake only keeps
        // its state current, for duplicate detection and queries.
        if self.core.fold(&delivery.commit) == Folded::Gap
            && let Ok(id) = uuid::Uuid::parse_str(delivery.commit.aggregate.as_str())
        {
            self.reload(IncidentId(id)).await;
        }
        if let Err(error) = self.follower.settle(&delivery).await {
            warn!(%error, "ack INCIDENTS commit");
        }
        Ok(())
    }

    /// Records the erasure on INTAKE (aggregate `erasure.<reporter>`), then purges the
    /// contact details. The record comes first: an erasure that could not be recorded is not
    /// made (the office asks again), and one recorded whose purge failed is recorded again
    /// when the office asks again, which an auditor reads as the repeated request it was.
    async fn erase_contact(&mut self, query: EraseContact, traceparent: &str) -> EraseReply {
        let reporter = query.reporter_id;
        let store_error = |message: String| EraseReply::Error {
            reason_code: STORE_UNAVAILABLE.to_owned(),
            message,
        };
        let aggregate = match AggregateId::new(crate::core::erasure_aggregate(reporter)) {
            Ok(aggregate) => aggregate,
            Err(error) => return store_error(format!("erasure record: {error}")),
        };
        let event = IntakeEvent::ContactErased {
            reporter,
            request_reference: query.request_reference,
        };
        let mut attempt = 1;
        loop {
            let position = match self.intake.last_position(&aggregate).await {
                Ok(position) => position,
                Err(error) => return store_error(format!("record the erasure: {error}")),
            };
            let command_id = format!("erase-{}", uuid::Uuid::now_v7());
            let commit = Commit {
                event_ids: crate::core::event_ids_for(&command_id, 1),
                meta: meta(&command_id, self.config.time.at(now_ms()), traceparent),
                command_id,
                events: vec![event.clone()],
            };
            match self.intake.append(&aggregate, &position, &commit).await {
                Ok(_) => break,
                // Another instance recorded an erasure of the same reporter meanwhile.
                Err(AppendError::Conflict { .. }) if attempt < ERASURE_RECORD_ATTEMPTS_MAX => {
                    attempt += 1;
                }
                Err(error) => {
                    return store_error(format!(
                        "record the erasure (nothing was erased; ask again): {error}"
                    ));
                }
            }
        }
        match self.contacts.purge(reporter.to_string()).await {
            Ok(()) => EraseReply::Erased {
                reporter_id: reporter,
            },
            Err(error) => store_error(format!(
                "erase the contact details (the request is recorded; ask again): {error}"
            )),
        }
    }

    async fn on_query(&mut self, request: async_nats::service::Request) {
        let started = std::time::Instant::now();
        let message = &request.message;
        if message.reply.is_none() {
            return;
        }
        let answer = match message.subject.as_str() {
            wire::SUBJECT_QUERY_RECEIPT => {
                let query = observe::refusal::parse_json::<wire::ReceiptQuery>(
                    "query",
                    &message.payload,
                    QUERY_BYTES_MAX,
                );
                let receipt = match query {
                    Ok(query) if is_valid_submission_id(&query.submission_id) => {
                        if self.records_in_flight.contains_key(&query.submission_id) {
                            // Answer with a receipt that is stored, not one still on its way.
                            self.wait_for_finishing().await;
                        }
                        let looked_up = match self.core.receipt(&query.submission_id) {
                            Some(_) => Ok(()),
                            None => self.look_up_receipt(&query.submission_id).await,
                        };
                        match (self.core.receipt(&query.submission_id), looked_up) {
                            (Some(receipt), _) => receipt.clone(),
                            (None, Err(message)) => Receipt::Error {
                                reason_code: STORE_UNAVAILABLE.to_owned(),
                                message,
                            },
                            (None, Ok(())) => Receipt::Rejected {
                                submission_id: Some(query.submission_id),
                                reason_code: wire::ReasonCode::NotFound,
                                message: "no receipt for this submission id: none was received, \
                                          or a durable submission is still waiting to be filed \
                                          (ask again)"
                                    .to_owned(),
                            },
                        }
                    }
                    Ok(_) => Receipt::Rejected {
                        submission_id: None,
                        reason_code: wire::ReasonCode::SchemaViolation,
                        message: "submission_id is not a valid submission id".to_owned(),
                    },
                    Err(refusal) => Receipt::Rejected {
                        submission_id: None,
                        reason_code: wire::ReasonCode::from_refusal(refusal.reason_code),
                        message: refusal.message,
                    },
                };
                to_json(&receipt)
            }
            wire::SUBJECT_QUERY_INCIDENT => {
                let query = observe::refusal::parse_json::<IncidentQuery>(
                    "query",
                    &message.payload,
                    QUERY_BYTES_MAX,
                );
                let answer = match query {
                    Ok(query) => self.incident_answer(IncidentId(query.incident_id)).await,
                    Err(refusal) => IncidentQueryReply::Rejected {
                        reason_code: refusal.reason_code.to_owned(),
                        message: refusal.message,
                    },
                };
                to_json(&answer)
            }
            wire::SUBJECT_CONTACT_ERASE => {
                let query = observe::refusal::parse_json::<EraseContact>(
                    "request",
                    &message.payload,
                    QUERY_BYTES_MAX,
                )
                .and_then(|query| match &query.request_reference {
                    Some(reference)
                        if reference.is_empty()
                            || reference.chars().count() > wire::REQUEST_REFERENCE_CHARS_MAX
                            || reference.chars().any(char::is_control) =>
                    {
                        Err(observe::refusal::Refusal::schema_violation(format!(
                            "request_reference must be 1..={} characters without control characters",
                            wire::REQUEST_REFERENCE_CHARS_MAX
                        )))
                    }
                    _ => Ok(query),
                });
                let answer = match query {
                    Ok(query) => {
                        let traceparent = observe::traceparent_or_new(message.headers.as_ref());
                        self.erase_contact(query, &traceparent).await
                    }
                    Err(refusal) => EraseReply::Rejected {
                        reason_code: refusal.reason_code.to_owned(),
                        message: refusal.message,
                    },
                };
                to_json(&answer)
            }
            _ => return,
        };
        let endpoint = ENDPOINTS
            .iter()
            .find(|(_, subject)| *subject == message.subject.as_str())
            .map_or("unknown", |(name, _)| *name);
        self.config
            .observer
            .metrics()
            .request(endpoint, json_outcome(&answer), started.elapsed());
        if let Err(error) = request.respond(Ok(answer)).await {
            warn!(%error, "answer query");
        }
    }

    /// Read from the store, not from the incidents this instance tracks: the store has
    /// dispatch's latest commits, which the follower may not have delivered yet, and the time
    /// of the last change (`changed_at_ms`).
    async fn incident_answer(&self, incident: IncidentId) -> IncidentQueryReply {
        match self.incidents.load(&incident_aggregate(incident)).await {
            Ok(loaded) if !loaded.commits.is_empty() => {
                let state = IncidentState::from_events(loaded.events());
                let changed_at = loaded
                    .commits
                    .last()
                    .map_or(0, |commit| commit.meta.occurred_at_ms);
                IncidentQueryReply::Found {
                    incident: status::view(
                        incident,
                        &state,
                        loaded.position.version,
                        Vec::new(),
                        changed_at,
                    ),
                }
            }
            Ok(_) => IncidentQueryReply::NotFound {
                incident_id: incident.0,
            },
            Err(error) => IncidentQueryReply::Error {
                reason_code: STORE_UNAVAILABLE.to_owned(),
                message: error.to_string(),
            },
        }
    }
}

/// Whether the consumer reported more submissions waiting when it delivered the last of
/// `batch`.
fn submissions_pending(
    batch: &[Result<jetstream::Message, consumer::pull::MessagesError>],
) -> bool {
    batch
        .iter()
        .rev()
        .find_map(|item| item.as_ref().ok())
        .and_then(|message| message.info().ok())
        .is_some_and(|info| info.pending > 0)
}

/// Adds the chunks (of at most [`SUBMISSION_CHUNK_MAX`]) that `chunks` yields within `wait`
/// to `batch` while one more fits in [`SUBMISSION_BATCH_MAX`]. Returns early when `chunks`
/// ends; the caller polls it again and sees the end.
async fn fill_batch<T, S>(batch: &mut Vec<T>, chunks: &mut S, wait: Duration)
where
    S: futures::Stream<Item = Vec<T>> + Unpin,
{
    if wait.is_zero() {
        return;
    }
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() + SUBMISSION_CHUNK_MAX <= SUBMISSION_BATCH_MAX {
        match tokio::time::timeout_at(deadline, chunks.next()).await {
            Ok(Some(more)) => batch.extend(more),
            Ok(None) | Err(_) => break,
        }
    }
    debug_assert!(batch.len() <= SUBMISSION_BATCH_MAX);
}

/// The metric outcome of a receipt: `accepted` (filed or merged), `rejected`, `error`.
/// Groups a batch's contact writes `(input index, reporter, details)` by reporter, in first
/// appearance order: (reporter, the inputs that gave their details, the one of them that
/// arrived last, its details). Of inputs that arrived at the same millisecond, the later
/// listed counts as last.
fn latest_per_reporter<T>(
    contacts: impl IntoIterator<Item = (usize, uuid::Uuid, T)>,
    arrived_ms: impl Fn(usize) -> i64,
) -> Vec<(uuid::Uuid, Vec<usize>, usize, T)> {
    let mut latest: Vec<(uuid::Uuid, Vec<usize>, usize, T)> = Vec::new();
    for (index, reporter, details) in contacts {
        match latest.iter_mut().find(|(held, ..)| *held == reporter) {
            Some((_, indices, last, held_details)) => {
                indices.push(index);
                if arrived_ms(index) >= arrived_ms(*last) {
                    *last = index;
                    *held_details = details;
                }
            }
            None => latest.push((reporter, vec![index], index, details)),
        }
    }
    latest
}

fn receipt_outcome(receipt: &Receipt) -> &'static str {
    match receipt {
        Receipt::Filed { .. } | Receipt::Merged { .. } => "accepted",
        Receipt::Rejected { .. } => "rejected",
        Receipt::Error { .. } => "error",
    }
}

/// `filed`, `merged`, `rejected` or `error`.
fn receipt_kind(receipt: &Receipt) -> &'static str {
    match receipt {
        Receipt::Filed { .. } => "filed",
        Receipt::Merged { .. } => "merged",
        Receipt::Rejected { .. } => "rejected",
        Receipt::Error { .. } => "error",
    }
}

/// `accepted`, `rejected` or `error` from a JSON answer's `"status"`.
fn json_outcome(answer: &[u8]) -> &'static str {
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        status: Option<&'a str>,
    }
    match serde_json::from_slice::<Status<'_>>(answer)
        .ok()
        .and_then(|status| status.status)
    {
        Some("rejected") | Some("not_found") => "rejected",
        Some("error") => "error",
        _ => "accepted",
    }
}

fn receipt_id(receipt: &Receipt) -> Option<String> {
    match receipt {
        Receipt::Filed { submission_id, .. } | Receipt::Merged { submission_id, .. } => {
            Some(submission_id.clone())
        }
        Receipt::Rejected { submission_id, .. } => submission_id.clone(),
        Receipt::Error { .. } => None,
    }
}

/// A submission whose incident commit lost to a concurrent writer is decided again at most
/// this many times within one batch (each time on the re-read incident).
const CONFLICT_RETRIES_MAX: usize = 3;

/// At most this many batches are storing receipts and answering while the next is decided.
const BATCHES_FINISHING_MAX: usize = 2;

/// What the loop must learn from a finished batch.
enum ReceiptFix {
    /// Another instance (or an earlier attempt) stored this submission's receipt first.
    StoredEarlier(String, Receipt),
    /// The receipt could not be stored: the submission will be decided again.
    NotStored(String),
}

/// The second half of a batch, owned so that it runs beside the next batch: store receipts
/// (each submission's own aggregate, created once) and contact details, then acknowledge or
/// answer every input.
struct Finish {
    intake: EventStore<IntakeCodec>,
    contacts_bucket: kv::Store,
    client: async_nats::Client,
    observer: observe::Observer,
    inputs: Vec<Input>,
    plans: Vec<Plan>,
    failed: Vec<bool>,
    /// (later input, earlier input): the later one was answered from the earlier one's plan.
    answered_from: Vec<(usize, usize)>,
    /// (input, reporter, contact details): an input whose details were not stored fails
    /// (nak'ed or answered `error`), so they are written when it comes back.
    contacts: Vec<(usize, uuid::Uuid, wire::Contact)>,
    /// The submission ids of the INTAKE records this batch stores.
    records: Vec<String>,
    started: std::time::Instant,
}

/// What a finished batch hands back: the ids it stored records for, and what it learnt
/// about receipts.
struct Finished {
    records: Vec<String>,
    fixes: Vec<ReceiptFix>,
}

impl Finish {
    async fn run(self) -> Finished {
        let Finish {
            intake,
            contacts_bucket,
            client,
            observer,
            inputs,
            mut plans,
            mut failed,
            answered_from,
            contacts,
            records: record_ids,
            started,
        } = self;
        let mut fixes = Vec::new();
        let records = plans.iter().enumerate().filter_map(|(index, plan)| {
            let (aggregate, event) = plan.record.as_ref()?;
            if failed[index] {
                return None;
            }
            let store = &intake;
            let now = inputs[index].now;
            let traceparent = inputs[index].traceparent.as_str();
            Some(async move {
                let aggregate = AggregateId::new(aggregate.clone()).map_err(|error| {
                    warn!(%aggregate, %error, "receipt aggregate id");
                    Err(index)
                })?;
                let command_id = format!("receipt-{aggregate}");
                let commit = Commit {
                    event_ids: crate::core::event_ids_for(&command_id, 1),
                    meta: meta(&command_id, now, traceparent),
                    command_id,
                    events: vec![event.clone()],
                };
                match store.append(&aggregate, &Position::NEW, &commit).await {
                    Ok(_) => Ok(index),
                    Err(AppendError::Conflict { .. }) => {
                        // Another instance decided this submission first: its receipt wins.
                        match store.load(&aggregate).await {
                            Ok(loaded) => Err(loaded
                                .events()
                                .next()
                                .and_then(IntakeEvent::receipt)
                                .map(|receipt| (index, receipt))),
                            Err(error) => {
                                warn!(%error, "read the stored receipt");
                                Err(None)
                            }
                        }
                    }
                    Err(error) => {
                        warn!(%error, "store receipt");
                        Err(None)
                    }
                }
                .map_err(|stored| stored.ok_or(index))
            })
        });
        // One write per reporter: the details of their submission in the batch that arrived
        // last (those of the others are superseded; concurrent writes of one key would only
        // contend). Every submission of the reporter fails with the write.
        let latest_contact = latest_per_reporter(
            contacts
                .iter()
                .map(|(index, reporter, contact)| (*index, *reporter, contact)),
            |index| inputs[index].arrived_ms,
        );
        let contact_writes = latest_contact.iter().map(|(reporter, indices, latest, contact)| {
            let contacts_bucket = &contacts_bucket;
            let arrived_ms = inputs[*latest].arrived_ms;
            async move {
                match contacts::write_contact(contacts_bucket, *reporter, contact, arrived_ms)
                    .await
                {
                    Ok(ContactWrite::Written) => None,
                    Ok(ContactWrite::ErasedSince) => {
                        info!(%reporter, "contact details erased after the submission arrived; not written again");
                        None
                    }
                    Ok(ContactWrite::Superseded) => {
                        debug!(%reporter, "contact details of a later submission held; not overwritten");
                        None
                    }
                    Err(error) => {
                        warn!(%error, "store contact details; the submission is decided again later");
                        Some(indices.as_slice())
                    }
                }
            }
        });
        let (stored, contacts_failed) = futures::future::join(
            futures::future::join_all(records),
            futures::future::join_all(contact_writes),
        )
        .await;
        // Not acknowledged without its contact details stored: the work queue would drop the
        // only copy of them.
        for index in contacts_failed.into_iter().flatten().flatten() {
            failed[*index] = true;
        }
        for result in stored {
            match result {
                Ok(_) => {}
                Err(Ok((index, receipt))) => {
                    if let Some(id) = receipt_id(&receipt) {
                        fixes.push(ReceiptFix::StoredEarlier(id, receipt.clone()));
                    }
                    plans[index].receipt = receipt;
                }
                Err(Err(index)) => failed[index] = true,
            }
        }
        let receipts_stored = started.elapsed();
        let batch_size = inputs.len();
        // An input answered from an earlier input's plan fails with it (see `answered_from`).
        for (later, earlier) in answered_from {
            if failed[earlier] {
                failed[later] = true;
            }
        }
        // Phase 3: acknowledge or answer.
        for ((input, plan), failed) in inputs.into_iter().zip(plans).zip(failed) {
            let receipt = if failed {
                if let Some(id) = receipt_id(&plan.receipt) {
                    fixes.push(ReceiptFix::NotStored(id));
                }
                Receipt::Error {
                    reason_code: STORE_UNAVAILABLE.to_owned(),
                    message:
                        "the decision could not be stored; send again with the same submission_id"
                            .to_owned(),
                }
            } else {
                plan.receipt
            };
            let trace_id = observe::trace_id(&input.traceparent).unwrap_or("");
            let incident = receipt
                .incident_id()
                .map(|id| id.to_string())
                .unwrap_or_default();
            let span = info_span!("submission", incident = %incident, trace_id);
            let entered = span.enter();
            let kind = receipt_outcome(&receipt);
            observer.metrics().submission(receipt_kind(&receipt));
            debug!(kind, receipt = receipt_kind(&receipt), "submission decided");
            drop(entered);
            match input.origin {
                Origin::Durable(message) => {
                    // Announced before the ack, on the same connection: an ack the server got
                    // implies the announcement before it was sent too. (Acked first, a crash
                    // between the two lost the announcement for good: the submission was
                    // never delivered again.) A crash before the ack redelivers the
                    // submission, and its stored receipt is announced again.
                    if !failed && let Some(id) = receipt_id(&receipt) {
                        let subject = format!("{}{id}", wire::SUBJECT_RECEIPTS_PREFIX);
                        if let Err(error) = client.publish(subject, to_json(&receipt)).await {
                            warn!(%error, "announce receipt");
                        }
                    }
                    let ack = if failed {
                        let delivered = message.info().map_or(1, |info| info.delivered);
                        message
                            .ack_with(AckKind::Nak(Some(nak_delay(delivered))))
                            .await
                    } else {
                        message.ack().await
                    };
                    if let Err(error) = ack {
                        let submission = receipt_id(&receipt).unwrap_or_default();
                        warn!(%submission, nak = failed, %error, "acknowledge submission (it is delivered again)");
                    }
                }
                Origin::Request(request) => {
                    observer.metrics().request(
                        "submit",
                        receipt_outcome(&receipt),
                        Duration::from_millis(
                            u64::try_from(now_ms().saturating_sub(input.arrived_ms)).unwrap_or(0),
                        ),
                    );
                    if request.message.reply.is_some()
                        && let Err(error) = request.respond(Ok(to_json(&receipt))).await
                    {
                        warn!(%error, "answer submission request");
                    }
                }
            }
        }
        debug!(
            target: "intake::batch",
            batch_size,
            receipts_stored_us = receipts_stored.as_micros() as u64,
            answered_us = started.elapsed().as_micros() as u64,
            "batch answered"
        );
        Finished {
            records: record_ids,
            fixes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A submission that cannot be decided comes back after 1 s, then 2, 4, ... up to a minute.
    #[test]
    fn compressed_time_maps_an_arrival_as_dispatch_does() {
        let origin_ms = 1_778_032_800_000;
        let compressed = DecisionTime::Compressed {
            origin_ms,
            scale: 600,
        };
        assert_eq!(compressed.at(origin_ms), Timestamp(origin_ms));
        assert_eq!(
            compressed.at(origin_ms + 1_000),
            Timestamp(origin_ms + 600_000),
            "one wall second is ten minutes"
        );
        assert_eq!(
            DecisionTime::Wall.at(origin_ms + 1_000),
            Timestamp(origin_ms + 1_000)
        );
    }

    /// A batch may list a reporter's submissions out of arrival order (a redelivery, stream
    /// timestamps after a failover): the details written are those that arrived last.
    #[test]
    fn a_batch_writes_the_details_that_arrived_last() {
        let (one, two) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let arrived = [300, 100, 200, 50, 200];
        let grouped = latest_per_reporter(
            [
                (0, one, "a"),
                (1, two, "b"),
                (2, one, "c"),
                (3, one, "d"),
                (4, two, "e"),
            ],
            |index| arrived[index],
        );
        assert_eq!(
            grouped,
            vec![(one, vec![0, 2, 3], 0, "a"), (two, vec![1, 4], 4, "e")]
        );
    }

    #[test]
    fn redeliveries_back_off_to_a_minute() {
        let delays: Vec<u64> = [0, 1, 2, 3, 4, 6, 7, 8, 1_000, i64::MAX]
            .into_iter()
            .map(|delivered| nak_delay(delivered).as_secs())
            .collect();
        assert_eq!(delays, [1, 1, 2, 4, 8, 32, 60, 60, 60, 60]);
    }

    /// Fills `first` from `chunks` (each ready at once) with `wait`; returns the batch length
    /// and how many chunks were left unread.
    fn check(first: usize, chunks: &[usize], wait: Duration) -> (usize, usize) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut batch = vec![0u8; first];
            let mut stream = futures::stream::iter(
                chunks
                    .iter()
                    .map(|length| vec![0u8; *length])
                    .collect::<Vec<_>>(),
            );
            fill_batch(&mut batch, &mut stream, wait).await;
            (batch.len(), stream.count().await)
        })
    }

    #[test]
    fn a_batch_fills_while_a_whole_chunk_fits() {
        let wait = Duration::from_millis(50);
        // 16 + 128 + 128 + 128 = 400; one more chunk of up to 128 would fit no more.
        assert_eq!(check(16, &[128, 128, 128, 128], wait), (400, 1));
        // Small chunks: taken until a whole chunk no longer fits under the bound.
        assert_eq!(check(380, &[5, 5, 5, 5], wait), (385, 3));
        // The stream ends: what it had is taken, nothing waits.
        assert_eq!(check(16, &[10, 20], wait), (46, 0));
        // No wait: nothing is added.
        assert_eq!(check(16, &[10, 20], Duration::ZERO), (16, 2));
    }

    #[test]
    fn a_batch_waits_no_longer_than_told() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut batch = vec![0u8; 16];
            let mut silent = futures::stream::pending::<Vec<u8>>();
            let started = tokio::time::Instant::now();
            fill_batch(&mut batch, &mut silent, Duration::from_millis(20)).await;
            assert_eq!(batch.len(), 16);
            assert!(started.elapsed() >= Duration::from_millis(20));
        });
    }

    #[test]
    fn a_batch_never_exceeds_its_bound() {
        for first in [0, 1, 127, 128, 384, 385, 512] {
            let (length, _) = check(first, &[128; 8], Duration::from_millis(50));
            assert!(length <= SUBMISSION_BATCH_MAX, "{first} → {length}");
        }
    }
}
