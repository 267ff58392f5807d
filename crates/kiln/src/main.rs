//! The `kiln` command: thin wiring from the command line to the library crates.

mod cmd;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln_exec::probe::Isolation;

/// kiln builds container images from Dockerfiles, fast, with its layer cache in any OCI
/// registry, and ships an OCI registry of its own.
#[derive(Parser)]
#[command(name = "kiln", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    /// State directory (content store, snapshots, cache DB). Default: /var/lib/kiln as root,
    /// $XDG_DATA_HOME/kiln (else ~/.local/share/kiln) otherwise, rootless.
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

impl Command {
    /// True for the commands that mount, unpack layers or delete snapshots: an ordinary user's
    /// kiln runs them in a user namespace (rootless mode, `docs/rootless.md`).
    fn needs_user_namespace(&self) -> bool {
        match self {
            Command::Build(_) | Command::Import(_) | Command::Du(_) | Command::Prune(_) => true,
            Command::Debug(a) => a.needs_user_namespace(),
            Command::Buildx(a) => a.needs_user_namespace(),
            Command::Registry(_)
            | Command::History(_)
            | Command::Login(_)
            | Command::Logout(_)
            | Command::InstallPlugin(_) => false,
        }
    }
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
    kiln_exec::userns::rootless_state_dir().unwrap_or_else(|| PathBuf::from("/var/lib/kiln"))
}

/// An ordinary user's kiln (or root's without CAP_SYS_ADMIN, as in an unprivileged
/// container): runs this same command again in a user namespace (uid 0 inside is the user,
/// 1.. its /etc/subuid range; root maps its own ids) and returns its exit code.
fn run_rootless(root: Option<PathBuf>) -> ExitCode {
    // The child is uid 0 inside, so it cannot tell the user's state dir: decide it here.
    // SAFETY (edition 2021: safe): kiln has one thread until it starts the child.
    std::env::set_var("KILN_ROOT", root.unwrap_or_else(default_root));
    let mapping = kiln_exec::userns::mapping_for_current_user();
    if let Some(n) = mapping.own_ids {
        eprintln!(
            "kiln: root without CAP_SYS_ADMIN (an unprivileged container?): building in a user \
             namespace that maps ids 0..{n} onto themselves"
        );
    }
    if mapping.single_uid() {
        let user = kiln_exec::userns::user_name(mapping.uid);
        eprintln!(
            "kiln: WARNING: rootless single-uid mode: {user} has no range in /etc/subuid and /etc/subgid, \
             so builds see only uid 0 and gid 0. Files of other users (COPY --chown, USER steps, \
             base image files not owned by root) become root-owned, and image digests differ from a \
             root build. Add `{user}:100000:65536` to /etc/subuid and /etc/subgid (`kiln debug env` \
             shows what this machine allows)."
        );
    }
    match kiln_exec::userns::run_in_user_namespace(&mapping) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("kiln: error: rootless mode: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Decides how this run isolates RUN steps (once, while kiln has one thread) and records
/// the decision in `KILN_ISOLATION` for the worker (and a rootless child). Returns the exit
/// code when this process is done: an error, or the rootless child's status. `announce`:
/// print the chroot warning (the commands that run RUN steps).
fn enter_isolation(
    requested: Result<Isolation, String>,
    root: Option<PathBuf>,
    announce: bool,
) -> Option<ExitCode> {
    let choice = match requested.and_then(kiln_exec::probe::choose_isolation) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kiln: error: {e} (`kiln debug env` shows what this environment allows)");
            return Some(ExitCode::FAILURE);
        }
    };
    // SAFETY (edition 2021: safe): kiln has one thread until it starts the child.
    std::env::set_var(Isolation::ENV, choice.isolation.as_str());
    if announce && choice.isolation == Isolation::Chroot {
        eprintln!(
            "kiln: WARNING: chroot isolation ({}): RUN steps run in a chroot and share this \
             container's network, processes, IPC, hostname and root privileges (minus \
             CAP_SYS_CHROOT); `kiln debug env` says what would allow namespaces",
            choice.reason
        );
    }
    choice.user_namespace.then(|| run_rootless(root))
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> ExitCode {
    // First, while kiln has one thread: kiln's rootless child enters its user namespace.
    let rootless = match kiln_exec::userns::enter_as_child() {
        Ok(child) => child,
        Err(err) => {
            eprintln!("kiln: error: rootless mode: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Installed as `docker-buildx`, kiln is the docker CLI's buildx plugin.
    if let Some(call) = cmd::buildx::plugin_call() {
        let args = match call {
            cmd::buildx::PluginCall::Metadata => return cmd::buildx::print_plugin_metadata(),
            cmd::buildx::PluginCall::Command(args) => args,
        };
        let root = cmd::buildx::plugin_root();
        if !rootless && args.needs_user_namespace() {
            let requested = Isolation::from_env();
            if let Some(code) = enter_isolation(requested, root.clone(), true) {
                return code;
            }
        }
        let globals = Globals {
            root: root.unwrap_or_else(default_root),
        };
        return finish(cmd::buildx::run(*args, &globals));
    }
    let cli = Cli::parse();
    if !rootless && cli.command.needs_user_namespace() {
        let requested = match &cli.command {
            Command::Build(args) => match args.isolation.as_deref() {
                Some(v) => v.parse().map_err(|e: String| format!("--isolation: {e}")),
                None => Isolation::from_env(),
            },
            _ => Isolation::from_env(),
        };
        let announce = matches!(cli.command, Command::Build(_));
        if let Some(code) = enter_isolation(requested, cli.root.clone(), announce) {
            return code;
        }
    }
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
