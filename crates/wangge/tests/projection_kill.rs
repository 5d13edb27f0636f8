//! `wangge serve projection` killed with SIGKILL while commits are being appended, restarted:
//! the KV read models equal a pure fold of the stream (nothing counted twice, nothing lost).
//! Then `wangge projection rebuild` swaps to generation 2 under the running builder, and
//! `wangge projection as-of --sequence` replays into its own bucket.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventstore::{BoundedContext, EventStore, StreamSpec};
use projection::ReadModels;
use projection::synthetic::{self, Synthetic};

const WAIT_MAX: Duration = Duration::from_secs(60);

fn wangge(url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wangge"));
    command
        .env_remove("WANGGE_CONFIG")
        .env("WANGGE_NATS__URL", url)
        .env("WANGGE_CITY", "sanming")
        .env("WANGGE_LOG__FILTER", "warn");
    command
}

fn spawn_builder(url: &str) -> Child {
    wangge(url)
        .args(["serve", "projection"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn wangge serve projection")
}

fn run_json(url: &str, args: &[&str]) -> serde_json::Value {
    let output = wangge(url).args(args).output().expect("run wangge");
    assert!(
        output.status.success(),
        "wangge {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("one JSON line")
}

/// The models a pure fold gives, as compared (see `projection::compare`).
async fn models_of_fold(
    store: &EventStore<codecs::IncidentCodec>,
    until: Option<u64>,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    comparable(
        projection::compare::fold_of_incidents(store, until)
            .await
            .unwrap(),
    )
}

/// Values as compared with a fold: GRIDS-derived compliance out (see `projection::compare`).
fn comparable(
    models: std::collections::BTreeMap<String, serde_json::Value>,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    projection::compare::comparable(models)
        .into_iter()
        .filter(|(key, _)| !key.starts_with("compliance."))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_counts_nothing_twice() {
    let server = testkit::NatsServer::start().unwrap();
    let url = server.url();
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    let store = EventStore::open(
        jetstream.clone(),
        StreamSpec::for_context(BoundedContext::Incidents, 1, Duration::from_secs(120)),
        codecs::IncidentCodec,
    )
    .await
    .unwrap();
    let mut generator = Synthetic::new(31, Synthetic::default_grids(2, 2, 2));
    let histories: Vec<_> = (0..600).map(|n| generator.incident(n)).collect();

    let mut builder = spawn_builder(&url);
    let appending = {
        let store = store.clone();
        tokio::spawn(async move { synthetic::append_histories(&store, &histories, 20).await })
    };
    // Kill once the builder has stored some of the stream and more is still arriving.
    let started = std::time::Instant::now();
    loop {
        let reached = match ReadModels::current(&jetstream).await {
            Ok(Some(models)) => models.checkpoint().await.unwrap().incidents_sequence,
            _ => 0,
        };
        if reached >= 300 {
            break;
        }
        assert!(started.elapsed() < WAIT_MAX, "the builder stored nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    builder.kill().unwrap(); // SIGKILL: no final flush, no acks
    let _ = builder.wait();
    appending.await.unwrap().unwrap();
    let last = store.last_sequence().await.unwrap();
    let mut builder = spawn_builder(&url);
    let models = ReadModels::current(&jetstream).await.unwrap().unwrap();
    let checkpoint = models.wait_for(last, 0, WAIT_MAX).await.unwrap();
    assert!(checkpoint.incidents_sequence >= last, "{checkpoint:?}");
    let stored = comparable(models.dump().await.unwrap());
    assert!(
        stored == models_of_fold(&store, None).await,
        "KV differs from the pure fold after kill -9 and restart"
    );
    assert_eq!(models.totals().await.unwrap().incidents, 600);

    // Rebuild under the running builder; it follows to generation 2.
    let report = run_json(&url, &["projection", "rebuild", "--json"]);
    assert_eq!(report["generation"], 2);
    assert_eq!(report["incidents_sequence"], last);
    let models = ReadModels::current(&jetstream).await.unwrap().unwrap();
    assert_eq!(models.generation(), 2);
    assert!(comparable(models.dump().await.unwrap()) == models_of_fold(&store, None).await);

    // As of a sequence: its own bucket, exactly the commits up to it.
    let cut = last / 3;
    let as_of = run_json(
        &url,
        &[
            "projection",
            "as-of",
            "--sequence",
            &cut.to_string(),
            "--json",
        ],
    );
    assert_eq!(as_of["report"]["incidents_sequence"], cut);
    let bucket = as_of["report"]["bucket"].as_str().unwrap().to_owned();
    let replayed = ReadModels::open_bucket(&jetstream, 0, &bucket)
        .await
        .unwrap();
    assert!(comparable(replayed.dump().await.unwrap()) == models_of_fold(&store, Some(cut)).await);

    // As of scores with the weights of `[projection]`, like the service (it used equal ones).
    let weighted = wangge(&url)
        .env("WANGGE_PROJECTION__WEIGHT_RESPONSE", "3")
        .args([
            "projection",
            "as-of",
            "--sequence",
            &last.to_string(),
            "--json",
        ])
        .output()
        .expect("run wangge projection as-of");
    assert!(
        weighted.status.success(),
        "{}",
        String::from_utf8_lossy(&weighted.stderr)
    );
    let weighted: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&weighted.stdout)
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let weighted_bucket = weighted["report"]["bucket"].as_str().unwrap().to_owned();
    let scorecards: Vec<serde_json::Value> =
        ReadModels::open_bucket(&jetstream, 0, &weighted_bucket)
            .await
            .unwrap()
            .dump()
            .await
            .unwrap()
            .into_iter()
            .filter(|(key, _)| key.starts_with("scorecard."))
            .map(|(_, value)| value)
            .collect();
    assert!(!scorecards.is_empty());
    for scorecard in &scorecards {
        assert_eq!(
            scorecard["weights"],
            serde_json::json!({"response": 3.0, "resolution": 1.0, "satisfaction": 1.0})
        );
    }
    let dropped = wangge(&url)
        .args(["projection", "drop-as-of", &weighted_bucket])
        .output()
        .unwrap();
    assert!(dropped.status.success());

    // `status` lists the as-of bucket; `drop-as-of` deletes it, and only it.
    let listed = run_json(&url, &["projection", "status"]);
    assert_eq!(listed["as_of_buckets"], serde_json::json!([bucket]));
    let dropped = wangge(&url)
        .args(["projection", "drop-as-of", &bucket])
        .output()
        .expect("run wangge");
    assert!(dropped.status.success());
    assert_eq!(
        String::from_utf8_lossy(&dropped.stdout).trim(),
        format!("dropped {bucket}")
    );
    assert!(jetstream.get_key_value(&bucket).await.is_err());
    let again = wangge(&url)
        .args(["projection", "drop-as-of", &bucket])
        .output()
        .expect("run wangge");
    assert!(!again.status.success(), "a missing bucket is an error");
    assert_eq!(
        ReadModels::current(&jetstream)
            .await
            .unwrap()
            .unwrap()
            .generation(),
        2
    );

    let _ = Command::new("kill")
        .args(["-TERM", &builder.id().to_string()])
        .status();
    let status = builder.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM ends the builder cleanly: {status}"
    );
}
