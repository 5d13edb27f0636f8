//! `wangge bench store`: the event store against raw JetStream in the same run.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use eventstore::{
    AggregateId, Commit, CommitMeta, EventStore, Position, PostcardCodec, ReplayRange, StreamSpec,
};
use serde::{Deserialize, Serialize};

use super::bench::median;

/// Aggregates (independent writers) in flight at once, as in DESIGN.md's reference figure.
const AGGREGATES_IN_FLIGHT_DEFAULT: usize = 1_000;
/// Replays per side, alternating raw and store.
const REPLAY_ROUNDS: usize = 5;
/// Append rounds per side, alternating raw and store.
const APPEND_ROUNDS: usize = 4;
/// Payload bytes of the benchmark event (a typical incident event is 100-300 bytes).
const EVENT_NOTE_BYTES: usize = 160;

#[derive(Debug, clap::Args)]
pub struct BenchStoreArgs {
    /// Commits to append on each side (raw and store).
    #[arg(long, default_value_t = 200_000)]
    commits: usize,
    /// Aggregates written concurrently; each writes its commits one after another.
    #[arg(long, default_value_t = AGGREGATES_IN_FLIGHT_DEFAULT)]
    aggregates: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BenchEvent {
    amount: u64,
    note: String,
}

type Codec = PostcardCodec<BenchEvent>;

#[derive(Debug, Serialize)]
struct StoreFigures {
    commits: usize,
    aggregates_in_flight: usize,
    commit_bytes: usize,
    append_per_s: f64,
    raw_append_per_s: f64,
    append_ratio: f64,
    replay_per_s: f64,
    raw_replay_per_s: f64,
    replay_ratio: f64,
    nats_server: String,
}

pub fn run(args: BenchStoreArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.commits >= args.aggregates,
        "--commits must be at least --aggregates"
    );
    anyhow::ensure!(args.aggregates >= 1, "--aggregates must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio")?;
    runtime.block_on(bench(args))
}

fn meta() -> CommitMeta {
    CommitMeta {
        correlation_id: uuid::Uuid::now_v7(),
        causation_id: uuid::Uuid::now_v7(),
        actor: "bench:store".to_owned(),
        occurred_at_ms: 1_767_225_600_000,
        traceparent: None,
    }
}

async fn bench(args: BenchStoreArgs) -> anyhow::Result<()> {
    let server = testkit::NatsServer::start().context("start a private nats-server")?;
    let binary = testkit::nats_server_binary().context("find nats-server")?;
    let client = async_nats::connect(server.url()).await.context("connect")?;
    let context = jetstream::new(client);
    let per_aggregate = args.commits / args.aggregates;
    let commits = per_aggregate.div_ceil(APPEND_ROUNDS) * APPEND_ROUNDS * args.aggregates;
    eprintln!(
        "bench store: {commits} commits per side, {} aggregates in flight, nats-server at {}",
        args.aggregates,
        server.url()
    );

    let store: EventStore<Codec> = EventStore::open(
        context.clone(),
        StreamSpec::named("BENCH_STORE", "bench"),
        PostcardCodec::new("bench"),
    )
    .await
    .context("open store stream")?;
    let raw_spec = StreamSpec::named("BENCH_RAW", "raw");
    EventStore::<Codec>::open(context.clone(), raw_spec, PostcardCodec::new("bench"))
        .await
        .context("open raw stream")?;

    // One real commit tells the raw side the exact bytes to publish.
    let sample_id = AggregateId::new("sample").expect("valid id");
    let event = BenchEvent {
        amount: 1,
        note: "x".repeat(EVENT_NOTE_BYTES),
    };
    store
        .append(
            &sample_id,
            &Position::NEW,
            &Commit::new("sample", vec![event.clone()], meta()),
        )
        .await
        .context("sample append")?;
    let stored = context
        .get_stream("BENCH_STORE")
        .await?
        .direct_get(1)
        .await
        .context("read sample")?;
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in stored.headers.iter() {
        if !name.to_string().starts_with("Nats-") {
            for value in values {
                headers.insert(name.to_string().as_str(), value.as_str());
            }
        }
    }
    let commit_bytes = stored.payload.len();
    let raw_payload = stored.payload.clone();

    // Alternate raw and store rounds so that each store round has a raw round beside it under
    // the same machine load; report medians of the rates and of the paired ratios.
    let per_round = per_aggregate.div_ceil(APPEND_ROUNDS).max(1);
    let mut raw_rates = Vec::with_capacity(APPEND_ROUNDS);
    let mut store_rates = Vec::with_capacity(APPEND_ROUNDS);
    for round in 0..APPEND_ROUNDS {
        let cpu = process_cpu_seconds();
        let raw = raw_append_round(
            &context,
            &headers,
            &raw_payload,
            round,
            args.aggregates,
            per_round,
        )
        .await?;
        let raw_cpu_us = (process_cpu_seconds() - cpu) * 1e6 / (per_round * args.aggregates) as f64;
        let cpu = process_cpu_seconds();
        let stored = store_append_round(&store, &event, round, args.aggregates, per_round).await?;
        let store_cpu_us =
            (process_cpu_seconds() - cpu) * 1e6 / (per_round * args.aggregates) as f64;
        eprintln!(
            "  append round {}: raw {raw:>8.0}/s ({raw_cpu_us:.1} us client CPU), store {stored:>8.0}/s ({store_cpu_us:.1} us), ratio {:.2}",
            round + 1,
            stored / raw
        );
        raw_rates.push(raw);
        store_rates.push(stored);
    }
    let raw_append_per_s = median(&raw_rates);
    let append_per_s = median(&store_rates);
    let append_ratio = median(&paired_ratios(&store_rates, &raw_rates));

    // Replay the store's stream: raw pull consumer (no decoding) against the store's replay.
    let until = store.last_sequence().await?;
    let stream = context.get_stream("BENCH_STORE").await?;
    let mut raw_rates = Vec::with_capacity(REPLAY_ROUNDS);
    let mut store_rates = Vec::with_capacity(REPLAY_ROUNDS);
    for round in 0..REPLAY_ROUNDS {
        let started = Instant::now();
        let count = raw_replay(&stream, until).await?;
        let raw = count as f64 / started.elapsed().as_secs_f64();

        let started = Instant::now();
        let mut count: u64 = 0;
        store
            .replay(
                ReplayRange {
                    until_sequence: Some(until),
                    ..ReplayRange::default()
                },
                |commit| {
                    count += commit.events.len() as u64;
                },
            )
            .await?;
        anyhow::ensure!(
            count == until,
            "store replay saw {count} events, expected {until}"
        );
        let replayed = count as f64 / started.elapsed().as_secs_f64();
        eprintln!(
            "  replay round {}: raw {raw:>8.0}/s, store {replayed:>8.0}/s, ratio {:.2}",
            round + 1,
            replayed / raw
        );
        raw_rates.push(raw);
        store_rates.push(replayed);
    }
    let raw_replay_per_s = median(&raw_rates);
    let replay_per_s = median(&store_rates);
    let replay_ratio = median(&paired_ratios(&store_rates, &raw_rates));

    let figures = StoreFigures {
        commits,
        aggregates_in_flight: args.aggregates,
        commit_bytes,
        append_per_s,
        raw_append_per_s,
        append_ratio,
        replay_per_s,
        raw_replay_per_s,
        replay_ratio,
        nats_server: binary.display().to_string(),
    };
    println!(
        "append: store {:.0}/s vs raw {:.0}/s (medians), paired ratio {:.2} (target >= 0.80)",
        figures.append_per_s, figures.raw_append_per_s, figures.append_ratio
    );
    println!(
        "replay: store {:.0}/s vs raw {:.0}/s (medians), paired ratio {:.2} (target >= 0.70)",
        figures.replay_per_s, figures.raw_replay_per_s, figures.replay_ratio
    );
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    }
    drop(context);
    drop(server);
    Ok(())
}

