//! `wangge bench ...`: every figure is printed beside raw NATS measured in the same run.

use crate::config::Settings;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Event store appends and replay against raw JetStream.
    Store,
    /// Partition a seeded synthetic city (offline).
    Partition(super::partition::BenchPartitionArgs),
    /// Point-in-grid lookups over a synthetic city (offline).
    Locate(super::partition::BenchLocateArgs),
}

pub fn run(_settings: &Settings, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Store => anyhow::bail!("`wangge bench store` is not written yet"),
        BenchCommand::Partition(args) => super::partition::bench_partition(args),
        BenchCommand::Locate(args) => super::partition::bench_locate(args),
    }
}
