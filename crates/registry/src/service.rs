//! The registry service: a thin shell around [`crate::domain`].
//!
//! - **Start**: the GRIDS stream is replayed in bulk up to its last sequence (taken at start)
//!   and folded into a [`Directory`]; the locate index is built once and published; a durable
//!   subscription private to this instance continues after the replayed sequence.
//! - **Run**: one `tokio::select!` loop over the shutdown signal, the subscription (commits
//!   written by any instance: several registries stay in sync) and three request subjects,
//!   subscribed in the queue group `registry` so instances share the load.
//! - **Commands** are decided on the in-memory state, appended with the aggregate's expected
//!   position and the command id as idempotency key, folded in, and only then answered. A
//!   conflicting writer makes this instance read the aggregate's new commits and decide again.
//! - **Shutdown**: stop taking requests (drain the subscriptions: requests already delivered
//!   are still answered), delete the private consumer, flush.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::service::endpoint::Endpoint;
use eventstore::{
    AggregateId, AppendError, Commit, CommitMeta, ConflictReason, EventStore, ReplayRange,
    SubscribeError, Subscription, SubscriptionConfig,
};
use futures::StreamExt as _;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::api::{
    self, CommunityAnswer, CommunityQuery, GridSummary, ItemRejectionJson, LocateAnswer,
    LocateBuildingRequest, LocateRequest, Receipt, RejectedReply,
};
use crate::directory::{Applied, Directory, Locator};
use crate::domain::{self, Community, Event, Rejection};
use crate::wire::RegistryCodec;

/// Decide-append rounds for one command when other writers keep winning the race.
const COMMAND_ATTEMPTS_MAX: usize = 4;
/// How long requests already delivered may take to be answered at shutdown.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A private consumer left behind by a crashed instance is removed by the server after this.
const CONSUMER_INACTIVE_THRESHOLD: Duration = Duration::from_secs(300);
/// Longest locate request body (a point needs a few dozen bytes).
const LOCATE_REQUEST_BYTES_MAX: usize = 1024;
/// Largest `grids.query.community` body (a community id).
const QUERY_REQUEST_BYTES_MAX: usize = 1024;
/// Longest actor string written to the commit envelope.
const ACTOR_BYTES_MAX: usize = 128;

/// How one registry instance runs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The city's standards profile for compliance answers.
    pub profile: standards::Profile,
    /// Queue group shared by all instances for request subjects.
    pub queue_group: String,
    /// This instance's name (part of its private consumer's name).
    pub instance: String,
    /// False: only follow the stream and keep [`Locator`]s current (for in-process use by
    /// another service); true: also answer requests.
    pub serve_requests: bool,
    /// Metrics and health of this instance ([`observe::Observer::disabled`] by default).
    pub observer: observe::Observer,
}

