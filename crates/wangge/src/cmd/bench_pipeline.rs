//! `wangge bench pipeline`: incidents through intake → dispatch → projection, as deployed
//! (each service its own `wangge serve` process on a private nats-server), against raw acked
//! JetStream publishes of the same payloads in the same run; then the latency from a resident's
//! publish to the handler's `assigned` notification at a fixed rate, split into its hops by
//! the times nats-server stored the incident's commits.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use async_nats::jetstream;
use futures::StreamExt as _;
use serde::Serialize;
use simulation::{CityPlan, ResidentPlan};

use super::children::Services;

/// Issue #6's targets: incidents per second against raw publishes, and the p99 from
/// submission to notification at 1,000 reports/s.
const RATIO_TARGET: f64 = 0.1;
const P99_TARGET_MS: f64 = 25.0;

/// Longest wait for the read models to show every incident dispatched.
const PIPELINE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for the last notification of the latency phase.
const NOTIFICATIONS_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for every consumer to catch up between the two phases.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Streams whose consumers must have caught up before the latency phase.
const SETTLE_STREAMS: [&str; 3] = [
    "SUBMISSIONS",
    "INCIDENTS",
    dispatch::notify::NOTIFICATIONS_STREAM,
];

/// Waits until no consumer of `streams` (e.g. [`SETTLE_STREAMS`]) has messages pending or
/// unacknowledged, so that a latency phase measures the steady state, not a backlog.
pub(crate) async fn settle(context: &jetstream::Context, streams: &[&str]) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let mut behind = Vec::new();
        for &name in streams {
            let stream = context
                .get_stream(name)
                .await
                .with_context(|| format!("open stream {name}"))?;
            let mut consumers = stream.consumers();
            while let Some(info) = consumers.next().await {
                let info = info.with_context(|| format!("list consumers of {name}"))?;
                if info.num_pending > 0 || info.num_ack_pending > 0 {
                    behind.push(format!(
                        "{name}/{}: {} pending, {} unacknowledged",
                        info.name, info.num_pending, info.num_ack_pending
                    ));
                }
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "consumers still behind after {SETTLE_TIMEOUT:?}: {}",
            behind.join("; ")
        );
        tokio::time::sleep(POLL_EVERY * 5).await;
    }
}

/// Every stream's last sequence: how many messages each has stored so far.
async fn stored_by_stream(
    context: &jetstream::Context,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let mut stored = std::collections::BTreeMap::new();
    let mut streams = context.streams();
    while let Some(info) = streams.next().await {
        let info = info.context("list streams")?;
        stored.insert(info.config.name, info.state.last_sequence);
    }
    Ok(stored)
}

