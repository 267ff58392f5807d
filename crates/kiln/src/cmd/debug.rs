//! `kiln debug`.

use std::process::ExitCode;

use crate::Globals;

/// Arguments of `kiln debug`.
#[derive(clap::Args)]
pub struct DebugArgs {}

/// Runs `kiln debug`.
pub fn run(_args: DebugArgs, _globals: &Globals) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kiln debug` is not implemented yet")
}
