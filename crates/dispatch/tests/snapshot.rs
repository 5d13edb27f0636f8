//! Dispatch's KV snapshot on a real nats-server, in virtual time: a graceful shutdown writes
//! the book as shards and a manifest; a restart loads it and replays only what was appended
//! while it was down, and ends with exactly the book a full replay builds. A garbage manifest
//! or shard is not trusted: the restart replays the whole stream and ends the same.

use std::collections::BTreeMap;
use std::time::Duration;

use dispatch::book::Held;
use dispatch::{DispatchConfig, DispatchService, IncidentStore, ManualTime, TimeSource};
use domain::incident::{Action, IncidentCommand};
use domain::{Actor, ActorId, IncidentId, Policy, Role, Timestamp, decide, next_deadline};
use eventstore::{
    AggregateId, BoundedContext, Commit, CommitMeta, EventStore, Position, StreamSpec,
};
use expect_test::{Expect, expect};
use futures::StreamExt as _;
use tokio::sync::watch;

/// 2026-05-06 10:00 (UTC+8), a working day.
const START: Timestamp = Timestamp(1_778_032_800_000);
const MINUTE: i64 = 60_000;
const WAIT_MAX: Duration = Duration::from_secs(20);
const BUCKET: &str = "DISPATCH_SNAPSHOTS";
/// Incidents filed while the first instance runs (one shard: fewer than 1,000).
const INCIDENTS_BEFORE_SHUTDOWN: u128 = 30;
/// Of those, acknowledged by xiaofang through the console (their next deadline moves).
const ACKNOWLEDGED_BEFORE_SHUTDOWN: u128 = 5;
/// Incidents filed while no instance runs.
const INCIDENTS_WHILE_DOWN: u128 = 3;

fn actor(role: Role, n: u128) -> Actor {
    Actor {
        role,
        id: ActorId(uuid::Uuid::from_u128(n)),
    }
}

fn policy() -> Policy {
    Policy::embedded("sanming").unwrap()
}

fn incident_id(n: u128) -> IncidentId {
    IncidentId(uuid::Uuid::from_u128(0x1000 + n))
}

fn aggregate_of(incident: IncidentId) -> AggregateId {
    AggregateId::new(incident.0.hyphenated().to_string()).unwrap()
}

fn meta(actor: &str, now: Timestamp) -> CommitMeta {
    CommitMeta {
        correlation_id: uuid::Uuid::now_v7(),
        causation_id: uuid::Uuid::now_v7(),
        actor: actor.to_owned(),
        occurred_at_ms: now.0,
        traceparent: None,
    }
}

async fn open_store(url: &str) -> (async_nats::Client, IncidentStore) {
    let client = async_nats::connect(url).await.unwrap();
    let store = EventStore::open(
        async_nats::jetstream::new(client.clone()),
        StreamSpec::for_context(BoundedContext::Incidents, 1, Duration::from_secs(120)),
        codecs::IncidentCodec,
    )
    .await
    .unwrap();
    (client, store)
}

/// Appends what intake would: Reported + Filed (0405 fire), as one commit, at `now`.
async fn report_and_file(store: &IncidentStore, n: u128, now: Timestamp) -> IncidentId {
    let incident = incident_id(n);
    let commands = [
        IncidentCommand {
            actor: actor(Role::Resident, 100 + n),
            action: Action::Report {
                incident,
                description: "fire in the stairwell".to_owned(),
                position: None,
                category_hint: None,
            },
        },
        IncidentCommand {
            actor: actor(Role::System, 9),
            action: Action::File {
                grid: "350402001002007".parse().unwrap(),
                category: "0405".parse().unwrap(),
            },
        },
    ];
    let mut state = domain::IncidentState::default();
    let mut events = Vec::new();
    for command in commands {
        for event in decide(&state, command, now, &policy()).unwrap() {
            state.apply(&event);
            events.push(event);
        }
    }
    let commit = Commit::new(format!("intake:{n}"), events, meta("system:intake", now));
    store
        .append(&aggregate_of(incident), &Position::NEW, &commit)
        .await
        .unwrap();
    incident
}

/// Appends xiaofang's acknowledgement directly (as a console through another service would).
async fn acknowledge_in_store(store: &IncidentStore, incident: IncidentId, now: Timestamp) {
    let loaded = store.load(&aggregate_of(incident)).await.unwrap();
    let mut state = domain::IncidentState::default();
    for event in loaded.events() {
        state.apply(event);
    }
    let command = IncidentCommand {
        actor: actor(Role::Department("xiaofang".parse().unwrap()), 7),
        action: Action::Acknowledge,
    };
    let events = decide(&state, command, now, &policy()).unwrap();
    let commit = Commit::new(
        format!("console:ack:{}", incident.0),
        events,
        meta("department:xiaofang", now),
    );
    store
        .append(&aggregate_of(incident), &loaded.position, &commit)
        .await
        .unwrap();
}

