//! `wangge bench intake`: submissions filed end to end (durable publish → incident commit and
//! receipt stored → receipt announced) against raw JetStream acked publishes of the same
//! payloads, measured in the same run on a private nats-server. Intake and the registry run
//! as `wangge serve` child processes, as a city runs them; this process only loads and counts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::children::Services;
use anyhow::Context as _;
use async_nats::jetstream;
use futures::StreamExt as _;
use serde::Serialize;
use serde_json::json;

/// Issue #4's target: filed per second against raw publishes.
const RATIO_TARGET: f64 = 0.35;

/// Publishes in flight (acks outstanding) on both sides.
const PUBLISHES_IN_FLIGHT_MAX: usize = 1_000;
/// Sequential durable submissions for the latency figures (one at a time, unloaded).
const LATENCY_SAMPLES_DEFAULT: usize = 500;
/// Longest wait for the last receipt of a run.
const RECEIPTS_TIMEOUT: Duration = Duration::from_secs(120);
/// South-west corner of the benchmark community (Sanming) and its side in degrees (~1.6 km).
const ORIGIN: (f64, f64) = (117.60, 26.24);
const SIDE_DEGREES: f64 = 0.016;
/// Buildings on a side of the benchmark community's square lattice.
const BUILDINGS_PER_SIDE: usize = 12;
/// Longest wait for intake to know the benchmark community's grids after the partition.
const GRIDS_KNOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Submission index of the first readiness probe: past any run's own submissions.
const PROBE_INDEX_FIRST: usize = 1 << 40;

#[derive(Debug, clap::Args)]
pub struct BenchIntakeArgs {
    /// Submissions to file (and raw messages to publish).
    #[arg(long, default_value_t = 50_000)]
    submissions: usize,
    /// Sequential submissions for p50/p99 latency.
    #[arg(long, default_value_t = LATENCY_SAMPLES_DEFAULT)]
    latency_samples: usize,
    /// Intake's longest wait (milliseconds) for a batch to fill under load (as in
    /// `wangge serve intake`); 0 decides every batch as it arrives.
    #[arg(
        long,
        default_value_t = intake::BATCH_FILL_WAIT.as_millis() as u64,
        value_parser = clap::value_parser!(u64).range(0..=intake::BATCH_FILL_WAIT_MAX.as_millis() as u64)
    )]
    batch_fill_wait_ms: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct IntakeFigures {
    submissions: usize,
    payload_bytes: usize,
    filed_per_s: f64,
    /// The median of `raw_publish_rounds_per_s`.
    raw_publish_per_s: f64,
    raw_publish_rounds_per_s: Vec<f64>,
    ratio: f64,
    /// The request/reply path: submissions answered "filed" per second (each answer is sent
    /// after its incident commit is stored), against the same raw figure.
    request_filed_per_s: f64,
    request_ratio: f64,
    p50_ms: f64,
    p99_ms: f64,
    latency_samples: usize,
    nats_server: String,
}

pub fn run(args: BenchIntakeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.submissions >= 1, "--submissions must be at least 1");
    let server = testkit::NatsServer::start().context("start a private nats-server")?;
    let url = server.url();
    let mut services = Services::default();
    services.spawn(
        "registry",
        &["serve".to_owned(), "registry".to_owned()],
        &url,
        None,
    )?;
    // Every submission is its own incident: the benchmark measures filing, not merging.
    let intake_args = [
        "serve".to_owned(),
        "intake".to_owned(),
        "--dedup-radius-m".to_owned(),
        "0".to_owned(),
        "--batch-fill-wait-ms".to_owned(),
        args.batch_fill_wait_ms.to_string(),
    ];
    services.spawn("intake", &intake_args, &url, None)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio")?;
    let outcome = runtime.block_on(super::children::until_signalled(bench(
        args,
        &server,
        &mut services,
    )));
    services.stop();
    drop(server);
    outcome
}

