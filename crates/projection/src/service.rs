//! The projection builder as a service: folds INCIDENTS (durable consumer, cumulative acks)
//! and GRIDS into the current generation's bucket, and answers `projection.query.<model>`.
//!
//! One `tokio::select!` loop: the shutdown signal, INCIDENTS deliveries, GRIDS deliveries,
//! a flush timer, the generation pointer (a rebuild swaps it; the service then moves to
//! the new generation) and the builder lease ([`crate::lease`]). Queries are answered by a
//! separate task reading KV, so they never wait for a flush and any instance (builder,
//! standby or `--queries-only`) can answer them.
//!
//! Only the lease holder folds. It checks its lease before every flush and writes the
//! checkpoint with a revision check, so a builder that lost its lease stops at once and the
//! standby that takes over resumes from the KV checkpoint like any restart (incident states
//! loaded, aggregates recomputed, commits already reflected skipped): nothing counts twice.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use eventstore::{
    Acks, Delivery, EventStore, Readers, ReplayRange, StreamSpec, SubscribeError, Subscription,
    SubscriptionConfig,
};
use futures::StreamExt as _;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::fold::{Applied, Projector, StoredIncident};
use crate::keys;
use crate::lease::{self, LeaseHandle, LeaseTiming, Role};
use crate::reader::ReadModels;
use crate::store::{self, Pointer, StoreError};
use crate::wire::{self, QueryReply, ScoreWeights};

/// Commits folded before a flush is forced (they stay unacknowledged until it is stored).
pub const FLUSH_COMMITS_MAX: usize = 2_000;
/// Longest time a folded commit waits for its flush.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Once the builder has caught up, its flush still waits this long after the first unflushed
/// commit, so that the commits of a moderate rate share a flush (an incident's filing and
/// dispatch commits come milliseconds apart, and every flush rewrites the aggregates they
/// touch) instead of one flush, and its key-value writes, per commit. 20 ms was enough while
/// a flush sorted every department board; once boards were kept in order the builder caught
/// up sooner and flushed more often, about 0.5 more server messages per report at 1,000
/// reports/s, which 50 ms takes back (docs/BENCHMARKS.md, "Session 12").
pub const FLUSH_LINGER: Duration = Duration::from_millis(50);
/// Attempts to store one flush before the service gives up (and restarts from KV).
const FLUSH_ATTEMPTS_MAX: usize = 5;
const FLUSH_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Queries answered concurrently by one instance.
pub const QUERIES_IN_FLIGHT_MAX: usize = 64;
/// Largest query body, in bytes.
pub const QUERY_BYTES_MAX: usize = 4 * 1024;
/// Areas, scorecards or communities listed in one query answer (a query's `limit` is at
/// most this, and this when absent).
pub const LIST_ITEMS_MAX: usize = 5_000;
/// A list answer ends its page before its items pass this many bytes of JSON and says
/// `next_after`: half of the server's default `max_payload` (1 MiB), so the answer always
/// fits with its envelope. (One grid's statistics are about 700 bytes, one community's
/// compliance report about 3 KB.)
pub const LIST_ANSWER_BYTES_MAX: usize = 512 * 1024;
/// A private GRIDS consumer left by a crashed instance is removed by the server after this.
const GRIDS_CONSUMER_INACTIVE: Duration = Duration::from_secs(300);
/// How often an instance that does not build reads the checkpoint its queries reflect (for
/// its progress and lag metrics).
const STANDBY_CHECKPOINT_POLL: Duration = Duration::from_secs(1);
/// How often an instance reads the generation pointer itself, besides watching it: the
/// watch reports only swaps made after it was opened (one made while the instance started was
/// missed, and the builder went on filling a generation no longer current), and an instance
/// whose switch failed half-way must still reach the current generation.
const POINTER_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// After a failure while building, this instance competes for the lease again only after
/// this pause, doubled for every failure in a row up to [`BUILD_RETRY_PAUSE_MAX`] (another
/// instance may build meanwhile); a successful flush resets it.
const BUILD_RETRY_PAUSE_MIN: Duration = Duration::from_secs(1);
const BUILD_RETRY_PAUSE_MAX: Duration = Duration::from_secs(60);