/// `after - before` per stream, divided by `per`, for streams that stored anything.
fn show_stored(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    per: u64,
) -> String {
    after
        .iter()
        .filter_map(|(name, last)| {
            let stored = last.saturating_sub(before.get(name).copied().unwrap_or(0));
            (stored > 0).then(|| format!("{name} {:.2}", stored as f64 / per.max(1) as f64))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Poll interval of the read models while the pipeline drains.
const POLL_EVERY: Duration = Duration::from_millis(20);

#[derive(Debug, clap::Args)]
pub struct BenchPipelineArgs {
    /// Reports for the throughput phase (and raw messages).
    #[arg(long, default_value_t = 20_000)]
    reports: u64,
    /// Reports per second in the latency phase.
    #[arg(long, default_value_t = 1_000.0)]
    latency_rate: f64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 5)]
    latency_seconds: u64,
    /// Write every latency sample to this CSV file (one row per report, in the order sent:
    /// when it was sent, its latency and its three hops, in milliseconds), to see whether the
    /// tail comes in bursts (a stall) or is spread over the run (scheduling), and when.
    #[arg(long, value_name = "FILE")]
    samples_out: Option<std::path::PathBuf>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct PipelineFigures {
    reports: u64,
    /// Reports that became incidents (the rest were refused, e.g. outside every community).
    incidents: u64,
    payload_bytes: usize,
    incidents_per_s: f64,
    /// The median of `raw_publish_rounds_per_s`.
    raw_publish_per_s: f64,
    raw_publish_rounds_per_s: Vec<f64>,
    ratio: f64,
    latency_rate_per_s: f64,
    latency_samples: usize,
    p50_ms: f64,
    p99_ms: f64,
    /// The latency split by where each sample's time went.
    hops: LatencyHops,
    /// Messages the server received and sent (`/varz`) per raw publish, in the raw phase
    /// (`null` if the server's monitoring endpoint did not answer).
    server_messages_per_raw_publish: Option<MessagesPer>,
    /// ... per incident, in the throughput phase (every service's publishes, acks, deliveries
    /// and key-value writes, and the benchmark's own polling of the read models): the ratio's
    /// bound, since the server's work grows with the messages it handles.
    server_messages_per_incident: Option<MessagesPer>,
    /// ... per report of the latency phase (publish of the first to the last notification).
    server_messages_per_latency_report: Option<MessagesPer>,
    nats_server: String,
}

#[derive(Debug, Serialize)]
struct MessagesPer {
    #[serde(rename = "in")]
    received: f64,
    #[serde(rename = "out")]
    sent: f64,
}

impl MessagesPer {
    fn of(
        counts: Option<(testkit::MessageCounts, testkit::MessageCounts)>,
        units: u64,
    ) -> Option<MessagesPer> {
        let (before, after) = counts?;
        let counted = after.since(&before);
        let units = units.max(1) as f64;
        Some(MessagesPer {
            received: counted.in_msgs as f64 / units,
            sent: counted.out_msgs as f64 / units,
        })
    }

    /// `a in + b out`, or `unknown` when the server's counters could not be read.
    fn show(per: &Option<MessagesPer>) -> String {
        per.as_ref().map_or_else(
            || "unknown".to_owned(),
            |per| format!("{:.1} in + {:.1} out", per.received, per.sent),
        )
    }
}

/// The latency phase split at the times nats-server stored the incident's commits (its clock
/// and the benchmark's are the same host's).
#[derive(Debug, Serialize)]
struct LatencyHops {
    /// Publish → the filing commit stored on INCIDENTS (intake).
    to_filed: Percentiles,
    /// Filing commit stored → the dispatch commit stored (dispatch's follower and decision);
    /// zero since intake routes a filing in its own commit, kept for filings dispatch routes.
    to_dispatched: Percentiles,
    /// Dispatch commit stored → the `assigned` notification received (dispatch's notifier).
    to_notified: Percentiles,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
}

impl Percentiles {
    fn of(mut values: Vec<f64>) -> Percentiles {
        values.sort_by(f64::total_cmp);
        Percentiles {
            samples: values.len(),
            p50_ms: super::bench::percentile(&values, 0.50),
            p99_ms: super::bench::percentile(&values, 0.99),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p50 {:.1} ms, p99 {:.1} ms", self.p50_ms, self.p99_ms)
    }
}

/// Milliseconds from `earlier` to `later` (negative if the clock says `later` came first).
fn millis_between(earlier: SystemTime, later: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(gap) => gap.as_secs_f64() * 1e3,
        Err(error) => -error.duration().as_secs_f64() * 1e3,
    }
}

/// When each latency sample's commits were stored: scans INCIDENTS after `after_sequence`
/// and splits every sample that has its filing commit (the first on its subject) and the
/// dispatch commit its notification names.
async fn latency_hops(
    context: &jetstream::Context,
    after_sequence: u64,
    samples: &[Option<Sample>],
    index_of: &HashMap<uuid::Uuid, usize>,
) -> anyhow::Result<(LatencyHops, Vec<HopRow>)> {
    let mut stream = context
        .get_stream("INCIDENTS")
        .await
        .context("open INCIDENTS")?;
    let last = stream
        .info()
        .await
        .context("INCIDENTS info")?
        .state
        .last_sequence;
    let mut filed_at: Vec<Option<SystemTime>> = vec![None; samples.len()];
    let mut stored_at: HashMap<u64, SystemTime> = HashMap::new();
    let wanted: std::collections::HashSet<u64> = samples
        .iter()
        .flatten()
        .map(|sample| sample.dispatch_sequence)
        .collect();
    if last > after_sequence {
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after_sequence + 1,
                },
                ..Default::default()
            })
            .await
            .context("INCIDENTS reader")?;
        let mut messages = consumer.messages().await.context("read INCIDENTS")?;
        while let Some(message) = messages.next().await {
            let message = message.context("read INCIDENTS")?;
            let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            let (sequence, at) = (info.stream_sequence, SystemTime::from(info.published));
            if wanted.contains(&sequence) {
                stored_at.insert(sequence, at);
            }
            let incident = message
                .subject
                .rsplit('.')
                .next()
                .and_then(|id| uuid::Uuid::parse_str(id).ok());
            if let Some(&index) = incident.and_then(|id| index_of.get(&id))
                && filed_at[index].is_none()
            {
                filed_at[index] = Some(at);
            }
            if sequence >= last {
                break;
            }
        }
    }
    let rows: Vec<HopRow> = samples
        .iter()
        .zip(filed_at)
        .filter_map(|(sample, filed)| {
            let (sample, filed) = (sample.as_ref()?, filed?);
            let dispatched = *stored_at.get(&sample.dispatch_sequence)?;
            Some(HopRow {
                sent: sample.sent,
                total_ms: millis_between(sample.sent, sample.received),
                to_filed_ms: millis_between(sample.sent, filed),
                to_dispatched_ms: millis_between(filed, dispatched),
                to_notified_ms: millis_between(dispatched, sample.received),
            })
        })
        .collect();
    let hop = |of: fn(&HopRow) -> f64| Percentiles::of(rows.iter().map(of).collect());
    let hops = LatencyHops {
        to_filed: hop(|row| row.to_filed_ms),
        to_dispatched: hop(|row| row.to_dispatched_ms),
        to_notified: hop(|row| row.to_notified_ms),
    };
    Ok((hops, rows))
}

