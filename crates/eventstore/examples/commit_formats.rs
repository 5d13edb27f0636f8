//! What a commit's envelope format costs a client: the same commits appended and read back
//! in format 1 (the envelope in headers) and format 2 (in the body), in alternating rounds on
//! a private nats-server. The reason format 2 exists (ARCHITECTURE.md, "Event envelope";
//! figures in docs/BENCHMARKS.md, "Session 24").
//!
//! ```sh
//! cargo run --release -p eventstore --example commit_formats           # 50,000 commits a round
//! cargo run --release -p eventstore --example commit_formats -- 20000
//! ```
//!
//! Client CPU is this process's user + system time (`/proc/self/stat`) per commit, on a
//! one-thread runtime, so it is the client's own cost and not the server's.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use eventstore::{
    AggregateId, Commit, CommitFormat, CommitMeta, EventStore, Position, PostcardCodec, StreamSpec,
};
use futures::StreamExt as _;

/// Appends awaiting their acks at once, as in `wangge bench store`.
const APPENDS_IN_FLIGHT_MAX: usize = 1_000;
/// Alternating rounds of each format.
const ROUNDS: usize = 3;
/// Longest wait for one message while reading back.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

type Codec = PostcardCodec<(u64, String)>;

/// Seconds of CPU this process has used (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    (ticks(11) + ticks(12)) / 100.0
}

fn commit(round: usize, index: usize) -> Commit<(u64, String)> {
    let meta = CommitMeta {
        correlation_id: uuid::Uuid::now_v7(),
        causation_id: uuid::Uuid::now_v7(),
        actor: "system:intake/intake-1".to_owned(),
        occurred_at_ms: 1_767_225_600_000,
        traceparent: None,
    };
    // Four events, as in a filing commit (reported, filed, submission taken, dispatched).
    let events = (0..4)
        .map(|n| {
            (
                n,
                format!("round {round} commit {index} event {n}: {}", "x".repeat(60)),
            )
        })
        .collect();
    Commit::new(format!("c-{round}-{index}"), events, meta)
}

async fn append_round(
    store: &EventStore<Codec>,
    round: usize,
    commits: usize,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let cpu = cpu_seconds();
    let started = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    for index in 0..commits {
        let aggregate = AggregateId::new(format!("a-{round}-{index}"))?;
        let commit = commit(round, index);
        pending.push(async move { store.append(&aggregate, &Position::NEW, &commit).await });
        if pending.len() >= APPENDS_IN_FLIGHT_MAX
            && let Some(appended) = pending.next().await
        {
            appended?;
        }
    }
    while let Some(appended) = pending.next().await {
        appended?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((
        commits as f64 / seconds,
        (cpu_seconds() - cpu) / commits as f64 * 1e6,
    ))
}

/// Reads the whole stream once with a raw pull consumer, reading each commit's event count
/// from its envelope; returns commits per second and client CPU per commit in µs.
async fn read_round(
    context: &jetstream::Context,
    stream_name: &str,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let stream = context.get_stream(stream_name).await?;
    let total = stream.get_info().await?.state.messages;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let cpu = cpu_seconds();
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1_000)
        .messages()
        .await?;
    let mut events = 0u64;
    for _ in 0..total {
        let message = tokio::time::timeout(READ_TIMEOUT, messages.next())
            .await?
            .ok_or("read ended")??;
        events += eventstore::stored_event_count(message.headers.as_ref(), &message.payload)
            .ok_or("not a commit")?;
    }
    assert_eq!(events, total * 4, "every commit holds four events");
    let seconds = started.elapsed().as_secs_f64();
    let _ = stream.delete_consumer(&consumer.cached_info().name).await;
    Ok((
        total as f64 / seconds,
        (cpu_seconds() - cpu) / total as f64 * 1e6,
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let commits: usize = match std::env::args().nth(1) {
        Some(count) => count.parse()?,
        None => 50_000,
    };
    let server = testkit::NatsServer::start()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let client = async_nats::connect(server.url()).await?;
            let context = jetstream::new(client);
            let mut stores = Vec::new();
            for (name, format) in [
                ("HEADERS", CommitFormat::Headers),
                ("BODY", CommitFormat::Body),
            ] {
                let spec = StreamSpec::named(name, &name.to_lowercase());
                let store = EventStore::open(context.clone(), spec, Codec::new("example"))
                    .await?
                    .with_commit_format(format);
                stores.push((name, store));
            }
            for round in 0..ROUNDS {
                for (name, store) in &stores {
                    let (rate, cpu) = append_round(store, round, commits).await?;
                    println!(
                        "append round {round} {name:>7}: {rate:>7.0} commits/s, client {cpu:5.1} µs/commit"
                    );
                }
            }
            for round in 0..ROUNDS {
                for (name, _) in &stores {
                    let (rate, cpu) = read_round(&context, name).await?;
                    println!(
                        "read   round {round} {name:>7}: {rate:>7.0} commits/s, client {cpu:5.1} µs/commit"
                    );
                }
            }
            Ok::<(), Box<dyn std::error::Error>>(())
        })
}
