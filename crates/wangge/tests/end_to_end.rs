//! End to end on real processes: `wangge serve registry|intake|dispatch|projection` against a
//! private nats-server, a seeded city, resident apps and consoles from `simulation`.
//!
//! The same seed is run twice: once undisturbed, once with every service killed with SIGKILL
//! in turn mid-run and restarted. The event log of every incident (event types in order) and
//! the read models' totals must be identical: nothing lost, nothing applied twice. Every
//! incident must end closed, or pending on a department that never answers.
//!
//! Determinism: incident ids are derived from submission ids, and an incident is named by the
//! least id among itself and the reports merged into it (which of two duplicates intake sees
//! first is timing); consoles start only after every receipt is in (so duplicate merges never
//! race with closings); a handler resolves only after the summoned departments that answer have
//! reported (`ConsolePlan::summons_wait`); time runs at wall speed, so no deadline passes
//! during the test and prompt consoles are never late.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eventstore::{BoundedContext, EventStore, ReplayRange, StreamSpec};
use simulation::{Behaviour, CityPlan, ConsolePlan, Consoles, ResidentPlan, Residents};
use tokio::sync::watch;

const SEED: u64 = 11;
const REPORTS: u64 = 160;
/// Longest wait for the system to go quiet.
const QUIET_TIMEOUT: Duration = Duration::from_secs(90);
/// The log is quiet when nothing was appended for this long.
const QUIET_FOR: Duration = Duration::from_secs(3);

/// Longest a handler console waits for the summoned departments' reports before resolving:
/// more than a notification held by a killed dispatch takes to come back (its ack wait).
const SUMMONS_WAIT: Duration = Duration::from_secs(45);

const SERVICES: [&str; 4] = ["registry", "intake", "dispatch", "projection"];

struct Services {
    url: String,
    children: BTreeMap<&'static str, Child>,
}

impl Services {
    fn start(url: &str) -> Services {
        let mut services = Services {
            url: url.to_owned(),
            children: BTreeMap::new(),
        };
        for name in SERVICES {
            services.spawn(name);
        }
        services
    }

