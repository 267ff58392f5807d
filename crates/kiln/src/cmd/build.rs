//! `kiln build`.

use std::process::ExitCode;

use crate::Globals;

/// Arguments of `kiln build`.
#[derive(clap::Args)]
pub struct BuildArgs {}

/// Runs `kiln build`.
pub fn run(_args: BuildArgs, _globals: &Globals) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kiln build` is not implemented yet")
}
