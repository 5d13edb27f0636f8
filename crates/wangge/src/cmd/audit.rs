//! `wangge audit ...` (being written: issue #6).

use crate::config::Settings;

/// Audit the event log: timelines, hash-chain verification, exports.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Walk every aggregate's hash chain.
    Verify,
}

pub fn run(_settings: &Settings, _command: AuditCommand) -> anyhow::Result<()> {
    anyhow::bail!("`wangge audit` is not yet written (issue #6)")
}