fn config(name: &str, time: &ManualTime, snapshot_bucket: Option<&str>) -> DispatchConfig {
    let mut config = DispatchConfig::new(policy());
    config.instance = name.to_owned();
    config.time = TimeSource::Manual(time.clone());
    config.deadline_poll_max = Duration::from_millis(20);
    config.snapshot_bucket = snapshot_bucket.map(str::to_owned);
    config
}

/// Starts an instance (book loaded) without running it: its book is what start-up rebuilt.
async fn load(url: &str, name: &str, time: &ManualTime, bucket: Option<&str>) -> DispatchService {
    let (client, store) = open_store(url).await;
    let mut config = config(name, time, bucket);
    config.serve_requests = false;
    config.notify = false;
    DispatchService::start(client, store, config).await.unwrap()
}

async fn last_sequence(store: &IncidentStore) -> u64 {
    let mut stream = store
        .jetstream()
        .get_stream(&store.spec().stream_name)
        .await
        .unwrap();
    stream.info().await.unwrap().state.last_sequence
}

async fn wait_version(store: &IncidentStore, incident: IncidentId, version: u64) {
    let started = std::time::Instant::now();
    while store
        .last_position(&aggregate_of(incident))
        .await
        .unwrap()
        .version
        < version
    {
        assert!(
            started.elapsed() < WAIT_MAX,
            "{incident} stuck below v{version}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every incident as held, in id order.
fn held(service: &DispatchService) -> BTreeMap<IncidentId, Held> {
    let (_, incidents) = service.book().parts();
    incidents.map(|(id, held)| (*id, held.clone())).collect()
}

/// Asserts that `restarted` holds exactly what a full replay (`replayed`, no snapshot) holds:
/// the same incidents, positions, templates, states and next deadlines, and the same figures
/// (but the bytes, which depend on map capacity). `expect` is the book grouped by status,
/// version and next deadline (minutes after START), and the snapshot sequence it started from.
fn check(restarted: &DispatchService, replayed: &DispatchService, expect: Expect) {
    assert_eq!(
        replayed.snapshot_sequence(),
        0,
        "the reference must replay it all"
    );
    assert_eq!(restarted.book().parts().0, replayed.book().parts().0);
    let (restarted_held, replayed_held) = (held(restarted), held(replayed));
    let ids: std::collections::BTreeSet<&IncidentId> =
        restarted_held.keys().chain(replayed_held.keys()).collect();
    let differing: Vec<String> = ids
        .into_iter()
        .filter(|id| restarted_held.get(id) != replayed_held.get(id))
        .map(|id| {
            let brief = |held: Option<&Held>| {
                held.map(|h| {
                    format!(
                        "{:?} v{} seq {} next {:?}",
                        h.state.status,
                        h.position.version,
                        h.position.sequence,
                        next_deadline(&h.state)
                    )
                })
            };
            format!(
                "{id}: restarted {:?}, replayed {:?}",
                brief(restarted_held.get(id)),
                brief(replayed_held.get(id))
            )
        })
        .collect();
    assert!(
        differing.is_empty(),
        "books differ:\n{}",
        differing.join("\n")
    );
    let figures = |service: &DispatchService| dispatch::BookStats {
        held_bytes: 0,
        ..service.book_stats()
    };
    assert_eq!(figures(restarted), figures(replayed));
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for held in restarted_held.values() {
        let next = next_deadline(&held.state).map_or("none".to_owned(), |at| {
            format!("+{}min", (at.0 - START.0) / MINUTE)
        });
        let key = format!(
            "{:?} v{} next deadline {next}",
            held.state.status, held.position.version
        );
        *groups.entry(key).or_default() += 1;
    }
    let mut text = format!(
        "from snapshot at sequence {}, reached {}\n",
        restarted.snapshot_sequence(),
        restarted.book().reached_sequence()
    );
    for (key, count) in groups {
        text.push_str(&format!("{count} x {key}\n"));
    }
    expect.assert_eq(&text);
}

/// The bucket's keys, sorted.
async fn sorted_keys(kv: &async_nats::jetstream::kv::Store) -> Vec<String> {
    let mut keys: Vec<String> = kv
        .keys()
        .await
        .unwrap()
        .map(|key| key.unwrap())
        .collect()
        .await;
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_the_shutdown_snapshot_holds_what_a_full_replay_holds() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let (client, store) = open_store(&url).await;
    let time = ManualTime::new(START);

    // First instance: dispatches 30 fires (deadlines pending), 5 are acknowledged.
    let (first_client, first_store) = open_store(&url).await;
    let first = DispatchService::start(
        first_client,
        first_store,
        config("dispatch-a", &time, Some(BUCKET)),
    )
    .await
    .unwrap();
    let mut progress = first.progress();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { first.run(stopped).await.unwrap() });
    let mut incidents = Vec::new();
    for n in 0..INCIDENTS_BEFORE_SHUTDOWN {
        incidents.push(report_and_file(&store, n, START).await);
    }
    for incident in &incidents {
        wait_version(&store, *incident, 4).await;
    }
    time.set(Timestamp(START.0 + 2 * MINUTE));
    for incident in &incidents[..ACKNOWLEDGED_BEFORE_SHUTDOWN as usize] {
        let body = serde_json::json!({
            "command_id": format!("acknowledge-{}", incident.0),
            "incident": incident.0,
            "actor": {"role": "department:xiaofang", "id": uuid::Uuid::from_u128(7)},
        });
        let reply = client
            .request(
                "dispatch.cmd.department.xiaofang.acknowledge",
                serde_json::to_vec(&body).unwrap().into(),
            )
            .await
            .unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(reply["status"], "accepted", "{reply}");
    }
    // Let the instance fold everything it can see, so its shutdown snapshot covers it all.
    let stream_end = last_sequence(&store).await;
    tokio::time::timeout(
        WAIT_MAX,
        progress.wait_for(|p| p.reached_sequence >= stream_end),
    )
    .await
    .unwrap()
    .unwrap();
    stop.send(true).unwrap();
    task.await.unwrap();

    let kv = store.jetstream().get_key_value(BUCKET).await.unwrap();
    let keys = sorted_keys(&kv).await;
    expect![[r#"["dispatch.g1.s0", "dispatch.manifest"]"#]].assert_eq(&format!("{keys:?}"));

    // While no instance runs: three new fires are filed, one dispatched fire is acknowledged.
    time.set(Timestamp(START.0 + 3 * MINUTE));
    for n in INCIDENTS_BEFORE_SHUTDOWN..INCIDENTS_BEFORE_SHUTDOWN + INCIDENTS_WHILE_DOWN {
        report_and_file(&store, n, time.now()).await;
    }
    acknowledge_in_store(&store, incidents[10], time.now()).await;

    let replayed = load(&url, "dispatch-replay", &time, None).await;
    let restarted = load(&url, "dispatch-b", &time, Some(BUCKET)).await;
    check(
        &restarted,
        &replayed,
        expect![[r#"
            from snapshot at sequence 65, reached 69
            6 x Acknowledged v6 next deadline +30min
            24 x Dispatched v4 next deadline +10min
            3 x Filed v2 next deadline none
        "#]],
    );

    // A garbage manifest, then a garbage shard: neither is trusted, the stream is replayed.
    for key in ["dispatch.manifest", "dispatch.g1.s0"] {
        let original = kv.get(key).await.unwrap().unwrap();
        kv.put(
            key,
            bytes::Bytes::from_static(b"\xffnot a snapshot\x00\x01"),
        )
        .await
        .unwrap();
        let restarted = load(&url, "dispatch-c", &time, Some(BUCKET)).await;
        check(
            &restarted,
            &replayed,
            expect![[r#"
                from snapshot at sequence 0, reached 69
                6 x Acknowledged v6 next deadline +30min
                24 x Dispatched v4 next deadline +10min
                3 x Filed v2 next deadline none
            "#]],
        );
        kv.put(key, original).await.unwrap();
    }
    // A shard that decodes but was written by another snapshot than the manifest's (two
    // instances writing the same generation at once, whose incidents are split differently):
    // not trusted either.
    let snapshots = eventstore::SnapshotStore::open(store.jetstream(), BUCKET, 1)
        .await
        .unwrap();
    let original = kv.get("dispatch.g1.s0").await.unwrap().unwrap();
    let read = snapshots
        .read::<Vec<(IncidentId, Held)>>("dispatch.g1.s0", dispatch::service::SNAPSHOT_FORMAT)
        .await
        .unwrap();
    let (chunk, position) = read.snapshot.expect("shard 0");
    let mut other = position;
    other.hash[0] ^= 0xff;
    snapshots
        .write(
            "dispatch.g1.s0",
            dispatch::service::SNAPSHOT_FORMAT,
            &chunk,
            other,
            read.revision,
        )
        .await
        .unwrap();
    let restarted = load(&url, "dispatch-e", &time, Some(BUCKET)).await;
    assert_eq!(
        restarted.snapshot_sequence(),
        0,
        "a shard of another write is not mixed in"
    );
    kv.put("dispatch.g1.s0", original).await.unwrap();
    // Restored, the same keys are trusted again: the fallbacks above were the garbage's doing.
    let restarted = load(&url, "dispatch-d", &time, Some(BUCKET)).await;
    assert_eq!(restarted.snapshot_sequence(), 65);
    drop(restarted);

    // Every shutdown that stored something writes a new generation; the bucket keeps the
    // newest two (the one replaced stays for a reader that had just read its manifest).
    for (n, name) in [(100, "dispatch-f"), (101, "dispatch-g")] {
        let (instance_client, instance_store) = open_store(&url).await;
        let service = DispatchService::start(
            instance_client,
            instance_store,
            config(name, &time, Some(BUCKET)),
        )
        .await
        .unwrap();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(async move { service.run(stopped).await.unwrap() });
        let incident = report_and_file(&store, n, time.now()).await;
        wait_version(&store, incident, 4).await;
        stop.send(true).unwrap();
        task.await.unwrap();
    }
    let keys = sorted_keys(&kv).await;
    expect![[r#"["dispatch.g2.s0", "dispatch.g3.s0", "dispatch.manifest"]"#]]
        .assert_eq(&format!("{keys:?}"));
}