/// One latency sample split into its hops, for `--samples-out`.
#[derive(Debug, Clone, Copy)]
struct HopRow {
    sent: SystemTime,
    total_ms: f64,
    to_filed_ms: f64,
    to_dispatched_ms: f64,
    to_notified_ms: f64,
}

/// Writes `rows` (in the order sent) as CSV. `sent_unix_ms` is the wall-clock time the report
/// was sent (milliseconds since the Unix epoch), to line the samples up with the services' logs.
fn write_samples(path: &std::path::Path, rows: &[HopRow]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
    let mut write = || -> std::io::Result<()> {
        writeln!(
            out,
            "sent_unix_ms,total_ms,to_filed_ms,to_dispatched_ms,to_notified_ms"
        )?;
        for row in rows {
            writeln!(
                out,
                "{:.3},{:.3},{:.3},{:.3},{:.3}",
                millis_between(SystemTime::UNIX_EPOCH, row.sent),
                row.total_ms,
                row.to_filed_ms,
                row.to_dispatched_ms,
                row.to_notified_ms
            )?;
        }
        out.flush()
    };
    write().with_context(|| format!("write {}", path.display()))
}

/// One latency sample's wall-clock ends and the INCIDENTS sequence of its dispatch commit.
#[derive(Debug, Clone, Copy)]
struct Sample {
    sent: SystemTime,
    received: SystemTime,
    dispatch_sequence: u64,
}

pub fn run(args: BenchPipelineArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.reports >= 1, "--reports must be at least 1");
    anyhow::ensure!(args.latency_rate > 0.0, "--latency-rate must be positive");
    let server = testkit::NatsServer::start().context("start a private nats-server")?;
    let binary = testkit::nats_server_binary().context("find nats-server")?;
    let url = server.url();
    let mut services = Services::default();
    let owned = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    services.spawn("registry", &owned(&["serve", "registry"]), &url, None)?;
    // Every report is its own incident: the benchmark measures filing, not merging.
    services.spawn(
        "intake",
        &owned(&["serve", "intake", "--dedup-radius-m", "0"]),
        &url,
        None,
    )?;
    services.spawn("dispatch", &owned(&["serve", "dispatch"]), &url, None)?;
    services.spawn("projection", &owned(&["serve", "projection"]), &url, None)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio")?;
    let figures = runtime.block_on(super::children::until_signalled(bench(
        &args,
        &server,
        &mut services,
        binary.display().to_string(),
    )));
    services.stop();
    drop(server);
    let figures = figures?;
    eprintln!(
        "pipeline {:.0} incidents/s vs raw {:.0} publishes/s, ratio {:.3} (target >= {RATIO_TARGET}: {}); at {:.0} reports/s: p50 {:.1} ms, p99 {:.1} ms (target <= {P99_TARGET_MS} ms: {})",
        figures.incidents_per_s,
        figures.raw_publish_per_s,
        figures.ratio,
        super::bench::verdict(figures.ratio >= RATIO_TARGET),
        figures.latency_rate_per_s,
        figures.p50_ms,
        figures.p99_ms,
        super::bench::verdict(figures.p99_ms <= P99_TARGET_MS),
    );
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    }
    Ok(())
}

