//! `wangge partition` and `wangge import osm`: owned by the partition work (not written yet).

#[derive(Debug, clap::Args)]
pub struct PartitionArgs {}

#[derive(Debug, clap::Subcommand)]
pub enum ImportCommand {
    /// Turn an OpenStreetMap extract into wangge GeoJSON (not written yet).
    Osm,
}

pub fn run(_args: PartitionArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wangge partition` is not written yet")
}

pub fn import(_command: ImportCommand) -> anyhow::Result<()> {
    anyhow::bail!("`wangge import osm` is not written yet")
}

#[derive(Debug, clap::Args)]
pub struct BenchPartitionArgs {}

#[derive(Debug, clap::Args)]
pub struct BenchLocateArgs {}

pub fn bench_partition(_args: BenchPartitionArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wangge bench partition` is not written yet")
}

pub fn bench_locate(_args: BenchLocateArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wangge bench locate` is not written yet")
}
