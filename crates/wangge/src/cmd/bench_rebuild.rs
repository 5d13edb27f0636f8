//! `wangge bench rebuild` (being written: issue #6).

#[derive(Debug, clap::Args)]
pub struct BenchRebuildArgs {}

pub fn run(_args: BenchRebuildArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wangge bench rebuild` is not yet written (issue #6)")
}
