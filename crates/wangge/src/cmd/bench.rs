//! `wangge bench ...`: every figure is printed beside raw NATS measured in the same run, on a
//! private nats-server started for the run, so the ratios say what wangge itself costs.

use crate::config::Settings;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Event store appends and replay against raw JetStream, in one run.
    ///
    /// Starts its own nats-server (file storage, temporary directory), then measures: raw
    /// JetStream publishes carrying the same bytes, `Nats-Expected-Last-Subject-Sequence` and
    /// `Nats-Msg-Id` with the same number of aggregates in flight, against `EventStore::append`;
    /// and a raw pull-consumer replay against the store's decoding replay of the same stream.
    Store(super::bench_store::BenchStoreArgs),
    /// Partition a seeded synthetic city (offline).
    Partition(super::partition::BenchPartitionArgs),
    /// Point-in-grid lookups over a synthetic city (offline).
    Locate(super::partition::BenchLocateArgs),
    /// The dispatch service with many open incidents and pending deadlines (own nats-server).
    Dispatch(super::bench_dispatch::BenchDispatchArgs),
    /// Submissions filed end to end by intake against raw acked publishes (own nats-server).
    Intake(super::bench_intake::BenchIntakeArgs),
    /// Rebuilding every read model from a long stream against raw pull-consumer replay.
    Rebuild(super::bench_rebuild::BenchRebuildArgs),
    /// Incidents through intake -> dispatch -> projection against raw JetStream publishes.
    Pipeline(super::bench_pipeline::BenchPipelineArgs),
}

pub fn run(_settings: &Settings, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Store(args) => super::bench_store::run(args),
        BenchCommand::Partition(args) => super::partition::bench_partition(args),
        BenchCommand::Locate(args) => super::partition::bench_locate(args),
        BenchCommand::Dispatch(args) => super::bench_dispatch::run(args),
        BenchCommand::Intake(args) => super::bench_intake::run(args),
        BenchCommand::Rebuild(args) => super::bench_rebuild::run(args),
        BenchCommand::Pipeline(args) => super::bench_pipeline::run(args),
    }
}

/// The median of `values` (the mean of the middle two of an even count).
pub(super) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

/// The value at quantile `p` (0..=1) of `sorted` (ascending), by nearest rank; 0 when empty.
pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    debug_assert!((0.0..=1.0).contains(&p), "quantile out of range");
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// How a benchmark's text line judges a figure against its target, on the exact value (a
/// ratio of 0.0996 printed to three places reads "0.100", which is not 0.1).
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "not met" }
}
