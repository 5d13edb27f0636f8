//! The dispatch service: a thin shell around [`domain::decide`].
//!
//! - **Start**: the INCIDENTS stream is replayed in bulk to its current end (after a KV
//!   snapshot, if one is there) into a [`Book`]; a durable subscription private to this
//!   instance continues after it. The deadline index is rebuilt from the states: a deadline is
//!   in the event log, so it survives any restart of dispatch or nats-server.
//! - **Run**: one `tokio::select!` loop over the shutdown signal, the private subscription
//!   (commits written by intake, consoles through any instance, other dispatch instances), the
//!   shared notifier consumer, console command requests (queue group) and a sleep until the
//!   next deadline.
//! - **Deadlines** fire as `DeadlineElapsed` decided at `now` and appended at the incident's
//!   expected position with the command id `deadline:<incident>:<deadline ms>`: a second
//!   instance or a restarted one that tries the same escalation gets a conflict or a
//!   duplicate, re-reads the incident, and finds nothing due. So each deadline escalates once.
//! - **Filed incidents that intake did not route** (its filing commit routes a fresh
//!   submission itself) are dispatched by the table (`Dispatch { to: None }` as the system
//!   actor, command id `dispatch:<incident>`).
//! - **Notifications** are published by a consumer shared by all instances (each commit is
//!   handled by one of them) to `dispatch.notify.<recipient>` with the Msg-Id
//!   `<stream sequence>:<recipient>:<kind>`, then acknowledged: a crash in between redelivers, and the
//!   server drops the repeat. The instance that stored a commit publishes its notifications
//!   right after the append (same Msg-Ids) and the notifier then only acks it: the department
//!   is told without waiting for the consumer to deliver the commit back.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use domain::incident::{Action, IncidentCommand, IncidentEvent, IncidentState, Status};
use domain::{Actor, ActorId, IncidentId, Policy, Rejection, Role, Timestamp, decide};
use eventstore::{
    AggregateId, AppendError, Appended, Commit, CommitMeta, ConflictReason, EventStore, Position,
    ReplayRange, SnapshotStore, SubscribeError, Subscription, SubscriptionConfig,
};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{Instrument as _, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::book::{AggregateTemplate, Applied, Book, BookStats, Held};
use crate::clock::TimeSource;
use crate::notify::{self, Notification, Recipient};
use crate::wire::{self, CommandReply, ConsoleCommand};

/// The INCIDENTS event store as dispatch uses it.
pub type IncidentStore = EventStore<codecs::IncidentCodec>;

/// Due deadlines escalated per loop turn (appended concurrently: distinct incidents).
pub const DUE_BATCH_MAX: usize = 256;
/// Filed incidents dispatched per loop turn.
pub const DISPATCH_BATCH_MAX: usize = 256;
/// Commits the notifier handles at once: their notifications are published together and their
/// acks awaited together, then the commits are acknowledged (one round trip per batch, not
/// one per notification — the service's loop is not held up by the notifier).
pub const NOTIFY_BATCH_MAX: usize = 256;
/// Pause between two snapshot shards, so a snapshot never holds up the bus for long.
const SNAPSHOT_SHARD_PAUSE: Duration = Duration::from_millis(10);
/// INCIDENTS deliveries folded in one turn of the loop (the ones already buffered).
pub const DELIVERIES_PER_TURN_MAX: usize = 256;
/// Under load (a turn that found at least this many deliveries buffered, and the server
/// reports more commits pending for the consumer), the turn waits up to
/// [`DispatchConfig::deliveries_fill_wait`] for more, up to [`DELIVERIES_PER_TURN_MAX`], so that the
/// incidents filed in it are dispatched as one larger batch (their appends share the round
/// trips). A lone delivery never waits, nor does a turn that has everything stored so far.
pub const DELIVERIES_FILL_FROM: usize = 16;
/// Default of [`DispatchConfig::deliveries_fill_wait`]; see [`DELIVERIES_FILL_FROM`].
pub const DELIVERIES_FILL_WAIT: Duration = Duration::from_millis(2);
/// Longest [`DispatchConfig::deliveries_fill_wait`] the command line accepts.
pub const DELIVERIES_FILL_WAIT_MAX: Duration = Duration::from_secs(1);
/// Decide-append rounds for one console command when other writers keep winning the race.
const COMMAND_ATTEMPTS_MAX: usize = 4;
/// How long requests already delivered may take to be answered at shutdown.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// After a system commit (an escalation, a dispatch) the store did not take, deadlines and
/// dispatch wait this long before they try again: a store that refuses at once (a stream
/// limit, a permission) must not spin the loop.
const STORE_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// A private consumer left behind by a crashed instance is removed by the server after this.
const CONSUMER_INACTIVE_THRESHOLD: Duration = Duration::from_secs(300);
/// Durable name of the notifier consumer shared by all dispatch instances.
pub const NOTIFIER_DURABLE: &str = "dispatch-notifier";
/// Incidents per snapshot shard (a worst-case state encodes in under 800 bytes, so a shard
/// stays below the KV value limit).
pub const SNAPSHOT_INCIDENTS_PER_SHARD: usize = 1_000;
/// Snapshot shards at most (1,000 x 1,000 = one million incidents).
pub const SNAPSHOT_SHARDS_MAX: usize = 1_000;
/// Format of the snapshot manifest and shards: bump when `Held` changes, or how it is folded
/// from events (a snapshot must hold what a replay would). 2: the incident state holds
/// `resolved_by`; 3: a failed verification resets `beyond_powers_declared`.
pub const SNAPSHOT_FORMAT: u16 = 3;
const SNAPSHOT_MANIFEST_KEY: &str = "dispatch.manifest";

/// How one dispatch instance runs.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    pub policy: Arc<Policy>,
    /// This instance's name (part of its private consumer's name).
    pub instance: String,
    /// Queue group shared by all instances for command subjects.
    pub queue_group: String,
    pub time: TimeSource,
    /// Longest sleep between deadline checks (a guard against clock jumps, and the tick of
    /// manual time in tests).
    pub deadline_poll_max: Duration,
    /// The id the service acts under as `Role::System`.
    pub system_actor: ActorId,
    /// Answer console commands.
    pub serve_requests: bool,
    /// Publish notifications (through the shared notifier consumer).
    pub notify: bool,
    /// NOTIFICATIONS stream replicas and duplicate window.
    pub replicas: usize,
    pub duplicate_window: Duration,
    /// KV bucket for snapshots (`None`: always replay the stream at start).
    pub snapshot_bucket: Option<String>,
    /// Ended incidents the book keeps ([`crate::book::ENDED_HELD_MAX`]; tests lower it).
    pub ended_held_max: usize,
    /// Write a snapshot after this many commits were folded in since the last one.
    pub snapshot_every_commits: u64,
    /// Under load, how long a loop turn waits for more deliveries to fill its batch (see
    /// [`DELIVERIES_FILL_FROM`]); zero never waits.
    pub deliveries_fill_wait: Duration,
    /// Metrics and health of this instance ([`observe::Observer::disabled`] by default).
    pub observer: observe::Observer,
}

