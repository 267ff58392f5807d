//! kiln as `docker buildx`: the docker CLI plugin `docker-buildx` (kiln's binary installed or
//! symlinked under that name in a `cli-plugins` directory) and `kiln buildx ...`, both
//! serving buildx's commands: `build` (kiln's build), `version`, builder instances (`ls`,
//! `inspect`, `create`, `use`, `rm`, `stop`), `du`, `prune`, `imagetools inspect|create`, and
//! `install`/`uninstall` (the docker CLI's `builder` alias, which sends `docker build` here).
//!
//! The docker CLI runs a plugin as `docker-buildx docker-cli-plugin-metadata` to learn what it
//! is, then as `docker-buildx buildx ARGS...` for `docker buildx ARGS...`
//! (docker/cli's `cli-plugins` protocol, schema 0.1.0).

pub mod builders;
pub mod imagetools;
mod template;

use std::ffi::OsString;
use std::io::BufRead as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::Globals;
use builders::BuilderStore;

/// The file name the docker CLI looks for (`docker-` + the plugin's command name).
pub const PLUGIN_FILE: &str = "docker-buildx";

/// The buildx release whose commands and output kiln serves. Tools gate features on it
/// (docker/build-push-action: `--metadata-file` from 0.6, attestations from 0.10, `--call`
/// from 0.15), so it is the release whose build flags kiln accepts.
pub const BUILDX_COMPAT_VERSION: &str = "0.20.0";

/// The BuildKit release kiln's `inspect` names: attestations (and so build-push-action's
/// default provenance) need 0.11 or later.
pub const BUILDKIT_COMPAT_VERSION: &str = "0.19.0";

/// kiln's own builder: the current one until `docker buildx use` picks another.
pub const DEFAULT_BUILDER: &str = "kiln";

/// `docker buildx`'s root: its options and subcommands.
#[derive(clap::Args, Debug)]
pub struct BuildxArgs {
    /// Builder instance for this command (default: `BUILDX_BUILDER`, else the current one)
    #[arg(long, value_name = "NAME")]
    builder: Option<String>,
    /// Debug logging (accepted; kiln's progress modes say what a build does)
    #[arg(short = 'D', long)]
    debug: bool,
    /// Without one, the help is printed and the exit code is 0, as buildx's (tools such as
    /// docker/setup-buildx-action run a bare `docker buildx` to learn whether buildx is there)
    #[command(subcommand)]
    command: Option<BuildxCommand>,
}

/// The docker CLI's view: `docker buildx ...` parsed on its own, with buildx's name in help
/// and errors.
#[derive(clap::Parser, Debug)]
#[command(
    name = "docker buildx",
    max_term_width = 100,
    about = "Docker Buildx, served by kiln"
)]
struct PluginCli {
    #[command(flatten)]
    args: BuildxArgs,
}

#[derive(clap::Subcommand, Debug)]
enum BuildxCommand {
    /// Start a build (kiln build, with docker-buildx's flags)
    #[command(visible_alias = "b")]
    Build(Box<crate::cmd::build::BuildArgs>),
    /// Show the buildx version kiln serves, and kiln's own
    Version(VersionArgs),
    /// List builder instances
    Ls(builders::LsArgs),
    /// Inspect the current builder instance
    Inspect(builders::InspectArgs),
    /// Create a new builder instance
    Create(builders::CreateArgs),
    /// Set the current builder instance
    Use(builders::UseArgs),
    /// Remove one or more builder instances
    Rm(builders::RmArgs),
    /// Stop a builder instance (kiln runs no daemon: nothing to stop)
    Stop(builders::StopArgs),
    /// Disk usage of kiln's state dir
    Du(DuArgs),
    /// Remove build cache
    Prune(PruneArgs),
    /// Commands to work on images in registries
    Imagetools(imagetools::ImagetoolsArgs),
    /// Make `docker build` run `docker buildx build` (the docker CLI's `builder` alias)
    Install,
    /// Undo `install`
    Uninstall,
}

/// Arguments of `docker buildx version`.
#[derive(clap::Args, Debug)]
struct VersionArgs {
    /// Builder override (accepted)
    #[arg(long, value_name = "NAME")]
    builder: Option<String>,
}

/// The `docker buildx version` line: buildx's shape (`NAME vVERSION REVISION`), naming kiln
/// and carrying the buildx release kiln serves where tools look for it
/// (docker/actions-toolkit reads the first ` vX.Y.Z` of the line).
pub fn version_line() -> String {
    format!(
        "kiln v{BUILDX_COMPAT_VERSION} kiln-{} (docker buildx {BUILDX_COMPAT_VERSION} compatible)",
        env!("CARGO_PKG_VERSION")
    )
}

/// The answer to `docker-buildx docker-cli-plugin-metadata`.
pub fn plugin_metadata() -> serde_json::Value {
    serde_json::json!({
        "SchemaVersion": "0.1.0",
        "Vendor": "kiln",
        "Version": format!("v{BUILDX_COMPAT_VERSION}"),
        "ShortDescription": format!("Docker Buildx (kiln {})", env!("CARGO_PKG_VERSION")),
    })
}

