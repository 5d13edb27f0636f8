//! `wangge bench ...` (not written yet).

use crate::config::Settings;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Event store appends and replay against raw JetStream.
    Store,
}

pub fn run(_settings: &Settings, _command: BenchCommand) -> anyhow::Result<()> {
    anyhow::bail!("benchmarks are not written yet")
}