impl DispatchConfig {
    pub fn new(policy: Policy) -> DispatchConfig {
        DispatchConfig {
            policy: Arc::new(policy),
            instance: "dispatch".to_owned(),
            queue_group: "dispatch".to_owned(),
            time: TimeSource::System,
            deadline_poll_max: Duration::from_secs(1),
            system_actor: ActorId(Uuid::from_u128(0xd15_9a7c)),
            serve_requests: true,
            notify: true,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            snapshot_bucket: Some("DISPATCH_SNAPSHOTS".to_owned()),
            ended_held_max: crate::book::ENDED_HELD_MAX,
            snapshot_every_commits: 50_000,
            deliveries_fill_wait: DELIVERIES_FILL_WAIT,
            observer: observe::Observer::disabled(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("catch up with the INCIDENTS stream: {reason}")]
    CatchUp { reason: String },
    #[error("create consumer {durable}: {reason}")]
    Consumer { durable: String, reason: String },
    #[error(transparent)]
    Subscription(#[from] SubscribeError),
    #[error("subscribe to {subject}: {reason}")]
    Subscribe { subject: String, reason: String },
    #[error("notifications: {reason}")]
    Notifications { reason: String },
    #[error("reload incident {incident}: {reason}")]
    Reload { incident: String, reason: String },
}

/// What the instance has done since it started (published on a watch channel).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Commits this instance appended (deadlines, dispatches, console commands).
    pub decisions: u64,
    pub deadlines_escalated: u64,
    pub dispatched: u64,
    pub commands_accepted: u64,
    pub commands_rejected: u64,
    /// Appends lost to another writer (then re-read).
    pub conflicts: u64,
    pub notifications: u64,
    pub reached_sequence: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotManifest {
    generation: u64,
    shards: u32,
    reached_sequence: u64,
    templates: Vec<AggregateTemplate>,
}

/// One dispatch instance.
pub struct DispatchService {
    client: async_nats::Client,
    store: IncidentStore,
    config: DispatchConfig,
    book: Book,
    subscription: Subscription<codecs::IncidentCodec>,
    notifier: Option<Subscription<codecs::IncidentCodec>>,
    durable: String,
    /// Console commands: the `commands` endpoint of the `wangge-dispatch` micro service.
    requests: Option<async_nats::service::endpoint::Endpoint>,
    micro: Option<async_nats::service::Service>,
    progress: Progress,
    progress_tx: watch::Sender<Progress>,
    snapshots: Option<SnapshotStore>,
    /// Stream sequence the loaded snapshot reached (0: the book was replayed from the start).
    from_snapshot: u64,
    commits_since_snapshot: u64,
    /// The snapshot being written beside the loop (one at a time).
    snapshot_task: Option<tokio::task::JoinHandle<Result<usize, String>>>,
    /// Until when system work (deadlines, dispatch) waits after a commit the store did not
    /// take (see [`STORE_RETRY_PAUSE`]).
    system_work_paused_until: Option<tokio::time::Instant>,
    /// Replies to recent console command ids, so a console's retry gets the first answer.
    recent: RecentReplies,
    /// Commits whose notifications this instance stored right after appending them.
    notified_here: notify::NotifiedHere,
}

/// Console commands remembered per instance, by incident and command id (a retry through
/// another instance still writes nothing: the store's Msg-Id and expected sequence refuse it,
/// but it is answered from the state as it is then).
pub const RECENT_COMMANDS_MAX: usize = 4_096;

/// A command id is the console's idempotency key within one incident, as in the store, whose
/// Msg-Id is `<aggregate>/<command id>`: the same id on another incident is another command.
type RecentKey = (IncidentId, String);

/// The replies of commands this instance stored. Only accepted commands are remembered: a
/// refusal wrote nothing, so a resend is decided again on the state as it is then, as
/// another instance would decide it.
#[derive(Debug, Default)]
struct RecentReplies {
    /// (incident, command id) -> the command it carried (actor and action) and the reply.
    replies: std::collections::HashMap<RecentKey, (RecentCommand, CommandReply)>,
    order: std::collections::VecDeque<RecentKey>,
}

/// What makes a resend the same command: the same actor and action.
type RecentCommand = (Actor, domain::incident::Action);

fn recent_key(command: &ConsoleCommand) -> RecentKey {
    (command.incident, command.command_id.clone())
}

fn recent_command(command: &ConsoleCommand) -> RecentCommand {
    (command.actor, command.action.clone())
}

impl RecentReplies {
    /// The reply to a resend of `command`; a different command under a remembered id is
    /// refused `command_id_reused`, as the store would.
    fn get(&self, command: &ConsoleCommand) -> Option<CommandReply> {
        let (remembered, reply) = self.replies.get(&recent_key(command))?;
        if *remembered == recent_command(command) {
            Some(reply.clone())
        } else {
            Some(CommandReply::rejected(
                "command_id_reused",
                format!(
                    "command id {} was already used for another command",
                    command.command_id
                ),
            ))
        }
    }

    fn remember(&mut self, command: &ConsoleCommand, reply: &CommandReply) {
        let CommandReply::Accepted {
            incident,
            version,
            sequence,
            ..
        } = *reply
        else {
            return;
        };
        let reply = CommandReply::Accepted {
            incident,
            version,
            sequence,
            duplicate: true,
            events: Vec::new(),
        };
        let key = recent_key(command);
        if self
            .replies
            .insert(key.clone(), (recent_command(command), reply))
            .is_none()
        {
            self.order.push_back(key);
        }
        while self.order.len() > RECENT_COMMANDS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.replies.remove(&old);
            }
        }
    }
}

impl std::fmt::Debug for DispatchService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatchService")
            .field("instance", &self.config.instance)
            .field("incidents", &self.book.len())
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

fn to_json<T: Serialize>(value: &T) -> bytes::Bytes {
    serde_json::to_vec(value)
        .unwrap_or_else(|error| {
            format!(r#"{{"status":"error","reason_code":"encode","message":"{error}"}}"#)
                .into_bytes()
        })
        .into()
}

/// `accepted`, as a duplicate of the stored `commit`: nothing was written.
/// Whether `stored`, the commit holding a command id, is the command `actor` now sends again
/// with `action`: the same actor, and a commit that opens with the action's own first event
/// (`Action::opens`: after any misses recorded first, which differ with the moment the
/// command was decided, so a resend decided later carries other leading events).
fn is_same_command(
    stored: &eventstore::RecordedCommit<IncidentEvent>,
    actor: &str,
    action: &Action,
) -> bool {
    stored.meta.actor == actor && action.opens(stored.events.iter().map(|recorded| &recorded.event))
}

fn duplicate_reply(
    incident: uuid::Uuid,
    commit: &eventstore::RecordedCommit<IncidentEvent>,
) -> CommandReply {
    CommandReply::Accepted {
        incident,
        version: commit.version,
        sequence: commit.sequence,
        duplicate: true,
        events: Vec::new(),
    }
}

fn event_names(events: &[IncidentEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| domain::encoding::event_type(e).to_owned())
        .collect()
}

impl DispatchService {
    /// Loads the book (snapshot + replay to the stream's end), opens the subscriptions and
    /// subscribes to console commands.
    pub async fn start(
        client: async_nats::Client,
        store: IncidentStore,
        config: DispatchConfig,
    ) -> Result<DispatchService, ServiceError> {
        let started = std::time::Instant::now();
        config
            .observer
            .metrics()
            .declare_whistle_kinds(&domain::routing::WhistleKind::ALL.map(|kind| kind.name()));
        let jetstream = store.jetstream().clone();
        let snapshots = match &config.snapshot_bucket {
            Some(bucket) => Some(
                SnapshotStore::open(&jetstream, bucket, config.replicas)
                    .await
                    .map_err(|e| ServiceError::CatchUp {
                        reason: e.to_string(),
                    })?,
            ),
            None => None,
        };
        let mut book = match &snapshots {
            Some(snapshots) => read_snapshot(snapshots).await.unwrap_or_default(),
            None => Book::new(),
        };
        book.set_ended_max(config.ended_held_max);
        let from_snapshot = book.reached_sequence();
        let mut gaps = Vec::new();
        let mut gaps_seen = std::collections::HashSet::new();
        let reached = store
            .replay(
                ReplayRange {
                    after_sequence: from_snapshot,
                    ..ReplayRange::default()
                },
                |commit| match book.apply_commit(&commit) {
                    Applied::New | Applied::AlreadyHeld => {}
                    Applied::Gap { incident, .. } => {
                        if gaps_seen.insert(incident) {
                            gaps.push((commit.aggregate, incident));
                        }
                    }
                    Applied::Foreign(reason) => warn!(%reason, "commit skipped"),
                },
            )
            .await
            .map_err(|e| ServiceError::CatchUp {
                reason: e.to_string(),
            })?;
        // A replay in stream order has no gaps unless a snapshot was torn, or an ended incident
        // left the book (`book::ENDED_HELD_MAX`) before a later commit on it; read those.
        for (aggregate, incident) in gaps {
            reload_into(&store, &mut book, &aggregate, incident).await?;
        }
        book.rebuild_deadlines();
        let subscription_config = SubscriptionConfig::private_follower(
            &config.instance,
            reached,
            CONSUMER_INACTIVE_THRESHOLD,
        );
        let durable = subscription_config.durable_name.clone();
        let subscription = store.subscribe(subscription_config).await?;
        let notifier = if config.notify {
            notify::open_stream(&jetstream, config.replicas, config.duplicate_window)
                .await
                .map_err(|reason| ServiceError::Notifications { reason })?;
            let mut notifier_config = SubscriptionConfig::durable(NOTIFIER_DURABLE);
            // Only used when the shared consumer is first created: notify from now on.
            notifier_config.start_after_sequence = reached;
            Some(store.subscribe(notifier_config).await?)
        } else {
            None
        };
        let (micro, requests) = if config.serve_requests {
            let (micro, mut endpoints) = observe::start_micro(
                &client,
                "dispatch",
                "wangge whistle-and-report dispatch: console commands",
                &config.queue_group,
                &config.instance,
                &[("commands", wire::SUBJECT_COMMANDS)],
            )
            .await
            .map_err(|error| ServiceError::Subscribe {
                subject: wire::SUBJECT_COMMANDS.to_owned(),
                reason: error.to_string(),
            })?;
            let commands = endpoints.pop();
            (Some(micro), commands)
        } else {
            (None, None)
        };
        let progress = Progress {
            reached_sequence: reached,
            ..Progress::default()
        };
        let (progress_tx, _) = watch::channel(progress);
        info!(
            incidents = book.len(),
            from_snapshot,
            reached,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "dispatch book rebuilt from the INCIDENTS stream"
        );
        Ok(DispatchService {
            client,
            store,
            config,
            book,
            subscription,
            notifier,
            durable,
            requests,
            micro,
            progress,
            progress_tx,
            snapshots,
            snapshot_task: None,
            system_work_paused_until: None,
            from_snapshot,
            commits_since_snapshot: reached.saturating_sub(from_snapshot),
            recent: RecentReplies::default(),
            notified_here: notify::NotifiedHere::default(),
        })
    }

    /// Memory and count figures of the held book (walks every incident: call sparingly).
    pub fn book_stats(&self) -> BookStats {
        self.book.stats()
    }

    pub fn book(&self) -> &Book {
        &self.book
    }

    /// The stream sequence covered by the snapshot this instance started from; 0 when there
    /// was none (or it was torn or undecodable) and the whole stream was replayed.
    pub fn snapshot_sequence(&self) -> u64 {
        self.from_snapshot
    }

    /// A receiver of [`Progress`], updated after every loop turn that did something.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress_tx.subscribe()
    }

    /// Serves until `shutdown` turns true (or its sender is dropped).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ServiceError> {
        let mut requests = self.requests.take();
        let mut notifier = self.notifier.take();
        let observer = self.config.observer.clone();
        observer.watch_connection(&self.client);
        observer.set_started();
        let mut metrics_refresh = tokio::time::interval(METRICS_REFRESH);
        metrics_refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            if *shutdown.borrow() {
                break Ok(());
            }
            let wait = match self.system_work_paused() {
                Some(remaining) => remaining,
                None => {
                    let work_pending = self.book.has_undispatched();
                    self.wait_for_deadline(work_pending)
                }
            };
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break Ok(());
                    }
                }
                delivery = self.subscription.next() => {
                    if let Err(error) = self.on_deliveries(delivery).await {
                        break Err(error);
                    }
                    // Dispatch what was just filed in this turn, not after another wake-up.
                    if self.book.has_undispatched() {
                        self.dispatch_filed().await;
                    }
                }
                delivery = next_notification(&mut notifier) => {
                    self.on_notification(delivery, &mut notifier).await;
                }
                Some(request) = next_request(&mut requests) => {
                    self.on_request(request).await;
                }
                _ = metrics_refresh.tick() => self.refresh_gauges(),
                _ = tokio::time::sleep(wait) => {
                    self.fire_due().await;
                    self.dispatch_filed().await;
                }
            }
            self.progress.reached_sequence = self.book.reached_sequence();
            self.progress_tx.send_replace(self.progress);
            observer.metrics().reached(
                &self.store.spec().stream_name,
                self.progress.reached_sequence,
            );
            if self.commits_since_snapshot >= self.config.snapshot_every_commits {
                self.write_snapshot(SNAPSHOT_SHARD_PAUSE).await;
            }
        };
        observer.set_stopping();
        // Stop taking commands (unsubscribe), then answer those already delivered to us.
        if let Some(endpoint) = requests.as_mut()
            && let Err(error) = endpoint.stop().await
        {
            warn!(%error, "stop the command endpoint");
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN_TIMEOUT;
        while let Ok(Some(request)) =
            tokio::time::timeout_at(deadline, next_request(&mut requests)).await
        {
            self.on_request(request).await;
        }
        if let Some(micro) = self.micro.take()
            && let Err(error) = micro.stop().await
        {
            warn!(%error, "stop the micro service");
        }
        if let Some(task) = self.snapshot_task.take() {
            report_snapshot(task.await);
        }
        // Not after an error: the loop may have stopped between a commit's sequence counted
        // as reached and its incident folded (a gap whose read failed), and a snapshot would
        // claim that commit for an incident the book holds at an older version, or not at all.
        if result.is_ok() && self.commits_since_snapshot > 0 {
            // Nothing left to hold up: no pause between shards.
            self.write_snapshot(Duration::ZERO).await;
            if let Some(task) = self.snapshot_task.take() {
                report_snapshot(task.await);
            }
        }
        if let Err(error) = self.store.delete_consumer(&self.durable).await {
            warn!(%error, "delete private consumer");
        }
        if let Err(error) = self.client.flush().await {
            warn!(%error, "flush at shutdown");
        }
        let progress = &self.progress;
        info!(
            decisions = progress.decisions,
            deadlines_escalated = progress.deadlines_escalated,
            dispatched = progress.dispatched,
            commands_accepted = progress.commands_accepted,
            commands_rejected = progress.commands_rejected,
            conflicts = progress.conflicts,
            notifications = progress.notifications,
            reached_sequence = progress.reached_sequence,
            "dispatch stopped"
        );
        result
    }

    /// How much longer system work waits after a commit the store did not take; `None` when
    /// it may go on.
    fn system_work_paused(&mut self) -> Option<Duration> {
        let until = self.system_work_paused_until?;
        let remaining = until.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            self.system_work_paused_until = None;
            return None;
        }
        Some(remaining)
    }

    /// Starts the wait of [`STORE_RETRY_PAUSE`] when `batch` has commits the store did not take.
    fn pause_system_work_after(&mut self, batch: &SystemBatch) {
        if !batch.not_stored.is_empty() {
            self.system_work_paused_until = Some(tokio::time::Instant::now() + STORE_RETRY_PAUSE);
        }
    }

    fn wait_for_deadline(&mut self, work_pending: bool) -> Duration {
        if work_pending {
            return Duration::ZERO;
        }
        let poll = self.config.deadline_poll_max;
        match self.book.next_deadline() {
            None => poll,
            Some(at) => {
                let ahead = at.0.saturating_sub(self.config.time.now().0);
                if ahead <= 0 {
                    return Duration::ZERO;
                }
                let wall = self.config.time.wall_ms_for(ahead).max(1) as u64;
                Duration::from_millis(wall).min(poll)
            }
        }
    }

    /// Folds a delivery and every one already buffered behind it (at most
    /// [`DELIVERIES_PER_TURN_MAX`]); under load, also those that come within
    /// [`DispatchConfig::deliveries_fill_wait`] (see [`DELIVERIES_FILL_FROM`]).
    async fn on_deliveries(
        &mut self,
        first: Result<eventstore::Delivery<IncidentEvent>, SubscribeError>,
    ) -> Result<(), ServiceError> {
        let mut pending = first.as_ref().map_or(0, |delivery| delivery.pending);
        self.on_delivery(first).await?;
        let mut taken = 1;
        let mut fill_until = None;
        while taken < DELIVERIES_PER_TURN_MAX {
            let delivery = match self.subscription.next_ready() {
                Some(delivery) => delivery,
                // Waiting pays only while the server holds more for us: otherwise it is
                // latency for nothing (at a steady moderate rate, 16 deliveries can pile
                // up behind a slow turn with nothing more to come).
                None if taken < DELIVERIES_FILL_FROM
                    || pending == 0
                    || self.config.deliveries_fill_wait.is_zero() =>
                {
                    break;
                }
                None => {
                    let wait = self.config.deliveries_fill_wait;
                    let deadline =
                        *fill_until.get_or_insert_with(|| tokio::time::Instant::now() + wait);
                    match tokio::time::timeout_at(deadline, self.subscription.next()).await {
                        Ok(delivery) => delivery,
                        Err(_) => break,
                    }
                }
            };
            pending = delivery.as_ref().map_or(0, |delivery| delivery.pending);
            self.on_delivery(delivery).await?;
            taken += 1;
        }
        Ok(())
    }

    async fn on_delivery(
        &mut self,
        delivery: Result<eventstore::Delivery<IncidentEvent>, SubscribeError>,
    ) -> Result<(), ServiceError> {
        // Not a commit (another client's publish on `incidents.ev.*`): nothing to fold. A
        // commit this build cannot read still stops dispatch (see docs/DISPATCH.md).
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(error) => return Ok(error.skip_if_foreign().await?),
        };
        let span = commit_span(&delivery.commit);
        self.fold_delivery(delivery).instrument(span).await
    }

    async fn fold_delivery(
        &mut self,
        delivery: eventstore::Delivery<IncidentEvent>,
    ) -> Result<(), ServiceError> {
        match self.book.apply_commit(&delivery.commit) {
            Applied::New => {
                self.commits_since_snapshot += 1;
                self.config.observer.metrics().commits_folded.inc();
            }
            Applied::AlreadyHeld => {}
            Applied::Gap { incident, held } => {
                if held == Position::NEW {
                    debug!(aggregate = %delivery.commit.aggregate, "commit on an incident the book does not hold (it ended and left the book); reading the incident");
                } else {
                    warn!(aggregate = %delivery.commit.aggregate, "commit out of order; reading the incident");
                }
                reload_into(
                    &self.store,
                    &mut self.book,
                    &delivery.commit.aggregate,
                    incident,
                )
                .await?;
            }
            Applied::Foreign(reason) => warn!(%reason, "commit skipped"),
        }
        if let Err(error) = self.subscription.settle(&delivery).await {
            debug!(%error, "ack failed; the commit may be redelivered (it is skipped then)");
        }
        Ok(())
    }

    async fn reload(&mut self, incident: IncidentId) -> Result<(), ServiceError> {
        let Some(aggregate) = self.book.aggregate_of(incident) else {
            return Ok(());
        };
        reload_into(&self.store, &mut self.book, &aggregate, incident).await
    }

    fn meta(
        &self,
        actor: &Actor,
        command_id: &str,
        now: Timestamp,
        traceparent: String,
    ) -> CommitMeta {
        let command = eventstore::command_uuid("dispatch", command_id);
        CommitMeta {
            correlation_id: command,
            causation_id: command,
            actor: self.actor_label(actor),
            occurred_at_ms: now.0,
            traceparent: Some(traceparent),
        }
    }

    /// How a commit's envelope names `actor`: `system:dispatch/<instance>` or
    /// `<role>/<id>`.
    fn actor_label(&self, actor: &Actor) -> String {
        match actor.role {
            Role::System => format!("system:dispatch/{}", self.config.instance),
            role => format!("{role}/{}", actor.id),
        }
    }

    fn system(&self) -> Actor {
        Actor {
            role: Role::System,
            id: self.config.system_actor,
        }
    }

    /// Decides a system command for each incident, appends the commits concurrently (distinct
    /// aggregates) and folds in the ones stored.
    async fn system_batch(
        &mut self,
        incidents: &[IncidentId],
        action: Action,
        command_id: impl Fn(IncidentId) -> String,
    ) -> SystemBatch {
        let now = self.config.time.now();
        let actor = self.system();
        let mut planned = Vec::with_capacity(incidents.len());
        let mut outcome = SystemBatch::default();
        for &incident in incidents {
            let (Some(held), Some(aggregate)) =
                (self.book.get(incident), self.book.aggregate_of(incident))
            else {
                continue;
            };
            let command = IncidentCommand {
                actor,
                action: action.clone(),
            };
            match decide(&held.state, command, now, &self.config.policy) {
                Ok(events) if !events.is_empty() => {
                    let traceparent = observe::new_traceparent();
                    let mut after = held.state.clone();
                    events.iter().for_each(|event| after.apply(event));
                    let command_id = command_id(incident);
                    let meta = self.meta(&actor, &command_id, now, traceparent);
                    let commit = Commit::new(command_id, events, meta);
                    planned.push((incident, aggregate, held.position, commit, after));
                }
                Ok(_) => outcome.nothing_to_do.push(incident),
                Err(rejection) => {
                    debug!(%incident, %rejection, "system command not applicable");
                    outcome.refused.push((incident, rejection));
                }
            }
        }
        let store = &self.store;
        let results: Vec<Result<Appended, AppendError>> =
            futures::future::join_all(planned.iter().map(|(_, aggregate, position, commit, _)| {
                store.append(aggregate, position, commit)
            }))
            .await;
        let mut stored = Vec::with_capacity(planned.len());
        for ((incident, _, _, commit, after), result) in planned.iter().zip(results) {
            let span = incident_span(*incident, commit.meta.traceparent.as_deref());
            match self
                .settle_system_append(*incident, commit, after, result)
                .instrument(span)
                .await
            {
                Settled::Stored(position) => stored.push((*incident, commit, after, position)),
                Settled::LostRace => outcome.lost_race.push(*incident),
                Settled::NotStored => outcome.not_stored.push(*incident),
            }
        }
        self.notify_stored(&stored).await;
        outcome.stored = stored.len() as u64;
        self.progress.decisions += outcome.stored;
        outcome
    }

    /// Folds in one system commit's append result.
    async fn settle_system_append(
        &mut self,
        incident: IncidentId,
        commit: &Commit<IncidentEvent>,
        after: &IncidentState,
        result: Result<Appended, AppendError>,
    ) -> Settled {
        match result {
            Ok(appended) if !appended.duplicate => {
                self.count_appended(&commit.events);
                debug!(command_id = %commit.command_id, sequence = appended.position.sequence, "system commit stored");
                self.announce(incident, after, commit, appended.position.version)
                    .await;
                self.book
                    .apply_own(incident, commit.events.iter(), appended.position);
                self.commits_since_snapshot += 1;
                Settled::Stored(appended.position)
            }
            Ok(_) | Err(AppendError::Conflict { .. }) => {
                // Another instance (or this one before a restart) stored it first.
                self.progress.conflicts += 1;
                self.config.observer.metrics().append_conflicts.inc();
                if let Err(error) = self.reload(incident).await {
                    warn!(%error, "reload after a lost race");
                }
                Settled::LostRace
            }
            Err(error) => {
                error!(%error, "append failed; will retry");
                Settled::NotStored
            }
        }
    }

    /// Escalates every due deadline (a bounded batch per turn).
    async fn fire_due(&mut self) {
        if self.system_work_paused().is_some() {
            return;
        }
        let now = self.config.time.now();
        let due = self.book.take_due(now, DUE_BATCH_MAX);
        if due.is_empty() {
            return;
        }
        let ids: Vec<IncidentId> = due.iter().map(|(id, _)| *id).collect();
        let at_of = |incident: IncidentId| {
            due.iter()
                .find(|(id, _)| *id == incident)
                .map_or(0, |(_, at)| at.0)
        };
        let outcome = self
            .system_batch(&ids, Action::DeadlineElapsed, |incident| {
                let prefix = wire::DEADLINE_COMMAND_ID_PREFIX;
                format!("{prefix}{incident}:{}", at_of(incident))
            })
            .await;
        self.pause_system_work_after(&outcome);
        self.progress.deadlines_escalated += outcome.stored;
        self.config
            .observer
            .metrics()
            .deadlines_escalated
            .inc_by(outcome.stored);
        // Not stored: tried again after STORE_RETRY_PAUSE. A lost race re-read the incident,
        // whose deadlines are current again.
        for incident in outcome.not_stored.iter().chain(&outcome.lost_race) {
            self.book.reschedule(*incident);
        }
        // Refused by the domain: the same state refuses it again, so it is not put back
        // (before, it was re-decided every turn, and enough of them held every later deadline
        // back); the incident's next commit schedules its deadlines afresh.
        for (incident, rejection) in &outcome.refused {
            warn!(%incident, %rejection, "a due deadline cannot be escalated; left until the incident changes");
        }
        for incident in &outcome.nothing_to_do {
            debug!(%incident, "a due deadline had nothing to escalate");
        }
    }

    /// Dispatches filed incidents by the routing table.
    async fn dispatch_filed(&mut self) {
        if self.system_work_paused().is_some() {
            return;
        }
        let filed = self.book.take_undispatched(DISPATCH_BATCH_MAX);
        if filed.is_empty() {
            return;
        }
        let outcome = self
            .system_batch(&filed, Action::Dispatch { to: None }, |incident| {
                format!("{}{incident}", wire::DISPATCH_COMMAND_ID_PREFIX)
            })
            .await;
        self.pause_system_work_after(&outcome);
        self.progress.dispatched += outcome.stored;
        self.config
            .observer
            .metrics()
            .dispatched
            .inc_by(outcome.stored);
        // Not stored: back in the set, tried again after STORE_RETRY_PAUSE. (Before, a filed
        // incident whose dispatch failed waited for its next commit or a restart; a filed
        // incident has no deadline, so nothing else would have moved it.)
        self.book.requeue_undispatched(&outcome.not_stored);
        for (incident, rejection) in &outcome.refused {
            warn!(%incident, %rejection, "a filed incident cannot be dispatched by the routing table");
        }
    }

    async fn on_request(&mut self, request: async_nats::service::Request) {
        let started = std::time::Instant::now();
        let message = &request.message;
        if message.reply.is_none() {
            debug!(subject = %message.subject, "request without reply subject ignored");
            return;
        }
        let traceparent = observe::traceparent_or_new(message.headers.as_ref());
        let reply_body = match wire::parse_command(message.subject.as_str(), &message.payload) {
            Ok(command) => {
                let span = incident_span(command.incident, Some(&traceparent));
                self.command_traced(command, traceparent)
                    .instrument(span)
                    .await
            }
            Err(reply) => reply,
        };
        let outcome = match &reply_body {
            CommandReply::Accepted { .. } => {
                self.progress.commands_accepted += 1;
                "accepted"
            }
            CommandReply::Rejected { .. } => {
                self.progress.commands_rejected += 1;
                "rejected"
            }
            CommandReply::Error { .. } => {
                self.progress.commands_rejected += 1;
                "error"
            }
        };
        debug!(subject = %message.subject, outcome, "console command answered");
        self.config
            .observer
            .metrics()
            .request("commands", outcome, started.elapsed());
        if let Err(error) = request.respond(Ok(to_json(&reply_body))).await {
            warn!(%error, "reply not sent");
        }
    }

    /// Publishes the public view of an incident after a commit this instance stored, on
    /// `incidents.status.<incident>` (core NATS, best effort: the reporter's app can always ask
    /// `incidents.query.get`). The writer announces its own commits, so each stored commit is
    /// announced once however many instances of each service run; intake announces its own.
    async fn announce(
        &self,
        incident: IncidentId,
        after: &IncidentState,
        commit: &Commit<IncidentEvent>,
        version: u64,
    ) {
        let public = codecs::status::view(
            incident,
            after,
            version,
            event_names(&commit.events),
            commit.meta.occurred_at_ms,
        );
        let payload = match serde_json::to_vec(&public) {
            Ok(payload) => payload,
            Err(error) => {
                warn!(%error, "encode incident status");
                return;
            }
        };
        if let Err(error) = self
            .client
            .publish(codecs::status::status_subject(incident), payload.into())
            .await
        {
            warn!(%error, "publish incident status");
        }
    }

    /// Counts a commit this instance stored: appends, whistles blown.
    fn count_appended(&self, events: &[IncidentEvent]) {
        let metrics = self.config.observer.metrics();
        metrics.commits_appended.inc();
        for event in events {
            if let IncidentEvent::WhistleBlown { kind, .. } = event {
                metrics.whistle(kind.name());
            }
        }
    }

    /// Gauges that need a walk over the book (incidents held, deadlines pending).
    fn refresh_gauges(&self) {
        let metrics = self.config.observer.metrics();
        metrics
            .incidents_held
            .set(i64::try_from(self.book.len()).unwrap_or(i64::MAX));
        let (_, incidents) = self.book.parts();
        let pending = incidents
            .filter(|(_, held)| domain::next_deadline(&held.state).is_some())
            .count();
        metrics
            .deadlines_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Decides a console command on the held state, appends it, folds it in, answers. A
    /// command id seen recently is answered as before, without deciding again.
    pub async fn command(&mut self, command: ConsoleCommand) -> CommandReply {
        self.command_traced(command, observe::new_traceparent())
            .await
    }

    async fn command_traced(
        &mut self,
        command: ConsoleCommand,
        traceparent: String,
    ) -> CommandReply {
        if let Some(reply) = self.recent.get(&command) {
            return reply;
        }
        let reply = self.decide_and_append(&command, &traceparent).await;
        self.recent.remember(&command, &reply);
        reply
    }

    async fn decide_and_append(
        &mut self,
        command: &ConsoleCommand,
        traceparent: &str,
    ) -> CommandReply {
        let command_id = command.command_id.clone();
        // A resend whose first answer was lost, past the store's duplicate window (Msg-Id), to
        // an instance that did not answer it (see `recent`), on a case that has since moved
        // back to a state that accepts the command (a failed verification reopens the work):
        // neither the Msg-Id nor the expected sequence would stop a second write. So the
        // command id is looked for in the incident's history first: one read of the incident
        // per console command not answered here before. The held position the history was read
        // at (`None`: not read yet).
        let mut history_read_at = None;
        for attempt in 1..=COMMAND_ATTEMPTS_MAX {
            let (Some(held_position), Some(aggregate)) = (
                self.book.get(command.incident).map(|held| held.position),
                self.book.aggregate_of(command.incident),
            ) else {
                // This instance may not have folded the incident yet (filed a moment ago,
                // its commit still on the way here), or dropped it once it ended: look in the
                // store before refusing.
                if attempt < COMMAND_ATTEMPTS_MAX {
                    match self.found_in_store(command.incident).await {
                        Ok(true) => continue,
                        Ok(false) => {}
                        // Not read: the incident may well exist; a refusal would be final.
                        Err(error) => return store_unavailable(error),
                    }
                }
                return CommandReply::from_rejection(&Rejection::NoSuchIncident);
            };
            // Searched once, as soon as the incident is held (at once, or read from the store).
            if history_read_at.is_none() {
                if let Some(reply) = self.already_applied(&aggregate, command).await {
                    return reply;
                }
                history_read_at = Some(held_position);
            }
            let Some(held) = self.book.get(command.incident) else {
                return CommandReply::from_rejection(&Rejection::NoSuchIncident);
            };
            let held_position = held.position;
            let now = self.config.time.now();
            let events = match decide(
                &held.state,
                IncidentCommand {
                    actor: command.actor,
                    action: command.action.clone(),
                },
                now,
                &self.config.policy,
            ) {
                Ok(events) => events,
                Err(rejection) => {
                    // The book may lag the store (another instance wrote, or the follower has
                    // not delivered the latest commit yet), and a refusal is never checked by
                    // an append: refuse only on the latest state.
                    // (Not read on the last attempt: nothing is decided again after it.)
                    let ahead = attempt < COMMAND_ATTEMPTS_MAX
                        && match self.store_is_ahead(&aggregate, held_position).await {
                            Ok(ahead) => ahead,
                            Err(error) => return store_unavailable(error),
                        };
                    if ahead {
                        if let Err(error) = self.reload(command.incident).await {
                            return CommandReply::error("store_unavailable", error.to_string());
                        }
                        continue;
                    }
                    // A resent command (its first answer lost in a crash) meets the state it
                    // already changed and would be refused; answer it as the duplicate it is.
                    // (Already looked for above if the incident is held where it was then: the
                    // store is not ahead of it, so the history read then is the history now.)
                    if history_read_at != Some(held_position)
                        && let Some(reply) = self.already_applied(&aggregate, command).await
                    {
                        return reply;
                    }
                    return CommandReply::from_rejection(&rejection);
                }
            };
            let position = held.position;
            let mut after = held.state.clone();
            events.iter().for_each(|event| after.apply(event));
            let commit = Commit::new(
                command_id.clone(),
                events,
                self.meta(&command.actor, &command_id, now, traceparent.to_owned()),
            );
            match self.store.append(&aggregate, &position, &commit).await {
                Ok(appended) if !appended.duplicate => {
                    self.count_appended(&commit.events);
                    info!(command_id = %commit.command_id, actor = %command.actor.role, events = %event_names(&commit.events).join(","), "console command stored");
                    self.announce(command.incident, &after, &commit, appended.position.version)
                        .await;
                    self.book
                        .apply_own(command.incident, commit.events.iter(), appended.position);
                    self.commits_since_snapshot += 1;
                    self.progress.decisions += 1;
                    self.notify_stored(&[(command.incident, &commit, &after, appended.position)])
                        .await;
                    return CommandReply::Accepted {
                        incident: command.incident.0,
                        version: appended.position.version,
                        sequence: appended.position.sequence,
                        duplicate: false,
                        events: event_names(&commit.events),
                    };
                }
                Ok(appended) => {
                    if let Err(error) = self.reload(command.incident).await {
                        warn!(%error, "reload after a duplicate command");
                    }
                    return CommandReply::Accepted {
                        incident: command.incident.0,
                        version: appended.position.version,
                        sequence: appended.position.sequence,
                        duplicate: true,
                        events: Vec::new(),
                    };
                }
                Err(AppendError::Conflict {
                    reason: ConflictReason::CommandIdReused { command_id, .. },
                    ..
                }) => {
                    if let Some(reply) = self
                        .resent(command.incident, &aggregate, &command.action, &commit)
                        .await
                    {
                        return reply;
                    }
                    return CommandReply::rejected(
                        "command_id_reused",
                        format!("command id {command_id} was already used for another command"),
                    );
                }
                Err(AppendError::Conflict { .. }) if attempt < COMMAND_ATTEMPTS_MAX => {
                    self.progress.conflicts += 1;
                    self.config.observer.metrics().append_conflicts.inc();
                    if let Err(error) = self.reload(command.incident).await {
                        return CommandReply::error("store_unavailable", error.to_string());
                    }
                }
                Err(AppendError::Conflict { .. }) => {
                    self.progress.conflicts += 1;
                    self.config.observer.metrics().append_conflicts.inc();
                    break;
                }
                Err(error) => return CommandReply::error("store_unavailable", error.to_string()),
            }
        }
        // Every attempt lost to another writer (before, the last lost race was answered
        // `store_unavailable`, so this answer was never given).
        CommandReply::error(
            "conflict",
            format!("other writers won {COMMAND_ATTEMPTS_MAX} times; retry"),
        )
    }

    /// Whether the store holds commits of `aggregate` after `held` (one read: the last
    /// message of the aggregate's subject). A failed read is an error: counted as "not
    /// ahead", it refused a command from a view the store may be ahead of.
    async fn store_is_ahead(
        &self,
        aggregate: &eventstore::AggregateId,
        held: Position,
    ) -> Result<bool, String> {
        match self.store.last_position(aggregate).await {
            Ok(last) => Ok(last.sequence > held.sequence),
            Err(error) => {
                warn!(%error, "read the incident's last commit before a refusal");
                Err(format!("read the incident's last commit: {error}"))
            }
        }
    }

    /// Looks for an incident the book does not hold under every aggregate id layout seen so
    /// far, and folds its stored history in. Whether it was found. (A layout under which
    /// nothing is stored costs one read: `load_after` stops at the subject's last position.)
    /// An error when it was not found and some layout could not be read.
    async fn found_in_store(&mut self, incident: IncidentId) -> Result<bool, String> {
        let mut unread = None;
        for template in self.book.templates().to_vec() {
            let aggregate = template.aggregate(incident);
            match reload_into(&self.store, &mut self.book, &aggregate, incident).await {
                Ok(()) if self.book.get(incident).is_some() => return Ok(true),
                Ok(()) => {}
                Err(error) => {
                    warn!(%error, "read an incident the book did not hold");
                    unread = Some(error.to_string());
                }
            }
        }
        match unread {
            Some(error) => Err(error),
            None => Ok(false),
        }
    }

    /// The stored commit of `aggregate` that carries `command_id`, read from the store (the
    /// book may not have seen it).
    async fn stored_commit(
        &self,
        aggregate: &eventstore::AggregateId,
        command_id: &str,
    ) -> Result<Option<eventstore::RecordedCommit<IncidentEvent>>, String> {
        let loaded = match self.store.load(aggregate).await {
            Ok(loaded) => loaded,
            Err(error) => {
                warn!(%error, "read the incident to look for a resent command");
                return Err(format!(
                    "read the incident's history to look for the command id: {error}"
                ));
            }
        };
        Ok(loaded
            .commits
            .into_iter()
            .find(|commit| commit.command_id == command_id))
    }

    /// The answer to a command whose id is already in the incident's history: accepted, as a
    /// duplicate, when it is the same command ([`is_same_command`]); refused
    /// `command_id_reused` otherwise. Read before a command is decided and again when the
    /// decider refused it, so the per-instance duplicate cache is not the only guard across
    /// restarts and instances.
    async fn already_applied(
        &mut self,
        aggregate: &eventstore::AggregateId,
        command: &ConsoleCommand,
    ) -> Option<CommandReply> {
        let command_id = &command.command_id;
        // Not read: deciding without knowing whether it was applied could apply it twice.
        let commit = match self.stored_commit(aggregate, command_id).await {
            Ok(commit) => commit?,
            Err(error) => return Some(store_unavailable(error)),
        };
        let actor = self.actor_label(&command.actor);
        if !is_same_command(&commit, &actor, &command.action) {
            return Some(CommandReply::rejected(
                "command_id_reused",
                format!("command id {command_id} was already used for another command"),
            ));
        }
        Some(duplicate_reply(command.incident.0, &commit))
    }

    /// A command whose id is already stored as the same command ([`is_same_command`]) is a
    /// resend decided again at another moment: its first append was stored although its
    /// answer was lost (an ack that timed out, a crash), so the book had not seen it. Answered
    /// as the duplicate it is, after re-reading the incident; `None` for a genuinely reused id.
    async fn resent(
        &mut self,
        incident: IncidentId,
        aggregate: &eventstore::AggregateId,
        action: &Action,
        commit: &Commit<IncidentEvent>,
    ) -> Option<CommandReply> {
        let stored = match self.stored_commit(aggregate, &commit.command_id).await {
            Ok(stored) => stored?,
            Err(error) => return Some(store_unavailable(error)),
        };
        if !is_same_command(&stored, &commit.meta.actor, action) {
            return None;
        }
        if let Err(error) = self.reload(incident).await {
            warn!(%error, "reload after a resent command");
        }
        Some(duplicate_reply(incident.0, &stored))
    }

    async fn on_notification(
        &mut self,
        first: Result<eventstore::Delivery<IncidentEvent>, SubscribeError>,
        notifier: &mut Option<Subscription<codecs::IncidentCodec>>,
    ) {
        let mut deliveries = match first {
            Ok(delivery) => vec![delivery],
            Err(error) => {
                // A message that is not a commit has no notices: acked, or it came back
                // after every ack wait, for ever.
                if let Err(error) = error.skip_if_foreign().await {
                    warn!(%error, "notifier delivery");
                }
                return;
            }
        };
        // Take what is already here, without waiting, up to the batch bound.
        if let Some(notifier) = notifier.as_mut() {
            while deliveries.len() < NOTIFY_BATCH_MAX {
                match futures::FutureExt::now_or_never(notifier.next()) {
                    Some(Ok(delivery)) => deliveries.push(delivery),
                    Some(Err(error)) => {
                        // One that is not a commit, anywhere in the batch, is acked and
                        // skipped (before, only the batch's first was: the rest came back
                        // after every ack wait).
                        if let Err(error) = error.skip_if_foreign().await {
                            warn!(%error, "notifier delivery");
                            break;
                        }
                    }
                    None => break,
                }
            }
        }
        self.notify_batch(deliveries).await;
    }

    /// Publishes the notifications of commits this instance has just stored, all at once, and
    /// awaits their acks together; remembers the commits whose notifications were all stored,
    /// so the notifier acknowledges them without publishing again. The department hears of a
    /// dispatch one append round trip after it was stored, not after the notifier consumer
    /// delivered the commit back. A failed publish is left to the notifier (at least once;
    /// the server drops a repeat by Msg-Id).
    async fn notify_stored(
        &mut self,
        stored: &[(IncidentId, &Commit<IncidentEvent>, &IncidentState, Position)],
    ) {
        if !self.config.notify || stored.is_empty() {
            return;
        }
        let commits: Vec<ToNotify> = stored
            .iter()
            .map(|(incident, commit, after, position)| ToNotify {
                incident: *incident,
                events: commit.events.iter().collect(),
                state: Some(after),
                sequence: position.sequence,
                version: position.version,
                traceparent: commit.meta.traceparent.as_deref(),
            })
            .collect();
        let (complete, count) = publish_notifications(
            self.store.jetstream(),
            &commits,
            "the notifier will send it",
        )
        .await;
        self.count_notifications(count);
        for ((_, _, _, position), complete) in stored.iter().zip(complete) {
            if complete {
                self.notified_here.insert(position.sequence);
            }
        }
    }

    /// Publishes the notifications of every commit in `deliveries` at once, awaits their acks
    /// together, then acknowledges each commit whose notifications were all stored. A commit
    /// with a failed publish is not acknowledged: it comes back, and the server drops the
    /// notifications it already stored (Msg-Id).
    async fn notify_batch(&mut self, deliveries: Vec<eventstore::Delivery<IncidentEvent>>) {
        // A commit on an incident the book does not hold (it ended and left the book, and a
        // rating reopened it; or the follower has not folded it yet) is addressed from the
        // incident read back from the store: a reopening's notice goes to the handler the state
        // names. A commit that files its incident names its own grid and needs no state. One
        // that cannot be read is left unacknowledged, to come back.
        let mut unread = vec![false; deliveries.len()];
        for (index, delivery) in deliveries.iter().enumerate() {
            let commit = &delivery.commit;
            let Some((_, incident)) = AggregateTemplate::parse(&commit.aggregate) else {
                continue;
            };
            let files = commit
                .events
                .iter()
                .any(|recorded| matches!(recorded.event, IncidentEvent::Filed { .. }));
            if files
                || self.book.get(incident).is_some()
                || self.notified_here.contains(commit.sequence)
            {
                continue;
            }
            if let Err(error) =
                reload_into(&self.store, &mut self.book, &commit.aggregate, incident).await
            {
                warn!(%error, "read an incident to address its notices; the commit comes back");
                unread[index] = true;
            }
        }
        // A notice addressed to whoever handles the case (an extension decided, a reopening)
        // goes to the handler of the time of the commit. The book may hold the incident
        // further on (its follower ran ahead of this notifier; another instance's commit, or a
        // reload above, moved it past the commit) or not yet as far: unless it holds the
        // incident exactly at this commit, the state before the commit is read from the store.
        let mut as_of: Vec<Option<IncidentState>> = vec![None; deliveries.len()];
        for (index, delivery) in deliveries.iter().enumerate() {
            let commit = &delivery.commit;
            if unread[index]
                || self.notified_here.contains(commit.sequence)
                || !notify::addressed_to_current_handler(
                    commit.events.iter().map(|recorded| &recorded.event),
                )
            {
                continue;
            }
            let Some((_, incident)) = AggregateTemplate::parse(&commit.aggregate) else {
                continue;
            };
            if self
                .book
                .get(incident)
                .is_some_and(|held| held.position.sequence == commit.sequence)
            {
                continue;
            }
            match state_before(&self.store, &commit.aggregate, commit.sequence).await {
                Ok(Some(state)) => as_of[index] = Some(state),
                // A history that cannot be read as far as this commit (one in it does not
                // decode) never will be: addressed from the book, as before, rather than
                // left to come back every ack wait for good.
                Ok(None) => warn!(
                    aggregate = %commit.aggregate,
                    sequence = commit.sequence,
                    "the incident's history before this commit does not decode; its notices are addressed from the held state"
                ),
                Err(error) => {
                    warn!(%error, "read an incident to address its notices; the commit comes back");
                    unread[index] = true;
                }
            }
        }
        let mut commits = Vec::with_capacity(deliveries.len());
        // Index into `commits` of each delivery that has notifications to publish.
        let mut published = vec![None; deliveries.len()];
        for (index, delivery) in deliveries.iter().enumerate() {
            let commit = &delivery.commit;
            if unread[index] {
                continue;
            }
            if self.notified_here.take(commit.sequence) {
                // Notified by this instance right after it stored the commit: just ack.
                continue;
            }
            let Some((_, incident)) = AggregateTemplate::parse(&commit.aggregate) else {
                continue;
            };
            published[index] = Some(commits.len());
            commits.push(ToNotify {
                incident,
                events: commit.events.iter().map(|e| &e.event).collect(),
                state: as_of[index]
                    .as_ref()
                    .or_else(|| self.book.get(incident).map(|h: &Held| &h.state)),
                sequence: commit.sequence,
                version: commit.version,
                traceparent: commit.meta.traceparent.as_deref(),
            });
        }
        let (complete, count) = publish_notifications(
            self.store.jetstream(),
            &commits,
            "the commit will be redelivered",
        )
        .await;
        drop(commits);
        self.count_notifications(count);
        for ((delivery, published), unread) in deliveries.iter().zip(published).zip(unread) {
            let stored = !unread && published.is_none_or(|at| complete[at]);
            if stored && let Err(error) = delivery.ack().await {
                debug!(%error, "notifier ack failed; redelivery is deduplicated by Msg-Id");
            }
        }
    }

    fn count_notifications(&mut self, stored: u64) {
        self.progress.notifications += stored;
        self.config.observer.metrics().notifications.inc_by(stored);
    }

    /// Starts writing a snapshot of the book beside the loop: the book is copied here (the
    /// copy is what the snapshot holds, as of `reached_sequence`), the shards are written by a
    /// task, one after another with `shard_pause` between them, so commands and notifications
    /// are not held up by the KV writes. If the previous snapshot is still being written, this
    /// waits for a later turn.
    async fn write_snapshot(&mut self, shard_pause: Duration) {
        let Some(snapshots) = self.snapshots.clone() else {
            self.commits_since_snapshot = 0;
            return;
        };
        if let Some(task) = &self.snapshot_task {
            if !task.is_finished() {
                return;
            }
            if let Some(task) = self.snapshot_task.take() {
                report_snapshot(task.await);
            }
        }
        let copy_started = std::time::Instant::now();
        let (templates, incidents) = self.book.parts();
        let copy = BookCopy {
            templates: templates.to_vec(),
            incidents: incidents.map(|(id, held)| (*id, held.clone())).collect(),
            reached_sequence: self.book.reached_sequence(),
        };
        debug!(
            incidents = copy.incidents.len(),
            copy_us = copy_started.elapsed().as_micros() as u64,
            "book copied for a snapshot"
        );
        self.snapshot_task = Some(tokio::spawn(async move {
            write_snapshot(&snapshots, copy, shard_pause).await
        }));
        self.commits_since_snapshot = 0;
    }
}