fn submission(index: usize, prefix: &str) -> serde_json::Value {
    // Spread over the community, a distinct point (and reporter) for every submission, so
    // nothing merges and no reporter hits the rate limit.
    let golden = 0.618_033_988_749_895_f64;
    let fx = (index as f64 * golden).fract();
    let fy = (index as f64 * golden * golden).fract();
    let lon = ORIGIN.0 + SIDE_DEGREES * (0.02 + 0.96 * fx);
    let lat = ORIGIN.1 + SIDE_DEGREES * (0.02 + 0.96 * fy);
    let category = ["0101", "0102", "0103", "0104"][index % 4];
    json!({
        "submission_id": format!("{prefix}-{index:08}"),
        "kind": "problem_report",
        "category": category,
        "location": {"point": {"lon": lon, "lat": lat}},
        "description": "小区门口垃圾桶满溢，已两天无人清运，气味很大，请尽快处理。",
        "media": [{"sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}],
        "channel": "app",
        "reporter_id": uuid::Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0000 | index as u128),
        "occurred_at": "2026-11-20T08:30:00+08:00"
    })
}

async fn request(
    client: &async_nats::Client,
    subject: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let reply = client
        .request(subject.to_owned(), body.to_string().into())
        .await
        .with_context(|| format!("request {subject}"))?;
    serde_json::from_slice(&reply.payload).context("reply is JSON")
}

/// One square community, a lattice of buildings, partitioned by the registry service; waits
/// until intake files a submission in it (intake follows the grids in its own process).
async fn seed_community(client: &async_nats::Client) -> anyhow::Result<()> {
    let (x, y) = ORIGIN;
    let s = SIDE_DEGREES;
    request(
        client,
        "grids.cmd.register_community",
        json!({
            "command_id": "bench-register", "community_id": "bench", "code": "350402001001",
            "name": "基准社区", "street": "列东街道", "district": "三元区",
            "boundary": [[[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]]
        }),
    )
    .await?;
    let step = s / BUILDINGS_PER_SIDE as f64;
    let mut buildings = Vec::new();
    for row in 0..BUILDINGS_PER_SIDE {
        for column in 0..BUILDINGS_PER_SIDE {
            buildings.push(json!({
                "id": format!("b{row}-{column}"),
                "lon": x + (column as f64 + 0.5) * step,
                "lat": y + (row as f64 + 0.5) * step,
                "households": 40
            }));
        }
    }
    request(
        client,
        "grids.cmd.import_buildings",
        json!({"command_id": "bench-import", "community_id": "bench", "buildings": buildings}),
    )
    .await?;
    let drawn = request(
        client,
        "grids.cmd.partition",
        json!({"command_id": "bench-partition", "community_id": "bench"}),
    )
    .await?;
    anyhow::ensure!(drawn["status"] == "accepted", "partition: {drawn}");
    // A probe (its own id, reporter and point; nothing merges) until intake files it.
    let deadline = Instant::now() + GRIDS_KNOWN_TIMEOUT;
    for attempt in 0usize.. {
        let mut probe = submission(PROBE_INDEX_FIRST + attempt, "probe");
        probe["location"] = json!({"point": {"lon": x + s / 2.0, "lat": y + s / 2.0}});
        let receipt = request(client, intake::wire::SUBJECT_REQUEST, probe).await?;
        if receipt["status"] == "filed" {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "intake did not locate the benchmark community within {GRIDS_KNOWN_TIMEOUT:?}: {receipt}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Publishes every payload with acks awaited, `PUBLISHES_IN_FLIGHT_MAX` outstanding.
pub(crate) async fn publish_all(
    context: &jetstream::Context,
    subject: &str,
    payloads: &[(String, bytes::Bytes)],
) -> anyhow::Result<()> {
    let mut pending = futures::stream::FuturesUnordered::new();
    for (id, payload) in payloads {
        if pending.len() >= PUBLISHES_IN_FLIGHT_MAX
            && let Some(ack) = pending.next().await
        {
            let _: jetstream::publish::PublishAck = ack?;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        let future = context
            .publish_with_headers(subject.to_owned(), headers, payload.clone())
            .await
            .context("publish")?;
        pending.push(async move { future.await.map_err(anyhow::Error::from) });
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    Ok(())
}

/// Rounds of the raw measurement. A round of the pipeline benchmark lasts about a quarter of
/// a second, so one stall of the machine moved a single round by a third; the figure is the
/// median of the rounds, and every round is reported.
pub(crate) const RAW_ROUNDS: usize = 3;

/// The raw side of a benchmark: `payloads` as acked JetStream publishes to a plain limits
/// stream (`BENCH_RAW`, created here), [`RAW_ROUNDS`] times, each round under fresh
/// `Nats-Msg-Id`s so that none is dropped as a duplicate. Returns each round's publishes per
/// second, and prints them.
pub(crate) async fn raw_publish_rounds(
    context: &jetstream::Context,
    payloads: &[(String, bytes::Bytes)],
) -> anyhow::Result<Vec<f64>> {
    context
        .create_stream(jetstream::stream::Config {
            name: "BENCH_RAW".to_owned(),
            subjects: vec!["raw.submit.>".to_owned()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("create raw stream")?;
    let mut rounds = Vec::with_capacity(RAW_ROUNDS);
    for round in 0..RAW_ROUNDS {
        let payloads: Vec<(String, bytes::Bytes)> = payloads
            .iter()
            .map(|(id, payload)| (format!("{id}-raw{round}"), payload.clone()))
            .collect();
        let started = Instant::now();
        publish_all(context, "raw.submit.app", &payloads).await?;
        rounds.push(payloads.len() as f64 / started.elapsed().as_secs_f64());
    }
    eprintln!(
        "  raw acked publishes: {:.0}/s (median of {})",
        super::bench::median(&rounds),
        rounds
            .iter()
            .map(|rate| format!("{rate:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(rounds)
}

/// Sends every payload as a submit request, `PUBLISHES_IN_FLIGHT_MAX` outstanding; counts
/// the answers by `status`.
async fn request_all(
    client: &async_nats::Client,
    payloads: &[bytes::Bytes],
) -> anyhow::Result<HashMap<String, usize>> {
    let mut replies = futures::stream::iter(payloads)
        .map(|payload| client.request(intake::wire::SUBJECT_REQUEST, payload.clone()))
        .buffer_unordered(PUBLISHES_IN_FLIGHT_MAX);
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    while let Some(reply) = replies.next().await {
        let reply = reply.context("submit request")?;
        let receipt: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
        *outcomes
            .entry(receipt["status"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    Ok(outcomes)
}

async fn bench(
    args: BenchIntakeArgs,
    server: &testkit::NatsServer,
    services: &mut Services,
) -> anyhow::Result<()> {
    let binary = testkit::nats_server_binary().context("find nats-server")?;
    let client = async_nats::connect(server.url()).await.context("connect")?;
    let context = jetstream::new(client.clone());
    services.wait_ready(&client, |_, _| {}).await?;
    seed_community(&client).await?;

    let payloads: Vec<(String, bytes::Bytes)> = (0..args.submissions)
        .map(|index| {
            let body = submission(index, "bench");
            (
                body["submission_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                body.to_string().into(),
            )
        })
        .collect();
    let payload_bytes = payloads.first().map_or(0, |(_, payload)| payload.len());
    eprintln!(
        "bench intake: {} submissions of {payload_bytes} bytes, nats-server at {}",
        args.submissions,
        server.url()
    );

    // Raw: the same payloads, acked JetStream publishes to a plain limits stream.
    let raw_rounds = raw_publish_rounds(&context, &payloads).await?;
    let raw_publish_per_s = super::bench::median(&raw_rounds);

    // Intake: publish durably, count receipts announced after the decisions were stored.
    let mut receipts = client
        .subscribe("intake.receipts.>")
        .await
        .context("subscribe receipts")?;
    client.flush().await?;
    let count_receipts = tokio::spawn(async move {
        let mut outcomes: HashMap<String, usize> = HashMap::new();
        let mut received = 0usize;
        while received < args.submissions {
            match tokio::time::timeout(RECEIPTS_TIMEOUT, receipts.next()).await {
                Ok(Some(message)) => {
                    let receipt: serde_json::Value =
                        serde_json::from_slice(&message.payload).unwrap_or_default();
                    *outcomes
                        .entry(receipt["status"].as_str().unwrap_or("?").to_owned())
                        .or_default() += 1;
                    received += 1;
                }
                _ => break,
            }
        }
        (received, outcomes, Instant::now())
    });
    let started = Instant::now();
    publish_all(&context, "intake.submit.app", &payloads).await?;
    let published = started.elapsed();
    let (received, outcomes, last) = count_receipts.await.context("receipt counter")?;
    anyhow::ensure!(
        received == args.submissions,
        "only {received} of {} receipts arrived",
        args.submissions
    );
    anyhow::ensure!(
        outcomes.get("filed") == Some(&args.submissions),
        "not all filed: {outcomes:?}"
    );
    let filed_per_s = args.submissions as f64 / (last - started).as_secs_f64();
    eprintln!(
        "  intake filed: {filed_per_s:.0}/s end to end (publishing took {:.2} s)",
        published.as_secs_f64()
    );

    // The request/reply path: the same kind of payloads, answered after the incident commit
    // is stored; no submission is stored on SUBMISSIONS.
    let request_payloads: Vec<bytes::Bytes> = (0..args.submissions)
        // Indices after the durable and latency ones: other points and reporters, so that
        // nothing merges into the incidents filed before.
        .map(|index| {
            submission(args.submissions + args.latency_samples + index, "request")
                .to_string()
                .into()
        })
        .collect();
    let started = Instant::now();
    let request_outcomes = request_all(&client, &request_payloads).await?;
    let request_filed_per_s = args.submissions as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        request_outcomes.get("filed") == Some(&args.submissions),
        "not all requests filed: {request_outcomes:?}"
    );
    eprintln!("  intake filed by request/reply: {request_filed_per_s:.0}/s");

    // Latency in the steady state: first let intake's consumers (SUBMISSIONS, and its
    // follower of INCIDENTS, which has the phases' commits to read back) catch up.
    let settle_started = Instant::now();
    super::bench_pipeline::settle(&context, &["SUBMISSIONS", "INCIDENTS"]).await?;
    eprintln!(
        "  settled: intake's consumers caught up in {:.1} s",
        settle_started.elapsed().as_secs_f64()
    );
    // Latency: one durable submission at a time, publish → receipt announced (its incident
    // commit and receipt stored).
    let mut latency_receipts = client
        .subscribe("intake.receipts.>")
        .await
        .context("subscribe")?;
    client.flush().await?;
    let mut latencies = Vec::with_capacity(args.latency_samples);
    for index in 0..args.latency_samples {
        let body = submission(args.submissions + index, "latency");
        let id = body["submission_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let sent = Instant::now();
        publish_all(
            &context,
            "intake.submit.app",
            &[(id, body.to_string().into())],
        )
        .await?;
        let message = tokio::time::timeout(RECEIPTS_TIMEOUT, latency_receipts.next())
            .await
            .context("latency receipt timed out")?
            .context("receipts subscription ended")?;
        latencies.push(sent.elapsed().as_secs_f64() * 1e3);
        let receipt: serde_json::Value =
            serde_json::from_slice(&message.payload).unwrap_or_default();
        anyhow::ensure!(
            receipt["status"] == "filed",
            "latency sample not filed: {receipt}"
        );
    }
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| super::bench::percentile(&latencies, p);
    let figures = IntakeFigures {
        submissions: args.submissions,
        payload_bytes,
        filed_per_s,
        raw_publish_per_s,
        raw_publish_rounds_per_s: raw_rounds,
        ratio: filed_per_s / raw_publish_per_s,
        request_filed_per_s,
        request_ratio: request_filed_per_s / raw_publish_per_s,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        latency_samples: latencies.len(),
        nats_server: binary.display().to_string(),
    };
    eprintln!(
        "filed {:.0}/s vs raw {:.0}/s, ratio {:.2} (target >= {RATIO_TARGET}: {}); request/reply {:.0}/s, ratio {:.2}; durable latency p50 {:.2} ms, p99 {:.2} ms",
        figures.filed_per_s,
        figures.raw_publish_per_s,
        figures.ratio,
        super::bench::verdict(figures.ratio >= RATIO_TARGET),
        figures.request_filed_per_s,
        figures.request_ratio,
        figures.p50_ms,
        figures.p99_ms
    );
    services.check_alive()?;
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    }
    Ok(())
}
