//! `wangge demo`: the end-to-end demonstration (not written yet).

use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {}

pub fn run(_settings: &Settings, _args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wangge demo` is not yet written: it lands with the projection/demo issue")
}