/// How often the gauges that walk the book are refreshed.
const METRICS_REFRESH: Duration = Duration::from_secs(5);

async fn next_request(
    requests: &mut Option<async_nats::service::endpoint::Endpoint>,
) -> Option<async_nats::service::Request> {
    match requests {
        Some(requests) => requests.next().await,
        None => std::future::pending().await,
    }
}

/// The span of work on one incident: every log line inside carries the incident id and the
/// trace id of the commit or request that caused it.
/// What became of one system command's commit.
enum Settled {
    /// Stored by this call, at this position.
    Stored(Position),
    /// Another writer (another instance, or this one before a restart) stored one first; the
    /// incident was read again.
    LostRace,
    /// The store did not take it (it retried and gave up): try again later.
    NotStored,
}

/// What [`DispatchService::system_batch`] did with each incident it was given.
#[derive(Default)]
struct SystemBatch {
    /// How many commits it stored.
    stored: u64,
    /// The domain decided nothing to write.
    nothing_to_do: Vec<IncidentId>,
    /// The domain refused the command on the incident's state.
    refused: Vec<(IncidentId, domain::Rejection)>,
    lost_race: Vec<IncidentId>,
    not_stored: Vec<IncidentId>,
}

fn incident_span(incident: IncidentId, traceparent: Option<&str>) -> tracing::Span {
    let trace_id = traceparent.and_then(observe::trace_id).unwrap_or("");
    info_span!("incident", incident = %incident, trace_id)
}

