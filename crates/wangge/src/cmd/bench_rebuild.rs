//! `wangge bench rebuild`: rebuilding every read model from a long INCIDENTS stream against
//! raw pull-consumer replay of the same stream in the same run (`projection::bench`).

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub struct BenchRebuildArgs {
    /// Events to write at least (synthetic incident lifecycles decided by the domain).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Paired rounds (raw replay, then rebuild); medians are reported.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchRebuildArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.events >= 1, "--events must be at least 1");
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio")?;
    let figures = runtime.block_on(projection::bench::run(
        args.events,
        args.rounds,
        projection::rebuild::REPLAY_CHUNKS_IN_FLIGHT,
        true,
    ))?;
    if args.json {
        println!("{}", serde_json::to_string(&figures)?);
    }
    Ok(())
}
