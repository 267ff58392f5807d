//! The `kiln` command: thin wiring from the command line to the library crates.

mod cmd;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kiln builds container images from Dockerfiles, fast, with its layer cache in any OCI
/// registry, and ships an OCI registry of its own.
#[derive(Parser)]
#[command(name = "kiln", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    /// State directory (content store, snapshots, cache DB). Default: /var/lib/kiln as root,
    /// $XDG_DATA_HOME/kiln otherwise.
    #[arg(long, global = true, env = "KILN_ROOT", value_name = "DIR")]
    root: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an image from a Dockerfile (buildctl and docker-buildx spellings both work)
    Build(Box<cmd::build::BuildArgs>),
    /// Run or maintain kiln's OCI registry
    Registry(cmd::registry::RegistryArgs),
    /// Inspect and check kiln's local state
    Debug(cmd::debug::DebugArgs),
    /// List, inspect, compare and report recorded builds
    History(cmd::history::HistoryArgs),
    /// Import a root filesystem (directory or tar) as an image in the local store
    Import(cmd::import::ImportArgs),
    /// Show the state dir's disk usage by kind
    Du(cmd::state::DuArgs),
    /// Remove build cache not in use (never what a running build holds)
    Prune(cmd::state::PruneArgs),
    /// Log in to a registry (stores credentials in Docker's config.json)
    Login(cmd::login::LoginArgs),
    /// Log out of a registry
    Logout(cmd::login::LogoutArgs),
    /// docker-buildx's commands (what the docker CLI plugin serves): build, version, ls,
    /// inspect, create, use, rm, du, prune, imagetools, install
    Buildx(cmd::buildx::BuildxArgs),
    /// Install kiln as the docker CLI plugin `docker-buildx` (a symlink)
    InstallPlugin(cmd::install_plugin::InstallPluginArgs),
}

/// Options every subcommand sees.
pub struct Globals {
    /// The state directory, resolved.
    pub root: PathBuf,
}

fn default_root() -> PathBuf {
    if nix_is_root() {
        return PathBuf::from("/var/lib/kiln");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("kiln");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/kiln"),
        None => PathBuf::from("/var/lib/kiln"),
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> ExitCode {
    // Installed as `docker-buildx`, kiln is the docker CLI's buildx plugin.
    if let Some(code) = cmd::buildx::run_as_plugin() {
        return code;
    }
    let cli = Cli::parse();
    let globals = Globals {
        root: cli.root.unwrap_or_else(default_root),
    };
    let result = match cli.command {
        Command::Build(args) => cmd::build::run(*args, &globals),
        Command::Registry(args) => cmd::registry::run(args, &globals),
        Command::Debug(args) => cmd::debug::run(args, &globals),
        Command::History(args) => cmd::history::run(args, &globals),
        Command::Import(args) => cmd::import::run(args, &globals),
        Command::Du(args) => cmd::state::run_du(args, &globals),
        Command::Prune(args) => cmd::state::run_prune(args, &globals),
        Command::Login(args) => cmd::login::run_login(args, &globals),
        Command::Logout(args) => cmd::login::run_logout(args, &globals),
        Command::Buildx(args) => cmd::buildx::run(args, &globals),
        Command::InstallPlugin(args) => cmd::install_plugin::run(args, &globals),
    };
    finish(result)
}

/// The exit code of a command's result; an error is printed first.
fn finish(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kiln: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