fn commit_span(commit: &eventstore::RecordedCommit<IncidentEvent>) -> tracing::Span {
    match AggregateTemplate::parse(&commit.aggregate) {
        Some((_, incident)) => incident_span(incident, commit.meta.traceparent.as_deref()),
        None => tracing::Span::none(),
    }
}

async fn next_notification(
    notifier: &mut Option<Subscription<codecs::IncidentCodec>>,
) -> Result<eventstore::Delivery<IncidentEvent>, SubscribeError> {
    match notifier {
        Some(notifier) => notifier.next().await,
        None => std::future::pending().await,
    }
}

/// A stored commit whose notifications are to be published.
struct ToNotify<'a> {
    incident: IncidentId,
    events: Vec<&'a IncidentEvent>,
    /// The incident's state (for the grid and the current handler).
    state: Option<&'a IncidentState>,
    sequence: u64,
    version: u64,
    traceparent: Option<&'a str>,
}

/// Publishes the notifications of every commit at once and awaits their acks together.
/// Returns, per commit, whether all its notifications were stored, and how many were stored
/// in all. A failure is logged with `fallback`: who sends that commit's notifications later.
async fn publish_notifications(
    jetstream: &jetstream::Context,
    commits: &[ToNotify<'_>],
    fallback: &str,
) -> (Vec<bool>, u64) {
    let mut complete = vec![true; commits.len()];
    let mut acks = Vec::new();
    for (index, commit) in commits.iter().enumerate() {
        let notes = notify::notifications(
            commit.incident,
            &commit.events,
            commit.state,
            commit.sequence,
            commit.version,
        );
        for (recipient, note) in &notes {
            match send_notification(jetstream, commit.sequence, *recipient, note).await {
                Ok(ack) => acks.push((index, ack)),
                Err(error) => {
                    incident_span(commit.incident, commit.traceparent).in_scope(|| {
                        warn!(%error, "notification not sent; {fallback}");
                    });
                    complete[index] = false;
                }
            }
        }
    }
    let (owners, futures): (Vec<usize>, Vec<_>) = acks.into_iter().unzip();
    let results = futures::future::join_all(
        futures
            .into_iter()
            .map(std::future::IntoFuture::into_future),
    )
    .await;
    let mut stored = 0;
    for (index, result) in owners.into_iter().zip(results) {
        match result {
            Ok(_) => stored += 1,
            Err(error) => {
                let commit = &commits[index];
                incident_span(commit.incident, commit.traceparent).in_scope(|| {
                    warn!(%error, "notification not stored; {fallback}");
                });
                complete[index] = false;
            }
        }
    }
    (complete, stored)
}

/// Sends one notification; the returned future resolves when JetStream stored it.
async fn send_notification(
    jetstream: &jetstream::Context,
    stream_sequence: u64,
    recipient: Recipient,
    note: &Notification,
) -> Result<jetstream::context::PublishAckFuture, String> {
    let subject = recipient.subject();
    let message = jetstream::message::PublishMessage::build()
        .payload(to_json(note))
        .message_id(format!("{stream_sequence}:{subject}:{}", note.kind));
    jetstream
        .send_publish(subject, message)
        .await
        .map_err(|e| e.to_string())
}

/// The answer to a command that could not be decided because the store could not be read:
/// nothing was written; send it again with the same command id.
fn store_unavailable(reason: String) -> CommandReply {
    CommandReply::error(
        "store_unavailable",
        format!("{reason}; nothing was written, send again with the same command_id"),
    )
}

/// The incident's state just before the commit at `sequence`: its stored commits before that
/// one, folded as stored (`inspect`: a broken link elsewhere in the history, which `verify`
/// reports, does not stop the notice). `None` when the history does not decode: that will
/// not change by reading again. A read that fails is an error (read again later).
async fn state_before(
    store: &IncidentStore,
    aggregate: &AggregateId,
    sequence: u64,
) -> Result<Option<IncidentState>, ServiceError> {
    let history = match store.inspect(aggregate).await {
        Ok(history) => history,
        Err(eventstore::LoadError::Corrupt { .. }) => return Ok(None),
        Err(error) => {
            return Err(ServiceError::Reload {
                incident: aggregate.to_string(),
                reason: error.to_string(),
            });
        }
    };
    let mut state = IncidentState::default();
    for recorded in history
        .commits
        .iter()
        .take_while(|commit| commit.sequence < sequence)
        .flat_map(|commit| &commit.events)
    {
        state.apply(&recorded.event);
    }
    Ok(Some(state))
}

/// Reads an incident's commits after the position the book holds it at (from the start when
/// it holds nothing: not folded yet, or dropped once it ended) and folds them in. The
/// position is the book's at the time of the read, never one noted earlier: an incident
/// dropped since would otherwise be read from the middle of its history.
async fn reload_into(
    store: &IncidentStore,
    book: &mut Book,
    aggregate: &AggregateId,
    incident: IncidentId,
) -> Result<(), ServiceError> {
    let held = book.get(incident).map_or(Position::NEW, |h| h.position);
    let loaded = store
        .load_after(aggregate, held)
        .await
        .map_err(|e| ServiceError::Reload {
            incident: incident.to_string(),
            reason: e.to_string(),
        })?;
    for commit in &loaded.commits {
        if let Applied::Gap { .. } | Applied::Foreign(_) = book.apply_read_back(commit) {
            return Err(ServiceError::Reload {
                incident: incident.to_string(),
                reason: format!("commit at sequence {} does not follow", commit.sequence),
            });
        }
    }
    Ok(())
}

/// Most snapshot shard keys listed when old generations are purged: the shards of the
/// generations kept, and of many left over by builds that did not purge them.
const SNAPSHOT_KEYS_LISTED_MAX: usize = 100 * SNAPSHOT_SHARDS_MAX;

fn shard_key(generation: u64, shard: usize) -> String {
    format!("dispatch.g{generation}.s{shard}")
}

/// Logs how a snapshot write ended.
fn report_snapshot(done: Result<Result<usize, String>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(shards)) => debug!(shards, "snapshot written"),
        Ok(Err(error)) => warn!(%error, "snapshot not written"),
        Err(error) => warn!(%error, "snapshot task failed"),
    }
}

