//! `kiln registry`.

use std::process::ExitCode;

use crate::Globals;

/// Arguments of `kiln registry`.
#[derive(clap::Args)]
pub struct RegistryArgs {}

/// Runs `kiln registry`.
pub fn run(_args: RegistryArgs, _globals: &Globals) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`kiln registry` is not implemented yet")
}
