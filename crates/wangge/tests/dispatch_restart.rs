//! `wangge serve dispatch` killed with SIGKILL while deadlines are pending, restarted next to a
//! second instance: every deadline is escalated exactly once. Time runs 2000x faster (hidden
//! `--time-scale`), so eight hours of emergency deadlines pass in about 15 seconds.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dispatch::TimeSource;
use domain::incident::{Action, IncidentCommand, IncidentEvent};
use domain::{Actor, ActorId, IncidentId, Policy, Role, decide};
use eventstore::{
    AggregateId, BoundedContext, Commit, CommitMeta, EventStore, Position, StreamSpec,
};
use expect_test::expect;

const SCALE: u32 = 2_000;
const INCIDENTS: u128 = 12;
const CATEGORIES: &[&str] = &["0405", "0403", "0401"];

fn spawn(url: &str, instance: &str, origin_ms: i64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_wangge"))
        .args(["serve", "dispatch", "--instance", instance])
        .args([
            "--time-scale",
            &SCALE.to_string(),
            "--time-origin-ms",
            &origin_ms.to_string(),
        ])
        .env_remove("WANGGE_CONFIG")
        .env("WANGGE_NATS__URL", url)
        .env("WANGGE_CITY", "sanming")
        .env("WANGGE_LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn wangge serve dispatch")
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_pending_deadlines_then_two_instances_escalate_each_deadline_once() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let store = EventStore::open(
        async_nats::jetstream::new(client.clone()),
        StreamSpec::for_context(BoundedContext::Incidents, 1, Duration::from_secs(120)),
        dispatch::IncidentCodec,
    )
    .await
    .unwrap();
    let origin_ms = dispatch::clock::wall_ms();
    let time = TimeSource::Scaled {
        origin_ms,
        scale: SCALE,
    };
    let policy = Policy::embedded("sanming").unwrap();

    let mut first = spawn(&url, "dispatch-a", origin_ms);
    // Filed emergencies, as intake writes them.
    let mut aggregates = Vec::new();
    for n in 0..INCIDENTS {
        let incident = IncidentId(uuid::Uuid::from_u128(0xabc0 + n));
        let now = time.now();
        let mut state = domain::IncidentState::default();
        let mut events = Vec::new();
        for (role, action) in [
            (
                Role::Resident,
                Action::Report {
                    incident,
                    description: "smoke".to_owned(),
                    position: None,
                    category_hint: None,
                },
            ),
            (
                Role::System,
                Action::File {
                    grid: "350402001002007".parse().unwrap(),
                    category: CATEGORIES[n as usize % CATEGORIES.len()].parse().unwrap(),
                },
            ),
        ] {
            let actor = Actor {
                role,
                id: ActorId(uuid::Uuid::from_u128(500 + n)),
            };
            for event in decide(&state, IncidentCommand { actor, action }, now, &policy).unwrap() {
                state.apply(&event);
                events.push(event);
            }
        }
        let aggregate = AggregateId::new(incident.0.hyphenated().to_string()).unwrap();
        let meta = CommitMeta {
            correlation_id: uuid::Uuid::now_v7(),
            causation_id: uuid::Uuid::now_v7(),
            actor: "system:intake".to_owned(),
            occurred_at_ms: now.0,
            traceparent: None,
        };
        store
            .append(
                &aggregate,
                &Position::NEW,
                &Commit::new("intake", events, meta),
            )
            .await
            .unwrap();
        aggregates.push(aggregate);
    }
    // ~40 virtual minutes: dispatched, response deadlines fired, resolutions still pending.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let mut dispatched = 0;
    let mut pending = 0;
    for aggregate in &aggregates {
        let loaded = store.load(aggregate).await.unwrap();
        let state = domain::IncidentState::from_events(loaded.events());
        dispatched += usize::from(state.handler.is_some());
        pending += usize::from(domain::next_deadline(&state).is_some());
    }
    assert!(
        dispatched > 0,
        "the first instance dispatched nothing before it was killed"
    );
    assert!(
        pending > 0,
        "no deadline was pending when the first instance was killed"
    );
    // Deadlines pass while no dispatch runs.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let mut again = spawn(&url, "dispatch-a", origin_ms);
    let mut second = spawn(&url, "dispatch-b", origin_ms);
    // Past every resolution deadline (at most 480 virtual minutes after the start).
    let wait_until = origin_ms + 500 * 60_000 / i64::from(SCALE) + 2_000;
    while dispatch::clock::wall_ms() < wait_until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    terminate(&mut again);
    terminate(&mut second);

    let mut summary: BTreeMap<String, usize> = BTreeMap::new();
    for aggregate in &aggregates {
        let loaded = store.load(aggregate).await.unwrap();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut state = domain::IncidentState::default();
        for commit in &loaded.commits {
            for recorded in &commit.events {
                state.apply(&recorded.event);
                let key = match &recorded.event {
                    IncidentEvent::DeadlineMissed { deadline, due, .. } => {
                        format!("DeadlineMissed({deadline:?})@{}", due.0)
                    }
                    IncidentEvent::WhistleReportMissed { department, due } => {
                        format!("WhistleReportMissed({department})@{}", due.0)
                    }
                    IncidentEvent::Dispatched { .. } => "Dispatched".to_owned(),
                    _ => continue,
                };
                *seen.entry(key).or_default() += 1;
            }
        }
        for (key, count) in &seen {
            assert_eq!(*count, 1, "{aggregate}: {key} recorded {count} times");
            let kind = key.split('@').next().unwrap().to_owned();
            *summary.entry(kind).or_default() += 1;
        }
        assert_eq!(
            domain::next_deadline(&state),
            None,
            "{aggregate}: a deadline is still pending: {state:?}"
        );
    }
    // How many report deadlines there are depends on when each escalation ran (wall time), so
    // only the deterministic kinds are pinned; every recorded miss was checked unique above.
    let rendered: Vec<String> = summary
        .iter()
        .filter(|(k, _)| !k.starts_with("WhistleReportMissed"))
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    assert!(summary.keys().any(|k| k.starts_with("WhistleReportMissed")));
    expect![[r#"
        DeadlineMissed(Resolution): 12
        DeadlineMissed(Response): 12
        Dispatched: 12"#]]
    .assert_eq(&rendered.join("\n"));
}