/// What a snapshot holds: the book as of `reached_sequence`.
struct BookCopy {
    templates: Vec<AggregateTemplate>,
    incidents: Vec<(IncidentId, Held)>,
    reached_sequence: u64,
}

/// Writes the book as shards of a new generation, then the manifest pointing at them (CAS on
/// the manifest: of two instances writing at once one wins the manifest, and a reader refuses
/// shards the other wrote over the winner's).
async fn write_snapshot(
    snapshots: &SnapshotStore,
    book: BookCopy,
    shard_pause: Duration,
) -> Result<usize, String> {
    let current = snapshots
        .read::<SnapshotManifest>(SNAPSHOT_MANIFEST_KEY, SNAPSHOT_FORMAT)
        .await
        .map_err(|e| e.to_string())?;
    let generation = current
        .snapshot
        .as_ref()
        .map_or(1, |(m, _)| m.generation + 1);
    let entries = &book.incidents;
    let shards = entries.len().div_ceil(SNAPSHOT_INCIDENTS_PER_SHARD);
    if shards > SNAPSHOT_SHARDS_MAX {
        return Err(format!("{shards} shards, more than {SNAPSHOT_SHARDS_MAX}"));
    }
    // Every shard and the manifest carry the same position, made unique to this write: two
    // instances writing the same generation at once overwrite each other's shards, and the
    // manifest that wins must not be read with the loser's shards (their incidents are split
    // differently, so together they can miss some). A reader checks that each shard has the
    // manifest's position.
    let mut write_id = [0; 32];
    write_id[..16].copy_from_slice(uuid::Uuid::now_v7().as_bytes());
    let position = Position {
        version: generation,
        sequence: book.reached_sequence,
        hash: write_id,
    };
    // One shard after another, with a pause between them: written at once (or back to back),
    // the shards (~150 KB each for 1,000 incidents) made a 30-60 ms stall for every incident
    // and notification in flight, measured in `wangge bench pipeline` (p99 27-39 ms); paced,
    // p99 16.5 ms. A snapshot is not urgent: the log is the truth.
    for (shard, chunk) in entries.chunks(SNAPSHOT_INCIDENTS_PER_SHARD).enumerate() {
        let key = shard_key(generation, shard);
        let existing = snapshots
            .read::<Vec<(IncidentId, Held)>>(&key, SNAPSHOT_FORMAT)
            .await
            .map_err(|e| e.to_string())?
            .revision;
        snapshots
            .write(&key, SNAPSHOT_FORMAT, &chunk.to_vec(), position, existing)
            .await
            .map_err(|e| e.to_string())?;
        if !shard_pause.is_zero() {
            tokio::time::sleep(shard_pause).await;
        }
    }
    let manifest = SnapshotManifest {
        generation,
        shards: shards as u32,
        reached_sequence: book.reached_sequence,
        templates: book.templates,
    };
    snapshots
        .write(
            SNAPSHOT_MANIFEST_KEY,
            SNAPSHOT_FORMAT,
            &manifest,
            position,
            current.revision,
        )
        .await
        .map_err(|e| e.to_string())?;
    remove_old_generations(snapshots, generation).await;
    Ok(shards)
}