    fn spawn(&mut self, name: &'static str) {
        let child = Command::new(env!("CARGO_BIN_EXE_wangge"))
            .args(["serve", name])
            .env_remove("WANGGE_CONFIG")
            .env("WANGGE_NATS__URL", &self.url)
            .env("WANGGE_LOG__FILTER", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a service");
        self.children.insert(name, child);
    }

    fn kill_and_restart(&mut self, name: &'static str) {
        let mut child = self.children.remove(name).expect("running");
        child.kill().expect("SIGKILL"); // std's kill is SIGKILL
        child.wait().expect("reap");
        self.spawn(name);
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn ready(client: &async_nats::Client, subject: &str, body: &'static str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let request = client.request(subject.to_owned(), body.into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), request).await {
            return;
        }
        assert!(Instant::now() < deadline, "{subject} never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn all_ready(client: &async_nats::Client) {
    ready(
        client,
        "grids.query.community",
        r#"{"community_id":"probe"}"#,
    )
    .await;
    ready(
        client,
        "intake.query.receipt",
        r#"{"submission_id":"probe-0000"}"#,
    )
    .await;
    ready(client, "dispatch.cmd.city.verify", "{}").await;
    ready(client, "projection.query.totals", "{}").await;
}

fn store_spec(context: BoundedContext) -> StreamSpec {
    StreamSpec::for_context(context, 1, Duration::from_secs(120))
}

/// Commits dispatch's shared notifier has not yet turned into notifications (after a crash,
/// those delivered to the killed instance come back after the consumer's ack wait).
async fn notifier_backlog(jetstream: &async_nats::jetstream::Context) -> u64 {
    let Ok(stream) = jetstream.get_stream("INCIDENTS").await else {
        return u64::MAX;
    };
    let Ok(mut consumer) = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
            dispatch::service::NOTIFIER_DURABLE,
        )
        .await
    else {
        return u64::MAX;
    };
    match consumer.info().await {
        Ok(info) => info.num_pending + info.num_ack_pending as u64,
        Err(_) => u64::MAX,
    }
}

/// Waits until INCIDENTS has had no append for `QUIET_FOR` while dispatch's notifier and the
/// consoles had nothing left to do.
async fn quiet(store: &EventStore<codecs::IncidentCodec>, consoles: &Consoles) {
    let deadline = Instant::now() + QUIET_TIMEOUT;
    let mut last = store.last_sequence().await.unwrap();
    let mut since = Instant::now();
    while since.elapsed() < QUIET_FOR {
        assert!(Instant::now() < deadline, "the system never went quiet");
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = store.last_sequence().await.unwrap();
        let backlog = consoles.backlog().await.unwrap_or(u64::MAX)
            + notifier_backlog(store.jetstream()).await;
        if now != last || backlog > 0 {
            last = now;
            since = Instant::now();
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// Incident id -> event types, sorted. Sorted because independent actors interleave
    /// differently from run to run even without a crash (intake merging a duplicate while
    /// dispatch dispatches; a department acknowledging while it reports to a whistle): the
    /// claim is the same events, none lost, none doubled — not the same interleaving.
    incidents: BTreeMap<String, Vec<String>>,
    /// Read models' incident count and count by status.
    read_model_incidents: u64,
    read_model_by_status: BTreeMap<String, u64>,
    filed: u64,
    merged: u64,
    rejected: u64,
}

/// One run of the seed; `crash` kills every service in turn.
async fn run(crash: bool) -> Outcome {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let mut services = Services::start(&url);
    let client = async_nats::connect(url.as_str()).await.unwrap();
    all_ready(&client).await;

    let policy = domain::Policy::embedded("sanming").unwrap();
    let city = simulation::plan_city(CityPlan {
        seed: SEED,
        streets: 1,
        communities_per_street: 2,
        buildings_per_community: 40,
    });
    simulation::register_city(&client, &city, |_, _| {})
        .await
        .unwrap();
    // Let intake's in-process registry catch up with the new grids.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Phase 1: reports. Intake and the registry are killed while they arrive.
    let (stop, stopped) = watch::channel(false);
    let residents = Residents::default();
    let receipts = residents
        .follow_receipts(&client, stopped.clone())
        .await
        .unwrap();
    let reporting = {
        let (residents, client, city, policy, stopped) = (
            residents.clone(),
            client.clone(),
            city.clone(),
            policy.clone(),
            stopped.clone(),
        );
        tokio::spawn(async move {
            let plan = ResidentPlan {
                seed: SEED,
                submissions: REPORTS,
                rate_per_s: 40.0,
                ..ResidentPlan::default()
            };
            residents.run(&client, &city, &policy, plan, stopped).await
        })
    };
    if crash {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        services.kill_and_restart("intake");
        tokio::time::sleep(Duration::from_millis(500)).await;
        services.kill_and_restart("registry");
    }
    reporting.await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while residents.stats().receipts() < REPORTS {
        assert!(
            Instant::now() < deadline,
            "receipts missing: {:?}",
            residents.stats()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Phase 2: consoles. Dispatch and the projection are killed while they work.
    let jetstream = async_nats::jetstream::new(client.clone());
    let incidents = EventStore::open_existing(
        jetstream.clone(),
        store_spec(BoundedContext::Incidents),
        codecs::IncidentCodec,
    )
    .await
    .unwrap();
    let mut console_plan = ConsolePlan::seeded(SEED, &policy, 0.0, 0.2);
    console_plan.prompt_delay = Duration::from_millis(50);
    console_plan.work_delay = Duration::from_millis(200);
    // Summoned departments report before the handler resolves, however late a crash makes
    // either (otherwise a report delayed by a kill meets a resolved case: invalid_transition).
    console_plan.summons_wait = SUMMONS_WAIT;
    let silent: Vec<String> = console_plan
        .departments
        .iter()
        .filter(|(_, behaviour)| **behaviour == Behaviour::Silent)
        .map(|(id, _)| id.clone())
        .collect();
    let (consoles, consoles_task) =
        Consoles::start(&client, console_plan, residents.clone(), stopped.clone())
            .await
            .unwrap();
    if crash {
        tokio::time::sleep(Duration::from_millis(700)).await;
        services.kill_and_restart("dispatch");
        tokio::time::sleep(Duration::from_millis(700)).await;
        services.kill_and_restart("projection");
        all_ready(&client).await;
    }
    quiet(&incidents, &consoles).await;
    let _ = stop.send(true);
    let _ = receipts.await;
    let _ = consoles_task.await;
    let console_stats = consoles.stats();
    assert_eq!(console_stats.failed, 0, "{console_stats:?}");
    // No console command is refused: a command resent after a crash is answered as a
    // duplicate, and summoned departments report before the handler resolves.
    assert!(
        console_stats.rejected.is_empty(),
        "console commands refused (crash: {crash}): {:?}",
        console_stats.rejected
    );

    // The log, incident by incident.
    let mut by_incident: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Incident -> the reports merged into it (their would-be incident ids).
    let mut merged_into: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Incident -> its state as the log leaves it (who handles it, who is summoned).
    let mut states: BTreeMap<String, domain::IncidentState> = BTreeMap::new();
    incidents
        .replay(ReplayRange::default(), |commit| {
            let incident = projection::fold::incident_of_aggregate(commit.aggregate.as_str())
                .expect("an incident aggregate")
                .to_string();
            for recorded in commit.events {
                if let domain::IncidentEvent::DuplicateMerged { duplicate, .. } = &recorded.event {
                    merged_into
                        .entry(incident.clone())
                        .or_default()
                        .push(duplicate.to_string());
                }
                states
                    .entry(incident.clone())
                    .or_default()
                    .apply(&recorded.event);
                by_incident
                    .entry(incident.clone())
                    .or_default()
                    .push(domain::describe::describe(&recorded.event).kind.to_owned());
            }
        })
        .await
        .unwrap();
    // Every incident is closed, merged, or waits on a department that never answers: its
    // handler, or a summons of its active whistle still pending.
    let by_incident_in_order = by_incident.clone();
    let is_silent = |department: &domain::DepartmentId| silent.contains(&department.to_string());
    for (incident, kinds) in &by_incident_in_order {
        let last = kinds.last().map(String::as_str).unwrap_or("");
        let state = &states[incident];
        let waits_on_silent = matches!(state.handler, Some(domain::incident::Handler::Department(d)) if is_silent(&d))
            || state.whistle.as_ref().is_some_and(|whistle| {
                whistle.summons.iter().any(|summons| {
                    summons.state == domain::incident::ReportState::Pending
                        && is_silent(&summons.department)
                })
            });
        let settled = matches!(
            last,
            "rated" | "closed" | "merged_into" | "duplicate_merged"
        ) || waits_on_silent;
        assert!(
            settled,
            "incident {incident} stopped at {kinds:?}, handler {:?} (crash: {crash}); consoles: {console_stats:?}",
            state.handler
        );
    }
    // The read models, once caught up with the log.
    let last_incident = incidents.last_sequence().await.unwrap();
    let grids = EventStore::open_existing(
        jetstream.clone(),
        store_spec(BoundedContext::Grids),
        registry::RegistryCodec,
    )
    .await
    .unwrap();
    let last_grid = grids.last_sequence().await.unwrap();
    let models = projection::ReadModels::current(&jetstream)
        .await
        .unwrap()
        .expect("a read model generation");
    let checkpoint = models
        .wait_for(last_incident, last_grid, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        checkpoint.incidents_sequence >= last_incident,
        "{checkpoint:?}"
    );
    let totals = models.totals().await.unwrap();
    let stats = residents.stats();
    drop(services);
    drop(server);
    // Which of two duplicate reports becomes the incident and which is merged into it is
    // the order intake handles them in: a crash that delays the first (redelivered after
    // the killed instance's ack wait) lets the second be filed first. So an incident is
    // named by the least id among itself and the reports merged into it.
    let incidents_by_group: BTreeMap<String, Vec<String>> = by_incident
        .into_iter()
        .map(|(incident, mut kinds)| {
            kinds.sort();
            let group = merged_into
                .get(&incident)
                .into_iter()
                .flatten()
                .chain(std::iter::once(&incident))
                .min()
                .expect("the incident itself")
                .clone();
            (group, kinds)
        })
        .collect();
    Outcome {
        incidents: incidents_by_group,
        read_model_incidents: totals.incidents,
        read_model_by_status: totals.by_status,
        filed: stats.filed,
        merged: stats.merged,
        rejected: stats.rejected.values().sum(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_every_service_in_turn_changes_nothing() {
    let undisturbed = run(false).await;
    assert_eq!(undisturbed.filed, undisturbed.incidents.len() as u64);
    assert_eq!(undisturbed.read_model_incidents, undisturbed.filed);
    assert_eq!(
        undisturbed.filed + undisturbed.merged + undisturbed.rejected,
        REPORTS
    );
    let rated = undisturbed
        .incidents
        .values()
        .filter(|kinds| kinds.iter().any(|kind| kind == "rated"))
        .count();
    let whistled = undisturbed
        .incidents
        .values()
        .filter(|kinds| kinds.iter().any(|kind| kind == "whistle_blown"))
        .count();
    assert!(
        rated > 0 && whistled > 0,
        "{rated} incidents went the whole way, {whistled} had a whistle"
    );
    let crashed = run(true).await;
    let differing: Vec<_> = undisturbed
        .incidents
        .iter()
        .filter(|(incident, kinds)| crashed.incidents.get(*incident) != Some(kinds))
        .map(|(incident, kinds)| (incident, kinds, crashed.incidents.get(incident)))
        .collect();
    assert!(
        differing.is_empty(),
        "incidents whose events differ (undisturbed, crashed): {differing:#?}"
    );
    assert_eq!(crashed, undisturbed);
}