pub type IncidentStore = EventStore<codecs::IncidentCodec>;
pub type GridsStore = EventStore<registry::RegistryCodec>;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("open stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("replay {stream}: {reason}")]
    Replay { stream: String, reason: String },
    #[error(transparent)]
    Subscription(#[from] SubscribeError),
    #[error("subscribe to queries: {reason}")]
    Queries { reason: String },
    #[error("read the history of {aggregate} after a missing commit: {reason}")]
    Reload { aggregate: String, reason: String },
    /// Handled inside the service (it detaches and stands by); never returned by `run`.
    #[error("this instance is no longer the builder: {reason}")]
    NotBuilder { reason: String },
}

/// How one projection instance runs.
#[derive(Debug, Clone)]
pub struct ProjectionConfig {
    /// This instance's name (in its private GRIDS consumer's name and in logs).
    pub instance: String,
    pub queue_group: String,
    pub incidents: StreamSpec,
    pub grids: StreamSpec,
    /// KV replicas (1 on a single server, 3 on a cluster).
    pub replicas: usize,
    pub weights: ScoreWeights,
    /// Standards profile for community compliance (`None`: not evaluated).
    pub profile: Option<standards::Profile>,
    /// The city's department ids (its routing table): a board query for one of them that has
    /// no case yet answers an empty board; any other id is `not_found`, so a console can tell
    /// a mistyped department from a quiet one.
    pub departments: Vec<String>,
    /// Compete for the builder lease and fold while holding it (false: answer queries only).
    pub build: bool,
    /// The builder lease's intervals (TTL 10 s by default).
    pub lease: LeaseTiming,
    pub serve_queries: bool,
    pub flush_commits_max: usize,
    pub flush_interval: Duration,
    /// See [`FLUSH_LINGER`]; at most `flush_interval`.
    pub flush_linger: Duration,
    /// How long the server waits for an ack before redelivering. (A crashed builder's
    /// unflushed commits come back sooner: the next builder deletes the durable and follows
    /// again from the checkpoint stored with the read models.)
    pub ack_wait: Duration,
}

impl ProjectionConfig {
    pub fn new(incidents: StreamSpec, grids: StreamSpec) -> ProjectionConfig {
        ProjectionConfig {
            instance: "projection".to_owned(),
            queue_group: wire::QUEUE_GROUP.to_owned(),
            incidents,
            grids,
            replicas: 1,
            weights: ScoreWeights::default(),
            profile: None,
            departments: Vec::new(),
            build: true,
            lease: LeaseTiming::default(),
            serve_queries: true,
            flush_commits_max: FLUSH_COMMITS_MAX,
            flush_interval: FLUSH_INTERVAL,
            flush_linger: FLUSH_LINGER,
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// What the instance has done (published on a watch channel after every flush).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Whether this instance holds the builder lease and folds.
    pub builder: bool,
    pub generation: u64,
    pub incidents_sequence: u64,
    pub grids_sequence: u64,
    /// Commits folded in / skipped because the incident's stored view already reflected them.
    pub applied: u64,
    pub skipped: u64,
    /// Incidents folded afresh from their stored history because a commit was missing.
    pub reloaded: u64,
    /// Commits of such a history that did not fold (stored data the fold cannot read, each
    /// one logged): skipped rather than crashing the builder on them at every restart.
    pub history_skipped: u64,
    /// Messages skipped because they do not decode: INCIDENTS commits this build cannot read
    /// (logged as errors) and messages on INCIDENTS or GRIDS that are not commits at all.
    pub undecodable_skipped: u64,
    pub flushes: u64,
    pub keys_written: u64,
}

/// The state of the generation being built.
struct Attached {
    /// The lease term this fold runs under.
    term: u64,
    /// The checkpoint key's revision as this builder last wrote (or found) it.
    checkpoint_revision: Option<u64>,
    generation: u64,
    bucket: String,
    kv: kv::Store,
    projector: Projector,
    incidents: Subscription<codecs::IncidentCodec>,
    grids: Subscription<registry::RegistryCodec>,
    grids_durable: String,
    /// INCIDENTS commits folded since the last flush, and the last of them: its ack covers
    /// them all (`AckPolicy::All`).
    unflushed: usize,
    last_unacked: Option<Delivery<domain::IncidentEvent>>,
    /// The last GRIDS commit folded since the last flush (its ack covers the earlier ones).
    last_unacked_grids: Option<Delivery<registry::domain::Event>>,
    first_unflushed: Option<tokio::time::Instant>,
    /// When this builder attached (a failure long after it is not one "in a row").
    attached_at: tokio::time::Instant,
    /// The last delivery said the server held nothing more: flush after the linger.
    caught_up: bool,
}

/// One projection instance.
pub struct ProjectionService {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    config: ProjectionConfig,
    incident_store: IncidentStore,
    grids_store: GridsStore,
    meta: kv::Store,
    attached: Option<Attached>,
    /// The builder lease (`None` for a query-only instance).
    lease: Option<LeaseHandle>,
    /// Failures while building since the last successful flush.
    build_failures: u32,
    progress: Progress,
    progress_tx: watch::Sender<Progress>,
    generation_tx: watch::Sender<u64>,
    /// The NATS micro service `wangge-projection` and its query endpoint.
    queries: Option<(
        async_nats::service::Service,
        async_nats::service::endpoint::Endpoint,
    )>,
}

impl std::fmt::Debug for ProjectionService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionService")
            .field("instance", &self.config.instance)
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Opens both streams as they are; creates one only when it does not exist yet (a fresh
/// single server without `wangge up`). Under the deploy accounts the `projection` user may not
/// create or change event streams, so it must never ask to when they exist.
pub async fn open_stores(
    jetstream: &jetstream::Context,
    incidents: &StreamSpec,
    grids: &StreamSpec,
) -> Result<(IncidentStore, GridsStore), ServiceError> {
    let stream_error = |spec: &StreamSpec, error: eventstore::OpenError| ServiceError::Stream {
        stream: spec.stream_name.clone(),
        reason: error.to_string(),
    };
    let incident_store = match EventStore::open_existing(
        jetstream.clone(),
        incidents.clone(),
        codecs::IncidentCodec,
    )
    .await
    {
        Ok(store) => store,
        Err(_) => EventStore::open(jetstream.clone(), incidents.clone(), codecs::IncidentCodec)
            .await
            .map_err(|error| stream_error(incidents, error))?,
    };
    let grids_store =
        match EventStore::open_existing(jetstream.clone(), grids.clone(), registry::RegistryCodec)
            .await
        {
            Ok(store) => store,
            Err(_) => EventStore::open(jetstream.clone(), grids.clone(), registry::RegistryCodec)
                .await
                .map_err(|error| stream_error(grids, error))?,
        };
    Ok((incident_store, grids_store))
}

/// The current generation; creates generation 1 (empty) when there is none yet.
pub async fn current_generation(
    meta: &kv::Store,
    jetstream: &jetstream::Context,
    replicas: usize,
) -> Result<u64, StoreError> {
    loop {
        if let Some((pointer, _)) = store::read_pointer(meta).await? {
            return Ok(pointer.generation);
        }
        store::open_bucket(jetstream, &keys::generation_bucket(1), replicas).await?;
        let pointer = Pointer {
            generation: 1,
            swapped_at_ms: now_ms(),
        };
        match store::swap_pointer(meta, pointer, None).await {
            Ok(_) => return Ok(1),
            // Another instance created it first: read theirs.
            Err(StoreError::SwapConflict { .. }) => continue,
            Err(error) => return Err(error),
        }
    }
}

impl ProjectionService {
    /// Opens the streams and the current generation, loads its incident states from KV,
    /// replays GRIDS, subscribes, and (if configured) starts answering queries.
    pub async fn start(
        client: async_nats::Client,
        config: ProjectionConfig,
    ) -> Result<ProjectionService, ServiceError> {
        let jetstream = jetstream::new(client.clone());
        let (incident_store, grids_store) =
            open_stores(&jetstream, &config.incidents, &config.grids).await?;
        let meta = store::open_bucket(&jetstream, keys::META_BUCKET, config.replicas).await?;
        let generation = current_generation(&meta, &jetstream, config.replicas).await?;
        let (progress_tx, _) = watch::channel(Progress::default());
        let (generation_tx, _) = watch::channel(generation);
        let mut service = ProjectionService {
            client,
            jetstream,
            config,
            incident_store,
            grids_store,
            meta,
            attached: None,
            lease: None,
            build_failures: 0,
            progress: Progress::default(),
            progress_tx,
            generation_tx,
            queries: None,
        };
        if service.config.build {
            let lease = lease::spawn(
                service.meta.clone(),
                &service.config.instance,
                service.config.lease,
            );
            // The lease task's first round: create the key when nobody holds it. A standby
            // returns as soon as it has read the holder (or after the wait), and `run`
            // attaches when the lease comes its way.
            let mut role = lease.role();
            let first_round = service.config.lease.poll_every * 2 + Duration::from_secs(1);
            let _ = tokio::time::timeout(first_round, role.changed()).await;
            let current = role.borrow().clone();
            service.lease = Some(lease);
            if let Some(term) = current.valid_term(tokio::time::Instant::now()) {
                service.attach(generation, term).await?;
                service.flush_as_builder().await?;
            } else {
                info!(
                    instance = %service.config.instance,
                    holder = current.holder.as_deref().unwrap_or("unknown"),
                    "standby: another instance holds the builder lease; answering queries"
                );
            }
        }
        if service.config.serve_queries {
            let queries_error = |reason: String| ServiceError::Queries { reason };
            // Queries are the endpoint of a NATS micro service, so `$SRV.PING/INFO/STATS`
            // find the projection and count its requests, as for every other service.
            let micro = observe::micro_service(
                &service.client,
                "projection",
                "wangge read models: incident views, boards, statistics, scorecards, compliance",
                &service.config.queue_group,
                &service.config.instance,
            )
            .await
            .map_err(|error| queries_error(error.to_string()))?;
            let endpoint = observe::endpoint(&micro, "query", wire::SUBJECT_QUERY_ALL)
                .await
                .map_err(|error| queries_error(error.to_string()))?;
            eventstore::bus::server_barrier(&service.client)
                .await
                .map_err(|error| queries_error(error.to_string()))?;
            service.queries = Some((micro, endpoint));
        }
        Ok(service)
    }

    /// A receiver of [`Progress`].
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress_tx.subscribe()
    }

    /// The lease as the lease task last published it.
    fn role(&self) -> Option<Role> {
        self.lease
            .as_ref()
            .map(|lease| lease.role().borrow().clone())
    }

    /// Whether this instance may write read models now (holding a valid term).
    fn holds_lease(&self) -> bool {
        self.role()
            .and_then(|role| role.valid_term(tokio::time::Instant::now()))
            .is_some()
    }

    /// Loads generation `generation` and subscribes to both streams for it, under lease term
    /// `term`. The caller flushes next (writing the recomputed aggregates).
    async fn attach(&mut self, generation: u64, term: u64) -> Result<(), ServiceError> {
        let started = std::time::Instant::now();
        let bucket = keys::generation_bucket(generation);
        let kv = store::open_bucket(&self.jetstream, &bucket, self.config.replicas).await?;
        let (checkpoint, checkpoint_revision) = store::checkpoint_entry(&kv, &bucket).await?;
        let checkpoint = checkpoint.unwrap_or_default();
        let mut projector = Projector::new(self.config.weights, self.config.profile.clone(), true);
        let loaded = store::load_prefix(&self.jetstream, &bucket, keys::INCIDENT_PREFIX).await?;
        let incidents_loaded = loaded.len();
        for (key, value) in loaded {
            let stored: StoredIncident =
                serde_json::from_slice(&value).map_err(|error| StoreError::Decode {
                    bucket: bucket.clone(),
                    key,
                    reason: error.to_string(),
                })?;
            projector.load_incident(stored.into_held());
        }
        // Aggregates are never read back: they are recomputed from the incident states, so
        // a flush torn by a crash cannot make anything count twice.
        projector.recompute_aggregates();
        projector.note_incidents_sequence(checkpoint.incidents_sequence);
        let grids_reached = self
            .grids_store
            .replay(ReplayRange::default(), |commit| {
                projector.apply_grids_commit(&commit)
            })
            .await
            .map_err(|error| ServiceError::Replay {
                stream: self.config.grids.stream_name.clone(),
                reason: error.to_string(),
            })?;
        // The checkpoint in KV, not the consumer's ack floor, says where to resume: a durable
        // left by a crashed builder would redeliver its unacknowledged commits only after
        // `ack_wait`, behind newer ones, out of order. So the consumer is made afresh, in
        // stream order from the checkpoint; commits an incident's stored view already
        // reflects are skipped by the fold. (One builder per generation: see PROJECTION.md.)
        let durable = keys::incidents_durable(generation);
        if let Ok(stream) = self
            .jetstream
            .get_stream(&self.config.incidents.stream_name)
            .await
        {
            let _ = stream.delete_consumer(&durable).await;
        }
        let mut incidents_config = SubscriptionConfig::durable(durable);
        // One builder per generation reads it: in order, remade over any lost delivery.
        incidents_config.readers = Readers::One;
        incidents_config.acks = Acks::Cumulative;
        incidents_config.start_after_sequence = checkpoint.incidents_sequence;
        incidents_config.batch_max = self.config.flush_commits_max.max(1);
        incidents_config.ack_pending_max = (self.config.flush_commits_max as i64 * 2).max(1_000);
        incidents_config.ack_wait = self.config.ack_wait;
        let incidents = self.incident_store.subscribe(incidents_config).await?;
        let grids_durable = format!(
            "projection-grids-{}-{}",
            eventstore::consumer_name_fragment(&self.config.instance),
            uuid::Uuid::now_v7().simple()
        );
        let mut grids_config = SubscriptionConfig::durable(grids_durable.clone());
        grids_config.start_after_sequence = grids_reached;
        grids_config.inactive_threshold = Some(GRIDS_CONSUMER_INACTIVE);
        grids_config.readers = Readers::One;
        grids_config.acks = Acks::Cumulative;
        let grids = self.grids_store.subscribe(grids_config).await?;
        info!(
            generation,
            term,
            incidents = incidents_loaded,
            checkpoint = checkpoint.incidents_sequence,
            grids_reached,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "projection attached to its generation"
        );
        self.progress.generation = generation;
        self.progress.builder = true;
        self.progress_tx.send_replace(self.progress);
        self.generation_tx.send_replace(generation);
        self.attached = Some(Attached {
            term,
            checkpoint_revision,
            generation,
            bucket,
            kv,
            projector,
            incidents,
            grids,
            grids_durable,
            unflushed: 0,
            last_unacked: None,
            last_unacked_grids: None,
            first_unflushed: Some(tokio::time::Instant::now()),
            attached_at: tokio::time::Instant::now(),
            caught_up: false,
        });
        Ok(())
    }

    /// Attaches to the current generation under `term` and writes the recomputed aggregates.
    async fn become_builder(&mut self, term: u64) -> Result<(), ServiceError> {
        let generation =
            current_generation(&self.meta, &self.jetstream, self.config.replicas).await?;
        info!(
            instance = %self.config.instance,
            term,
            generation,
            "builder lease held: loading the read models and folding from the checkpoint"
        );
        self.attach(generation, term).await?;
        self.flush_as_builder().await
    }

    /// A failure while building or becoming the builder (the store timed out, a stream had no
    /// leader, a consumer broke): the instance stands by, giving the lease back, and keeps
    /// answering queries; a builder (this instance or another, at the lease's next poll) then
    /// starts afresh from the KV checkpoint. Before, such a failure ended the fold loop
    /// while the query task kept the process up: an instance that answered queries from
    /// read models nobody built any more, and never exited for a supervisor to restart it.
    /// Only the end of the query task ends the service (see `run`).
    async fn builder_failed(&mut self, error: ServiceError) {
        // A builder that held on longer than the longest pause (a quiet city: no flush to
        // show progress) fails afresh, not as one more in a row.
        if self
            .attached
            .as_ref()
            .is_some_and(|attached| attached.attached_at.elapsed() >= BUILD_RETRY_PAUSE_MAX)
        {
            self.build_failures = 0;
        }
        self.build_failures = self.build_failures.saturating_add(1);
        let doublings = self.build_failures.saturating_sub(1).min(16);
        let hold_off = BUILD_RETRY_PAUSE_MIN
            .saturating_mul(1 << doublings)
            .min(BUILD_RETRY_PAUSE_MAX);
        warn!(
            instance = %self.config.instance,
            %error,
            failures_in_a_row = self.build_failures,
            competes_again_after_ms = u64::try_from(hold_off.as_millis()).unwrap_or(u64::MAX),
            "building the read models failed; standing by (the next builder starts from the KV checkpoint)"
        );
        self.stand_by_for(&error.to_string(), hold_off).await;
    }

    /// Stops folding without writing anything more (the lease is gone or about to go), and
    /// gives the lease back so that a builder starts afresh from the KV checkpoint.
    async fn stand_by(&mut self, reason: &str) {
        self.stand_by_for(reason, Duration::ZERO).await;
    }

    /// [`Self::stand_by`], competing for the lease again only after `hold_off`.
    async fn stand_by_for(&mut self, reason: &str, hold_off: Duration) {
        // The lease first: deleting the private consumer below may wait a whole request
        // timeout while the cluster has no leader, and another instance may build meanwhile.
        if let Some(lease) = &self.lease {
            lease.resign(hold_off);
        }
        self.progress.builder = false;
        self.progress_tx.send_replace(self.progress);
        if let Some(attached) = self.attached.take() {
            warn!(
                instance = %self.config.instance,
                term = attached.term,
                reason,
                unflushed = attached.unflushed,
                "no longer the builder: stopped folding (unflushed commits are refolded by the next builder)"
            );
            if let Ok(stream) = self
                .jetstream
                .get_stream(&self.config.grids.stream_name)
                .await
            {
                let _ = stream.delete_consumer(&attached.grids_durable).await;
            }
        }
    }

    /// [`Self::flush`], standing by instead of failing when the lease is gone.
    async fn flush_as_builder(&mut self) -> Result<(), ServiceError> {
        // Failures in a row end only with a flush that stored progress: the first flush of
        // every attach stores none, and counted, a builder that fails at the same commit
        // every time (one that does not decode) would retry every second, forever, each
        // time loading every read model again.
        let progressed = self.attached.as_ref().is_some_and(|attached| {
            attached.unflushed > 0 || attached.last_unacked_grids.is_some()
        });
        let flushed = self.flush().await;
        if flushed.is_ok() && progressed && self.attached.is_some() {
            self.build_failures = 0;
        }
        match flushed {
            Err(ServiceError::NotBuilder { reason }) => {
                self.stand_by(&reason).await;
                Ok(())
            }
            other => other,
        }
    }

    /// Attaches or stands by as the lease says.
    async fn follow_lease(&mut self) -> Result<(), ServiceError> {
        let Some(role) = self.role() else {
            return Ok(());
        };
        let term = role.valid_term(tokio::time::Instant::now());
        let attached_term = self.attached.as_ref().map(|attached| attached.term);
        match (attached_term, term) {
            (Some(attached), Some(term)) if attached == term => Ok(()),
            (Some(_), _) => {
                self.stand_by("the builder lease was lost or renewed as a new term")
                    .await;
                Ok(())
            }
            (None, Some(term)) => self.become_builder(term).await,
            (None, None) => Ok(()),
        }
    }

    /// A standby's (or query-only instance's) progress: the checkpoint its answers reflect.
    async fn note_checkpoint(&mut self, models: &mut Option<ReadModels>) {
        let generation = *self.generation_tx.borrow();
        if models.as_ref().map(ReadModels::generation) != Some(generation) {
            *models = ReadModels::open(&self.jetstream, generation).await.ok();
        }
        let Some(models) = models.as_ref() else {
            return;
        };
        if let Ok(checkpoint) = models.checkpoint().await {
            self.progress.generation = checkpoint.generation.max(generation);
            self.progress.incidents_sequence = checkpoint.incidents_sequence;
            self.progress.grids_sequence = checkpoint.grids_sequence;
            self.progress_tx.send_if_modified(|progress| {
                let changed = *progress != self.progress;
                *progress = self.progress;
                changed
            });
        }
    }

    /// Stores what changed (aggregates, then incidents, then the checkpoint), then acks the
    /// commits it covers.
    async fn flush(&mut self) -> Result<(), ServiceError> {
        let role = self.role();
        let Some(attached) = self.attached.as_mut() else {
            return Ok(());
        };
        let term = attached.term;
        let lease_valid = || match &role {
            Some(role) => role.valid_term(tokio::time::Instant::now()) == Some(term),
            None => true,
        };
        if !lease_valid() {
            return Err(ServiceError::NotBuilder {
                reason: "builder lease expired or lost before a flush".to_owned(),
            });
        }
        attached.first_unflushed = None;
        let rendered = attached.projector.take_dirty(false);
        let written = rendered.len() as u64;
        let checkpoint = attached.projector.checkpoint(attached.generation, now_ms());
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A retry starts only within the lease: the pause before it may have outlasted
            // the term, and a standby may have taken over and flushed meanwhile.
            if attempt > 1 && !lease_valid() {
                return Err(ServiceError::NotBuilder {
                    reason: "builder lease expired while a flush was retried".to_owned(),
                });
            }
            // Values are `Bytes`: a retry's copy costs reference counts only.
            let batch = crate::fold::Rendered {
                models: rendered.models.clone(),
                incidents: rendered.incidents.clone(),
            };
            match store::write_flush_fenced(
                &attached.kv,
                &attached.bucket,
                batch,
                checkpoint,
                attached.checkpoint_revision,
            )
            .await
            {
                Ok(revision) => {
                    attached.checkpoint_revision = Some(revision);
                    break;
                }
                // (A retry after a write whose answer was lost is refused too: the instance
                // then stands by and the lease's next term reloads from KV. Safe, if slow.)
                Err(StoreError::Fenced { .. }) => {
                    return Err(ServiceError::NotBuilder {
                        reason: "another builder stored a checkpoint".to_owned(),
                    });
                }
                Err(error) if !lease_valid() => {
                    return Err(ServiceError::NotBuilder {
                        reason: format!("builder lease expired while a flush failed: {error}"),
                    });
                }
                Err(error) if attempt < FLUSH_ATTEMPTS_MAX => {
                    warn!(%error, attempt, "flush not stored; retrying");
                    tokio::time::sleep(FLUSH_RETRY_PAUSE).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
        // Cumulative acks (`AckPolicy::All`): the last delivery's ack covers the flush. The
        // checkpoint, not the ack floor, is where a builder resumes; acks only keep the
        // consumer's pending count low (one ack per flush instead of one per commit).
        attached.unflushed = 0;
        if let Some(delivery) = attached.last_unacked.take()
            && let Err(error) = delivery.ack().await
        {
            debug!(%error, "ack lost; the flushed commits are redelivered and skipped");
        }
        if let Some(delivery) = attached.last_unacked_grids.take()
            && let Err(error) = delivery.ack().await
        {
            debug!(%error, "ack lost; the flushed GRIDS commits are redelivered and skipped");
        }
        self.progress.flushes += 1;
        self.progress.keys_written += written;
        self.progress.incidents_sequence = checkpoint.incidents_sequence;
        self.progress.grids_sequence = checkpoint.grids_sequence;
        self.progress_tx.send_replace(self.progress);
        Ok(())
    }

    /// Reads the generation pointer and moves to it if this instance is elsewhere: a builder
    /// switches, any instance points its queries there. Re-opens a pointer watch that failed.
    async fn check_pointer(&mut self, pointer_watch: &mut Option<kv::Watch>) {
        if pointer_watch.is_none() {
            match self.meta.watch(keys::CURRENT).await {
                Ok(watch) => *pointer_watch = Some(watch),
                Err(error) => debug!(%error, "watch the generation pointer again"),
            }
        }
        let generation = match store::read_pointer(&self.meta).await {
            Ok(Some((pointer, _))) => pointer.generation,
            Ok(None) => return,
            Err(error) => {
                debug!(%error, "read the generation pointer");
                return;
            }
        };
        // Generations only grow: a lower one is a stale read (a replica behind the leader),
        // never a reason to go back.
        let building = self.attached.as_ref().map(|attached| attached.generation);
        match building {
            Some(attached) if generation > attached => {
                if let Err(error) = self.switch(generation).await {
                    self.builder_failed(error).await;
                }
            }
            Some(_) => {}
            None => {
                if generation > *self.generation_tx.borrow() {
                    info!(generation, "queries follow the current generation");
                    self.generation_tx.send_replace(generation);
                }
            }
        }
    }

    /// Moves to `generation` after a rebuild swapped the pointer.
    async fn switch(&mut self, generation: u64) -> Result<(), ServiceError> {
        self.flush_as_builder().await?;
        let Some(old) = self.attached.take() else {
            // The lease went during the flush: the next builder finds the new pointer.
            return Ok(());
        };
        info!(
            from = old.generation,
            to = generation,
            "generation swapped; moving to it"
        );
        self.delete_consumers(&old).await;
        self.attach(generation, old.term).await?;
        self.flush_as_builder().await
    }

    async fn delete_consumers(&self, attached: &Attached) {
        let durable = keys::incidents_durable(attached.generation);
        for (stream, consumer) in [
            (&self.config.incidents.stream_name, durable.as_str()),
            (
                &self.config.grids.stream_name,
                attached.grids_durable.as_str(),
            ),
        ] {
            match self.jetstream.get_stream(stream).await {
                Ok(stream) => {
                    if let Err(error) = stream.delete_consumer(consumer).await {
                        debug!(%consumer, %error, "delete consumer");
                    }
                }
                Err(error) => {
                    warn!(%stream, %consumer, %error, "open stream to delete a consumer; the consumer stays")
                }
            }
        }
    }

    /// Builds and serves until `stopped` turns true (or its sender is dropped).
    pub async fn run(mut self, mut stopped: watch::Receiver<bool>) -> Result<(), ServiceError> {
        let mut query_task = self.queries.take().map(|(micro, endpoint)| {
            let jetstream = self.jetstream.clone();
            let generation = self.generation_tx.subscribe();
            let stop = stopped.clone();
            let departments = self.config.departments.clone();
            tokio::spawn(serve_queries(
                jetstream,
                micro,
                endpoint,
                generation,
                stop,
                departments,
            ))
        });
        let mut pointer_watch = match self.meta.watch(keys::CURRENT).await {
            Ok(watch) => Some(watch),
            Err(error) => {
                warn!(%error, "watch the generation pointer; swaps are seen by reading it every few seconds");
                None
            }
        };
        // The first tick is at once: a swap between `start` and the watch above is seen now.
        let mut pointer_check = tokio::time::interval(POINTER_CHECK_INTERVAL);
        pointer_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut role = self.lease.as_ref().map(LeaseHandle::role);
        let mut standby_models: Option<ReadModels> = None;
        let result = loop {
            if *stopped.borrow() {
                break Ok(());
            }
            let Some(attached) = self.attached.as_mut() else {
                // Standby or query-only instance: follow the pointer for the query task, the
                // lease, and the checkpoint the answers reflect.
                tokio::select! {
                    changed = stopped.changed() => {
                        if changed.is_err() {
                            break Ok(());
                        }
                    }
                    entry = next_pointer(&mut pointer_watch) => {
                        if let Some(pointer) = entry.and_then(|value| serde_json::from_slice::<Pointer>(&value).ok()) {
                            self.generation_tx.send_replace(pointer.generation);
                        }
                    }
                    reason = query_task_ended(&mut query_task) => {
                        if *stopped.borrow() {
                            break Ok(());
                        }
                        break Err(ServiceError::Queries { reason });
                    }
                    () = role_changed(&mut role) => {
                        if let Err(error) = self.follow_lease().await {
                            self.builder_failed(error).await;
                            continue;
                        }
                    }
                    () = tokio::time::sleep(STANDBY_CHECKPOINT_POLL) => {
                        self.note_checkpoint(&mut standby_models).await;
                    }
                    _ = pointer_check.tick() => self.check_pointer(&mut pointer_watch).await,
                }
                continue;
            };
            let flush_wait = if attached.caught_up {
                self.config.flush_linger.min(self.config.flush_interval)
            } else {
                self.config.flush_interval
            };
            let flush_at = attached.first_unflushed.map(|first| first + flush_wait);
            tokio::select! {
                changed = stopped.changed() => {
                    if changed.is_err() || *stopped.borrow() {
                        break Ok(());
                    }
                }
                reason = query_task_ended(&mut query_task) => {
                    if *stopped.borrow() {
                        break Ok(());
                    }
                    break Err(ServiceError::Queries { reason });
                }
                () = role_changed(&mut role) => {
                    if let Err(error) = self.follow_lease().await {
                        self.builder_failed(error).await;
                        continue;
                    }
                }
                delivery = attached.incidents.next() => {
                    let delivery = match delivery {
                        Ok(delivery) => delivery,
                        // A commit this build cannot decode (an event type from a newer build
                        // during a rolling upgrade, a foreign publish on the subjects) is
                        // skipped like one of a stored history that does not decode (below):
                        // stopping on it stopped every builder on it, for good, while the
                        // read models went stale. The checkpoint moves past it.
                        Err(SubscribeError::Decode { sequence, source, message, .. }) => {
                            if eventstore::carries_envelope(message.headers.as_ref(), &message.payload) {
                                error!(
                                    sequence,
                                    %source,
                                    "an INCIDENTS commit this build cannot read skipped (the read models miss it until this build is upgraded and `wangge projection rebuild` runs)"
                                );
                            } else {
                                warn!(sequence, %source, "an INCIDENTS message that is not a commit skipped");
                            }
                            self.progress.undecodable_skipped += 1;
                            attached.projector.note_incidents_sequence(sequence);
                            // Progress: the next flush moves the checkpoint past it.
                            attached.unflushed += 1;
                            attached.first_unflushed.get_or_insert_with(tokio::time::Instant::now);
                            // Cumulative: covers the commits before it too, which the
                            // checkpoint (where a builder resumes) covers at the next flush.
                            if let Err(error) = message.ack().await {
                                debug!(%error, "ack of an undecodable commit lost; it comes back and is skipped again");
                            }
                            continue;
                        }
                        // A builder whose lease ran out finds its consumer replaced.
                        Err(error) if self.lease.is_some() && !self.holds_lease() => {
                            self.stand_by(&format!("INCIDENTS consumer: {error}")).await;
                            continue;
                        }
                        Err(error) => {
                            self.builder_failed(error.into()).await;
                            continue;
                        }
                    };
                    match attached.projector.apply_incident_commit(&delivery.commit) {
                        Applied::New => self.progress.applied += 1,
                        Applied::AlreadyReflected => self.progress.skipped += 1,
                        Applied::Foreign => warn!(aggregate = %delivery.commit.aggregate, "commit names no incident; skipped"),
                        Applied::Gap { incident, held_version } => {
                            warn!(
                                aggregate = %delivery.commit.aggregate,
                                held_version,
                                first_version = delivery.commit.first_version,
                                "commit does not follow the incident's view; folding its stored history afresh"
                            );
                            // `inspect`, not `load`: a history whose links do not hold (a commit
                            // missing or edited) is data to fold as far as it goes, not an error
                            // to stop on; stopping made every builder stall on the same commit
                            // for good. Only a store that cannot be read is retried.
                            match self.incident_store.inspect(&delivery.commit.aggregate).await {
                                Ok(history) => {
                                    for broken in &history.breaks {
                                        warn!(
                                            aggregate = %delivery.commit.aggregate,
                                            sequence = broken.sequence,
                                            version = broken.version,
                                            detail = %broken.detail,
                                            "the incident's stored history has a broken link (`wangge audit verify` names it); folded as stored"
                                        );
                                    }
                                    let skipped = attached.projector.replace_incident(incident, &history.commits);
                                    for (sequence, applied) in &skipped {
                                        warn!(
                                            aggregate = %delivery.commit.aggregate,
                                            sequence,
                                            ?applied,
                                            "a commit of the incident's stored history does not fold; skipped"
                                        );
                                    }
                                    self.progress.history_skipped += skipped.len() as u64;
                                    self.progress.reloaded += 1;
                                }
                                // A commit of the history that does not decode: the incident keeps
                                // the view it had; this commit is skipped like one that does not
                                // fold.
                                Err(error @ eventstore::LoadError::Corrupt { .. }) => {
                                    warn!(
                                        aggregate = %delivery.commit.aggregate,
                                        %error,
                                        "the incident's stored history does not decode; the commit is skipped"
                                    );
                                    self.progress.history_skipped += 1;
                                }
                                // Not acked: the flush does not cover it and a later builder
                                // (or this one after a restart) folds it again.
                                Err(error) => {
                                    let error = ServiceError::Reload {
                                        aggregate: delivery.commit.aggregate.to_string(),
                                        reason: error.to_string(),
                                    };
                                    self.builder_failed(error).await;
                                    continue;
                                }
                            }
                        }
                    }
                    attached.caught_up = delivery.pending == 0;
                    attached.last_unacked = Some(delivery);
                    attached.unflushed += 1;
                    attached.first_unflushed.get_or_insert_with(tokio::time::Instant::now);
                    let full = attached.unflushed >= self.config.flush_commits_max;
                    if full && let Err(error) = self.flush_as_builder().await {
                        self.builder_failed(error).await;
                        continue;
                    }
                }
                delivery = attached.grids.next() => {
                    let delivery = match delivery {
                        Ok(delivery) => delivery,
                        // Not a commit (another client's publish on `grids.ev.*`): skipped.
                        // A GRIDS commit this build cannot read stops the builder, as the
                        // registry stops on it (upgrade the registry last).
                        Err(error) => match error.skip_if_foreign().await {
                            Ok(()) => {
                                self.progress.undecodable_skipped += 1;
                                continue;
                            }
                            Err(error) => {
                                self.builder_failed(error.into()).await;
                                continue;
                            }
                        },
                    };
                    attached.projector.apply_grids_commit(&delivery.commit);
                    attached.caught_up = delivery.pending == 0;
                    attached.last_unacked_grids = Some(delivery);
                    attached.first_unflushed.get_or_insert_with(tokio::time::Instant::now);
                }
                _ = sleep_until(flush_at) => {
                    if let Err(error) = self.flush_as_builder().await {
                        self.builder_failed(error).await;
                        continue;
                    }
                }
                _ = pointer_check.tick() => self.check_pointer(&mut pointer_watch).await,
                entry = next_pointer(&mut pointer_watch) => {
                    let generation = entry.and_then(|value| serde_json::from_slice::<Pointer>(&value).ok()).map(|p| p.generation);
                    if let Some(generation) = generation
                        && generation != attached.generation
                        && let Err(error) = self.switch(generation).await
                    {
                        self.builder_failed(error).await;
                        continue;
                    }
                }
            }
        };
        let flushed = if result.is_ok() {
            self.flush_as_builder().await
        } else {
            Ok(())
        };
        if let Some(attached) = self.attached.take() {
            // The INCIDENTS durable stays (its position is the builder's); the private GRIDS
            // consumer goes.
            if let Ok(stream) = self
                .jetstream
                .get_stream(&self.config.grids.stream_name)
                .await
            {
                let _ = stream.delete_consumer(&attached.grids_durable).await;
            }
        }
        // Give the lease back after the last flush: a standby takes over at its next poll.
        if let Some(lease) = self.lease.take() {
            lease.release().await;
        }
        if let Some(task) = query_task {
            // Without a stop signal the query task would answer for ever: a failed service
            // must end, for its supervisor to start it again.
            if result.is_err() {
                task.abort();
            }
            match task.await {
                Ok(()) => {}
                Err(error) if error.is_cancelled() => {}
                Err(error) => warn!(%error, "query task"),
            }
        }
        if let Err(error) = self.client.flush().await {
            warn!(%error, "flush at shutdown");
        }
        let progress = &self.progress;
        info!(
            builder = progress.builder,
            generation = progress.generation,
            incidents_sequence = progress.incidents_sequence,
            grids_sequence = progress.grids_sequence,
            applied = progress.applied,
            skipped = progress.skipped,
            reloaded = progress.reloaded,
            history_skipped = progress.history_skipped,
            undecodable_skipped = progress.undecodable_skipped,
            flushes = progress.flushes,
            keys_written = progress.keys_written,
            "projection stopped"
        );
        result.and(flushed)
    }
}

/// Waits for the query task to end (never, when there is none) and says why; the handle is
/// taken, so that it is not awaited again.
async fn query_task_ended(task: &mut Option<tokio::task::JoinHandle<()>>) -> String {
    let Some(handle) = task.as_mut() else {
        return std::future::pending().await;
    };
    let ended = handle.await;
    *task = None;
    match ended {
        Ok(()) => "the query subscription ended".to_owned(),
        Err(error) => format!("the query task failed: {error}"),
    }
}

/// Resolves when the lease's role changes (never for a query-only instance, nor after the
/// lease task ended).
async fn role_changed(role: &mut Option<watch::Receiver<Role>>) {
    match role {
        Some(receiver) => {
            if receiver.changed().await.is_err() {
                *role = None;
            }
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn next_pointer(watch: &mut Option<kv::Watch>) -> Option<bytes::Bytes> {
    match watch {
        Some(entries) => match entries.next().await {
            Some(Ok(entry)) if entry.operation == kv::Operation::Put => Some(entry.value),
            Some(Ok(_)) => None,
            Some(Err(error)) => {
                warn!(%error, "generation pointer watch failed; reading the pointer every few seconds, and watching again");
                *watch = None;
                None
            }
            None => {
                *watch = None;
                None
            }
        },
        None => std::future::pending().await,
    }
}

/// Answers queries until `stopped`; the generation follows the builder's (or the pointer).
async fn serve_queries(
    jetstream: jetstream::Context,
    micro: async_nats::service::Service,
    mut requests: async_nats::service::endpoint::Endpoint,
    generation: watch::Receiver<u64>,
    mut stopped: watch::Receiver<bool>,
    departments: Vec<String>,
) {
    let mut models: Option<ReadModels> = None;
    let departments = std::sync::Arc::new(departments);
    // Answers in flight (at most QUERIES_IN_FLIGHT_MAX): one slow list query does not hold
    // up the others.
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        // A full set: wait for one answer before taking another request.
        while in_flight.len() >= QUERIES_IN_FLIGHT_MAX {
            let _ = in_flight.join_next().await;
        }
        let request = tokio::select! {
            changed = stopped.changed() => {
                if changed.is_err() || *stopped.borrow() {
                    break;
                }
                continue;
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
            request = requests.next() => match request {
                Some(request) => request,
                None => break,
            },
        };
        let wanted = *generation.borrow();
        if models.as_ref().map(ReadModels::generation) != Some(wanted) {
            models = match ReadModels::open(&jetstream, wanted).await {
                Ok(opened) => Some(opened),
                Err(error) => {
                    warn!(generation = wanted, %error, "open the current generation's read models for queries");
                    None
                }
            };
        }
        let models = models.clone();
        let departments = std::sync::Arc::clone(&departments);
        in_flight.spawn(async move {
            let answer = match &models {
                Some(models) => {
                    answer(
                        models,
                        &departments,
                        &request.message.subject,
                        &request.message.payload,
                    )
                    .await
                }
                None => unavailable_reply(format!("generation {wanted} is not readable")),
            };
            if let Err(error) = request.respond(Ok(answer.into())).await {
                debug!(%error, "query reply not sent");
            }
        });
    }
    // Answers already being made are sent before the endpoint stops.
    while in_flight.join_next().await.is_some() {}
    if let Err(error) = requests.stop().await {
        debug!(%error, "stop the query endpoint");
    }
    if let Err(error) = micro.stop().await {
        debug!(%error, "stop the micro service");
    }
}

/// `error`, `store_unavailable`: the read models could not be read (ask again).
fn unavailable_reply(message: String) -> Vec<u8> {
    serde_json::to_vec(&QueryReply::<()>::Error {
        reason_code: "store_unavailable".to_owned(),
        message,
    })
    .expect("error replies serialise")
}

/// `rejected`: the query cannot be answered as asked.
fn rejected_reply(reason_code: &str, message: String) -> Vec<u8> {
    serde_json::to_vec(&QueryReply::<()>::Rejected {
        reason_code: reason_code.to_owned(),
        message,
    })
    .expect("rejected replies serialise")
}

fn found<T: Serialize>(
    models: &ReadModels,
    checkpoint: wire::Checkpoint,
    value: Result<Option<T>, StoreError>,
) -> Vec<u8> {
    found_page(
        models,
        checkpoint,
        value.map(|value| value.map(|value| (value, None))),
    )
}

/// A value, and for one page of a list the key to ask after when more follow.
type Page<T> = (T, Option<String>);

/// `found` with the page's `next_after`.
fn found_page<T: Serialize>(
    models: &ReadModels,
    checkpoint: wire::Checkpoint,
    value: Result<Option<Page<T>>, StoreError>,
) -> Vec<u8> {
    let reply = match value {
        Ok(Some((value, next_after))) => QueryReply::Found {
            generation: models.generation(),
            checkpoint,
            value,
            next_after,
        },
        Ok(None) => QueryReply::NotFound {
            generation: models.generation(),
            checkpoint,
        },
        Err(error) => return unavailable_reply(error.to_string()),
    };
    serde_json::to_vec(&reply).expect("replies serialise")
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Vec<u8>> {
    // An empty body is the query with every field left out.
    let payload = if payload.len() <= QUERY_BYTES_MAX && payload.iter().all(u8::is_ascii_whitespace)
    {
        b"{}".as_slice()
    } else {
        payload
    };
    observe::refusal::parse_json("query", payload, QUERY_BYTES_MAX)
        .map_err(|refusal| rejected_reply(refusal.reason_code, refusal.message))
}

/// The refusal of a list query's `limit` outside 1..=[`LIST_ITEMS_MAX`].
fn limit_refusal(limit: Option<u32>) -> Option<Vec<u8>> {
    let limit = limit?;
    let within = usize::try_from(limit).is_ok_and(|limit| (1..=LIST_ITEMS_MAX).contains(&limit));
    (!within).then(|| {
        rejected_reply(
            observe::refusal::SCHEMA_VIOLATION,
            format!("limit {limit} is outside 1..={LIST_ITEMS_MAX}"),
        )
    })
}

/// One page of `items`: in `key` order, those after `after`, at most `limit` (at most
/// [`LIST_ITEMS_MAX`]) and [`LIST_ANSWER_BYTES_MAX`] bytes of JSON, with the key to ask
/// after when more follow.
fn page<T: Serialize>(
    items: Result<Vec<T>, StoreError>,
    key: fn(&T) -> &str,
    after: Option<&str>,
    limit: Option<u32>,
) -> Result<Option<Page<Vec<T>>>, StoreError> {
    let mut items = items?;
    items.sort_by(|a, b| key(a).cmp(key(b)));
    // Clamped for callers that did not check it with `limit_refusal`.
    let limit = limit.map_or(LIST_ITEMS_MAX, |limit| {
        usize::try_from(limit)
            .unwrap_or(LIST_ITEMS_MAX)
            .clamp(1, LIST_ITEMS_MAX)
    });
    let start = after.map_or(0, |after| items.partition_point(|item| key(item) <= after));
    let mut bytes = 0;
    let mut end = start;
    while end < items.len() && end - start < limit {
        // `,` between items; an item that does not serialise is left to the reply's encoder.
        let item_bytes = serde_json::to_vec(&items[end]).map_or(0, |json| json.len()) + 1;
        if end > start && bytes + item_bytes > LIST_ANSWER_BYTES_MAX {
            break;
        }
        bytes += item_bytes;
        end += 1;
    }
    let next_after = (end < items.len() && end > start).then(|| key(&items[end - 1]).to_owned());
    items.truncate(end);
    items.drain(..start);
    Ok(Some((items, next_after)))
}

/// The answer to one query (pure over the read models and the city's `departments`: no state
/// of the builder).
pub async fn answer(
    models: &ReadModels,
    departments: &[String],
    subject: &str,
    payload: &[u8],
) -> Vec<u8> {
    let model = subject
        .strip_prefix(wire::SUBJECT_QUERY_PREFIX)
        .unwrap_or(subject);
    let checkpoint = match models.checkpoint().await {
        Ok(checkpoint) => checkpoint,
        Err(error) => return unavailable_reply(error.to_string()),
    };
    match model {
        "incident" => match parse::<wire::IncidentQuery>(payload) {
            Ok(query) => found(
                models,
                checkpoint,
                models.incident(&query.incident_id).await,
            ),
            Err(reply) => reply,
        },
        "board" => match parse::<wire::BoardQuery>(payload) {
            Ok(query) => {
                let quiet =
                    departments
                        .contains(&query.department)
                        .then(|| wire::DepartmentBoard {
                            department: query.department.clone(),
                            sequence: checkpoint.incidents_sequence,
                            open: 0,
                            entries: Vec::new(),
                        });
                let board = models
                    .board(&query.department)
                    .await
                    .map(|board| board.or(quiet));
                found(models, checkpoint, board)
            }
            Err(reply) => reply,
        },
        "area" => match parse::<wire::AreaQuery>(payload) {
            Ok(query) => {
                if let Some(refusal) = limit_refusal(query.limit) {
                    return refusal;
                }
                let level = query.level.name();
                match &query.code {
                    Some(code) => found(
                        models,
                        checkpoint,
                        models.area(level, code).await.map(|a| a.map(|a| vec![a])),
                    ),
                    None => found_page(
                        models,
                        checkpoint,
                        page(
                            models.areas(level).await,
                            |area| &area.code,
                            query.after.as_deref(),
                            query.limit,
                        ),
                    ),
                }
            }
            Err(reply) => reply,
        },
        "scorecards" => match parse::<wire::ScorecardQuery>(payload) {
            Ok(query) => {
                if let Some(refusal) = limit_refusal(query.limit) {
                    return refusal;
                }
                let kind = query.kind.name();
                match &query.id {
                    Some(id) => found(
                        models,
                        checkpoint,
                        models.scorecard(kind, id).await.map(|s| s.map(|s| vec![s])),
                    ),
                    None => found_page(
                        models,
                        checkpoint,
                        page(
                            models.scorecards(kind).await,
                            |scorecard| &scorecard.id,
                            query.after.as_deref(),
                            query.limit,
                        ),
                    ),
                }
            }
            Err(reply) => reply,
        },
        "totals" => match parse::<wire::NoQuery>(payload) {
            Ok(wire::NoQuery {}) => found(models, checkpoint, models.totals().await.map(Some)),
            Err(reply) => reply,
        },
        "compliance" => match parse::<wire::ComplianceQuery>(payload) {
            Ok(query) => {
                if let Some(refusal) = limit_refusal(query.limit) {
                    return refusal;
                }
                match &query.community_id {
                    Some(id) => found(
                        models,
                        checkpoint,
                        models.compliance(id).await.map(|c| c.map(|c| vec![c])),
                    ),
                    None => found_page(
                        models,
                        checkpoint,
                        page(
                            models.compliance_all().await,
                            |community| &community.community_id,
                            query.after.as_deref(),
                            query.limit,
                        ),
                    ),
                }
            }
            Err(reply) => reply,
        },
        "checkpoint" => match parse::<wire::NoQuery>(payload) {
            Ok(wire::NoQuery {}) => found(models, checkpoint, Ok(Some(checkpoint))),
            Err(reply) => reply,
        },
        other => rejected_reply(
            "unknown_model",
            format!(
                "no model {other:?}: incident, board, area, scorecards, totals, compliance, checkpoint"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items of `bytes` bytes each, keyed `k00`, `k01`, ...
    fn items(count: usize, bytes: usize) -> Vec<(String, String)> {
        (0..count)
            .map(|n| (format!("k{n:02}"), "x".repeat(bytes)))
            .collect()
    }

    /// The keys of each page of `items` (walking `next_after`) with `limit`.
    fn pages(items: &[(String, String)], limit: Option<u32>) -> Vec<Vec<String>> {
        let mut pages = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, next) = page(Ok(items.to_vec()), |item| &item.0, after.as_deref(), limit)
                .unwrap()
                .unwrap();
            pages.push(page.into_iter().map(|item| item.0).collect());
            match next {
                Some(next) => after = Some(next),
                None => return pages,
            }
        }
    }

    #[test]
    fn a_list_is_cut_into_pages_by_limit_and_by_bytes() {
        let small = items(7, 10);
        assert_eq!(
            pages(&small, Some(3)),
            vec![
                vec!["k00", "k01", "k02"],
                vec!["k03", "k04", "k05"],
                vec!["k06"]
            ]
        );
        assert_eq!(pages(&small, None).len(), 1);
        // 100 KB items: five fit under LIST_ANSWER_BYTES_MAX (512 KiB), the sixth would not.
        let large = items(12, 100_000);
        let sizes: Vec<usize> = pages(&large, None).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![5, 5, 2]);
        // One item larger than the bound still makes a page, so the walk always advances.
        let huge = items(2, LIST_ANSWER_BYTES_MAX + 1);
        assert_eq!(pages(&huge, None), vec![vec!["k00"], vec!["k01"]]);
        // An empty list, or a page after the last key, is one empty page with no next.
        assert_eq!(pages(&[], None), vec![Vec::<String>::new()]);
    }
}