/// `count` reports of the seeded residents whose point the registry serves (a point jittered
/// off a community's edge would be refused as outside every community, and the benchmark
/// measures filing, not refusing).
async fn payloads(
    client: &async_nats::Client,
    city: &[simulation::PlannedCommunity],
    policy: &domain::Policy,
    seed: u64,
    count: u64,
) -> anyhow::Result<Vec<(String, bytes::Bytes)>> {
    let plan = ResidentPlan {
        seed,
        submissions: count + count / 4 + 16,
        residents: u64::MAX,
        repeat_share: 0.0,
        invalid_share: 0.0,
        ..ResidentPlan::default()
    };
    let mut kept = Vec::with_capacity(count as usize);
    for mut submission in simulation::residents::submissions(city, policy, plan) {
        // Every report goes out on `intake.submit.app` (one subject, as the raw publishes
        // it is compared with), so it says so: intake refuses a channel other than the
        // subject's (`channel_mismatch`).
        submission.channel = intake::wire::Channel::App;
        if kept.len() as u64 == count {
            break;
        }
        let intake::wire::Location::Point(point) = submission.location else {
            continue;
        };
        let answer = client
            .request(
                "grids.locate",
                serde_json::to_vec(&serde_json::json!({"lon": point.lon, "lat": point.lat}))?
                    .into(),
            )
            .await
            .context("grids.locate")?;
        let answer: serde_json::Value = serde_json::from_slice(&answer.payload)?;
        if answer["status"] == "served" {
            kept.push((
                submission.submission_id.clone(),
                serde_json::to_vec(&submission)?.into(),
            ));
        }
    }
    anyhow::ensure!(
        kept.len() as u64 == count,
        "only {} of {count} seeded reports fall inside a community",
        kept.len()
    );
    Ok(kept)
}