/// What the docker CLI asked of kiln as its plugin.
pub enum PluginCall {
    /// `docker-cli-plugin-metadata`: what the plugin is.
    Metadata,
    /// `docker buildx ARGS...`.
    Command(Box<BuildxArgs>),
}

/// When kiln runs under the plugin's name (`argv[0]` is `docker-buildx`), what it is asked
/// (bad arguments end the process with clap's error, as any command's); `None` when kiln
/// runs as `kiln`.
pub fn plugin_call() -> Option<PluginCall> {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let name = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())?;
    if name != PLUGIN_FILE {
        return None;
    }
    argv.remove(0);
    if argv.first().and_then(|a| a.to_str()) == Some("docker-cli-plugin-metadata") {
        return Some(PluginCall::Metadata);
    }
    // The docker CLI passes the plugin's command name first; run by hand, it is absent.
    if argv.first().and_then(|a| a.to_str()) == Some("buildx") {
        argv.remove(0);
    }
    let cli = <PluginCli as clap::Parser>::parse_from(
        std::iter::once(OsString::from("docker buildx")).chain(argv),
    );
    Some(PluginCall::Command(Box::new(cli.args)))
}

/// Prints the plugin's metadata for the docker CLI.
pub fn print_plugin_metadata() -> ExitCode {
    println!(
        "{}",
        serde_json::to_string_pretty(&plugin_metadata()).unwrap_or_default()
    );
    ExitCode::SUCCESS
}

/// The state dir the plugin was given: `KILN_ROOT` (the docker CLI passes its environment
/// on), else `None` for kiln's default.
pub fn plugin_root() -> Option<std::path::PathBuf> {
    std::env::var_os("KILN_ROOT")
        .filter(|v| !v.is_empty())
        .map(Into::into)
}

impl BuildxArgs {
    /// True for the commands that use the store as `kiln build`, `du` and `prune` do: an
    /// ordinary user's kiln runs them in a user namespace (`docs/rootless.md`).
    pub fn needs_user_namespace(&self) -> bool {
        matches!(
            self.command,
            Some(BuildxCommand::Build(_) | BuildxCommand::Du(_) | BuildxCommand::Prune(_))
        )
    }
}

/// Runs `kiln buildx ...` (and the plugin's commands).
pub fn run(args: BuildxArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let _ = args.debug;
    let root_builder = args.builder;
    let pick = |own: Option<String>| own.or_else(|| root_builder.clone());
    let Some(command) = args.command else {
        let help = <PluginCli as clap::CommandFactory>::command().render_help();
        outln!("{help}");
        return Ok(ExitCode::SUCCESS);
    };
    match command {
        BuildxCommand::Build(build) => {
            // buildx refuses a builder it does not know; kiln builds the same either way.
            let store = BuilderStore::load()?;
            store.find(&store.selected(root_builder.as_deref()))?;
            crate::cmd::build::run(*build, globals)
        }
        BuildxCommand::Version(v) => {
            let _ = v.builder;
            outln!("{}", version_line());
            Ok(ExitCode::SUCCESS)
        }
        BuildxCommand::Ls(a) => builders::ls(a, globals),
        BuildxCommand::Inspect(mut a) => {
            a.builder = pick(a.builder.take());
            builders::inspect(a, globals)
        }
        BuildxCommand::Create(a) => builders::create(a, globals),
        BuildxCommand::Use(a) => builders::use_builder(a, globals),
        BuildxCommand::Rm(mut a) => {
            a.builder = pick(a.builder.take());
            builders::rm(a, globals)
        }
        BuildxCommand::Stop(mut a) => {
            a.builder = pick(a.builder.take());
            builders::stop(a, globals)
        }
        BuildxCommand::Du(a) => du(a, globals),
        BuildxCommand::Prune(a) => prune(a, globals),
        BuildxCommand::Imagetools(a) => imagetools::run(a, globals),
        BuildxCommand::Install => install_alias(),
        BuildxCommand::Uninstall => uninstall_alias(),
    }
}

/// Arguments of `docker buildx du`.
#[derive(clap::Args, Debug)]
struct DuArgs {
    /// Filter (accepted; kiln shows the whole state dir by kind)
    #[arg(long, value_name = "FILTER")]
    filter: Vec<String>,
    /// Per-record detail (accepted; kiln shows totals by kind)
    #[arg(long)]
    verbose: bool,
    /// Builder override (accepted)
    #[arg(long, value_name = "NAME")]
    builder: Option<String>,
}

fn du(args: DuArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let _ = (args.filter, args.verbose, args.builder);
    crate::cmd::state::run_du(crate::cmd::state::DuArgs {}, globals)
}

