use std::io::{Read as _, Write as _};

use expect_test::{Expect, expect};
use futures::StreamExt as _;

use super::*;

/// GET `path` on `address`; returns the status line's code and the body.
fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, body.to_owned())
}

/// The metric lines (no comments) containing `needle`, with the histogram buckets left out,
/// sorted (a family's series come in hash order).
fn lines_with(text: &str, needle: &str) -> String {
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.starts_with('#') && line.contains(needle) && !line.contains("_bucket"))
        .collect();
    lines.sort_unstable();
    lines.join("\n")
}

fn check(given: &Observer, needle: &str, expect: Expect) {
    expect.assert_eq(&lines_with(&given.encode(), needle));
}

#[test]
fn metrics_carry_service_and_instance_and_compute_lag() {
    let observer = Observer::new("dispatch", "dispatch-2");
    let metrics = observer.metrics();
    metrics.request("commands", "accepted", Duration::from_millis(2));
    metrics.request("commands", "rejected", Duration::from_millis(1));
    metrics.request("commands", "accepted", Duration::from_millis(3));
    metrics.whistle("emergency");
    metrics.deadlines_pending.set(7);
    // Before the stream's end is first polled the lag is unknown, and not exported.
    metrics.reached("INCIDENTS", 90);
    check(&observer, "lag", expect![[r#""#]]);
    metrics.stream_end("INCIDENTS", 120);
    metrics.reached("INCIDENTS", 100);
    check(
        &observer,
        "requests_total",
        expect![[r#"
            wangge_requests_total{service="dispatch",instance="dispatch-2",endpoint="commands",outcome="accepted"} 2
            wangge_requests_total{service="dispatch",instance="dispatch-2",endpoint="commands",outcome="rejected"} 1"#]],
    );
    check(
        &observer,
        "lag",
        expect![[
            r#"wangge_stream_lag_messages{service="dispatch",instance="dispatch-2",stream="INCIDENTS"} 20"#
        ]],
    );
    check(
        &observer,
        "whistles",
        expect![[
            r#"wangge_whistles_blown_total{service="dispatch",instance="dispatch-2",kind="emergency"} 1"#
        ]],
    );
    check(
        &observer,
        "deadlines_pending",
        expect![[r#"wangge_deadlines_pending{service="dispatch",instance="dispatch-2"} 7"#]],
    );
}

#[test]
fn trace_ids_come_from_traceparent() {
    let cases = [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later-field",
        "00-short-00f067aa0ba902b7-01",
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
    ];
    let seen: Vec<String> = cases
        .iter()
        .map(|case| format!("{case} -> {:?}", trace_id(case)))
        .collect();
    expect![[r#"
        00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 -> Some("4bf92f3577b34da6a3ce929d0e0e4736")
        01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later-field -> Some("4bf92f3577b34da6a3ce929d0e0e4736")
        00-short-00f067aa0ba902b7-01 -> None
        garbage -> None
        00-00000000000000000000000000000000-00f067aa0ba902b7-01 -> None
        00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01 -> None
        00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01 -> None
        ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 -> None
        00-4bf92f3577b34da6a3ce929d0e0e4736- -> None
        00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra -> None
        00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1 -> None"#]]
    .assert_eq(&seen.join("\n"));
}

#[test]
fn a_trace_started_here_is_well_formed_and_not_sampled() {
    let started = new_traceparent();
    let parts: Vec<&str> = started.split('-').collect();
    assert_eq!(parts.len(), 4, "{started}");
    assert_eq!(parts[0], "00", "version: {started}");
    assert!(trace_id(&started).is_some(), "trace id: {started}");
    assert_eq!(parts[2].len(), 16, "span id: {started}");
    assert_eq!(parts[3], "00", "flags (not sampled): {started}");

    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    assert_eq!(
        traceparent_or_new(Some(&headers)),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "a caller's sampling decision is passed on"
    );
}

#[tokio::test]
async fn health_metrics_over_http_and_micro_service_discovery_on_a_real_server() {
    let server = testkit::NatsServer::start().expect("nats-server");
    let client = async_nats::connect(server.url()).await.expect("connect");
    let observer = Observer::new("registry", "registry-1");
    observer.watch_connection(&client);
    let (stop, stopped) = watch::channel(false);
    let http = serve_http("127.0.0.1:0", observer.clone(), stopped)
        .await
        .expect("serve http");
    let address = http.address;
    let get =
        move |path: &'static str| tokio::task::spawn_blocking(move || http_get(address, path));

    let (status, body) = get("/healthz").await.expect("get");
    assert_eq!(
        (status, body.trim()),
        (503, "starting: catching up with its streams")
    );
    observer.set_started();
    let (status, _) = get("/healthz").await.expect("get");
    assert_eq!(status, 200);
    observer.metrics().commits_appended.inc();
    let (status, body) = get("/metrics").await.expect("get");
    assert_eq!(status, 200);
    assert_eq!(
        lines_with(&body, "commits_appended"),
        r#"wangge_commits_appended_total{service="registry",instance="registry-1"} 1"#
    );
    let (status, _) = get("/nothing").await.expect("get");
    assert_eq!(status, 404);

    // Micro service: discoverable by PING and INFO, with endpoint stats.
    let service = micro_service(
        &client,
        "registry",
        "grid registry",
        "registry",
        "registry-1",
    )
    .await
    .expect("micro");
    let mut locate = endpoint(&service, "locate", "grids.locate")
        .await
        .expect("endpoint");
    let responder = tokio::spawn(async move {
        let request = locate.next().await.expect("one request");
        request
            .respond(Ok(bytes::Bytes::from_static(b"{}")))
            .await
            .expect("respond");
    });
    client.flush().await.expect("flush");
    let answer = client
        .request("grids.locate", bytes::Bytes::from_static(b"{}"))
        .await
        .expect("request");
    assert_eq!(&answer.payload[..], b"{}");
    responder.await.expect("responder");
    let ping = client
        .request("$SRV.PING.wangge-registry", bytes::Bytes::new())
        .await
        .expect("ping");
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).expect("json");
    let stats = client
        .request("$SRV.STATS.wangge-registry", bytes::Bytes::new())
        .await
        .expect("stats");
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).expect("json");
    let endpoint_stats = &stats["endpoints"][0];
    expect![[r#"
        ping: io.nats.micro.v1.ping_response wangge-registry instance=registry-1
        stats: locate on grids.locate (queue registry): 1 requests, 0 errors"#]]
    .assert_eq(&format!(
        "ping: {} {} instance={}\nstats: {} on {} (queue {}): {} requests, {} errors",
        ping["type"].as_str().unwrap_or_default(),
        ping["name"].as_str().unwrap_or_default(),
        ping["metadata"]["instance"].as_str().unwrap_or_default(),
        endpoint_stats["name"].as_str().unwrap_or_default(),
        endpoint_stats["subject"].as_str().unwrap_or_default(),
        endpoint_stats["queue_group"].as_str().unwrap_or_default(),
        endpoint_stats["num_requests"],
        endpoint_stats["num_errors"],
    ));

    // Lag: the poller reads the stream's end.
    let jetstream = async_nats::jetstream::new(client.clone());
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "LAGGED".to_owned(),
            subjects: vec!["lagged.>".to_owned()],
            ..Default::default()
        })
        .await
        .expect("stream");
    for _ in 0..5 {
        jetstream
            .publish("lagged.x", bytes::Bytes::new())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    observer.metrics().reached("LAGGED", 2);
    // No lag line until the first poll (the lag is not known before it).
    assert_eq!(lines_with(&observer.encode(), "stream_lag"), "");
    let poller = spawn_lag_refresh(
        jetstream,
        vec!["LAGGED".to_owned()],
        Duration::from_millis(100),
        observer.clone(),
        stop.subscribe(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while lines_with(&observer.encode(), "stream_lag").is_empty()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        lines_with(&observer.encode(), "stream_lag"),
        r#"wangge_stream_lag_messages{service="registry",instance="registry-1",stream="LAGGED"} 3"#
    );

    observer.set_stopping();
    let (status, _) = get("/healthz").await.expect("get");
    assert_eq!(status, 503);
    stop.send(true).expect("stop");
    http.task.await.expect("http task");
    poller.await.expect("poller");
    service.stop().await.expect("stop micro");
}

/// Connections that send nothing hold their place for the header read timeout only: with
/// every place taken by idle clients, a probe is still answered (before, they held the
/// places for 30 s and a liveness probe with a 1 s timeout failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_starve_the_probes() {
    let observer = Observer::new("registry", "registry-1");
    let (stop, stopped) = watch::channel(false);
    let http = serve_http("127.0.0.1:0", observer, stopped)
        .await
        .expect("serve http");
    let address = http.address;
    let idle: Vec<std::net::TcpStream> = (0..super::HTTP_CONNECTIONS_MAX + 8)
        .map(|_| std::net::TcpStream::connect(address).expect("connect"))
        .collect();
    let probe = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        write!(
            stream,
            "GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    });
    let answer = probe.await.expect("probe");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    drop(idle);
    stop.send(true).expect("stop");
}