async fn bench(
    args: &BenchPipelineArgs,
    server: &testkit::NatsServer,
    services: &mut Services,
    nats_server: String,
) -> anyhow::Result<PipelineFigures> {
    let url = &server.url();
    let client = async_nats::connect(url).await.context("connect")?;
    let context = jetstream::new(client.clone());
    services.wait_ready(&client, |_, _| {}).await?;
    let policy = domain::Policy::embedded("sanming").context("policy")?;
    let city = simulation::plan_city(CityPlan {
        seed: 1,
        streets: 1,
        communities_per_street: 2,
        buildings_per_community: 80,
    });
    simulation::register_city(&client, &city, |_, _| {})
        .await
        .context("register the benchmark city")?;
    // Let intake's in-process registry catch up with the grids.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let throughput = payloads(&client, &city, &policy, 1, args.reports).await?;
    let payload_bytes = throughput.first().map_or(0, |(_, payload)| payload.len());
    eprintln!(
        "bench pipeline: {} reports of {payload_bytes} bytes through 4 service processes, nats-server at {url}",
        args.reports
    );

    // Raw: the same payloads, acked JetStream publishes to a plain limits stream.
    let counts_before = server.message_counts();
    let raw_rounds = super::bench_intake::raw_publish_rounds(&context, &throughput).await?;
    let raw_publish_per_s = super::bench::median(&raw_rounds);
    let raw_counts = counts_before.zip(server.message_counts());

    // Pipeline: until the read models show every report as an incident, none left undispatched.
    let models = loop {
        if let Some(models) = projection::ReadModels::current(&context).await? {
            break models;
        }
        tokio::time::sleep(POLL_EVERY).await;
    };
    let before = models.totals().await?.incidents;
    // Receipts say how many reports became incidents (a point jittered off a community's
    // edge is rightly refused as outside every community).
    let mut receipts = client
        .subscribe(format!("{}>", intake::wire::SUBJECT_RECEIPTS_PREFIX))
        .await
        .context("subscribe receipts")?;
    client.flush().await?;
    let reports = args.reports;
    let receipt_counter = tokio::spawn(async move {
        let (mut filed, mut other) = (0u64, 0u64);
        while let Ok(Some(message)) = tokio::time::timeout(PIPELINE_TIMEOUT, receipts.next()).await
        {
            let receipt: serde_json::Value =
                serde_json::from_slice(&message.payload).unwrap_or_default();
            if receipt["status"] == "filed" {
                filed += 1;
            } else {
                other += 1;
            }
            if filed + other >= reports {
                break;
            }
        }
        (filed, other, Instant::now())
    });
    let stored_before = stored_by_stream(&context).await?;
    let counts_before = server.message_counts();
    let started = Instant::now();
    super::bench_intake::publish_all(&context, "intake.submit.app", &throughput).await?;
    let published = started.elapsed();
    let deadline = started + PIPELINE_TIMEOUT;
    let mut last_progress = Instant::now();
    let mut receipt_counter = Some(receipt_counter);
    let mut filed: Option<u64> = None;
    let elapsed = loop {
        let totals = models.totals().await?;
        let waiting: u64 = ["reported", "filed"]
            .iter()
            .filter_map(|status| totals.by_status.get(*status))
            .sum();
        if let Some(counter) = &receipt_counter
            && counter.is_finished()
        {
            let (count, other, at) = receipt_counter
                .take()
                .expect("checked above")
                .await
                .context("receipt counter")?;
            eprintln!(
                "  intake: {count} filed, {other} refused; receipts took {:.2} s",
                (at - started).as_secs_f64()
            );
            filed = Some(count);
        }
        if let Some(filed) = filed
            && totals.incidents >= before + filed
            && waiting == 0
        {
            break started.elapsed();
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!(
                "  {:>5.1} s: read models {} incidents, {waiting} not yet dispatched",
                started.elapsed().as_secs_f64(),
                totals.incidents - before
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pipeline did not drain within {PIPELINE_TIMEOUT:?}: {} incidents in the read models, {waiting} undispatched, receipts {filed:?}",
            totals.incidents - before,
        );
        services.check_alive()?;
        tokio::time::sleep(POLL_EVERY).await;
    };
    let pipeline_counts = counts_before.zip(server.message_counts());
    let stored_after = stored_by_stream(&context).await?;
    let filed = filed.unwrap_or(0);
    let incidents_per_s = filed as f64 / elapsed.as_secs_f64();
    let server_messages_per_raw_publish = MessagesPer::of(
        raw_counts,
        args.reports * super::bench_intake::RAW_ROUNDS as u64,
    );
    let server_messages_per_incident = MessagesPer::of(pipeline_counts, filed);
    eprintln!(
        "  pipeline: {incidents_per_s:.0} incidents/s dispatched and projected (publishing took {:.2} s)",
        published.as_secs_f64()
    );
    eprintln!(
        "  server messages: {} per incident, {} per raw publish",
        MessagesPer::show(&server_messages_per_incident),
        MessagesPer::show(&server_messages_per_raw_publish)
    );

    eprintln!(
        "  stored per incident by stream: {}",
        show_stored(&stored_before, &stored_after, filed)
    );

    // The latency phase measures the steady state, not the tail of the burst above: wait
    // until every consumer of the pipeline's streams has caught up.
    let settle_started = Instant::now();
    settle(&context, &SETTLE_STREAMS).await?;
    eprintln!(
        "  settled: every consumer caught up {:.1} s after the drain",
        settle_started.elapsed().as_secs_f64()
    );

    // Latency at a fixed rate: publish → the handler's `assigned` notification.
    let count = (args.latency_rate * args.latency_seconds as f64).round() as u64;
    let latency = payloads(&client, &city, &policy, 2, count).await?;
    let mut notifications = client
        .subscribe(format!("{}.>", dispatch::notify::NOTIFY_SUBJECT_PREFIX))
        .await
        .context("subscribe notifications")?;
    client.flush().await?;
    let expected: HashMap<uuid::Uuid, usize> = latency
        .iter()
        .enumerate()
        .map(|(index, (id, _))| (intake::incident_id_for(id).0, index))
        .collect();
    let incidents_before = context
        .get_stream("INCIDENTS")
        .await
        .context("open INCIDENTS")?
        .info()
        .await
        .context("INCIDENTS info")?
        .state
        .last_sequence;
    type SentAt = Vec<Option<(Instant, SystemTime)>>;
    let sent_at: std::sync::Arc<std::sync::Mutex<SentAt>> =
        std::sync::Arc::new(std::sync::Mutex::new(vec![None; latency.len()]));
    let receiver = {
        let sent_at = sent_at.clone();
        let expected = expected.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(expected.len());
            let mut samples: Vec<Option<Sample>> = vec![None; expected.len()];
            let mut seen = std::collections::HashSet::new();
            while seen.len() < expected.len() {
                let message =
                    match tokio::time::timeout(NOTIFICATIONS_TIMEOUT, notifications.next()).await {
                        Ok(Some(message)) => message,
                        _ => break,
                    };
                let received = Instant::now();
                let received_wall = SystemTime::now();
                let Ok(notification) =
                    serde_json::from_slice::<dispatch::Notification>(&message.payload)
                else {
                    continue;
                };
                if notification.kind != "assigned" {
                    continue;
                }
                if let Some(&index) = expected.get(&notification.incident)
                    && seen.insert(index)
                {
                    let sent = sent_at.lock().unwrap_or_else(|e| e.into_inner())[index];
                    if let Some((sent, sent_wall)) = sent {
                        latencies.push((received - sent).as_secs_f64() * 1e3);
                        samples[index] = Some(Sample {
                            sent: sent_wall,
                            received: received_wall,
                            dispatch_sequence: notification.stream_sequence,
                        });
                    }
                }
            }
            (latencies, samples)
        })
    };
    let latency_counts_before = server.message_counts();
    let period = Duration::from_secs_f64(1.0 / args.latency_rate);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut pending = futures::stream::FuturesUnordered::new();
    for (index, (id, payload)) in latency.iter().enumerate() {
        ticker.tick().await;
        while let Some(Some(ack)) = futures::FutureExt::now_or_never(pending.next()) {
            let _: jetstream::publish::PublishAck = ack?;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        sent_at.lock().unwrap_or_else(|e| e.into_inner())[index] =
            Some((Instant::now(), SystemTime::now()));
        let future = context
            .publish_with_headers("intake.submit.app".to_owned(), headers, payload.clone())
            .await
            .context("publish")?;
        pending.push(async move { future.await.map_err(anyhow::Error::from) });
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    let (latencies, samples) = receiver.await.context("notification receiver")?;
    let server_messages_per_latency_report = MessagesPer::of(
        latency_counts_before.zip(server.message_counts()),
        latency.len() as u64,
    );
    anyhow::ensure!(
        latencies.len() == latency.len(),
        "only {} of {} reports reached their handler's notification",
        latencies.len(),
        latency.len()
    );
    let (hops, rows) = latency_hops(&context, incidents_before, &samples, &expected).await?;
    if let Some(path) = &args.samples_out {
        write_samples(path, &rows)?;
        eprintln!(
            "  {} latency samples written to {}",
            rows.len(),
            path.display()
        );
    }
    eprintln!(
        "  latency by hop: to filed {}; to dispatched {}; to notified {}",
        hops.to_filed, hops.to_dispatched, hops.to_notified
    );
    eprintln!(
        "  server messages: {} per report at that rate",
        MessagesPer::show(&server_messages_per_latency_report)
    );
    let overall = Percentiles::of(latencies);
    Ok(PipelineFigures {
        reports: args.reports,
        incidents: filed,
        payload_bytes,
        incidents_per_s,
        raw_publish_per_s,
        raw_publish_rounds_per_s: raw_rounds,
        ratio: incidents_per_s / raw_publish_per_s,
        latency_rate_per_s: args.latency_rate,
        latency_samples: overall.samples,
        p50_ms: overall.p50_ms,
        p99_ms: overall.p99_ms,
        hops,
        server_messages_per_raw_publish,
        server_messages_per_incident,
        server_messages_per_latency_report,
        nats_server,
    })
}
