//! The intake service against a real nats-server, with a real grid registry: the durable path
//! across an intake outage, resubmission, every rejection reason, duplicate merge, status
//! updates, queries and contact erasure.

use std::time::Duration;

use codecs::IncidentCodec;
use eventstore::{BoundedContext, EventStore, StreamSpec};
use expect_test::{Expect, expect};
use futures::StreamExt as _;
use intake::{IntakeCodec, IntakeService, ServiceConfig};
use registry::{RegistryCodec, RegistryService};
use serde_json::{Value, json};
use testkit::NatsServer;
use tokio::sync::watch;

/// South-west corner of the test community (Sanming, Fujian) and ~100 m in degrees.
const ORIGIN: (f64, f64) = (117.6300, 26.2600);
const STEP: f64 = 0.001;
const REPORTER: &str = "0193a1b2-0000-7000-8000-000000000001";
const OTHER_REPORTER: &str = "0193a1b2-0000-7000-8000-000000000002";
const THIRD_REPORTER: &str = "0193a1b2-0000-7000-8000-000000000003";
const FOURTH_REPORTER: &str = "0193a1b2-0000-7000-8000-000000000004";

async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .name("intake-test")
        .connect(url)
        .await
        .expect("connect to nats-server")
}

fn spec(context: BoundedContext) -> StreamSpec {
    StreamSpec::for_context(context, 1, Duration::from_secs(120))
}

struct Stack {
    registry_stop: watch::Sender<bool>,
    locator: registry::Locator,
}

