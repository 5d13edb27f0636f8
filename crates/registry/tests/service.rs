//! The registry service against a real nats-server: commands, locate, query, restart from the
//! stream, idempotent redelivery, and two instances kept in sync.

use std::time::Duration;

use eventstore::{BoundedContext, EventStore, StreamSpec};
use expect_test::{Expect, expect};
use registry::{LocateAnswer, RegistryCodec, RegistryService, ServiceConfig};
use serde_json::{Value, json};
use testkit::NatsServer;
use tokio::sync::watch;

/// South-west corner of the test community (Sanming, Fujian) and ~100 m in degrees.
const ORIGIN: (f64, f64) = (117.6300, 26.2600);
const STEP: f64 = 0.001;

async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .name("registry-test")
        .connect(url)
        .await
        .expect("connect to nats-server")
}

async fn store(client: &async_nats::Client) -> EventStore<RegistryCodec> {
    EventStore::open(
        async_nats::jetstream::new(client.clone()),
        StreamSpec::for_context(BoundedContext::Grids, 1, Duration::from_secs(120)),
        RegistryCodec,
    )
    .await
    .expect("open GRIDS")
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), registry::ServiceError>>,
    locator: registry::Locator,
}

async fn start(url: &str, instance: &str) -> Running {
    let client = connect(url).await;
    let store = store(&client).await;
    let mut config = ServiceConfig::new(standards::builtin("sanming").expect("sanming profile"));
    config.instance = instance.to_owned();
    let service = RegistryService::start(client, store, config)
        .await
        .expect("start registry");
    let locator = service.locator();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(service.run(stopped));
    Running {
        stop,
        task,
        locator,
    }
}

impl Running {
    async fn shutdown(self) {
        self.stop.send(true).expect("service listens");
        self.task
            .await
            .expect("service task")
            .expect("service ends cleanly");
    }
}

async fn request(client: &async_nats::Client, subject: &str, body: Vec<u8>) -> Value {
    let reply = client
        .request(subject.to_owned(), body.into())
        .await
        .unwrap_or_else(|error| panic!("request {subject}: {error}"));
    serde_json::from_slice(&reply.payload).expect("reply is JSON")
}

async fn send(client: &async_nats::Client, subject: &str, body: Value) -> Value {
    request(client, subject, body.to_string().into_bytes()).await
}

/// Snapshots a reply without the fields that depend on time or ids.
fn check(reply: &Value, expect: Expect) {
    let mut reply = reply.clone();
    if let Some(compliance) = reply.get_mut("compliance") {
        *compliance = compliance["summary"].clone();
    }
    expect.assert_eq(&reply.to_string());
}

fn position(column: f64, row: f64) -> (f64, f64) {
    (ORIGIN.0 + column * STEP, ORIGIN.1 + row * STEP)
}

