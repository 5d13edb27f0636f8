//! `wangge standards`: owned by the standards work (not written yet).

#[derive(Debug, clap::Args)]
pub struct StandardsArgs {}

pub fn run(_args: StandardsArgs) -> anyhow::Result<()> {
    anyhow::bail!("`wangge standards` is not written yet")
}