/// Arguments of `docker buildx prune`.
#[derive(clap::Args, Debug)]
struct PruneArgs {
    /// Remove all cache records, not only unused ones
    #[arg(short, long)]
    all: bool,
    /// Do not prompt for confirmation
    #[arg(short, long)]
    force: bool,
    /// `until=DURATION`: remove cache not used for longer than DURATION
    #[arg(long, value_name = "until=DURATION")]
    filter: Vec<String>,
    /// Keep at most this much cache (e.g. `10GB`)
    #[arg(long = "keep-storage", value_name = "SIZE")]
    keep_storage: Option<String>,
    /// Same as --keep-storage (buildx 0.17's spelling)
    #[arg(
        long = "max-used-space",
        value_name = "SIZE",
        conflicts_with = "keep_storage"
    )]
    max_used_space: Option<String>,
    /// Per-record detail (accepted; kiln prints the totals)
    #[arg(long)]
    verbose: bool,
    /// Builder override (accepted)
    #[arg(long, value_name = "NAME")]
    builder: Option<String>,
}

fn prune(args: PruneArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let _ = (args.verbose, args.builder);
    if !args.force {
        eprint!("WARNING! This will remove kiln's unused build cache. Are you sure you want to continue? [y/N] ");
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .context("reading the answer from standard input (pass -f to skip the question)")?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let keep = args.keep_storage.or(args.max_used_space);
    crate::cmd::state::run_prune(
        crate::cmd::state::PruneArgs::new(keep, args.filter, args.all),
        globals,
    )
}

/// The docker CLI's config file, read as JSON (an absent file is an empty object).
fn read_docker_config(path: &Path) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    match std::fs::read(path) {
        Ok(b) if b.iter().all(u8::is_ascii_whitespace) => Ok(Default::default()),
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            Ok(_) => anyhow::bail!("{} is not a JSON object", path.display()),
            Err(e) => Err(e).with_context(|| format!("parsing {}", path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_docker_config(
    path: &Path,
    config: serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut bytes = serde_json::to_vec_pretty(&serde_json::Value::Object(config))?;
    bytes.push(b'\n');
    kiln_fs::write_atomic(path, &bytes, kiln_fs::Durability::Fsync)
        .with_context(|| format!("writing {}", path.display()))
}

/// `docker buildx install`: `"aliases": {"builder": "buildx"}` in the docker CLI's config,
/// which makes the CLI run `docker build` as `docker buildx build` (every other key kept).
fn install_alias() -> anyhow::Result<ExitCode> {
    let path = kiln_oci::DockerConfig::default_path();
    let mut config = read_docker_config(&path)?;
    let aliases = config
        .entry("aliases")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    match aliases {
        serde_json::Value::Object(m) => {
            m.insert("builder".into(), "buildx".into());
        }
        _ => anyhow::bail!("{}: \"aliases\" is not a JSON object", path.display()),
    }
    write_docker_config(&path, config)?;
    Ok(ExitCode::SUCCESS)
}

/// `docker buildx uninstall`: removes the `builder` alias again.
fn uninstall_alias() -> anyhow::Result<ExitCode> {
    let path = kiln_oci::DockerConfig::default_path();
    let mut config = read_docker_config(&path)?;
    let now_empty = match config.get_mut("aliases") {
        Some(serde_json::Value::Object(m)) => {
            if m.remove("builder").is_none() {
                return Ok(ExitCode::SUCCESS);
            }
            m.is_empty()
        }
        _ => return Ok(ExitCode::SUCCESS),
    };
    if now_empty {
        config.remove("aliases");
    }
    write_docker_config(&path, config)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docker/actions-toolkit's `Buildx.parseVersion`: the first whitespace, an optional `v`,
    /// then seven hex digits or digits and dots.
    fn toolkit_version(line: &str) -> Option<String> {
        let bytes: Vec<char> = line.chars().collect();
        for i in 0..bytes.len() {
            if !bytes[i].is_whitespace() {
                continue;
            }
            let mut j = i + 1;
            if bytes.get(j) == Some(&'v') {
                j += 1;
            }
            let hex: String = bytes[j..].iter().take(7).collect();
            if hex.len() == 7
                && hex
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            {
                return Some(hex);
            }
            let num: String = bytes[j..]
                .iter()
                .take_while(|c| c.is_ascii_digit() || **c == '.')
                .collect();
            if !num.is_empty() {
                return Some(num);
            }
        }
        None
    }

    #[test]
    fn version_line_gives_tools_the_buildx_release_and_names_kiln() {
        let line = version_line();
        assert!(line.starts_with("kiln v"), "{line}");
        assert_eq!(
            toolkit_version(&line).as_deref(),
            Some(BUILDX_COMPAT_VERSION)
        );
    }

    #[test]
    fn plugin_metadata_has_the_schema_the_docker_cli_checks() {
        let m = plugin_metadata();
        assert_eq!(m["SchemaVersion"], "0.1.0");
        assert_eq!(m["Vendor"], "kiln");
        assert!(m["ShortDescription"].as_str().unwrap().contains("kiln"));
    }
}
