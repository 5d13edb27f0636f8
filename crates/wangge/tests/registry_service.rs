//! `wangge up` and `wangge serve registry` as a city engineer runs them: real binary, real
//! nats-server, SIGTERM for a graceful stop.

use std::process::{Command, Stdio};
use std::time::Duration;

use expect_test::expect;
use serde_json::{Value, json};
use testkit::NatsServer;

fn wangge(url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wangge"));
    command
        .env("WANGGE_NATS__URL", url)
        .env("WANGGE_CITY", "loudi")
        .env("WANGGE_LOG__FILTER", "warn");
    command
}

async fn request(client: &async_nats::Client, subject: &str, body: Value) -> Option<Value> {
    let reply = client
        .request(subject.to_owned(), body.to_string().into())
        .await
        .ok()?;
    serde_json::from_slice(&reply.payload).ok()
}

#[test]
fn up_creates_streams_and_serve_registry_answers_then_stops_on_sigterm() {
    let server = NatsServer::start().expect("nats-server");
    // Two URLs of the same server: the comma-separated form must parse.
    let url = format!("{0},{0}", server.url());

    let up = wangge(&url).arg("up").output().expect("run wangge up");
    assert!(
        up.status.success(),
        "wangge up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    expect![[r#"
        stream GRIDS (grids.ev.>): replicas 1, duplicate window 120s, 0 messages, ready
        stream INCIDENTS (incidents.ev.>): replicas 1, duplicate window 120s, 0 messages, ready
        stream INTAKE (intake.ev.>): replicas 1, duplicate window 120s, 0 messages, ready
        stream SUBMISSIONS (consumer intake), stream NOTIFICATIONS, buckets INTAKE_CONTACTS and DISPATCH_SNAPSHOTS: ready
        bucket PROJECTION ready, current generation 1 (bucket PROJ_G1)
    "#]]
    .assert_eq(&String::from_utf8_lossy(&up.stdout));

    let mut serve = wangge(&url)
        .args(["serve", "registry", "--instance", "cli-test"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run wangge serve registry");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let answers = runtime.block_on(async {
        let client = async_nats::connect(server.url()).await.expect("connect");
        let point = json!({"lon": 111.9935, "lat": 27.7005});
        // Wait until the service has caught up and subscribed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let before = loop {
            if let Some(answer) = request(&client, "grids.locate", point.clone()).await {
                break answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "registry never answered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (x, y, s) = (111.99, 27.70, 0.01);
        let registered = request(
            &client,
            "grids.cmd.register_community",
            json!({
                "command_id": "r1", "community_id": "dakeshan", "code": "431302001001",
                "name": "大科山社区", "street": "大科街道", "district": "娄星区",
                "boundary": [[[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]]
            }),
        )
        .await
        .expect("register answered");
        let imported = request(
            &client,
            "grids.cmd.import_buildings",
            json!({"command_id": "i1", "community_id": "dakeshan", "buildings": [
                {"id": "a", "lon": 111.993, "lat": 27.7005, "households": 120},
                {"id": "b", "lon": 111.996, "lat": 27.7030, "households": 110}
            ]}),
        )
        .await
        .expect("import answered");
        let partitioned = request(
            &client,
            "grids.cmd.partition",
            json!({"command_id": "p1", "community_id": "dakeshan"}),
        )
        .await
        .expect("partition answered");
        let after = request(&client, "grids.locate", point)
            .await
            .expect("locate answered");
        [before, registered, imported, partitioned, after]
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    });
    expect![[r#"
        {"status":"unserved"}
        {"command_id":"r1","community_id":"dakeshan","duplicate":false,"events":["community_registered"],"sequence":1,"status":"accepted","version":1}
        {"buildings_imported":2,"command_id":"i1","community_id":"dakeshan","duplicate":false,"events":["buildings_imported"],"sequence":2,"status":"accepted","version":2}
        {"command_id":"p1","community_id":"dakeshan","duplicate":false,"events":["grids_drawn"],"grids_drawn":[{"flags":[],"grid_code":"431302001001001","grid_worker":null,"households":230}],"sequence":3,"status":"accepted","version":3}
        {"community":"dakeshan","community_code":"431302001001","community_name":"大科山社区","district":"娄星区","grid_code":"431302001001001","grid_worker":null,"status":"served","street":"大科街道"}"#]].assert_eq(&answers);

    let killed = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(killed.success());
    let status = serve.wait().expect("wait for wangge serve");
    assert!(status.success(), "wangge serve exited with {status}");
}

/// The operator's settings stand: `wangge up` applies them to every stream and bucket, and a
/// service starting with other settings (a host with a stale configuration) leaves them as
/// they are and says so.
#[test]
fn up_applies_the_settings_and_a_starting_service_keeps_them() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let run_up = |window: &str| {
        let up = wangge(&url)
            .arg("up")
            .env("WANGGE_STORE__DUPLICATE_WINDOW_SECONDS", window)
            .output()
            .expect("run wangge up");
        assert!(
            up.status.success(),
            "wangge up failed: {}",
            String::from_utf8_lossy(&up.stderr)
        );
        String::from_utf8_lossy(&up.stdout).into_owned()
    };
    run_up("120");
    expect![[r#"
        stream GRIDS (grids.ev.>): replicas 1, duplicate window 300s, 0 messages, ready
        stream INCIDENTS (incidents.ev.>): replicas 1, duplicate window 300s, 0 messages, ready
        stream INTAKE (intake.ev.>): replicas 1, duplicate window 300s, 0 messages, ready
        stream SUBMISSIONS (consumer intake), stream NOTIFICATIONS, buckets INTAKE_CONTACTS and DISPATCH_SNAPSHOTS: ready
        bucket PROJECTION ready, current generation 1 (bucket PROJ_G1)
        stream NOTIFICATIONS: replicas 1 -> 1, duplicate window 120s -> 300s
    "#]]
    .assert_eq(&run_up("300"));

    let serve = wangge(&url)
        .args(["serve", "registry", "--instance", "stale-host"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wangge serve registry");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let windows = runtime.block_on(async {
        let client = async_nats::connect(&url).await.expect("connect");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let point = json!({"lon": 111.9935, "lat": 27.7005});
        while request(&client, "grids.locate", point.clone())
            .await
            .is_none()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "registry never answered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let jetstream = async_nats::jetstream::new(client);
        let mut windows = Vec::new();
        for stream in ["GRIDS", "INCIDENTS", "NOTIFICATIONS"] {
            let info = jetstream
                .get_stream(stream)
                .await
                .expect("stream")
                .info()
                .await
                .expect("info")
                .clone();
            windows.push(format!(
                "{stream} {}s",
                info.config.duplicate_window.as_secs()
            ));
        }
        windows.join(", ")
    });
    assert_eq!(windows, "GRIDS 300s, INCIDENTS 300s, NOTIFICATIONS 300s");
    let killed = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(killed.success());
    let output = serve.wait_with_output().expect("wait for wangge serve");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("settings differ from this service's")
            && stderr.contains("duplicate window 300 s (ours 120 s)"),
        "{stderr}"
    );
}
