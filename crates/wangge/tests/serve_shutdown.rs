//! `wangge serve` stops in bounded time even when NATS is gone: the stop talks to NATS
//! (acks, deleting its private consumer), and an operator's second signal, or the grace
//! period, must end the process rather than leave it waiting for a reconnection.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the test waits for the service to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the process may take to exit after the second signal.
const EXIT_AFTER_SECOND_SIGNAL_MAX: Duration = Duration::from_secs(5);

fn signal(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// `wangge serve registry` on `url`, logging at info in `log_format` to a pipe.
fn serve_registry(url: &str, instance: &str, log_format: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_wangge"))
        .args(["serve", "registry", "--instance", instance])
        .env_remove("WANGGE_CONFIG")
        .env_remove("RUST_LOG")
        .env("WANGGE_NATS__URL", url)
        .env("WANGGE_LOG__FORMAT", log_format)
        .env("WANGGE_LOG__FILTER", "info,async_nats=off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wangge serve registry")
}

/// Everything the exited service wrote to its piped stderr.
fn stderr_of(service: &mut Child) -> String {
    let mut stderr = String::new();
    service
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    stderr
}

/// Waits until the registry answers a community query.
async fn wait_ready(url: &str, service: &mut Child) {
    let client = async_nats::connect(url).await.expect("connect");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let probe = client.request(
            "grids.query.community",
            r#"{"community_id":"probe"}"#.into(),
        );
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), probe).await {
            return;
        }
        assert!(Instant::now() < deadline, "registry never answered");
        assert!(
            service.try_wait().expect("poll").is_none(),
            "registry exited early"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_a_stop_that_waits_for_nats() {
    let mut server = testkit::NatsServer::start().expect("nats-server");
    let url = server.url();
    let mut service = serve_registry(&url, "registry-shutdown", "pretty");
    wait_ready(&url, &mut service).await;

    server.kill();
    signal(&service);
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&service);
    let second = Instant::now();
    let status = loop {
        if let Some(status) = service.try_wait().expect("poll") {
            break status;
        }
        assert!(
            second.elapsed() < EXIT_AFTER_SECOND_SIGNAL_MAX,
            "still running {EXIT_AFTER_SECOND_SIGNAL_MAX:?} after the second signal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = stderr_of(&mut service);
    eprintln!("service exit: {status:?}");
    assert!(stderr.contains("shutting down"), "{stderr}");
    // Either the stop finished on its own before the second signal (exit 0), or the second
    // signal ended it (exit 1, saying so).
    match status.code() {
        Some(0) => {}
        Some(1) => assert!(
            stderr.contains("exiting before the stop finished"),
            "{stderr}"
        ),
        other => panic!("exit {other:?}: {stderr}"),
    }
}

/// In JSON, every line a service logs, from start to stop, is one object that names the
/// service and the instance (`spans[0]`, the span `serve`): a collector merging two instances'
/// streams can tell them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_instance_on_every_line() {
    let server = testkit::NatsServer::start().expect("nats-server");
    let url = server.url();
    let mut service = serve_registry(&url, "registry-logs", "json");
    wait_ready(&url, &mut service).await;
    signal(&service);
    let status = service.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    let stderr = stderr_of(&mut service);
    let mut messages = Vec::new();
    for line in stderr.lines() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("not one JSON object ({error}): {line}"));
        let outer = &value["spans"][0];
        assert_eq!(
            (&outer["name"], &outer["service"], &outer["instance"]),
            (
                &serde_json::json!("serve"),
                &serde_json::json!("registry"),
                &serde_json::json!("registry-logs")
            ),
            "{line}"
        );
        messages.push(value["message"].as_str().unwrap_or("").to_owned());
    }
    assert!(
        messages.iter().any(|message| message == "registry serving")
            && messages.iter().any(|message| message == "shutting down"),
        "{messages:?}"
    );
}

/// A service opts out of transparent huge pages unless `runtime.transparent_huge_pages` says
/// otherwise (the kernel shows the process's switch as `THP_enabled` in /proc/PID/status).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_opts_out_of_transparent_huge_pages_unless_told() {
    let server = testkit::NatsServer::start().expect("nats-server");
    let url = server.url();
    let mut seen = Vec::new();
    for allowed in [None, Some("true"), Some("false")] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wangge"));
        command
            .args(["serve", "registry", "--instance", "registry-thp"])
            .env_remove("WANGGE_CONFIG")
            .env_remove("WANGGE_RUNTIME__TRANSPARENT_HUGE_PAGES")
            .env_remove("RUST_LOG")
            .env("WANGGE_NATS__URL", &url)
            .env("WANGGE_LOG__FILTER", "warn,async_nats=off")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(allowed) = allowed {
            command.env("WANGGE_RUNTIME__TRANSPARENT_HUGE_PAGES", allowed);
        }
        let mut service = command.spawn().expect("spawn wangge serve registry");
        wait_ready(&url, &mut service).await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", service.id()))
            .expect("read /proc/PID/status");
        let switch = status
            .lines()
            .find_map(|line| line.strip_prefix("THP_enabled:"))
            .map(str::trim)
            .unwrap_or("(no THP_enabled line)")
            .to_owned();
        signal(&service);
        let exit = service.wait().expect("wait");
        assert!(exit.success(), "{exit:?}: {}", stderr_of(&mut service));
        seen.push(format!("{allowed:?}: THP_enabled {switch}"));
    }
    // A kernel built without transparent huge pages shows 0 whatever the process asks.
    let allowed = if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
        1
    } else {
        0
    };
    assert_eq!(
        seen.join("; "),
        format!(
            "None: THP_enabled 0; Some(\"true\"): THP_enabled {allowed}; Some(\"false\"): THP_enabled 0"
        )
    );
}