fn register_body() -> Value {
    let (x, y) = ORIGIN;
    let s = 4.0 * STEP;
    json!({
        "command_id": "cmd-register-1",
        "community_id": "liedong",
        "actor": "staff:sanyuan/zhang",
        "code": "350402001001",
        "name": "列东社区",
        "street": "列东街道",
        "district": "三元区",
        "boundary": [[[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]]
    })
}

fn import_body() -> Value {
    let mut buildings = Vec::new();
    for row in 0..3 {
        for column in 0..3 {
            let (lon, lat) = position(0.8 + column as f64 * 1.2, 0.8 + row as f64 * 1.2);
            buildings.push(json!({
                "id": format!("b{}", row * 3 + column + 1),
                "lon": lon, "lat": lat, "households": 60, "population": 180
            }));
        }
    }
    let (lon, lat) = position(9.0, 9.0);
    buildings.push(json!({"id": "far", "lon": lon, "lat": lat, "households": 10}));
    json!({"command_id": "cmd-import-1", "community_id": "liedong", "buildings": buildings})
}

async fn locate(client: &async_nats::Client, (lon, lat): (f64, f64)) -> Value {
    send(client, "grids.locate", json!({"lon": lon, "lat": lat})).await
}

async fn stream_messages(client: &async_nats::Client) -> u64 {
    let jetstream = async_nats::jetstream::new(client.clone());
    let mut stream = jetstream.get_stream("GRIDS").await.expect("GRIDS");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_serves_locate_commands_and_queries_and_survives_restart() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let client = connect(&url).await;
    let first = start(&url, "registry-a").await;

    check(
        &send(&client, "grids.cmd.register_community", register_body()).await,
        expect![[
            r#"{"command_id":"cmd-register-1","community_id":"liedong","duplicate":false,"events":["community_registered"],"sequence":1,"status":"accepted","version":1}"#
        ]],
    );
    check(
        &send(&client, "grids.cmd.import_buildings", import_body()).await,
        expect![[
            r#"{"buildings_imported":9,"command_id":"cmd-import-1","community_id":"liedong","duplicate":false,"events":["buildings_imported"],"rejected_items":[{"building_id":"far","message":"position (117.639, 26.269) is outside the community boundary","reason_code":"outside_boundary"}],"sequence":2,"status":"accepted","version":2}"#
        ]],
    );
    check(
        &send(
            &client,
            "grids.cmd.partition",
            json!({"command_id": "cmd-partition-1", "community_id": "liedong"}),
        )
        .await,
        expect![[
            r#"{"command_id":"cmd-partition-1","community_id":"liedong","duplicate":false,"events":["grids_drawn"],"grids_drawn":[{"flags":[],"grid_code":"350402001001001","grid_worker":null,"households":180},{"flags":[],"grid_code":"350402001001002","grid_worker":null,"households":180},{"flags":[],"grid_code":"350402001001003","grid_worker":null,"households":180}],"sequence":3,"status":"accepted","version":3}"#
        ]],
    );

    // The grid that holds building b1 gets a worker.
    let b1 = position(0.8, 0.8);
    let before = locate(&client, b1).await;
    let grid_code = before["grid_code"]
        .as_str()
        .expect("b1 is served")
        .to_owned();
    let assign = json!({
        "command_id": "cmd-assign-1", "community_id": "liedong",
        "grid_code": grid_code, "worker_id": "w-001", "worker_name": "王芳"
    });
    check(
        &send(&client, "grids.cmd.assign_grid_worker", assign.clone()).await,
        expect![[
            r#"{"command_id":"cmd-assign-1","community_id":"liedong","duplicate":false,"events":["grid_worker_assigned"],"sequence":4,"status":"accepted","version":4}"#
        ]],
    );
    check(
        &locate(&client, b1).await,
        expect![[
            r#"{"community":"liedong","community_code":"350402001001","community_name":"列东社区","district":"三元区","grid_code":"350402001001003","grid_worker":{"name":"王芳","worker_id":"w-001"},"status":"served","street":"列东街道"}"#
        ]],
    );
    // A building id locates by grid membership, to the grid its own point lies in.
    assert_eq!(
        send(&client, "grids.locate", json!({"building_id": "b1"})).await,
        locate(&client, b1).await
    );
    check(
        &send(&client, "grids.locate", json!({"building_id": "b99"})).await,
        expect![[
            r#"{"message":"building \"b99\" is in no grid of the registry","reason_code":"unknown_building","status":"rejected"}"#
        ]],
    );
    check(
        &send(&client, "grids.locate", json!({"building_id": 7})).await,
        expect![[
            r#"{"message":"invalid type: integer `7`, expected a string at line 1 column 16","reason_code":"schema_violation","status":"rejected"}"#
        ]],
    );
    check(
        &locate(&client, position(9.0, 9.0)).await,
        expect![[r#"{"status":"unserved"}"#]],
    );
    check(
        &request(&client, "grids.locate", b"{\"lon\": \"east\"}".to_vec()).await,
        expect![[
            r#"{"message":"invalid type: string \"east\", expected f64 at line 1 column 14","reason_code":"schema_violation","status":"rejected"}"#
        ]],
    );
    check(
        &request(&client, "grids.locate", b"not json".to_vec()).await,
        expect![[
            r#"{"message":"expected ident at line 1 column 2","reason_code":"malformed_json","status":"rejected"}"#
        ]],
    );
    check(
        &locate(&client, (200.0, 26.0)).await,
        expect![[
            r#"{"message":"(200, 26) is outside WGS84 lon -180..180, lat -90..90","reason_code":"bad_coordinates","status":"rejected"}"#
        ]],
    );
    check(
        &send(
            &client,
            "grids.cmd.partition",
            json!({"command_id": "cmd-partition-2", "community_id": "nowhere"}),
        )
        .await,
        expect![[
            r#"{"message":"community nowhere is not registered","reason_code":"not_registered","status":"rejected"}"#
        ]],
    );
    check(
        &send(
            &client,
            "grids.query.community",
            json!({"community_id": "liedong"}),
        )
        .await,
        expect![[
            r#"{"buildings":9,"code":"350402001001","community_id":"liedong","compliance":{"met":0,"not_applicable":0,"not_met":0,"unknown":3},"district":"三元区","grid_workers":1,"grids":[{"flags":[],"grid_code":"350402001001001","grid_worker":null,"households":180},{"flags":[],"grid_code":"350402001001002","grid_worker":null,"households":180},{"flags":[],"grid_code":"350402001001003","grid_worker":{"name":"王芳","worker_id":"w-001"},"households":180}],"households":540,"name":"列东社区","population":1620,"status":"found","street":"列东街道","version":4}"#
        ]],
    );

    // In process: the same answer without NATS.
    match first.locator.locate(b1.0, b1.1) {
        LocateAnswer::Served {
            grid_code: code,
            grid_worker,
            ..
        } => {
            assert_eq!(code, grid_code);
            assert_eq!(grid_worker.map(|w| w.worker_id).as_deref(), Some("w-001"));
        }
        other => panic!("in-process locate: {other:?}"),
    }

    // A redelivered command writes nothing.
    let messages = stream_messages(&client).await;
    check(
        &send(&client, "grids.cmd.assign_grid_worker", assign.clone()).await,
        expect![[
            r#"{"command_id":"cmd-assign-1","community_id":"liedong","duplicate":true,"events":[],"sequence":0,"status":"accepted","version":4}"#
        ]],
    );
    assert_eq!(stream_messages(&client).await, messages);
    // The same id with another command is refused, not answered as a duplicate.
    let mut reused = assign.clone();
    reused["worker_id"] = json!("w-other");
    check(
        &send(&client, "grids.cmd.assign_grid_worker", reused).await,
        expect![[
            r#"{"message":"command id cmd-assign-1 was already used for another command","reason_code":"command_id_reused","status":"rejected"}"#
        ]],
    );
    assert_eq!(stream_messages(&client).await, messages);

    // Restart: state comes back from the stream.
    first.shutdown().await;
    let second = start(&url, "registry-b").await;
    check(
        &locate(&client, b1).await,
        expect![[
            r#"{"community":"liedong","community_code":"350402001001","community_name":"列东社区","district":"三元区","grid_code":"350402001001003","grid_worker":{"name":"王芳","worker_id":"w-001"},"status":"served","street":"列东街道"}"#
        ]],
    );
    check(
        &send(&client, "grids.cmd.assign_grid_worker", assign).await,
        expect![[
            r#"{"command_id":"cmd-assign-1","community_id":"liedong","duplicate":true,"events":[],"sequence":0,"status":"accepted","version":4}"#
        ]],
    );
    assert_eq!(stream_messages(&client).await, messages);

    // A second instance follows commits made by the first.
    let third = start(&url, "registry-c").await;
    let b9 = position(3.2, 3.2);
    let other_grid = locate(&client, b9).await["grid_code"]
        .as_str()
        .expect("b9 is served")
        .to_owned();
    let reply = send(
        &client,
        "grids.cmd.assign_grid_worker",
        json!({
            "command_id": "cmd-assign-2", "community_id": "liedong",
            "grid_code": other_grid, "worker_id": "w-002", "worker_name": "李明"
        }),
    )
    .await;
    assert_eq!(reply["status"], "accepted", "{reply}");
    for locator in [&second.locator, &third.locator] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let LocateAnswer::Served {
                grid_worker: Some(worker),
                ..
            } = locator.locate(b9.0, b9.1)
                && worker.worker_id == "w-002"
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "an instance did not follow the other's commit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    second.shutdown().await;
    third.shutdown().await;
}

/// A command decided on an instance whose follower lags the stream: another writer stored
/// the community a moment ago. The instance must not refuse `not_registered`, nor answer a
/// repeated command from its stale view: it reads the stream and decides again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_behind_the_stream_reads_it_before_refusing() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let client = connect(&url).await;
    let lagging = start(&url, "registry-lagging").await;
    testkit::consumers::pause_follower(&client, "GRIDS", "registry-lagging").await;
    // Another instance registers the community: its commit goes straight to the stream.
    let store = store(&client).await;
    let parsed =
        registry::api::parse_command("register_community", register_body().to_string().as_bytes())
            .expect("register command");
    let community = registry::domain::Community::new("liedong");
    let events = registry::domain::decide(
        &community,
        &parsed.header.command_id,
        &parsed.command,
        1_767_225_600_000,
    )
    .expect("register");
    let commit = eventstore::Commit::new(
        parsed.header.command_id.clone(),
        events,
        eventstore::CommitMeta {
            correlation_id: uuid::Uuid::now_v7(),
            causation_id: uuid::Uuid::now_v7(),
            actor: "registry-elsewhere".to_owned(),
            occurred_at_ms: 1_767_225_600_000,
            traceparent: None,
        },
    );
    let aggregate = eventstore::AggregateId::new("liedong").expect("aggregate");
    store
        .append(&aggregate, &eventstore::Position::NEW, &commit)
        .await
        .expect("append the registration");

    let imported = send(&client, "grids.cmd.import_buildings", import_body()).await;
    assert_eq!(imported["status"], "accepted", "{imported}");
    // The same registration again: answered as the duplicate it is, from the stream's state.
    let again = send(&client, "grids.cmd.register_community", register_body()).await;
    assert_eq!(
        (&again["status"], &again["duplicate"]),
        (&json!("accepted"), &json!(true)),
        "{again}"
    );
    lagging.shutdown().await;
}

/// A tower geocoded to one address: 40 buildings of 200 households at one point (and two
/// elsewhere). The partition draws grids whose buildings all share that point, with no land
/// of their own (an empty polygon). They are left out of the point index and reached by
/// building id; the rest of the community is located as usual, on the instance that stored
/// the partition and on the one that follows it. Before, the empty polygon failed the
/// community's whole locate part, and every follower stopped on the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grids_without_land_leave_the_community_locatable_on_every_instance() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let client = connect(&url).await;
    let instances = [
        start(&url, "registry-one").await,
        start(&url, "registry-two").await,
    ];
    let registered = send(&client, "grids.cmd.register_community", register_body()).await;
    assert_eq!(registered["status"], "accepted", "{registered}");
    let tower = position(2.0, 2.0);
    let mut buildings: Vec<Value> = (0..40)
        .map(|index| json!({"id": format!("t{index}"), "lon": tower.0, "lat": tower.1, "households": 200}))
        .collect();
    let (west, east) = (position(0.5, 0.5), position(3.5, 3.5));
    buildings.push(json!({"id": "west", "lon": west.0, "lat": west.1, "households": 100}));
    buildings.push(json!({"id": "east", "lon": east.0, "lat": east.1, "households": 100}));
    let imported = send(
        &client,
        "grids.cmd.import_buildings",
        json!({"command_id": "cmd-import-tower", "community_id": "liedong", "buildings": buildings}),
    )
    .await;
    assert_eq!(imported["status"], "accepted", "{imported}");
    let partitioned = send(
        &client,
        "grids.cmd.partition",
        json!({"command_id": "cmd-partition-tower", "community_id": "liedong"}),
    )
    .await;
    assert_eq!(partitioned["status"], "accepted", "{partitioned}");
    for instance in &instances {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while instance.locator.grids() == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the partition reaches every instance"
            );
            assert!(
                !instance.task.is_finished(),
                "the instance is still serving"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (what, (lon, lat)) in [("west", west), ("east", east), ("tower", tower)] {
            let answer = instance.locator.locate(lon, lat);
            assert!(
                matches!(answer, registry::api::LocateAnswer::Served { .. }),
                "{what}: {answer:?}"
            );
        }
        for building in ["t0", "t39", "west"] {
            assert!(
                instance.locator.locate_building(building).is_some(),
                "{building} is reached by id"
            );
        }
    }
    for instance in instances {
        assert!(!instance.task.is_finished(), "no instance stopped");
        instance.shutdown().await;
    }
}

/// A command's W3C `traceparent` header goes into its commit, so that the audit log links
/// back to the request (as intake's and dispatch's commits do); a command without one gets
/// the trace the envelope derives from the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_traceparent_is_stored_in_its_commit() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let client = connect(&url).await;
    let running = start(&url, "registry-trace").await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", traceparent);
    let reply = client
        .request_with_headers(
            "grids.cmd.register_community",
            headers,
            register_body().to_string().into(),
        )
        .await
        .expect("request");
    let reply: Value = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(reply["status"], "accepted", "{reply}");
    let loaded = store(&client)
        .await
        .load(&eventstore::AggregateId::new("liedong").expect("aggregate id"))
        .await
        .expect("load");
    assert_eq!(
        loaded.commits[0].meta.traceparent.as_deref(),
        Some(traceparent)
    );
    running.shutdown().await;
}