/// Purges the shards of generations before the one this write replaced: every write adds a
/// generation under new keys, so without this the bucket grew by a whole book per snapshot.
/// The replaced generation is kept, for an instance that read the manifest just before the
/// swap and is still reading its shards. A failure is logged: the snapshot itself stands.
async fn remove_old_generations(snapshots: &SnapshotStore, generation: u64) {
    let keep_from = generation.saturating_sub(1);
    let keys = match snapshots
        .keys_with_prefix("dispatch.g", SNAPSHOT_KEYS_LISTED_MAX)
        .await
    {
        Ok(keys) => keys,
        Err(error) => {
            warn!(%error, "list old snapshot shards; they stay in the bucket");
            return;
        }
    };
    for key in keys {
        let Some(old) = shard_generation(&key).filter(|old| *old < keep_from) else {
            continue;
        };
        if let Err(error) = snapshots.purge(&key).await {
            warn!(%error, generation = old, "purge an old snapshot shard");
            return;
        }
    }
}

/// The generation a shard key names (`dispatch.g<generation>.s<shard>`).
fn shard_generation(key: &str) -> Option<u64> {
    key.strip_prefix("dispatch.g")?
        .split_once(".s")?
        .0
        .parse()
        .ok()
}

/// Reads the latest complete snapshot; `None` (replay from the start) when absent or torn,
/// with a warning that says why (none when there is no snapshot at all).
async fn read_snapshot(snapshots: &SnapshotStore) -> Option<Book> {
    let torn = |reason: String| {
        warn!(%reason, "dispatch snapshot not used; replaying INCIDENTS from the start");
    };
    let (manifest, position) = match snapshots
        .read::<SnapshotManifest>(SNAPSHOT_MANIFEST_KEY, SNAPSHOT_FORMAT)
        .await
    {
        Ok(read) => read.snapshot?,
        Err(error) => {
            torn(format!("manifest {SNAPSHOT_MANIFEST_KEY}: {error}"));
            return None;
        }
    };
    let mut incidents = Vec::new();
    for shard in 0..manifest.shards as usize {
        let key = shard_key(manifest.generation, shard);
        let read = match snapshots
            .read::<Vec<(IncidentId, Held)>>(&key, SNAPSHOT_FORMAT)
            .await
        {
            Ok(read) => read,
            Err(error) => {
                torn(format!("shard {key}: {error}"));
                return None;
            }
        };
        let Some((chunk, shard_position)) = read.snapshot else {
            torn(format!("shard {key} is missing or does not decode"));
            return None;
        };
        if shard_position != position {
            torn(format!(
                "shard {key} was written by another snapshot than the manifest's (two \
                 instances wrote generation {} at once)",
                manifest.generation
            ));
            return None;
        }
        incidents.extend(chunk);
    }
    if incidents
        .iter()
        .any(|(_, h)| usize::from(h.template) >= manifest.templates.len())
    {
        torn("an incident names an aggregate layout the manifest does not have".to_owned());
        return None;
    }
    let book = Book::from_parts(manifest.templates, incidents, manifest.reached_sequence);
    info!(
        incidents = book.len(),
        reached = manifest.reached_sequence,
        "dispatch book loaded from snapshot"
    );
    Some(book)
}

/// `Status` of an incident as held, for tests and tools.
pub fn status_of(book: &Book, incident: IncidentId) -> Option<Status> {
    book.get(incident).map(|h| h.state.status)
}
