//! `wangge bench rebuild`: rebuilding every read model from a long INCIDENTS stream, against
//! raw pull-consumer replay of the same stream in the same run, on a private nats-server.

use std::time::Instant;

use async_nats::jetstream::consumer;
use eventstore::{BoundedContext, EventStore, StreamSpec};
use futures::StreamExt as _;
use serde::Serialize;

use crate::synthetic::{self, Synthetic};

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[error("bench rebuild: {0}")]
pub struct BenchError(String);

impl From<String> for BenchError {
    fn from(reason: String) -> Self {
        BenchError(reason)
    }
}

macro_rules! from_error {
    ($($t:ty),*) => {$(
        impl From<$t> for BenchError {
            fn from(error: $t) -> Self {
                BenchError(error.to_string())
            }
        }
    )*};
}
from_error!(
    eventstore::OpenError,
    eventstore::LoadError,
    eventstore::AppendError,
    crate::RebuildError,
    async_nats::Error,
    async_nats::ConnectError,
    async_nats::jetstream::context::GetStreamError,
    async_nats::jetstream::stream::ConsumerError,
    async_nats::jetstream::consumer::StreamError,
    async_nats::jetstream::consumer::pull::MessagesError
);

struct Args {
    events: u64,
    rounds: usize,
}

/// Appends in flight while the bench writes the stream (as intake and dispatch would).
const WRITES_IN_FLIGHT: usize = 1_000;
/// Messages per pull request of the raw replay (as the rebuild's replay).
const RAW_BATCH_MAX: usize = crate::rebuild::REPLAY_BATCH_MAX;
/// Incidents generated at most (a bound on the generator's loop).
const INCIDENTS_MAX: u64 = 10_000_000;

/// What `wangge bench rebuild` prints.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildFigures {
    pub events: u64,
    pub commits: u64,
    pub incidents: u64,
    /// Events per second rebuilding every read model into a fresh generation (replay, fold,
    /// KV writes, checkpoint, pointer swap).
    pub events_per_s: f64,
    /// Events per second of a raw pull consumer (no acks, batches of 1,000) over the same
    /// stream, counting each message's events from its header.
    pub raw_replay_per_s: f64,
    pub ratio: f64,
    pub rebuild_s: Vec<f64>,
    pub raw_replay_s: Vec<f64>,
    pub keys_written: u64,
    /// Seconds spent writing the stream (not part of the ratio).
    pub write_s: f64,
    pub nats_server: String,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Reads the whole stream with a raw pull consumer; returns the events counted.
async fn raw_replay(
    jetstream: &async_nats::jetstream::Context,
    stream_name: &str,
    last: u64,
) -> Result<u64, BenchError> {
    let stream = jetstream.get_stream(stream_name).await?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            deliver_policy: consumer::DeliverPolicy::All,
            inactive_threshold: std::time::Duration::from_secs(30),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(RAW_BATCH_MAX)
        .messages()
        .await?;
    let mut events = 0u64;
    let mut reached = 0u64;
    while reached < last {
        let message = messages
            .next()
            .await
            .ok_or_else(|| BenchError::from("raw replay ended".to_owned()))??;
        reached = message
            .info()
            .map_err(|e| BenchError::from(e.to_string()))?
            .stream_sequence;
        events +=
            eventstore::stored_event_count(message.headers.as_ref(), &message.payload).unwrap_or(1);
    }
    let _ = stream.delete_consumer(&consumer.cached_info().name).await;
    Ok(events)
}

/// Writes at least `events` events to a private nats-server, then measures `rounds` paired
/// rounds of raw replay and rebuild. Progress goes to stderr.
pub async fn run(
    events: u64,
    rounds: usize,
    chunks_in_flight: usize,
    write_during_replay: bool,
) -> Result<RebuildFigures, BenchError> {
    let args = Args {
        events,
        rounds: rounds.max(1),
    };
    let server = testkit::NatsServer::start()
        .map_err(|e| BenchError::from(format!("start a private nats-server: {e}")))?;
    let binary = testkit::nats_server_binary().map_err(|e| BenchError::from(e.to_string()))?;
    let nats_server = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let client = async_nats::connect(server.url()).await?;
    let jetstream = async_nats::jetstream::new(client.clone());
    let incidents_spec = StreamSpec::for_context(
        BoundedContext::Incidents,
        1,
        std::time::Duration::from_secs(120),
    );
    let grids_spec = StreamSpec::for_context(
        BoundedContext::Grids,
        1,
        std::time::Duration::from_secs(120),
    );
    let store = EventStore::open(
        jetstream.clone(),
        incidents_spec.clone(),
        codecs::IncidentCodec,
    )
    .await?;

    // Write the stream: whole lifecycles, in windows of incidents appended concurrently.
    let started = Instant::now();
    let mut synthetic = Synthetic::new(1, Synthetic::default_grids(4, 5, 4));
    let mut written = 0u64;
    let mut incidents = 0u64;
    let window = (WRITES_IN_FLIGHT * 10) as u64;
    while written < args.events && incidents < INCIDENTS_MAX {
        let histories: Vec<_> = (incidents..incidents + window)
            .map(|n| synthetic.incident(n))
            .collect();
        incidents += window;
        written += synthetic::append_histories(&store, &histories, WRITES_IN_FLIGHT).await?;
        eprintln!(
            "written {written} events of {} ({} incidents, {:.0} s)",
            args.events,
            incidents,
            started.elapsed().as_secs_f64()
        );
    }
    let write_s = started.elapsed().as_secs_f64();
    let last = store.last_sequence().await?;
    eprintln!(
        "stream: {written} events in {last} commits, {incidents} incidents, written in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut options = crate::RebuildOptions::new(incidents_spec.clone(), grids_spec);
    options.chunks_in_flight = chunks_in_flight;
    options.write_during_replay = write_during_replay;
    let mut raw_s = Vec::new();
    let mut rebuild_s = Vec::new();
    let mut raw_events = 0;
    let mut report = None;
    for round in 0..args.rounds {
        let started = Instant::now();
        raw_events = raw_replay(&jetstream, &incidents_spec.stream_name, last).await?;
        raw_s.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let rebuilt = crate::rebuild(&jetstream, &options, &crate::NoProgress).await?;
        rebuild_s.push(started.elapsed().as_secs_f64());
        eprintln!(
            "round {}: raw replay {:.2} s, rebuild {:.2} s (generation {}, {} keys)",
            round + 1,
            raw_s[round],
            rebuild_s[round],
            rebuilt.generation,
            rebuilt.keys_written
        );
        eprintln!("  {rebuilt:?}");
        report = Some(rebuilt);
    }
    let report = report.ok_or_else(|| BenchError::from("no round".to_owned()))?;
    if report.events != raw_events {
        return Err(BenchError::from(format!(
            "the rebuild folded {} events but the raw replay counted {raw_events}",
            report.events
        )));
    }
    let events_per_s = report.events as f64 / median(&rebuild_s);
    let raw_replay_per_s = raw_events as f64 / median(&raw_s);
    let figures = RebuildFigures {
        events: report.events,
        commits: report.commits,
        incidents: report.incidents,
        events_per_s,
        raw_replay_per_s,
        ratio: events_per_s / raw_replay_per_s,
        rebuild_s,
        raw_replay_s: raw_s,
        keys_written: report.keys_written,
        write_s,
        nats_server,
    };
    eprintln!(
        "rebuild: {:.0} events/s, raw replay: {:.0} events/s, ratio {:.2} (target >= 0.5)",
        figures.events_per_s, figures.raw_replay_per_s, figures.ratio
    );
    Ok(figures)
}
