//! Scale-out and failover on a 3-node JetStream cluster (R3 streams) with the deploy accounts:
//! two `wangge serve` instances of each service (registry, intake, dispatch, projection), each
//! service as its own restricted user, a resident app submitting reports on both paths (durable
//! `intake.submit.app` and request/reply `intake.request`).
//!
//! Phase 1 runs undisturbed; in phase 2 the node leading the INCIDENTS stream is killed
//! (`kill -9`) while reports keep coming, and restarted afterwards; in phase 3 the projection
//! instance holding the builder lease is killed (`kill -9`) while reports keep coming. Nothing
//! is lost and nothing is processed twice:
//!
//! - every submission has exactly one receipt in INTAKE;
//! - every filed incident has exactly one commit that dispatches it in INCIDENTS (intake's
//!   filing commit routes it) and no command id twice, and no other instance wrote it again;
//! - the read models equal a pure fold of INCIDENTS after each phase (no commit counted twice
//!   by two builders, none lost), the standby projection took the lease over within its bound
//!   and the totals stayed exact;
//! - both intake instances, both registry instances and both projection instances answered
//!   requests (queue groups), as their `$SRV.STATS` show;
//! - no incident version was announced twice on `incidents.status.<id>` (each stored change
//!   is announced by the one instance that stored it), and every incident was announced.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use eventstore::{BoundedContext, EventStore, ReplayRange, StreamSpec};
use projection::{LeaseValue, ReadModels};
use serde_json::{Value, json};
use testkit::{DeployAccounts, NatsCluster};

const SERVICES: [&str; 4] = ["registry", "intake", "dispatch", "projection"];
const INSTANCES_PER_SERVICE: usize = 2;
/// Submissions per phase, half on each path.
const SUBMISSIONS_PER_PHASE: usize = 60;
const REPLICAS: usize = 3;
/// Longest wait for the pipeline to finish a phase.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a single submission may be retried (covers a leader election).
const SUBMIT_RETRY_MAX: Duration = Duration::from_secs(30);
const ORIGIN: (f64, f64) = (117.6300, 26.2600);
const STEP: f64 = 0.001;

/// Submissions of phase 3 (the projection builder is killed meanwhile).
const SUBMISSIONS_PHASE_THREE: usize = 20;
/// Time allowed beyond the lease's takeover bound before the test calls it late.
const TAKEOVER_SLACK: Duration = Duration::from_secs(5);
/// Read-model queries sent to the two projection instances.
const PROJECTION_QUERIES: usize = 20;
/// Longest wait for the read models to reach the end of INCIDENTS (a builder takeover takes
/// up to the lease's bound, 11 s, plus loading).
const PROJECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// `wangge serve` children by instance name, killed when dropped.
struct Services(Vec<(String, Child)>);