/// A registry with one partitioned community of 9 buildings.
async fn registry(url: &str) -> Stack {
    let client = connect(url).await;
    let grids = EventStore::open(
        async_nats::jetstream::new(client.clone()),
        spec(BoundedContext::Grids),
        RegistryCodec,
    )
    .await
    .expect("open GRIDS");
    let config =
        registry::ServiceConfig::new(standards::builtin("sanming").expect("sanming profile"));
    let service = RegistryService::start(client.clone(), grids, config)
        .await
        .expect("start registry");
    let locator = service.locator();
    let (registry_stop, stopped) = watch::channel(false);
    tokio::spawn(service.run(stopped));
    let (x, y) = ORIGIN;
    let s = 4.0 * STEP;
    send(
        &client,
        "grids.cmd.register_community",
        json!({
            "command_id": "cmd-register-1", "community_id": "liedong", "code": "350402001001",
            "name": "列东社区", "street": "列东街道", "district": "三元区",
            "boundary": [[[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]]
        }),
    )
    .await;
    let mut buildings = Vec::new();
    for row in 0..3 {
        for column in 0..3 {
            let (lon, lat) = position(0.8 + column as f64 * 1.2, 0.8 + row as f64 * 1.2);
            buildings.push(json!({"id": format!("b{}", row * 3 + column + 1),
                "lon": lon, "lat": lat, "households": 60}));
        }
    }
    send(
        &client,
        "grids.cmd.import_buildings",
        json!({"command_id": "cmd-import-1", "community_id": "liedong", "buildings": buildings}),
    )
    .await;
    send(
        &client,
        "grids.cmd.partition",
        json!({"command_id": "cmd-partition-1", "community_id": "liedong"}),
    )
    .await;
    for _ in 0..100 {
        if locator.grids() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(locator.grids() > 0, "registry drew grids");
    Stack {
        registry_stop,
        locator,
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), intake::ServiceError>>,
}

async fn start_intake(url: &str, locator: &registry::Locator, config: ServiceConfig) -> Running {
    let client = connect(url).await;
    let jetstream = async_nats::jetstream::new(client.clone());
    let incidents = EventStore::open(
        jetstream.clone(),
        spec(BoundedContext::Incidents),
        IncidentCodec,
    )
    .await
    .expect("open INCIDENTS");
    let intake_store = EventStore::open(
        jetstream,
        spec(BoundedContext::Intake),
        IntakeCodec::new(intake::INTAKE_EVENT_TYPE),
    )
    .await
    .expect("open INTAKE");
    let service = IntakeService::start(
        client,
        incidents,
        intake_store,
        domain::Policy::embedded("sanming").expect("sanming policy"),
        Box::new(locator.clone()),
        config,
    )
    .await
    .expect("start intake");
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(service.run(stopped));
    Running { stop, task }
}

impl Running {
    async fn shutdown(self) {
        self.stop.send(true).expect("intake listens");
        self.task
            .await
            .expect("intake task")
            .expect("intake ends cleanly");
    }
}

/// A nats-server, a client of it, the registry (in this process) and intake started with
/// `config`: the set-up of a test that needs nothing else.
struct Harness {
    server: NatsServer,
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    stack: Stack,
    running: Running,
}

async fn harness(config: ServiceConfig) -> Harness {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let client = connect(&url).await;
    let stack = registry(&url).await;
    let jetstream = async_nats::jetstream::new(client.clone());
    let running = start_intake(&url, &stack.locator, config).await;
    Harness {
        server,
        client,
        jetstream,
        stack,
        running,
    }
}

impl Harness {
    async fn shutdown(self) {
        self.running.shutdown().await;
        self.stack
            .registry_stop
            .send(true)
            .expect("registry listens");
        drop(self.server);
    }
}

fn position(column: f64, row: f64) -> (f64, f64) {
    (ORIGIN.0 + column * STEP, ORIGIN.1 + row * STEP)
}

/// Building `index % 9`'s position, moved `index / 9` × ~2 m east (inside its grid).
fn near_building(index: usize) -> (f64, f64) {
    let (column, row) = ((index % 9) % 3, (index % 9) / 3);
    let (lon, lat) = position(0.8 + column as f64 * 1.2, 0.8 + row as f64 * 1.2);
    (lon + (index / 9) as f64 * 0.00002, lat)
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

fn submission(id: &str, reporter: &str, category: &str, (lon, lat): (f64, f64)) -> Value {
    json!({
        "submission_id": id,
        "kind": "problem_report",
        "category": category,
        "location": {"point": {"lon": lon, "lat": lat}},
        "description": "垃圾桶满溢 overflowing bin",
        "media": [{"sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}],
        "channel": "app",
        "reporter_id": reporter,
        "occurred_at": "2026-11-20T08:30:00+08:00",
        "contact": {"name": "张三", "phone": "13800000000"}
    })
}

/// Snapshots a JSON value without its time-dependent fields.
fn check(value: &Value, expect: Expect) {
    let mut value = value.clone();
    for field in [
        "respond_by",
        "respond_by_ms",
        "resolve_by_ms",
        "changed_at_ms",
    ] {
        if let Some(slot) = value.get_mut(field)
            && !slot.is_null()
        {
            *slot = json!("<time>");
        }
    }
    expect.assert_eq(&value.to_string());
}

async fn stream_messages(client: &async_nats::Client, stream: &str) -> u64 {
    let jetstream = async_nats::jetstream::new(client.clone());
    let mut stream = jetstream.get_stream(stream).await.expect("stream");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_path_survives_intake_outage_and_resubmission_files_once() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let client = connect(&url).await;
    let stack = registry(&url).await;
    let jetstream = async_nats::jetstream::new(client.clone());
    // Intake creates SUBMISSIONS; then it goes down.
    let first = start_intake(&url, &stack.locator, ServiceConfig::default()).await;
    first.shutdown().await;

    // While intake is down, apps publish durably; the server acknowledges each.
    let mut receipts = client
        .subscribe("intake.receipts.>")
        .await
        .expect("subscribe receipts");
    for index in 0..20 {
        let id = format!("durable-{index:04}");
        let body = submission(&id, REPORTER, "0101", near_building(index));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        for _ in 0..3 {
            // The same submission sent three times.
            let ack = jetstream
                .publish_with_headers(
                    "intake.submit.app",
                    headers.clone(),
                    body.to_string().into(),
                )
                .await
                .expect("publish")
                .await
                .expect("server acknowledged");
            assert_eq!(ack.stream, "SUBMISSIONS");
        }
    }
    assert_eq!(
        stream_messages(&client, "SUBMISSIONS").await,
        20,
        "Msg-Id dedup"
    );
    // The reporter's contact details are erased while the submissions wait (through another
    // instance, say): the details they gave before the erasure are not written back.
    let contacts = jetstream
        .get_key_value("INTAKE_CONTACTS")
        .await
        .expect("contacts bucket");
    contacts.purge(REPORTER).await.expect("erase");

    let mut config = ServiceConfig::default();
    config.core.rate_burst = 1_000;
    config.core.dedup_radius_m = 0.0;
    let second = start_intake(&url, &stack.locator, config.clone()).await;
    let mut filed = 0;
    while filed < 20 {
        let message = tokio::time::timeout(Duration::from_secs(10), receipts.next())
            .await
            .expect("receipt within 10 s")
            .expect("receipt");
        let receipt: Value = serde_json::from_slice(&message.payload).expect("JSON");
        assert_eq!(receipt["status"], "filed", "{receipt}");
        filed += 1;
    }
    assert_eq!(
        stream_messages(&client, "INCIDENTS").await,
        20,
        "one commit per incident"
    );
    assert_eq!(
        stream_messages(&client, "INTAKE").await,
        0,
        "a filing's receipt is in its incident commit, not a second message"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        stream_messages(&client, "SUBMISSIONS").await,
        0,
        "acked and removed"
    );
    let erased = contacts
        .entry(REPORTER)
        .await
        .expect("read")
        .expect("the erasure's marker");
    assert!(
        matches!(
            erased.operation,
            async_nats::jetstream::kv::Operation::Purge
        ),
        "details given before the erasure came back: {:?}",
        erased.operation
    );
    // Given again after the erasure, they are kept.
    let after = send(
        &client,
        "intake.request",
        submission("after-erasure-0001", REPORTER, "0103", near_building(5)),
    )
    .await;
    assert_eq!(after["status"], "filed", "{after}");
    let stored = contacts
        .get(REPORTER)
        .await
        .expect("read")
        .expect("details given again are kept");
    let stored: Value = serde_json::from_slice(&stored).expect("JSON");
    assert_eq!(
        (&stored["name"], &stored["phone"]),
        (&json!("张三"), &json!("13800000000"))
    );

    // The same submission id on the request path returns the original receipt, writes nothing.
    let again = submission("durable-0003", REPORTER, "0101", near_building(3));
    let mut replies = Vec::new();
    for _ in 0..3 {
        replies.push(send(&client, "intake.request", again.clone()).await);
    }
    assert!(replies.iter().all(|reply| *reply == replies[0]));
    check(
        &replies[0],
        expect![[
            r#"{"grid_code":"350402001001001","incident_id":"4eac5c3d-0999-8a4c-a2f5-ccb6b6f776c4","respond_by":"<time>","respond_by_ms":"<time>","status":"filed","submission_id":"durable-0003"}"#
        ]],
    );
    second.shutdown().await;
    // A restarted intake takes the receipts back from the filing commits on INCIDENTS.
    let third = start_intake(&url, &stack.locator, config.clone()).await;
    let reply = send(&client, "intake.request", again.clone()).await;
    assert_eq!(reply, replies[0]);
    third.shutdown().await;
    // One that holds only 5 receipts in memory looks the evicted ones up in the store.
    config.core.receipts_held_max = 5;
    let fourth = start_intake(&url, &stack.locator, config).await;
    let reply = send(&client, "intake.request", again).await;
    assert_eq!(reply, replies[0]);
    assert_eq!(stream_messages(&client, "INCIDENTS").await, 21);
    assert_eq!(stream_messages(&client, "INTAKE").await, 0);
    fourth.shutdown().await;
    stack.registry_stop.send(true).expect("registry listens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_merges_status_queries_and_erasure() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let client = connect(&url).await;
    let stack = registry(&url).await;
    let mut config = ServiceConfig::default();
    config.core.rate_burst = 3;
    let running = start_intake(&url, &stack.locator, config).await;
    let b1 = position(0.8, 0.8);

    // Every rejection reason.
    let reject = |body: Vec<u8>| {
        let client = client.clone();
        async move {
            let reply = request(&client, "intake.request", body).await;
            format!("{} {}", reply["reason_code"], reply["message"])
        }
    };
    let valid = submission("reject-00001", REPORTER, "0101", b1);
    expect![[r#""malformed_json" "payload is not JSON: key must be a string at line 1 column 2""#]]
        .assert_eq(&reject(b"{oops".to_vec()).await);
    expect![[r#""schema_violation" "not a submission: missing field `channel`""#]].assert_eq(
        &reject({
            let mut body = valid.clone();
            body.as_object_mut().map(|o| o.remove("channel"));
            body["submission_id"] = json!("reject-00002");
            body.to_string().into_bytes()
        })
        .await,
    );
    let mut body = valid.clone();
    body["submission_id"] = json!("reject-00003");
    body["category"] = json!("0199");
    expect![[r#""unknown_category" "category 0199 is not a fileable category of the taxonomy""#]]
        .assert_eq(&reject(body.to_string().into_bytes()).await);
    let mut body = valid.clone();
    body["submission_id"] = json!("reject-00004");
    body["location"] = json!({"point": {"lon": ORIGIN.0 + 0.5, "lat": ORIGIN.1}});
    expect![[r#""outside_communities" "the location is outside every community with grids""#]]
        .assert_eq(&reject(body.to_string().into_bytes()).await);
    let mut body = valid.clone();
    body["submission_id"] = json!("reject-00005");
    body["description"] = json!("字".repeat(4_001));
    expect![[r#""description_too_long" "description is 4001 characters, more than 4000""#]]
        .assert_eq(&reject(body.to_string().into_bytes()).await);
    let mut body = valid.clone();
    body["submission_id"] = json!("reject-00006");
    body["media"] = json!(vec![json!({"url": "https://media.example/a.jpg"}); 10]);
    expect![[r#""too_many_media" "10 media references, more than 9""#]]
        .assert_eq(&reject(body.to_string().into_bytes()).await);
    expect![[r#""payload_too_large" "payload is 70000 bytes, more than 65536""#]]
        .assert_eq(&reject(vec![b' '; 70_000]).await);
    let mut body = submission("reject-00007", FOURTH_REPORTER, "0101", b1);
    body["location"] = json!({"building_id": "b99"});
    expect![[r#""unknown_building" "building \"b99\" is in no grid of the grid registry""#]]
        .assert_eq(&reject(body.to_string().into_bytes()).await);

    // A building id locates like the building's own point: same grid, same position.
    let mut body = submission("building-00001", FOURTH_REPORTER, "0105", (0.0, 0.0));
    body["location"] = json!({"building_id": "b5"});
    let by_building = send(&client, "intake.request", body).await;
    check(
        &by_building,
        expect![[
            r#"{"grid_code":"350402001001002","incident_id":"66d887af-378b-8e1a-a942-746a74057670","respond_by":"<time>","respond_by_ms":"<time>","status":"filed","submission_id":"building-00001"}"#
        ]],
    );
    let by_point = send(
        &client,
        "intake.request",
        submission("building-00002", FOURTH_REPORTER, "0106", near_building(4)),
    )
    .await;
    assert_eq!(by_building["grid_code"], by_point["grid_code"]);
    let found = send(
        &client,
        "incidents.query.get",
        json!({"incident_id": by_building["incident_id"]}),
    )
    .await;
    // Routed by the city's table in its filing commit.
    assert_eq!(found["incident"]["status"], "dispatched", "{found}");
    // Rejected submissions are recorded (one INTAKE record per refusal).
    check(
        &send(
            &client,
            "intake.query.receipt",
            json!({"submission_id": "reject-00003"}),
        )
        .await,
        expect![[
            r#"{"message":"category 0199 is not a fileable category of the taxonomy","reason_code":"unknown_category","status":"rejected","submission_id":"reject-00003"}"#
        ]],
    );

    // Duplicate merge, with a status subscriber on the original incident.
    let first = send(
        &client,
        "intake.request",
        submission("merge-00001", REPORTER, "0103", b1),
    )
    .await;
    let incident = first["incident_id"].as_str().expect("filed").to_owned();
    let mut status = client
        .subscribe(format!("incidents.status.{incident}"))
        .await
        .expect("subscribe status");
    client.flush().await.expect("flush");
    let near = (b1.0 + 0.0001, b1.1 + 0.0001); // ~15 m away
    let second = send(
        &client,
        "intake.request",
        submission("merge-00002", OTHER_REPORTER, "0103", near),
    )
    .await;
    check(
        &second,
        expect![[
            r#"{"grid_code":"350402001001003","incident_id":"3b93881b-230e-8002-86c8-d33f2a8ff3b8","respond_by":"<time>","respond_by_ms":"<time>","status":"merged","submission_id":"merge-00002"}"#
        ]],
    );
    assert_eq!(second["incident_id"], first["incident_id"]);
    let update = tokio::time::timeout(Duration::from_secs(5), status.next())
        .await
        .expect("status within 5 s")
        .expect("status");
    check(
        &serde_json::from_slice(&update.payload).expect("JSON"),
        expect![[
            r#"{"additional_reporters":1,"category":"0103","changed_at_ms":"<time>","events":["incident.duplicate_merged"],"grid_code":"350402001001003","handler":"grid_worker","incident_id":"3b93881b-230e-8002-86c8-d33f2a8ff3b8","resolve_by_ms":"<time>","respond_by_ms":"<time>","status":"dispatched","version":5}"#
        ]],
    );
    // Another category at the same spot is a new incident.
    let other = send(
        &client,
        "intake.request",
        submission("merge-00003", OTHER_REPORTER, "0102", near),
    )
    .await;
    assert_eq!(other["status"], "filed");
    assert_ne!(other["incident_id"], first["incident_id"]);

    // Query by id.
    let found = send(
        &client,
        "incidents.query.get",
        json!({"incident_id": incident}),
    )
    .await;
    check(
        &found["incident"],
        expect![[
            r#"{"additional_reporters":1,"category":"0103","changed_at_ms":"<time>","events":[],"grid_code":"350402001001003","handler":"grid_worker","incident_id":"3b93881b-230e-8002-86c8-d33f2a8ff3b8","resolve_by_ms":"<time>","respond_by_ms":"<time>","status":"dispatched","version":5}"#
        ]],
    );
    check(
        &send(
            &client,
            "incidents.query.get",
            json!({"incident_id": "0193a1b2-0000-7000-8000-0000000000ff"}),
        )
        .await,
        expect![[r#"{"incident_id":"0193a1b2-0000-7000-8000-0000000000ff","status":"not_found"}"#]],
    );

    // Contact details: in the erasable bucket, never in the event log; erased on request.
    let jetstream = async_nats::jetstream::new(client.clone());
    let contacts = jetstream
        .get_key_value("INTAKE_CONTACTS")
        .await
        .expect("bucket");
    let stored = contacts
        .get(REPORTER)
        .await
        .expect("read")
        .expect("contact stored");
    // With the arrival of the submission that gave them (a later write of an earlier
    // submission does not replace them).
    let mut stored: Value = serde_json::from_slice(&stored).expect("JSON");
    assert!(
        stored["arrived_ms"].as_i64().is_some_and(|ms| ms > 0),
        "{stored}"
    );
    stored["arrived_ms"] = json!("<time>");
    expect![[r#"{"arrived_ms":"<time>","name":"张三","phone":"13800000000"}"#]]
        .assert_eq(&stored.to_string());
    for stream in ["INCIDENTS", "INTAKE"] {
        let mut stream = jetstream.get_stream(stream).await.expect("stream");
        let last = stream.info().await.expect("info").state.last_sequence;
        for sequence in 1..=last {
            let message = stream.direct_get(sequence).await.expect("message");
            let text = String::from_utf8_lossy(&message.payload);
            assert!(
                !text.contains("13800000000") && !text.contains("张三"),
                "PII in {stream:?}"
            );
        }
    }
    check(
        &send(
            &client,
            "intake.contact.erase",
            json!({"reporter_id": REPORTER, "request_reference": "个保-2026-0042\u{7}"}),
        )
        .await,
        expect![[
            r#"{"message":"request_reference must be 1..=128 characters without control characters","reason_code":"schema_violation","status":"rejected"}"#
        ]],
    );
    assert!(
        contacts.get(REPORTER).await.expect("read").is_some(),
        "a refused request erases nothing"
    );
    check(
        &send(
            &client,
            "intake.contact.erase",
            json!({"reporter_id": REPORTER, "request_reference": "个保-2026-0042"}),
        )
        .await,
        expect![[r#"{"reporter_id":"0193a1b2-0000-7000-8000-000000000001","status":"erased"}"#]],
    );
    assert!(
        contacts.get(REPORTER).await.expect("read").is_none(),
        "erased"
    );
    // The erasure is on record (who, and the office's reference), the details are not.
    let intake_store = EventStore::open_existing(
        jetstream.clone(),
        spec(BoundedContext::Intake),
        IntakeCodec::new(intake::INTAKE_EVENT_TYPE),
    )
    .await
    .expect("open INTAKE");
    let erasures = intake_store
        .load(&eventstore::AggregateId::new(format!("erasure.{REPORTER}")).unwrap())
        .await
        .expect("load the erasure records");
    expect![[r#"
        [
            ContactErased {
                reporter: 0193a1b2-0000-7000-8000-000000000001,
                request_reference: Some(
                    "个保-2026-0042",
                ),
            },
        ]"#]]
    .assert_eq(&format!("{:#?}", erasures.events().collect::<Vec<_>>()));

    // Rate limit: burst 3 for a fresh reporter, then refused.
    let mut outcomes = Vec::new();
    for index in 0..4 {
        let body = submission(
            &format!("rate-{index:05}"),
            THIRD_REPORTER,
            "0104",
            near_building(index + 3),
        );
        let reply = send(&client, "intake.request", body).await;
        outcomes.push(format!(
            "{}{}",
            reply["status"],
            reply
                .get("reason_code")
                .map(|c| format!(" {c}"))
                .unwrap_or_default()
        ));
    }
    expect![[r#"["\"filed\"", "\"filed\"", "\"filed\"", "\"rejected\" \"rate_limited\""]"#]]
        .assert_eq(&format!("{outcomes:?}"));
    running.shutdown().await;
    stack.registry_stop.send(true).expect("registry listens");
}

/// Publishes `body` on the durable `subject` with `message_id` as its `Nats-Msg-Id`, and
/// returns the next receipt announced.
async fn publish_durable(
    jetstream: &async_nats::jetstream::Context,
    receipts: &mut async_nats::Subscriber,
    subject: &str,
    message_id: &str,
    body: &Value,
) -> async_nats::Message {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id);
    jetstream
        .publish_with_headers(subject.to_owned(), headers, body.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("server acknowledged");
    tokio::time::timeout(Duration::from_secs(10), receipts.next())
        .await
        .expect("receipt within 10 s")
        .expect("receipt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_submissions_while_running_are_filed_one_by_one() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let client = connect(&url).await;
    let stack = registry(&url).await;
    let jetstream = async_nats::jetstream::new(client.clone());
    let running = start_intake(&url, &stack.locator, ServiceConfig::default()).await;
    let mut receipts = client
        .subscribe("intake.receipts.>")
        .await
        .expect("subscribe receipts");
    client.flush().await.expect("flush");
    for index in 0..3 {
        let id = format!("live-{index:05}");
        let body = submission(&id, REPORTER, "0101", near_building(index));
        let message =
            publish_durable(&jetstream, &mut receipts, "intake.submit.app", &id, &body).await;
        let receipt: Value = serde_json::from_slice(&message.payload).expect("JSON");
        assert_eq!(receipt["submission_id"], id.as_str(), "{receipt}");
    }
    // The header's id and the body's differ: refused under the header's id (the one the
    // stream deduplicates by), and the body's id stays free.
    let body = submission("live-body", REPORTER, "0101", near_building(7));
    let message = publish_durable(
        &jetstream,
        &mut receipts,
        "intake.submit.app",
        "live-header",
        &body,
    )
    .await;
    assert_eq!(message.subject.as_str(), "intake.receipts.live-header");
    let receipt: Value = serde_json::from_slice(&message.payload).expect("JSON");
    assert_eq!(
        (&receipt["status"], &receipt["reason_code"]),
        (&Value::from("rejected"), &Value::from("id_mismatch")),
        "{receipt}"
    );
    let body_id = client
        .request(
            "intake.query.receipt",
            serde_json::json!({"submission_id": "live-body"})
                .to_string()
                .into(),
        )
        .await
        .expect("query");
    let answer: Value = serde_json::from_slice(&body_id.payload).expect("JSON");
    assert_eq!(answer["reason_code"], "not_found", "{answer}");
    // Published on the patrol subject with the app's channel in the body: refused, so that a
    // permission on `intake.submit.patrol` means what it says.
    let body = submission("live-channel", REPORTER, "0101", near_building(8));
    let message = publish_durable(
        &jetstream,
        &mut receipts,
        "intake.submit.patrol",
        "live-channel",
        &body,
    )
    .await;
    let receipt: Value = serde_json::from_slice(&message.payload).expect("JSON");
    expect![[r#"intake.receipts.live-channel "rejected" "channel_mismatch" "published on \"intake.submit.patrol\" but the body's channel is \"app\"; publish on intake.submit.app""#]].assert_eq(&format!(
        "{} {} {} {}",
        message.subject, receipt["status"], receipt["reason_code"], receipt["message"]
    ));
    running.shutdown().await;
    stack.registry_stop.send(true).expect("registry listens");
}

/// A duplicate report decided while another writer appends to the same incident: the merge
/// commit meets the concurrent write, intake re-reads the incident and decides again, and the
/// reporter is told `merged` (never `error`). The other writer here is the test, merging
/// a co-reporter as a second intake instance would, at the same moment as the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_that_meets_a_concurrent_write_is_decided_again() {
    /// Rounds tried until the race has gone intake's losing way at least once.
    const ROUNDS_MAX: usize = 60;
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let client = connect(&url).await;
    let stack = registry(&url).await;
    let observer = observe::Observer::new("intake", "conflict-test");
    // Originals ~2 m apart must not merge into each other; each duplicate is at its original.
    // Every reporter sends once and has one token: a merge decided again after the conflict
    // must not be charged twice (it would be refused `rate_limited`).
    let config = ServiceConfig {
        observer: observer.clone(),
        core: intake::CoreConfig {
            dedup_radius_m: 1.0,
            rate_burst: 1,
            rate_refill_ms: 3_600_000,
            ..Default::default()
        },
        ..Default::default()
    };
    let reporter = |kind: u64, round: usize| format!("0193a1b2-0000-7000-8{kind:03}-{round:012}");
    let running = start_intake(&url, &stack.locator, config).await;
    let writer = EventStore::open(
        async_nats::jetstream::new(client.clone()),
        spec(BoundedContext::Incidents),
        IncidentCodec,
    )
    .await
    .expect("open INCIDENTS");
    let policy = domain::Policy::embedded("sanming").expect("sanming policy");
    let conflicts = || observer.metrics().append_conflicts.get();
    let mut rounds = 0;
    let mut incidents = Vec::new();
    while rounds < ROUNDS_MAX && conflicts() == 0 {
        let at = near_building(rounds);
        let original = send(
            &client,
            "intake.request",
            submission(
                &format!("original-{rounds:03}"),
                &reporter(1, rounds),
                "0101",
                at,
            ),
        )
        .await;
        assert_eq!(original["status"], "filed", "{original}");
        let incident_id = original["incident_id"].as_str().expect("id").to_owned();
        let aggregate = eventstore::AggregateId::new(incident_id.clone()).expect("aggregate");
        let loaded = writer.load(&aggregate).await.expect("load");
        let mut state = domain::incident::IncidentState::default();
        loaded.events().for_each(|event| state.apply(event));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        let events = domain::incident::decide(
            &state,
            domain::incident::IncidentCommand {
                actor: domain::Actor {
                    role: domain::Role::System,
                    id: domain::ActorId(uuid::Uuid::nil()),
                },
                action: domain::incident::Action::MergeDuplicate {
                    duplicate: domain::IncidentId(uuid::Uuid::now_v7()),
                    reporter: domain::ActorId(uuid::Uuid::parse_str(THIRD_REPORTER).expect("uuid")),
                },
            },
            domain::Timestamp(now),
            &policy,
        )
        .expect("the test's merge is valid");
        let command_id = format!("test-merge-{rounds}");
        let commit = eventstore::Commit {
            event_ids: vec![uuid::Uuid::now_v7(); events.len()],
            events,
            meta: eventstore::CommitMeta {
                correlation_id: uuid::Uuid::now_v7(),
                causation_id: uuid::Uuid::now_v7(),
                actor: "system:test".to_owned(),
                occurred_at_ms: now,
                traceparent: None,
            },
            command_id,
        };
        let duplicate = submission(
            &format!("duplicate-{rounds:03}"),
            &reporter(2, rounds),
            "0101",
            at,
        );
        let (_, merged) = tokio::join!(
            writer.append(&aggregate, &loaded.position, &commit),
            send(&client, "intake.request", duplicate)
        );
        assert_eq!(
            (merged["status"].as_str(), merged["incident_id"].as_str()),
            (Some("merged"), Some(incident_id.as_str())),
            "round {rounds}: {merged}"
        );
        incidents.push(aggregate);
        rounds += 1;
    }
    assert!(
        conflicts() > 0,
        "intake never met the concurrent write in {ROUNDS_MAX} rounds"
    );
    // Whoever won each race, the incident holds intake's co-reporter exactly once.
    for (round, aggregate) in incidents.iter().enumerate() {
        let other = domain::ActorId(uuid::Uuid::parse_str(&reporter(2, round)).expect("uuid"));
        let loaded = writer.load(aggregate).await.expect("load");
        let mut state = domain::incident::IncidentState::default();
        loaded.events().for_each(|event| state.apply(event));
        let held = state.co_reporters.iter().filter(|r| **r == other).count();
        assert_eq!(held, 1, "{aggregate}: {:?}", state.co_reporters);
    }
    running.shutdown().await;
    stack.registry_stop.send(true).expect("registry listens");
}

/// A submission whose contact details could not be stored is not answered "filed" (nor, on
/// the durable path, acknowledged: the work queue would drop the only copy of the details).
/// Sent again once the bucket takes writes, it gets its receipt and the details are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_whose_contact_details_were_not_stored_is_not_answered_filed() {
    let config = ServiceConfig::default();
    let harness = harness(config.clone()).await;
    let (client, jetstream) = (&harness.client, &harness.jetstream);
    jetstream
        .delete_key_value(&config.contacts_bucket)
        .await
        .expect("delete the contacts bucket");
    let body = submission("contact-0001", REPORTER, "0101", near_building(3));
    let answer = send(client, "intake.request", body.clone()).await;
    assert_eq!(
        (&answer["status"], &answer["reason_code"]),
        (&Value::from("error"), &Value::from("store_unavailable")),
        "{answer}"
    );
    let contacts = intake::service::ensure_contacts_bucket(jetstream, &config)
        .await
        .expect("the bucket again");
    let answer = send(client, "intake.request", body).await;
    assert_eq!(answer["status"], "filed", "{answer}");
    let stored = contacts
        .get(REPORTER)
        .await
        .expect("read")
        .expect("contact stored");
    let stored: Value = serde_json::from_slice(&stored).expect("JSON");
    assert_eq!(stored["phone"], "13800000000", "{stored}");
    harness.shutdown().await;
}

/// The durable submissions consumer deleted under a running intake (an operator's mistake,
/// a stream restored from a backup) is made again, and submissions published after it are
/// filed: durable intake does not stop until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_submissions_consumer_is_made_again() {
    let config = ServiceConfig::default();
    let harness = harness(config.clone()).await;
    let (client, jetstream) = (&harness.client, &harness.jetstream);
    let mut receipts = client
        .subscribe("intake.receipts.>")
        .await
        .expect("subscribe receipts");
    client.flush().await.expect("flush");
    let body = submission("before-0001", REPORTER, "0101", near_building(1));
    publish_durable(
        jetstream,
        &mut receipts,
        "intake.submit.app",
        "before-0001",
        &body,
    )
    .await;
    jetstream
        .get_stream("SUBMISSIONS")
        .await
        .expect("SUBMISSIONS")
        .delete_consumer(&config.submissions_durable)
        .await
        .expect("delete the consumer");
    let body = submission("after-0001", REPORTER, "0101", near_building(2));
    let message = publish_durable(
        jetstream,
        &mut receipts,
        "intake.submit.app",
        "after-0001",
        &body,
    )
    .await;
    let receipt: Value = serde_json::from_slice(&message.payload).expect("JSON");
    assert_eq!(
        (
            receipt["submission_id"].as_str(),
            receipt["status"].as_str()
        ),
        (Some("after-0001"), Some("filed")),
        "{receipt}"
    );
    harness.shutdown().await;
}
