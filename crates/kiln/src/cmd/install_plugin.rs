//! `kiln install-plugin`: makes kiln the docker CLI's buildx plugin by a symlink named
//! `docker-buildx` in a `cli-plugins` directory the CLI reads (default
//! `$DOCKER_CONFIG/cli-plugins`, i.e. `~/.docker/cli-plugins`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use super::buildx::{builders::docker_config_dir, PLUGIN_FILE};
use crate::Globals;

/// Arguments of `kiln install-plugin`.
#[derive(clap::Args, Debug)]
pub struct InstallPluginArgs {
    /// Plugin directory (default: $DOCKER_CONFIG/cli-plugins; system-wide:
    /// /usr/local/lib/docker/cli-plugins or /usr/libexec/docker/cli-plugins)
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Replace a `docker-buildx` that is there already (e.g. Docker's own buildx)
    #[arg(long)]
    force: bool,
    /// Also make `docker build` run kiln (as `docker buildx install` does: the CLI's
    /// `builder` alias)
    #[arg(long = "alias-build")]
    alias_build: bool,
}

/// Runs `kiln install-plugin`: the symlink, and what it did.
pub fn run(args: InstallPluginArgs, _globals: &Globals) -> anyhow::Result<ExitCode> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| docker_config_dir().join("cli-plugins"));
    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .context("finding kiln's own executable")?;
    let link = dir.join(PLUGIN_FILE);
    std::fs::create_dir_all(&dir).with_context(|| format!("--dir {}", dir.display()))?;
    match std::fs::symlink_metadata(&link) {
        Ok(_) if points_at(&link, &exe) => {
            outln!("{} already points at {}", link.display(), exe.display());
        }
        Ok(_) if !args.force => anyhow::bail!(
            "{} exists and is not kiln (Docker's own buildx?); pass --force to replace it",
            link.display()
        ),
        Ok(_) => {
            std::fs::remove_file(&link)
                .with_context(|| format!("removing the old {}", link.display()))?;
            symlink(&exe, &link)?;
            outln!(
                "replaced {} with a symlink to {}",
                link.display(),
                exe.display()
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            symlink(&exe, &link)?;
            outln!("installed {} -> {}", link.display(), exe.display());
        }
        Err(e) => return Err(e).with_context(|| format!("looking at {}", link.display())),
    }
    if args.alias_build {
        let status = std::process::Command::new(&link)
            .args(["buildx", "install"])
            .status()
            .with_context(|| format!("running {} buildx install", link.display()))?;
        if !status.success() {
            anyhow::bail!("`docker buildx install` failed ({status})");
        }
        outln!("`docker build` now runs `docker buildx build` (alias `builder` in the docker CLI's config.json)");
    } else {
        outln!("`docker buildx build` now runs kiln; `docker buildx install` makes `docker build` run it too");
    }
    if args.dir.is_some() && !dir.ends_with("cli-plugins") {
        outln!(
            "note: the docker CLI reads plugins from directories named cli-plugins; {} is not one",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn points_at(link: &Path, exe: &Path) -> bool {
    link.canonicalize().is_ok_and(|p| p == exe)
}

fn symlink(exe: &Path, link: &Path) -> anyhow::Result<()> {
    std::os::unix::fs::symlink(exe, link)
        .with_context(|| format!("creating {} -> {}", link.display(), exe.display()))
}
