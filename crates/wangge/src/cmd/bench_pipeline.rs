//! `wangge bench pipeline` (being written: issue #6).

#[derive(Debug, clap::Args)]
pub struct BenchPipelineArgs {}

pub fn run(_args: BenchPipelineArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wangge bench pipeline` is not yet written (issue #6)")
}