impl ServiceConfig {
    pub fn new(profile: standards::Profile) -> ServiceConfig {
        ServiceConfig {
            profile,
            queue_group: "registry".to_owned(),
            instance: "registry".to_owned(),
            serve_requests: true,
            observer: observe::Observer::disabled(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("read GRIDS stream info: {reason}")]
    StreamInfo { reason: String },
    #[error("create consumer {durable}: {reason}")]
    Consumer { durable: String, reason: String },
    #[error(transparent)]
    Subscription(#[from] SubscribeError),
    #[error("catch up with the GRIDS stream: {reason}")]
    CatchUp { reason: String },
    #[error("subscribe to {subject}: {reason}")]
    Subscribe { subject: String, reason: String },
    #[error("build locate index: {0}")]
    Index(#[from] partition::locate::LocateError),
    #[error("read commits of {community}: {reason}")]
    Reload { community: String, reason: String },
}

/// A started registry: state rebuilt, ready to [`RegistryService::run`].
pub struct RegistryService {
    client: async_nats::Client,
    store: EventStore<RegistryCodec>,
    config: ServiceConfig,
    directory: Directory,
    subscription: Subscription<RegistryCodec>,
    durable: String,
    /// Request endpoints of the `wangge-registry` micro service (queue group), open from the
    /// end of `start`.
    requests: futures::stream::SelectAll<Endpoint>,
    micro: Option<async_nats::service::Service>,
    recent: RecentCommands,
}

/// Command ids remembered per instance with what they carried, so that an id sent again with
/// another command is refused `command_id_reused` instead of answered as a duplicate. (The
/// community's state holds its recent ids, not their bodies; an instance started since
/// answers such a resend as a duplicate, and nothing is written either way.)
pub const RECENT_COMMANDS_MAX: usize = 4_096;

#[derive(Debug, Default)]
struct RecentCommands {
    /// (community id, command id) -> fingerprint of (command name, parsed command).
    fingerprints: HashMap<(String, String), u64>,
    order: VecDeque<(String, String)>,
}

impl RecentCommands {
    fn fingerprint(name: &str, command: &domain::Command) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::hash::DefaultHasher::new();
        name.hash(&mut hasher);
        format!("{command:?}").hash(&mut hasher);
        hasher.finish()
    }

    /// True when `key` was remembered with another command.
    fn reused(&self, key: &(String, String), fingerprint: u64) -> bool {
        self.fingerprints
            .get(key)
            .is_some_and(|remembered| *remembered != fingerprint)
    }

    fn remember(&mut self, key: (String, String), fingerprint: u64) {
        if self.fingerprints.insert(key.clone(), fingerprint).is_none() {
            self.order.push_back(key);
        }
        if self.order.len() > RECENT_COMMANDS_MAX
            && let Some(oldest) = self.order.pop_front()
        {
            self.fingerprints.remove(&oldest);
        }
        debug_assert!(self.fingerprints.len() <= RECENT_COMMANDS_MAX);
    }
}

/// Micro endpoints: (name, subject).
const ENDPOINTS: [(&str, &str); 3] = [
    ("locate", api::SUBJECT_LOCATE),
    ("commands", api::SUBJECT_COMMANDS),
    ("community", api::SUBJECT_QUERY_COMMUNITY),
];

impl std::fmt::Debug for RegistryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryService")
            .field("config", &self.config)
            .field("communities", &self.directory.communities())
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

/// `accepted`, `rejected` or `error` from a reply's `"status"` (locate's `served` and
/// `unserved` are answers, so accepted).
fn outcome_of(body: &[u8]) -> &'static str {
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        status: Option<&'a str>,
    }
    match serde_json::from_slice::<Status<'_>>(body)
        .ok()
        .and_then(|s| s.status)
    {
        Some("rejected") => "rejected",
        Some("error") => "error",
        _ => "accepted",
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|error| {
        format!(r#"{{"status":"error","reason_code":"encode","message":"{error}"}}"#).into_bytes()
    })
}

impl RegistryService {
    /// Folds the GRIDS stream up to its current end into memory, opens this instance's private
    /// subscription after it, then subscribes to the request subjects (if `serve_requests`).
    pub async fn start(
        client: async_nats::Client,
        store: EventStore<RegistryCodec>,
        config: ServiceConfig,
    ) -> Result<RegistryService, ServiceError> {
        // 1. Bulk replay (no acks) up to the stream's last sequence now.
        let started = std::time::Instant::now();
        let mut directory = Directory::new();
        let mut commits = 0u64;
        let mut apply_error = None;
        let reached = store
            .replay(ReplayRange::default(), |commit| {
                if apply_error.is_some() {
                    return;
                }
                match directory.apply(&commit) {
                    Ok(_) => commits += 1,
                    Err(error) => apply_error = Some(error),
                }
            })
            .await
            .map_err(|error| ServiceError::CatchUp {
                reason: error.to_string(),
            })?;
        if let Some(error) = apply_error {
            return Err(ServiceError::CatchUp {
                reason: error.to_string(),
            });
        }
        // 2. A private durable consumer from there on, for commits written after the replay.
        // Created here so the server removes it if this instance dies without cleaning up; the
        // store's subscription then finds and uses it.
        let subscription_config = SubscriptionConfig::private_follower(
            &config.instance,
            reached,
            CONSUMER_INACTIVE_THRESHOLD,
        );
        let durable = subscription_config.durable_name.clone();
        let subscription = store.subscribe(subscription_config).await?;
        let grids = directory.publish_all()?;
        info!(
            commits,
            communities = directory.communities(),
            grids,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "registry state rebuilt from the GRIDS stream"
        );
        config
            .observer
            .metrics()
            .reached(&store.spec().stream_name, reached);
        let (micro, endpoints) = if config.serve_requests {
            let (micro, endpoints) = observe::start_micro(
                &client,
                "registry",
                "wangge grid registry: locate, community commands and queries",
                &config.queue_group,
                &config.instance,
                &ENDPOINTS,
            )
            .await
            .map_err(|error| ServiceError::Subscribe {
                subject: "$SRV".to_owned(),
                reason: error.to_string(),
            })?;
            (Some(micro), endpoints)
        } else {
            (None, Vec::new())
        };
        Ok(RegistryService {
            client,
            store,
            config,
            directory,
            subscription,
            durable,
            requests: futures::stream::select_all(endpoints),
            micro,
            recent: RecentCommands::default(),
        })
    }

    /// A cheap in-process handle that always answers from the latest state.
    pub fn locator(&self) -> Locator {
        self.directory.locator()
    }

    /// Serves until `shutdown` turns true (or its sender is dropped), then drains and returns.
    /// Requests that arrived since [`RegistryService::start`] returned are answered too.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ServiceError> {
        info!(
            serve_requests = self.config.serve_requests,
            queue_group = %self.config.queue_group,
            "registry serving"
        );
        let mut requests = std::mem::take(&mut self.requests);
        let observer = self.config.observer.clone();
        observer.watch_connection(&self.client);
        observer.set_started();
        let result = loop {
            if *shutdown.borrow() {
                break Ok(());
            }
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break Ok(());
                    }
                }
                delivery = self.subscription.next() => {
                    if let Err(error) = self.on_delivery(delivery).await {
                        break Err(error);
                    }
                }
                Some(message) = requests.next(), if self.config.serve_requests => {
                    self.on_request(message).await;
                }
            }
        };
        // Stop taking requests (unsubscribe); answer the ones already delivered to us.
        observer.set_stopping();
        let mut answered = 0usize;
        for endpoint in requests.iter_mut() {
            if let Err(error) = endpoint.stop().await {
                warn!(%error, "stop request endpoint");
            }
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN_TIMEOUT;
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, requests.next()).await {
            self.on_request(message).await;
            answered += 1;
        }
        if let Some(micro) = self.micro.take()
            && let Err(error) = micro.stop().await
        {
            warn!(%error, "stop the micro service");
        }
        if let Err(error) = self.store.delete_consumer(&self.durable).await {
            warn!(%error, "delete private consumer");
        }
        if let Err(error) = self.client.flush().await {
            warn!(%error, "flush at shutdown");
        }
        info!(answered_while_draining = answered, "registry stopped");
        result
    }

    async fn on_delivery(
        &mut self,
        delivery: Result<eventstore::Delivery<Event>, SubscribeError>,
    ) -> Result<(), ServiceError> {
        // Not a commit (another client's publish on `grids.ev.*`): nothing to fold. A commit
        // this build cannot read still stops the follower.
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(error) => return Ok(error.skip_if_foreign().await?),
        };
        let metrics = self.config.observer.metrics();
        metrics.reached(&self.store.spec().stream_name, delivery.commit.sequence);
        match self.directory.apply(&delivery.commit) {
            Ok(Applied::New) => {
                metrics.commits_folded.inc();
                // As the writer does (`locate index not rebuilt after a command`): the
                // community keeps the locate part it had. Before, every follower (other
                // registry instances, intake's in-process one) stopped on it.
                if let Err(error) = self
                    .directory
                    .publish_community(delivery.commit.aggregate.as_str())
                {
                    error!(community = %delivery.commit.aggregate, %error, "locate index not rebuilt after a commit");
                }
            }
            Ok(Applied::AlreadyHeld) => {}
            Err(gap) => {
                warn!(%gap, "commit out of order; reading the community's commits");
                self.reload(&delivery.commit.aggregate).await?;
            }
        }
        if let Err(error) = self.subscription.settle(&delivery).await {
            debug!(%error, "ack failed; the commit may be redelivered (it is skipped then)");
        }
        Ok(())
    }

    /// Reads the commits of one community after the held position and folds them in.
    /// The version and sequence of the stored commit that carries `commit`'s command id, when
    /// it was stored by the same actor with the same kinds of events (a resend decided again);
    /// `None` otherwise, or when the history cannot be read.
    async fn stored_resend(
        &self,
        aggregate: &AggregateId,
        commit: &Commit<domain::Event>,
    ) -> Option<(u64, u64)> {
        let loaded = match self.store.load(aggregate).await {
            Ok(loaded) => loaded,
            Err(error) => {
                warn!(%error, "read the community to look for a resent command");
                return None;
            }
        };
        let stored = loaded
            .commits
            .iter()
            .find(|stored| stored.command_id == commit.command_id)?;
        let same_kinds = stored.events.len() == commit.events.len()
            && stored
                .events
                .iter()
                .zip(&commit.events)
                .all(|(stored, ours)| {
                    std::mem::discriminant(&stored.event) == std::mem::discriminant(ours)
                });
        (stored.meta.actor == commit.meta.actor && same_kinds)
            .then_some((stored.version, stored.sequence))
    }

    async fn reload(&mut self, aggregate: &AggregateId) -> Result<(), ServiceError> {
        let held = self.directory.community_or_new(aggregate.as_str()).position;
        let loaded = self
            .store
            .load_after(aggregate, held)
            .await
            .map_err(|error| ServiceError::Reload {
                community: aggregate.to_string(),
                reason: error.to_string(),
            })?;
        for commit in &loaded.commits {
            self.directory
                .apply(commit)
                .map_err(|error| ServiceError::Reload {
                    community: aggregate.to_string(),
                    reason: error.to_string(),
                })?;
        }
        if let Err(error) = self.directory.publish_community(aggregate.as_str()) {
            error!(community = %aggregate, %error, "locate index not rebuilt after a reload");
        }
        Ok(())
    }

    async fn on_request(&mut self, request: async_nats::service::Request) {
        let started = std::time::Instant::now();
        let message = &request.message;
        if message.reply.is_none() {
            debug!(subject = %message.subject, "request without reply subject ignored");
            return;
        }
        let subject = message.subject.as_str();
        let body = if subject == api::SUBJECT_LOCATE {
            to_json(&locate_reply(&self.directory.locator(), &message.payload))
        } else if subject == api::SUBJECT_QUERY_COMMUNITY {
            self.query_community(&message.payload).await
        } else if let Some(name) = subject.strip_prefix(api::SUBJECT_COMMAND_PREFIX) {
            let name = name.to_owned();
            // The caller's W3C traceparent goes into the commit, so that the audit log links
            // back to the request; without one, the envelope derives it from the command.
            let traceparent = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get("traceparent"))
                .map(|value| value.as_str())
                .filter(|value| observe::trace_id(value).is_some())
                .map(str::to_owned);
            self.command(&name, &message.payload, traceparent).await
        } else {
            to_json(&RejectedReply::new(
                "unknown_subject",
                format!("no handler for {subject}"),
            ))
        };
        let endpoint = ENDPOINTS
            .iter()
            .find(|(_, endpoint_subject)| {
                *endpoint_subject == subject
                    || endpoint_subject
                        .strip_suffix('*')
                        .is_some_and(|prefix| subject.starts_with(prefix))
            })
            .map_or("unknown", |(name, _)| *name);
        self.config
            .observer
            .metrics()
            .request(endpoint, outcome_of(&body), started.elapsed());
        if let Err(error) = request.respond(Ok(body.into())).await {
            warn!(%error, "reply not sent");
        }
    }

    async fn query_community(&mut self, payload: &[u8]) -> Vec<u8> {
        let query: CommunityQuery =
            match observe::refusal::parse_json("query", payload, QUERY_REQUEST_BYTES_MAX) {
                Ok(query) => query,
                Err(refusal) => return to_json(&RejectedReply::from(refusal)),
            };
        let registered = |directory: &Directory| {
            directory
                .get(&query.community_id)
                .is_some_and(|entry| entry.community.profile.is_some())
        };
        // No refusal from a stale view: a community registered a moment ago through another
        // instance may not have reached this one yet. Before `not_found`, ask the store.
        if !registered(&self.directory)
            && let Ok(aggregate) = AggregateId::new(query.community_id.clone())
        {
            let held = self
                .directory
                .get(&query.community_id)
                .map_or(0, |entry| entry.position.sequence);
            match self.store.last_position(&aggregate).await {
                Ok(last) if last.sequence > held => {
                    if let Err(error) = self.reload(&aggregate).await {
                        return to_json(&error_reply("store_unavailable", error.to_string()));
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    return to_json(&error_reply("store_unavailable", error.to_string()));
                }
            }
        }
        match self.directory.get(&query.community_id) {
            Some(entry) if entry.community.profile.is_some() => to_json(&community_answer(
                &entry.community,
                entry.position.version,
                &self.config.profile,
            )),
            _ => to_json(&RejectedReply::new(
                "not_found",
                format!("community {:?} is not registered", query.community_id),
            )),
        }
    }

    async fn command(
        &mut self,
        name: &str,
        payload: &[u8],
        traceparent: Option<String>,
    ) -> Vec<u8> {
        if payload.len() > api::REQUEST_BYTES_MAX {
            let refusal = observe::refusal::Refusal::too_large(
                "command",
                payload.len(),
                api::REQUEST_BYTES_MAX,
            );
            return to_json(&RejectedReply::from(refusal));
        }
        let parsed = match api::parse_command(name, payload) {
            Ok(parsed) => parsed,
            Err(rejected) => return to_json(&rejected),
        };
        let header = parsed.header;
        let recent_key = (header.community_id.clone(), header.command_id.clone());
        let fingerprint = RecentCommands::fingerprint(name, &parsed.command);
        if self.recent.reused(&recent_key, fingerprint) {
            return to_json(&RejectedReply::new(
                "command_id_reused",
                format!(
                    "command id {} was already used for another command",
                    header.command_id
                ),
            ));
        }
        if let Err(reason) = domain::check_id(&header.community_id, domain::COMMUNITY_ID_BYTES_MAX)
        {
            return to_json(&RejectedReply::new(
                "bad_community_id",
                format!("community id {:?} {reason}", header.community_id),
            ));
        }
        let aggregate = match AggregateId::new(header.community_id.clone()) {
            Ok(aggregate) => aggregate,
            Err(error) => {
                return to_json(&RejectedReply::new("bad_community_id", error.to_string()));
            }
        };
        let actor: String = header
            .actor
            .as_deref()
            .unwrap_or("anonymous")
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(ACTOR_BYTES_MAX)
            .collect();
        for attempt in 1..=COMMAND_ATTEMPTS_MAX {
            let now = now_ms();
            // Decide on the held state without copying it (a community holds its buildings).
            let fresh;
            let (community, position) = match self.directory.get(&header.community_id) {
                Some(entry) => (&entry.community, entry.position),
                None => {
                    fresh = Community::new(header.community_id.as_str());
                    (&fresh, eventstore::Position::NEW)
                }
            };
            let decided = if parsed.command.may_partition() {
                // Drawing grids takes tens of milliseconds for a large community: decide on
                // the blocking pool, so that on a one-thread runtime the connection (pings)
                // and `/healthz` stay served meanwhile. Commands still run one at a time.
                let (owned, command_id, command) = (
                    community.clone(),
                    header.command_id.clone(),
                    parsed.command.clone(),
                );
                match tokio::task::spawn_blocking(move || {
                    domain::decide(&owned, &command_id, &command, now)
                })
                .await
                {
                    Ok(decided) => decided,
                    Err(error) => {
                        error!(%error, command_id = %header.command_id, "deciding a partition failed");
                        return to_json(&error_reply(
                            "internal",
                            format!("deciding the command failed: {error}"),
                        ));
                    }
                }
            } else {
                domain::decide(community, &header.command_id, &parsed.command, now)
            };
            // A refusal, or an answer that needs no append, is never checked by the store:
            // give it only on the latest state. This instance may lag the stream (another
            // instance stored the community's last command a moment ago).
            if !matches!(&decided, Ok(events) if !events.is_empty())
                && attempt < COMMAND_ATTEMPTS_MAX
            {
                match self.store.last_position(&aggregate).await {
                    Ok(last) if last.sequence > position.sequence => {
                        if let Err(error) = self.reload(&aggregate).await {
                            return to_json(&error_reply("store_unavailable", error.to_string()));
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(error) => {
                        return to_json(&error_reply("store_unavailable", error.to_string()));
                    }
                }
            }
            let events = match decided {
                Ok(events) => events,
                Err(rejection) => return to_json(&rejection_reply(&rejection)),
            };
            if events.is_empty() {
                return to_json(&receipt(
                    &header.command_id,
                    community,
                    position.version,
                    0,
                    true,
                    &[],
                ));
            }
            let command_uuid = eventstore::command_uuid("registry", &header.command_id);
            let meta = CommitMeta {
                correlation_id: command_uuid,
                causation_id: command_uuid,
                actor: if actor.is_empty() {
                    "anonymous".to_owned()
                } else {
                    actor.clone()
                },
                occurred_at_ms: now,
                traceparent: traceparent.clone(),
            };
            let commit = Commit::new(header.command_id.clone(), events, meta);
            match self.store.append(&aggregate, &position, &commit).await {
                Ok(appended) if !appended.duplicate => {
                    self.recent.remember(recent_key.clone(), fingerprint);
                    self.config.observer.metrics().commits_appended.inc();
                    info!(community = %aggregate, command_id = %header.command_id, sequence = appended.position.sequence, "command stored");
                    self.directory.apply_own(
                        &header.community_id,
                        &header.command_id,
                        &commit.events,
                        appended.position,
                    );
                    if let Err(error) = self.directory.publish_community(&header.community_id) {
                        error!(%error, "locate index not rebuilt after a command");
                    }
                    let community = &self
                        .directory
                        .get(&header.community_id)
                        .expect("applied above")
                        .community;
                    return to_json(&receipt(
                        &header.command_id,
                        community,
                        appended.position.version,
                        appended.position.sequence,
                        false,
                        &commit.events,
                    ));
                }
                Ok(appended) => {
                    // Stored before (by us or another instance) but not yet folded in here.
                    if let Err(error) = self.reload(&aggregate).await {
                        warn!(%error, "reload after a duplicate append");
                    }
                    let community = self.directory.community_or_new(&header.community_id);
                    return to_json(&receipt(
                        &header.command_id,
                        &community.community,
                        appended.position.version,
                        appended.position.sequence,
                        true,
                        &[],
                    ));
                }
                Err(AppendError::Conflict {
                    reason: ConflictReason::StaleVersion { .. },
                    ..
                }) if attempt < COMMAND_ATTEMPTS_MAX => {
                    self.config.observer.metrics().append_conflicts.inc();
                    debug!(community = %aggregate, attempt, "another writer went first; reading its commits");
                    if let Err(error) = self.reload(&aggregate).await {
                        return to_json(&error_reply("store_unavailable", error.to_string()));
                    }
                }
                Err(AppendError::Conflict {
                    reason: ConflictReason::CommandIdReused { command_id, .. },
                    ..
                }) => {
                    // A resend decided again at another moment (its first answer lost) differs
                    // from the stored commit only in its times (`registered_at_ms`,
                    // `assigned_at_ms`): the same actor and the same kinds of events make it
                    // the duplicate it is, not a reused id.
                    if let Some((version, sequence)) = self.stored_resend(&aggregate, &commit).await
                    {
                        if let Err(error) = self.reload(&aggregate).await {
                            warn!(%error, "reload after a resent command");
                        }
                        let community = self.directory.community_or_new(&header.community_id);
                        return to_json(&receipt(
                            &header.command_id,
                            &community.community,
                            version,
                            sequence,
                            true,
                            &[],
                        ));
                    }
                    return to_json(&RejectedReply::new(
                        "command_id_reused",
                        format!("command id {command_id} was already used for another command"),
                    ));
                }
                Err(error) => {
                    if let Some(refusal) = too_large_to_store(&error) {
                        warn!(%error, "command refused: its commit is over the size a commit holds");
                        return to_json(&refusal);
                    }
                    error!(%error, "append failed");
                    return to_json(&error_reply("store_unavailable", error.to_string()));
                }
            }
        }
        to_json(&error_reply(
            "conflict",
            format!("other writers won {COMMAND_ATTEMPTS_MAX} times; retry"),
        ))
    }
}

/// A commit over the store's bounds is refused as what it is: sent again, the same command
/// decides the same commit, so `store_unavailable` ("nothing was written, send again") would
/// have it sent again for ever.
fn too_large_to_store(error: &AppendError) -> Option<RejectedReply> {
    let AppendError::Encode { source, .. } = error else {
        return None;
    };
    let what = match source {
        eventstore::EncodeCommitError::TooLarge { bytes } => format!(
            "its commit would be {bytes} bytes, more than the {} a commit holds",
            eventstore::COMMIT_BODY_BYTES_MAX
        ),
        eventstore::EncodeCommitError::TooManyEvents { count } => format!(
            "its commit would hold {count} events, more than the {} a commit holds",
            eventstore::COMMIT_EVENTS_MAX
        ),
        _ => return None,
    };
    Some(RejectedReply::new(
        "commit_too_large",
        format!(
            "{what}: import fewer buildings per command; a community whose grids do not fit \
             one commit must be split"
        ),
    ))
}

fn error_reply(reason_code: &str, message: String) -> RejectedReply {
    RejectedReply {
        status: "error".to_owned(),
        reason_code: reason_code.to_owned(),
        message,
        rejected_items: Vec::new(),
    }
}

fn rejection_reply(rejection: &Rejection) -> RejectedReply {
    let mut reply = RejectedReply::new(rejection.reason_code(), rejection.to_string());
    if let Rejection::NothingToImport { rejected, .. } = rejection {
        reply.rejected_items = rejected.iter().map(ItemRejectionJson::from).collect();
    }
    reply
}

/// Answers a `grids.locate` body.
pub fn locate_reply(locator: &Locator, payload: &[u8]) -> LocateAnswer {
    if payload.len() > LOCATE_REQUEST_BYTES_MAX {
        return observe::refusal::Refusal::too_large(
            "request",
            payload.len(),
            LOCATE_REQUEST_BYTES_MAX,
        )
        .into();
    }
    if let Err(refusal) = observe::refusal::require_object("request", payload) {
        // Malformed JSON is named as such, not as a shape error.
        if serde_json::from_slice::<serde_json::Value>(payload).is_ok() {
            return refusal.into();
        }
    }
    let point_error = match serde_json::from_slice::<LocateRequest>(payload) {
        Ok(request) => return locator.locate(request.lon, request.lat),
        Err(error) => error,
    };
    match serde_json::from_slice::<LocateBuildingRequest>(payload) {
        Ok(request) => match locator.locate_building(&request.building_id) {
            Some(found) => found.answer,
            None => LocateAnswer::rejected(
                "unknown_building",
                format!(
                    "building {:?} is in no grid of the registry",
                    request.building_id
                ),
            ),
        },
        // Report the error of the form the request meant.
        Err(error) => {
            let error = if mentions_building_id(payload) {
                error
            } else {
                point_error
            };
            observe::refusal::Refusal::from_json_error_in(&error, payload).into()
        }
    }
}

fn mentions_building_id(payload: &[u8]) -> bool {
    payload
        .windows(b"\"building_id\"".len())
        .any(|window| window == b"\"building_id\"")
}

fn grid_summaries<'a>(
    community: &Community,
    grids: impl Iterator<Item = &'a domain::GridRecord>,
) -> Vec<GridSummary> {
    grids
        .map(|grid| GridSummary {
            grid_code: grid.grid_code.clone(),
            households: grid.households,
            flags: grid.flags.iter().map(|f| f.as_str().to_owned()).collect(),
            grid_worker: community.workers.get(&grid.grid_code).cloned(),
        })
        .collect()
}

fn receipt(
    command_id: &str,
    community: &Community,
    version: u64,
    sequence: u64,
    duplicate: bool,
    events: &[Event],
) -> Receipt {
    let mut receipt = Receipt {
        status: "accepted".to_owned(),
        command_id: command_id.to_owned(),
        community_id: community.id.clone(),
        duplicate,
        version,
        sequence,
        events: events.iter().map(|e| e.kind().to_owned()).collect(),
        buildings_imported: None,
        rejected_items: Vec::new(),
        grids_drawn: Vec::new(),
        grids_retired: Vec::new(),
    };
    for event in events {
        match event {
            Event::BuildingsImported {
                buildings,
                rejected,
            } => {
                receipt.buildings_imported = Some(buildings.len());
                receipt.rejected_items = rejected.iter().map(ItemRejectionJson::from).collect();
            }
            Event::GridsDrawn { drawn, retired, .. } => {
                receipt.grids_drawn = grid_summaries(community, drawn.iter());
                receipt.grids_retired = retired.clone();
            }
            _ => {}
        }
    }
    receipt
}

/// Facts and compliance of one community.
pub fn community_answer(
    community: &Community,
    version: u64,
    profile: &standards::Profile,
) -> CommunityAnswer {
    let registered = community
        .profile
        .as_ref()
        .expect("only registered communities are answered");
    let households = community.households();
    let population = community.population();
    let grid_workers = community
        .workers
        .values()
        .map(|w| w.worker_id.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let facts = standards::CommunityFacts {
        households: u32::try_from(households).unwrap_or(u32::MAX),
        population: population.map(|p| u32::try_from(p).unwrap_or(u32::MAX)),
        grids: Some(community.grids.len() as u32),
        grid_workers: Some(grid_workers as u32),
        ..standards::CommunityFacts::default()
    };
    CommunityAnswer {
        status: "found".to_owned(),
        community_id: community.id.clone(),
        code: registered.code.clone(),
        name: registered.name.clone(),
        street: registered.street.clone(),
        district: registered.district.clone(),
        buildings: community.buildings.len(),
        households,
        population,
        grids: grid_summaries(community, community.grids.values()),
        grid_workers,
        version,
        compliance: standards::evaluate(profile, &facts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refused with its own code (nothing to retry), not `store_unavailable`.
    #[test]
    fn a_commit_over_the_store_bounds_is_refused_not_retried() {
        let error = AppendError::Encode {
            subject: "grids.ev.liedong".to_owned(),
            source: eventstore::EncodeCommitError::TooLarge { bytes: 1_200_000 },
        };
        let refusal = serde_json::to_string(&too_large_to_store(&error)).expect("JSON");
        expect_test::expect![[r#"{"status":"rejected","reason_code":"commit_too_large","message":"its commit would be 1200000 bytes, more than the 983040 a commit holds: import fewer buildings per command; a community whose grids do not fit one commit must be split"}"#]]
            .assert_eq(&refusal);
        let other = AppendError::Encode {
            subject: "grids.ev.liedong".to_owned(),
            source: eventstore::EncodeCommitError::Empty,
        };
        assert!(too_large_to_store(&other).is_none());
    }
}