/// Raw JetStream: the same bytes, expected subject sequence and Msg-Id, same concurrency.
async fn raw_append_round(
    context: &jetstream::Context,
    headers: &async_nats::HeaderMap,
    payload: &bytes::Bytes,
    round: usize,
    aggregates: usize,
    per_aggregate: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(aggregates);
    for aggregate in 0..aggregates {
        let context = context.clone();
        let headers = headers.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let subject = format!("raw.ev.r{round}a{aggregate}");
            let mut last_sequence = 0;
            for n in 0..per_aggregate {
                let publish = jetstream::message::PublishMessage::build()
                    .headers(headers.clone())
                    .payload(payload.clone())
                    .message_id(format!("r{round}a{aggregate}/{n}"))
                    .expected_last_subject_sequence(last_sequence);
                let ack = context
                    .send_publish(subject.clone(), publish)
                    .await?
                    .await?;
                last_sequence = ack.sequence;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((aggregates * per_aggregate) as f64 / started.elapsed().as_secs_f64())
}

/// The store: encode, hash chain, expected sequence, Msg-Id, ack.
async fn store_append_round(
    store: &EventStore<Codec>,
    event: &BenchEvent,
    round: usize,
    aggregates: usize,
    per_aggregate: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(aggregates);
    for aggregate in 0..aggregates {
        let store = store.clone();
        let event = event.clone();
        tasks.push(tokio::spawn(async move {
            let id = AggregateId::new(format!("r{round}a{aggregate}")).expect("valid id");
            let mut position = Position::NEW;
            for n in 0..per_aggregate {
                let commit = Commit::new(
                    format!("c{n}"),
                    vec![BenchEvent {
                        amount: n as u64,
                        ..event.clone()
                    }],
                    meta(),
                );
                position = store.append(&id, &position, &commit).await?.position;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((aggregates * per_aggregate) as f64 / started.elapsed().as_secs_f64())
}

/// Reads `1..=until` with a no-ack pull consumer in batches of 1,000, without decoding.
async fn raw_replay(stream: &jetstream::stream::Stream, until: u64) -> anyhow::Result<u64> {
    use futures::StreamExt as _;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1_000)
        .messages()
        .await?;
    let mut count = 0;
    while let Some(message) = messages.next().await {
        let message = message?;
        count += 1;
        if message
            .info()
            .map_err(|error| anyhow::anyhow!("{error}"))?
            .stream_sequence
            >= until
        {
            break;
        }
    }
    Ok(count)
}

fn paired_ratios(numerators: &[f64], denominators: &[f64]) -> Vec<f64> {
    numerators
        .iter()
        .zip(denominators)
        .map(|(n, d)| n / d)
        .collect()
}

/// User + system CPU seconds this process has used (from /proc/self/stat; 0 elsewhere).
fn process_cpu_seconds() -> f64 {
    const CLOCK_TICKS_PER_S: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is 0, utime is 11, stime is 12.
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / CLOCK_TICKS_PER_S
}