impl Services {
    fn kill(&mut self, instance: &str) {
        let (_, child) = self
            .0
            .iter_mut()
            .find(|(name, _)| name == instance)
            .expect("a running instance");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn serve(urls: &str, accounts: &DeployAccounts, name: &str, instance: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_wangge"))
        .args(["serve", name, "--instance", instance])
        .env_remove("WANGGE_CONFIG")
        .env("WANGGE_NATS__URL", urls)
        .env("WANGGE_NATS__USER", name)
        .env(
            "WANGGE_NATS__PASSWORD",
            accounts.password(name).expect("service user"),
        )
        .env("WANGGE_NATS__INBOX_PREFIX", format!("_INBOX_{name}"))
        .env("WANGGE_STORE__REPLICAS", REPLICAS.to_string())
        // Warnings too, and the builder lease's changes: nextest shows them only when the
        // test fails, and a failed takeover or failover is explained by them.
        .env(
            "WANGGE_LOG__FILTER",
            "warn,async_nats=error,projection::lease=debug,projection::service=info",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn wangge serve")
}

/// Status updates received, by (incident id, version): their payloads.
type Announced = BTreeMap<(String, u64), Vec<String>>;

async fn connect(
    urls: &str,
    accounts: &DeployAccounts,
    user: &str,
    inbox: &str,
) -> async_nats::Client {
    let addresses: Vec<async_nats::ServerAddr> = urls
        .split(',')
        .map(|url| url.parse().expect("server address"))
        .collect();
    async_nats::ConnectOptions::new()
        .user_and_password(
            user.to_owned(),
            accounts.password(user).expect("user").to_owned(),
        )
        .custom_inbox_prefix(format!("_INBOX_{inbox}"))
        .connect(addresses)
        .await
        .expect("connect")
}

/// Every answer to a `$SRV` request within a short window (one per instance).
async fn gather(client: &async_nats::Client, subject: &str) -> Vec<Value> {
    use futures::StreamExt as _;
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply(subject.to_owned(), inbox, bytes::Bytes::new())
        .await
        .expect("publish");
    let mut out = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(700), answers.next()).await
    {
        // A status message ("no responders") has no payload.
        if let Ok(value) = serde_json::from_slice(&message.payload) {
            out.push(value);
        }
    }
    out
}

async fn wait_instances(admin: &async_nats::Client, service: &str, instances: usize) {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    while gather(admin, &format!("$SRV.PING.wangge-{service}"))
        .await
        .len()
        < instances
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service}: not every instance answered PING"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Requests `subject` until answered (a leader election can make a request time out).
async fn request_retrying(client: &async_nats::Client, subject: &str, body: &Value) -> Value {
    let deadline = tokio::time::Instant::now() + SUBMIT_RETRY_MAX;
    loop {
        let request = async_nats::Request::new()
            .payload(body.to_string().into())
            .timeout(Some(Duration::from_secs(2)));
        match client.send_request(subject.to_owned(), request).await {
            Ok(reply) => {
                let value: Value = serde_json::from_slice(&reply.payload).expect("json");
                if value["status"] != "error" {
                    return value;
                }
            }
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{subject} never answered: {error}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn publish_retrying(jetstream: &jetstream::Context, id: &str, body: &Value) {
    let deadline = tokio::time::Instant::now() + SUBMIT_RETRY_MAX;
    loop {
        let message = jetstream::message::PublishMessage::build()
            .payload(body.to_string().into())
            .message_id(id);
        let stored = match jetstream.send_publish("intake.submit.app", message).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        match stored {
            Ok(()) => return,
            Err(error) => assert!(
                tokio::time::Instant::now() < deadline,
                "submission {id} never stored: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn position(column: f64, row: f64) -> (f64, f64) {
    (ORIGIN.0 + column * STEP, ORIGIN.1 + row * STEP)
}

fn submission(index: usize) -> (String, Value) {
    let id = format!("cluster-{index:05}");
    // Spread over the 9 buildings and 3 categories (reports of one category near one building
    // are merged by intake: duplicate merges are part of the pipeline under test).
    let (lon, lat) = position(
        0.8 + (index % 3) as f64 * 1.2,
        0.8 + (index / 3 % 3) as f64 * 1.2,
    );
    let category = ["0101", "0201", "0301"][index / 9 % 3];
    let body = json!({
        "submission_id": id,
        "kind": "problem_report",
        "category": category,
        "location": {"point": {"lon": lon + (index / 27) as f64 * 0.00002, "lat": lat}},
        "description": "cluster test",
        "channel": "app",
        "reporter_id": uuid::Uuid::from_u128(0x5000 + index as u128),
        "occurred_at": "2026-11-20T08:30:00+08:00",
    });
    (id, body)
}

async fn submit_phase(resident: &async_nats::Client, range: std::ops::Range<usize>) {
    let jetstream = jetstream::new(resident.clone());
    let mut sends = Vec::new();
    for index in range {
        let (id, body) = submission(index);
        let jetstream = jetstream.clone();
        let resident = resident.clone();
        sends.push(tokio::spawn(async move {
            if index % 2 == 0 {
                publish_retrying(&jetstream, &id, &body).await;
            } else {
                let receipt = request_retrying(&resident, "intake.request", &body).await;
                assert!(
                    receipt["status"] == "filed" || receipt["status"] == "merged",
                    "{receipt}"
                );
            }
        }));
    }
    for send in sends {
        send.await.expect("submission task");
    }
}

/// What the log holds: receipts per submission (INTAKE records and filing commits), and per
/// incident its commits' command ids.
#[derive(Debug, Default)]
struct Ledger {
    receipts: BTreeMap<String, usize>,
    /// Each incident's commits: command id, and whether the commit dispatches it.
    incidents: BTreeMap<String, Vec<(String, bool)>>,
    /// Commits that dispatch an incident, by the writer's actor.
    dispatchers: BTreeMap<String, usize>,
}

/// Reads the ledger, retrying while the cluster elects leaders (reads may then fail).
async fn ledger(admin: &async_nats::Client) -> Ledger {
    let deadline = tokio::time::Instant::now() + SUBMIT_RETRY_MAX;
    loop {
        match read_ledger(admin).await {
            Ok(ledger) => return ledger,
            Err(error) => assert!(
                tokio::time::Instant::now() < deadline,
                "read the log: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn read_ledger(admin: &async_nats::Client) -> Result<Ledger, String> {
    let jetstream = jetstream::new(admin.clone());
    let spec = |context| StreamSpec::for_context(context, REPLICAS, Duration::from_secs(120));
    let mut ledger = Ledger::default();
    let intake = EventStore::open_existing(
        jetstream.clone(),
        spec(BoundedContext::Intake),
        intake::IntakeCodec::new(intake::INTAKE_EVENT_TYPE),
    )
    .await
    .map_err(|error| error.to_string())?;
    intake
        .replay(ReplayRange::default(), |commit| {
            *ledger
                .receipts
                .entry(commit.aggregate.to_string())
                .or_default() += 1;
        })
        .await
        .map_err(|error| error.to_string())?;
    let incidents = EventStore::open_existing(
        jetstream,
        spec(BoundedContext::Incidents),
        dispatch::IncidentCodec,
    )
    .await
    .map_err(|error| error.to_string())?;
    incidents
        .replay(ReplayRange::default(), |commit| {
            // A filing's receipt is the `SubmissionTaken` in its commit (merges and refusals
            // are on INTAKE).
            for recorded in &commit.events {
                if let domain::incident::IncidentEvent::SubmissionTaken { submission_id, .. } =
                    &recorded.event
                {
                    *ledger.receipts.entry(submission_id.clone()).or_default() += 1;
                }
            }
            let dispatches = commit.events.iter().any(|recorded| {
                matches!(
                    recorded.event,
                    domain::incident::IncidentEvent::Dispatched { .. }
                )
            });
            if dispatches {
                *ledger
                    .dispatchers
                    .entry(commit.meta.actor.clone())
                    .or_default() += 1;
            }
            ledger
                .incidents
                .entry(commit.aggregate.to_string())
                .or_default()
                .push((commit.command_id, dispatches));
        })
        .await
        .map_err(|error| error.to_string())?;
    Ok(ledger)
}

impl Ledger {
    fn dispatched(&self) -> usize {
        self.incidents
            .values()
            .filter(|commits| commits.iter().any(|(_, dispatches)| *dispatches))
            .count()
    }

    /// Problems: a submission with other than one receipt, an incident without exactly one
    /// commit that dispatches it (intake's filing, or dispatch's for a filing without one), a
    /// command id twice.
    fn problems(&self, submissions: usize) -> Vec<String> {
        let mut problems = Vec::new();
        if self.receipts.len() != submissions {
            problems.push(format!(
                "{} receipts for {submissions} submissions",
                self.receipts.len()
            ));
        }
        for (submission, count) in &self.receipts {
            if *count != 1 {
                problems.push(format!("{submission}: {count} receipts"));
            }
        }
        for (incident, commits) in &self.incidents {
            let dispatches = commits.iter().filter(|(_, dispatches)| *dispatches).count();
            let mut unique: Vec<&String> = commits.iter().map(|(id, _)| id).collect();
            unique.sort();
            unique.dedup();
            if dispatches != 1 || unique.len() != commits.len() {
                problems.push(format!("{incident}: {commits:?}"));
            }
        }
        problems
    }
}

async fn settle(admin: &async_nats::Client, submissions: usize) -> Ledger {
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    loop {
        let ledger = ledger(admin).await;
        if ledger.receipts.len() >= submissions && ledger.dispatched() == ledger.incidents.len() {
            return ledger;
        }
        if tokio::time::Instant::now() >= deadline {
            let missing: Vec<String> = (0..submissions)
                .map(|index| submission(index).0)
                .filter(|id| !ledger.receipts.contains_key(id))
                .collect();
            let queue = match jetstream::new(admin.clone())
                .get_stream("SUBMISSIONS")
                .await
            {
                Ok(stream) => match stream.consumer_info("intake").await {
                    Ok(info) => format!(
                        "pending {}, ack pending {}, redelivered {}, waiting {}",
                        info.num_pending,
                        info.num_ack_pending,
                        info.num_redelivered,
                        info.num_waiting
                    ),
                    Err(error) => error.to_string(),
                },
                Err(error) => error.to_string(),
            };
            let intake = EventStore::open_existing(
                jetstream::new(admin.clone()),
                StreamSpec::for_context(BoundedContext::Intake, REPLICAS, Duration::from_secs(120)),
                intake::IntakeCodec::new(intake::INTAKE_EVENT_TYPE),
            )
            .await
            .expect("INTAKE");
            let incidents = EventStore::open_existing(
                jetstream::new(admin.clone()),
                StreamSpec::for_context(
                    BoundedContext::Incidents,
                    REPLICAS,
                    Duration::from_secs(120),
                ),
                intake::IncidentCodec,
            )
            .await
            .expect("INCIDENTS");
            let mut direct = Vec::new();
            for id in &missing {
                // A merge or refusal is on INTAKE; a filing is the commit of its own incident.
                let aggregate = eventstore::AggregateId::new(id.clone()).expect("aggregate");
                let filing =
                    eventstore::AggregateId::new(intake::incident_id_for(id).0.to_string())
                        .expect("aggregate");
                let on_intake = match intake.load(&aggregate).await {
                    Ok(loaded) => format!("version {} in INTAKE", loaded.position.version),
                    Err(error) => error.to_string(),
                };
                let on_incidents = match incidents.load(&filing).await {
                    Ok(loaded) => format!("version {} in INCIDENTS", loaded.position.version),
                    Err(error) => error.to_string(),
                };
                direct.push(format!("{id}: {on_intake}; {on_incidents}"));
            }
            panic!(
                "pipeline did not settle: {} receipts of {submissions} (missing {missing:?}, \
                 read directly: {direct:?}; SUBMISSIONS consumer: {queue}), {} of {} incidents \
                 dispatched",
                ledger.receipts.len(),
                ledger.dispatched(),
                ledger.incidents.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `num_requests` of `endpoint` per instance of `service`, sorted.
async fn requests_per_instance(
    admin: &async_nats::Client,
    service: &str,
    endpoint: &str,
) -> Vec<u64> {
    let mut counts: Vec<u64> = gather(admin, &format!("$SRV.STATS.wangge-{service}"))
        .await
        .iter()
        .map(|stats| {
            stats["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["name"] == endpoint)
                .map(|e| e["num_requests"].as_u64().unwrap_or(0))
                .sum()
        })
        .collect();
    counts.sort_unstable();
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_of_each_service_share_the_work_and_survive_a_stream_leader_kill() {
    let accounts = DeployAccounts::load().expect("accounts.conf");
    let mut cluster = NatsCluster::start_with(accounts.options()).expect("cluster");
    let urls = cluster.urls();
    let admin = connect(&urls, &accounts, "admin", "admin").await;
    let admin_js = jetstream::new(admin.clone());
    // The operator's first step: `wangge up` as admin creates every stream and bucket (R3).
    let up = Command::new(env!("CARGO_BIN_EXE_wangge"))
        .arg("up")
        .env_remove("WANGGE_CONFIG")
        .env("WANGGE_NATS__URL", &urls)
        .env("WANGGE_NATS__USER", "admin")
        .env(
            "WANGGE_NATS__PASSWORD",
            accounts.password("admin").expect("admin"),
        )
        .env("WANGGE_NATS__INBOX_PREFIX", "_INBOX_admin")
        .env("WANGGE_STORE__REPLICAS", REPLICAS.to_string())
        // Warnings too: nextest shows them only when the test fails, and a failed takeover
        // or failover is explained by them.
        .env("WANGGE_LOG__FILTER", "warn,async_nats=error")
        .output()
        .expect("run wangge up");
    assert!(
        up.status.success(),
        "wangge up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    // Every stored change is announced once on incidents.status.<id>, by the instance that
    // stored it, however many instances run: count the announcements per (incident, version).
    let announced: std::sync::Arc<std::sync::Mutex<Announced>> = std::sync::Arc::default();
    let mut status_updates = admin
        .subscribe("incidents.status.>")
        .await
        .expect("subscribe status");
    admin.flush().await.expect("flush");
    let counting = {
        let announced = announced.clone();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            while let Some(message) = status_updates.next().await {
                let status: Value = serde_json::from_slice(&message.payload).expect("status JSON");
                let key = (
                    status["incident_id"].as_str().unwrap_or("").to_owned(),
                    status["version"].as_u64().unwrap_or(0),
                );
                announced
                    .lock()
                    .expect("lock")
                    .entry(key)
                    .or_default()
                    .push(String::from_utf8_lossy(&message.payload).into_owned());
            }
        })
    };
    // Held from the first spawn, so that a failed wait below still kills what was started.
    let mut services = Services(Vec::new());
    // One instance after the other: the first dispatch creates the shared notifier consumer
    // (creating the same R3 consumer from two processes at once can outlast the JetStream API
    // timeout; `wangge up` created intake's shared consumer already).
    for service in SERVICES {
        for n in 1..=INSTANCES_PER_SERVICE {
            let instance = format!("{service}-{n}");
            services.0.push((
                instance.clone(),
                serve(&urls, &accounts, service, &instance),
            ));
            wait_instances(&admin, service, n).await;
        }
    }

    // A community with 9 buildings, partitioned, through either registry instance.
    let (x, y) = ORIGIN;
    let side = 4.0 * STEP;
    let mut buildings = Vec::new();
    for row in 0..3 {
        for column in 0..3 {
            let (lon, lat) = position(0.8 + column as f64 * 1.2, 0.8 + row as f64 * 1.2);
            buildings.push(json!({"id": format!("b{}", row * 3 + column + 1),
                "lon": lon, "lat": lat, "households": 60}));
        }
    }
    for (subject, body) in [
        (
            "grids.cmd.register_community",
            json!({
            "command_id": "c-register", "community_id": "liedong", "code": "350402001001",
            "name": "列东社区", "street": "列东街道", "district": "三元区",
            "boundary": [[[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]]}),
        ),
        (
            "grids.cmd.import_buildings",
            json!({
            "command_id": "c-import", "community_id": "liedong", "buildings": buildings}),
        ),
        (
            "grids.cmd.partition",
            json!({"command_id": "c-partition", "community_id": "liedong"}),
        ),
    ] {
        let reply = request_retrying(&admin, subject, &body).await;
        assert_eq!(reply["status"], "accepted", "{subject}: {reply}");
    }
    // Both registry instances (and intake's in-process followers) see the grids.
    let point = {
        let (lon, lat) = position(0.8, 0.8);
        json!({"lon": lon, "lat": lat})
    };
    let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
    let mut served = 0;
    while served < 40 {
        let reply = request_retrying(&admin, "grids.locate", &point).await;
        if reply["status"] == "served" {
            served += 1;
        } else {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never located: {reply}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let resident = connect(&urls, &accounts, "resident-app", "resident").await;
    // Phase 1: undisturbed.
    submit_phase(&resident, 0..SUBMISSIONS_PER_PHASE).await;
    let first = settle(&admin, SUBMISSIONS_PER_PHASE).await;
    assert_eq!(first.problems(SUBMISSIONS_PER_PHASE), Vec::<String>::new());
    assert_eq!(
        read_models_against_fold(&admin).await,
        first.incidents.len() as u64
    );

    // Phase 2: the INCIDENTS leader dies mid-run.
    let mut incidents_stream = admin_js.get_stream("INCIDENTS").await.expect("INCIDENTS");
    let leader = incidents_stream
        .info()
        .await
        .expect("info")
        .cluster
        .clone()
        .and_then(|cluster| cluster.leader)
        .expect("a leader");
    let index = cluster.index_of(&leader).expect("leader is a node");
    let half = SUBMISSIONS_PER_PHASE / 2;
    let phase_two = SUBMISSIONS_PER_PHASE..SUBMISSIONS_PER_PHASE + half;
    let submitting = {
        let resident = resident.clone();
        tokio::spawn(async move { submit_phase(&resident, phase_two).await })
    };
    cluster.node_mut(index).kill();
    submit_phase(
        &resident,
        SUBMISSIONS_PER_PHASE + half..2 * SUBMISSIONS_PER_PHASE,
    )
    .await;
    submitting.await.expect("phase two submissions");
    let total = 2 * SUBMISSIONS_PER_PHASE;
    let after_kill = settle(&admin, total).await;
    assert_eq!(after_kill.problems(total), Vec::<String>::new());
    cluster
        .node_mut(index)
        .restart()
        .expect("restart the killed node");
    cluster.wait_healthy().expect("cluster healthy again");
    let after_restart = ledger(&admin).await;
    assert_eq!(after_restart.problems(total), Vec::<String>::new());
    assert_eq!(after_restart.incidents.len(), after_kill.incidents.len());
    assert_eq!(
        read_models_against_fold(&admin).await,
        after_restart.incidents.len() as u64
    );
    // Both projection instances answer queries (queue group), the builder and the standby
    // alike, with the same totals.
    let auditor = connect(&urls, &accounts, "auditor", "auditor").await;
    for _ in 0..PROJECTION_QUERIES {
        let reply = request_retrying(&auditor, "projection.query.totals", &json!({})).await;
        assert_eq!(
            reply["value"]["incidents"].as_u64(),
            Some(after_restart.incidents.len() as u64),
            "{reply}"
        );
    }
    let queries = requests_per_instance(&admin, "projection", "query").await;
    assert_eq!(queries.len(), INSTANCES_PER_SERVICE, "{queries:?}");
    assert!(
        queries.iter().all(|count| *count > 0),
        "projection: {queries:?}"
    );

    // Phase 3: the projection builder dies (kill -9: no flush, no release) while reports keep
    // coming; the standby takes the lease over and folds on from the KV checkpoint.
    let builder = lease_holder(&admin)
        .await
        .expect("read the builder lease")
        .expect("a builder holds the lease");
    let killed_at = tokio::time::Instant::now();
    services.kill(&builder.instance);
    let phase_three =
        2 * SUBMISSIONS_PER_PHASE..2 * SUBMISSIONS_PER_PHASE + SUBMISSIONS_PHASE_THREE;
    let submitting = {
        let resident = resident.clone();
        tokio::spawn(async move { submit_phase(&resident, phase_three).await })
    };
    let successor = loop {
        match lease_holder(&admin).await {
            Ok(Some(lease)) if lease.holder != builder.holder => break lease,
            last_seen => {
                assert!(
                    killed_at.elapsed() < PROJECTION_TIMEOUT,
                    "no standby took the builder lease over from {builder:?}; last read: {last_seen:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let takeover = killed_at.elapsed();
    submitting.await.expect("phase three submissions");
    let total = 2 * SUBMISSIONS_PER_PHASE + SUBMISSIONS_PHASE_THREE;
    let after_failover = settle(&admin, total).await;
    assert_eq!(after_failover.problems(total), Vec::<String>::new());
    let bound = projection::LeaseTiming::default().takeover_bound();
    assert_ne!(successor.instance, builder.instance);
    // (Slack for a loaded machine: the standby's polls and the check's own polls.)
    assert!(
        takeover <= bound + TAKEOVER_SLACK,
        "takeover after {takeover:?}, bound {bound:?}"
    );
    assert_eq!(
        read_models_against_fold(&admin).await,
        after_failover.incidents.len() as u64
    );
    let caught_up = killed_at.elapsed();

    counting.abort();
    let announced = announced.lock().expect("lock").clone();
    let repeated: Vec<_> = announced
        .iter()
        .filter(|(_, payloads)| payloads.len() > 1)
        .collect();
    assert!(
        announced.len() >= after_failover.incidents.len() && repeated.is_empty(),
        "{} status updates for {} incidents; announced more than once: {repeated:#?}",
        announced.len(),
        after_failover.incidents.len()
    );

    // The work was shared: every instance answered requests of its queue group.
    let intake = requests_per_instance(&admin, "intake", "submit").await;
    let registry = requests_per_instance(&admin, "registry", "locate").await;
    assert_eq!(intake.len(), INSTANCES_PER_SERVICE, "{intake:?}");
    assert!(intake.iter().all(|count| *count > 0), "intake: {intake:?}");
    // At least one request per request-path submission (more: retries while the leader
    // was being elected, answered by the receipt stored the first time).
    assert!(
        intake.iter().sum::<u64>() as usize >= total / 2,
        "{intake:?}"
    );
    assert_eq!(registry.len(), INSTANCES_PER_SERVICE, "{registry:?}");
    assert!(
        registry.iter().all(|count| *count > 0),
        "registry: {registry:?}"
    );
    eprintln!(
        "killed {leader}; {} incidents from {total} submissions; dispatch commits by instance: {:?}; \
         intake submit requests per instance: {intake:?}; registry locates per instance: {registry:?}; \
         projection builder {} killed, {} took the lease after {takeover:?} (bound {bound:?}), \
         read models exact {caught_up:?} after the kill; projection queries per instance before: {queries:?}",
        after_failover.incidents.len(),
        after_failover.dispatchers,
        builder.instance,
        successor.instance,
    );
}

/// The builder lease as stored.
/// The projection builder lease as stored, or the error of reading it (kept apart, so that a
/// failing read is not taken for a lease nobody holds).
async fn lease_holder(admin: &async_nats::Client) -> Result<Option<LeaseValue>, String> {
    projection::lease::holder(&jetstream::new(admin.clone()))
        .await
        .map_err(|error| error.to_string())
}

/// Waits until the read models have folded INCIDENTS to its end, asserts they equal a pure
/// fold of the stream (aggregates' `sequence` and GRIDS-derived compliance left out), and
/// returns the incidents they count.
async fn read_models_against_fold(admin: &async_nats::Client) -> u64 {
    let jetstream = jetstream::new(admin.clone());
    let store = EventStore::open_existing(
        jetstream.clone(),
        StreamSpec::for_context(
            BoundedContext::Incidents,
            REPLICAS,
            Duration::from_secs(120),
        ),
        codecs::IncidentCodec,
    )
    .await
    .expect("INCIDENTS");
    let deadline = tokio::time::Instant::now() + PROJECTION_TIMEOUT;
    loop {
        let attempt = async {
            let last = store.last_sequence().await.map_err(|e| e.to_string())?;
            let models = ReadModels::current(&jetstream)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no generation")?;
            let checkpoint = models.checkpoint().await.map_err(|e| e.to_string())?;
            if checkpoint.incidents_sequence < last {
                return Err(format!(
                    "checkpoint {} behind INCIDENTS {last}",
                    checkpoint.incidents_sequence
                ));
            }
            let expected = comparable(
                projection::compare::fold_of_incidents(&store, Some(checkpoint.incidents_sequence))
                    .await
                    .map_err(|e| e.to_string())?,
            );
            let stored = comparable(models.dump().await.map_err(|e| e.to_string())?);
            let differing: Vec<&String> = stored
                .keys()
                .chain(expected.keys())
                .filter(|key| stored.get(*key) != expected.get(*key))
                .collect();
            if let Some(first) = differing.first() {
                return Err(format!(
                    "read models differ from the fold: {differing:?}; first, {first}: stored {} \
                     but the fold gives {}",
                    stored
                        .get(*first)
                        .map_or("nothing".to_owned(), Value::to_string),
                    expected
                        .get(*first)
                        .map_or("nothing".to_owned(), Value::to_string),
                ));
            }
            Ok(models.totals().await.map_err(|e| e.to_string())?.incidents)
        };
        match attempt.await {
            Ok(incidents) => return incidents,
            Err(error) => assert!(
                tokio::time::Instant::now() < deadline,
                "read models: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Values as compared with a fold: GRIDS-derived compliance out, aggregates' `sequence` (when
/// it was last written) out.
fn comparable(models: BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    projection::compare::comparable(models)
        .into_iter()
        .filter(|(key, _)| !key.starts_with("compliance."))
        .collect()
}
