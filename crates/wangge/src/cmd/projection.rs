//! `wangge serve projection` and `wangge projection ...` (being written: issue #6).

use crate::config::Settings;

/// Runs the projection builder until SIGINT/SIGTERM.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {}

pub fn serve(_settings: &Settings, _args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wangge serve projection` is not yet written (issue #6)")
}

/// Read-model maintenance: rebuild, replay as of a time or sequence.
#[derive(Debug, clap::Subcommand)]
pub enum ProjectionCommand {
    /// Rebuild every read model from stream sequence 0 into fresh buckets, then swap.
    Rebuild,
}

pub fn run(_settings: &Settings, _command: ProjectionCommand) -> anyhow::Result<()> {
    anyhow::bail!("`wangge projection` is not yet written (issue #6)")
}

/// Creates the projection's buckets (called by `wangge up`).
pub async fn up(_settings: &Settings, _client: &async_nats::Client) -> anyhow::Result<()> {
    Ok(())
}
