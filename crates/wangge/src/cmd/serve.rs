//! `wangge up` and `wangge serve <service>` (not written yet).

use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct UpArgs {}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {}

pub fn up(_settings: &Settings, _args: UpArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wangge up` is not written yet")
}

pub fn serve(_settings: &Settings, _args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wangge serve` is not written yet")
}
