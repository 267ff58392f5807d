//! Builder instances as `docker buildx` shows them: `ls`, `inspect`, `create`, `use`, `rm`,
//! `stop`. kiln builds in-process, so every instance is the same builder (driver `kiln`, one
//! node, always running) under another name; an instance records what `create` was given
//! (driver, options, platforms) so `inspect` shows it back, and `use` picks the current one.
//! Instances live in one small JSON file, `$BUILDX_CONFIG/kiln-builders.json` (default
//! `$DOCKER_CONFIG/buildx/`, where buildx keeps its own).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{BUILDKIT_COMPAT_VERSION, DEFAULT_BUILDER};
use crate::Globals;

/// The name buildx gives the Docker daemon's builder; kiln answers to it as well, so a
/// workflow using `driver: docker` (builder `default`) finds a builder.
const DOCKER_DEFAULT_NAME: &str = "default";

/// One builder instance made by `docker buildx create`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BuilderInstance {
    /// The instance's name.
    pub name: String,
    /// The driver `create` asked for (kiln always builds itself; shown as a driver option).
    #[serde(default)]
    pub requested_driver: Option<String>,
    /// `--driver-opt` values as given.
    #[serde(default)]
    pub driver_opts: Vec<String>,
    /// `--buildkitd-flags` as given.
    #[serde(default)]
    pub buildkitd_flags: Option<String>,
    /// `--platform` values as given (shown with `*`, as buildx marks chosen platforms).
    #[serde(default)]
    pub platforms: Vec<String>,
}

/// The instances file: the builders `create` made and the one `use` picked.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BuilderStore {
    /// The current builder's name; `None` means kiln's own.
    #[serde(default)]
    pub current: Option<String>,
    /// Builders made by `create`, in creation order.
    #[serde(default)]
    pub builders: Vec<BuilderInstance>,
}

/// The directory buildx keeps its state in: `$BUILDX_CONFIG`, else `$DOCKER_CONFIG/buildx`,
/// else `~/.docker/buildx`.
pub fn buildx_config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BUILDX_CONFIG").filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    docker_config_dir().join("buildx")
}

/// The docker CLI's config directory: `$DOCKER_CONFIG`, else `~/.docker`.
pub fn docker_config_dir() -> PathBuf {
    let config = kiln_oci::auth::DockerConfig::default_path();
    config
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".docker"))
}

impl BuilderStore {
    fn path() -> PathBuf {
        buildx_config_dir().join("kiln-builders.json")
    }

    /// Reads the instances file (none yet: no instances).
    pub fn load() -> anyhow::Result<Self> {
        let path = Self::path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not kiln's builder list; remove it to start afresh",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the instances file in one piece.
    pub fn save(&self) -> anyhow::Result<()> {
        let path = Self::path();
        let dir = buildx_config_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let bytes = serde_json::to_vec_pretty(self)?;
        kiln_fs::write_atomic(&path, &bytes, kiln_fs::Durability::Fsync)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The instance `name` names: `None` for kiln's own builder (`kiln` or `default`), an
    /// error naming the builder when there is none of that name.
    pub fn find(&self, name: &str) -> anyhow::Result<Option<&BuilderInstance>> {
        if is_builtin(name) {
            return Ok(None);
        }
        match self.builders.iter().find(|b| b.name == name) {
            Some(b) => Ok(Some(b)),
            None => anyhow::bail!(
                "no builder {name:?} found (`docker buildx ls` lists them; `docker buildx create --name {name}` makes one)"
            ),
        }
    }

    /// The name of the builder a command uses: `--builder`, else `BUILDX_BUILDER`, else the
    /// current one. An empty name is no name, as in buildx (docker/actions-toolkit runs
    /// `docker buildx inspect ''` when a workflow names no builder).
    pub fn selected(&self, flag: Option<&str>) -> String {
        flag.filter(|f| !f.is_empty())
            .map(str::to_owned)
            .or_else(|| {
                std::env::var("BUILDX_BUILDER")
                    .ok()
                    .filter(|v| !v.is_empty())
            })
            .or_else(|| self.current.clone())
            .unwrap_or_else(|| DEFAULT_BUILDER.to_owned())
    }
}

fn is_builtin(name: &str) -> bool {
    name == DEFAULT_BUILDER || name == DOCKER_DEFAULT_NAME
}

/// What `inspect` and `ls` show of one builder.
struct BuilderView {
    name: String,
    node: String,
    endpoint: String,
    status: String,
    flags: Option<String>,
    driver_opts: Vec<String>,
    platforms: Vec<String>,
}

impl BuilderView {
    fn of(instance: Option<&BuilderInstance>, name: &str, globals: &Globals) -> Self {
        let endpoint = format!("kiln://{}", globals.root.display());
        let host = kiln_oci::Platform::host().to_string();
        match instance {
            None => BuilderView {
                name: name.to_owned(),
                node: format!("{DEFAULT_BUILDER}0"),
                endpoint,
                status: status(globals),
                flags: None,
                driver_opts: Vec::new(),
                platforms: vec![host],
            },
            Some(b) => {
                let mut driver_opts = Vec::new();
                if let Some(d) = &b.requested_driver {
                    driver_opts.push(format!("requested-driver=\"{d}\""));
                }
                for o in &b.driver_opts {
                    match o.split_once('=') {
                        Some((k, v)) => driver_opts.push(format!("{k}=\"{v}\"")),
                        None => driver_opts.push(format!("{o}=\"\"")),
                    }
                }
                let mut platforms: Vec<String> =
                    b.platforms.iter().map(|p| format!("{p}*")).collect();
                if !b.platforms.contains(&host) {
                    platforms.push(host);
                }
                BuilderView {
                    name: b.name.clone(),
                    node: format!("{}0", b.name),
                    endpoint,
                    status: status(globals),
                    flags: b.buildkitd_flags.clone(),
                    driver_opts,
                    platforms,
                }
            }
        }
    }
}

/// The node's status: kiln needs no daemon, so a builder is running when its state dir can
/// be opened (which `--bootstrap` does, creating it).
fn status(globals: &Globals) -> String {
    if globals.root.join("db").is_dir() {
        "running".to_owned()
    } else {
        "inactive".to_owned()
    }
}

/// Opens (creating when needed) the state dir, as buildx's `--bootstrap` starts a builder.
fn bootstrap(name: &str, globals: &Globals) -> anyhow::Result<()> {
    kiln_store::Store::open(&globals.root).with_context(|| {
        format!(
            "booting builder {name}: opening kiln's state dir {}",
            globals.root.display()
        )
    })?;
    eprintln!(
        "#1 [internal] booting builder {name}: kiln builds in-process, state in {}\n#1 DONE 0.0s",
        globals.root.display()
    );
    Ok(())
}

/// Arguments of `docker buildx inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Builder to inspect (default: the current one)
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// Make sure the builder is ready before printing (kiln: opens its state dir)
    #[arg(long)]
    bootstrap: bool,
    /// Builder to inspect (same as NAME)
    #[arg(long, value_name = "NAME")]
    pub(super) builder: Option<String>,
}

/// Runs `docker buildx inspect`: buildx's layout, which docker/setup-buildx-action parses
/// (`Name`, `Driver`, then per node `Name`, `Endpoint`, `Status`, `BuildKit version`,
/// `Platforms`, `Labels`).
pub fn inspect(args: InspectArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let store = BuilderStore::load()?;
    let name = store.selected(args.name.as_deref().or(args.builder.as_deref()));
    let instance = store.find(&name)?;
    if args.bootstrap {
        bootstrap(&name, globals)?;
    }
    let v = BuilderView::of(instance, &name, globals);
    let mut out = String::new();
    out += &format!("Name:   {}\nDriver: kiln\n\nNodes:\n", v.name);
    let mut rows: Vec<(&str, String)> =
        vec![("Name:", v.node.clone()), ("Endpoint:", v.endpoint.clone())];
    if !v.driver_opts.is_empty() {
        rows.push(("Driver Options:", v.driver_opts.join(" ")));
    }
    rows.push(("Status:", v.status.clone()));
    if let Some(f) = &v.flags {
        rows.push(("BuildKit daemon flags:", f.clone()));
    }
    rows.push(("BuildKit version:", format!("v{BUILDKIT_COMPAT_VERSION}")));
    rows.push(("Platforms:", v.platforms.join(", ")));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, val) in rows {
        out += &format!("{k:<width$}{val}\n");
    }
    let labels = [
        (
            "org.mobyproject.buildkit.worker.executor",
            "kiln".to_owned(),
        ),
        (
            "org.mobyproject.buildkit.worker.kiln.version",
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
        (
            "org.mobyproject.buildkit.worker.snapshotter",
            "overlayfs".to_owned(),
        ),
    ];
    out += "Labels:\n";
    let lw = labels.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    for (k, val) in labels {
        out += &format!(" {:<lw$}{val}\n", format!("{k}:"));
    }
    super::super::print_stdout(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `docker buildx ls`.
#[derive(clap::Args, Debug)]
pub struct LsArgs {
    /// `json` for one JSON object per builder, or the default table
    #[arg(long, value_name = "FORMAT")]
    format: Option<String>,
    /// Accepted for buildx compatibility: kiln never truncates
    #[arg(long = "no-trunc")]
    no_trunc: bool,
}

/// Runs `docker buildx ls`: every builder, the current one marked `*`.
pub fn ls(args: LsArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let _ = args.no_trunc;
    let store = BuilderStore::load()?;
    let current = store.selected(None);
    let mut views = vec![BuilderView::of(None, DEFAULT_BUILDER, globals)];
    views.extend(
        store
            .builders
            .iter()
            .map(|b| BuilderView::of(Some(b), &b.name, globals)),
    );
    let is_current =
        |v: &BuilderView| v.name == current || (is_builtin(&current) && v.name == DEFAULT_BUILDER);
    match args.format.as_deref() {
        Some("json") => {
            for v in &views {
                let line = serde_json::json!({
                    "Name": v.name,
                    "Driver": "kiln",
                    "Current": is_current(v),
                    "Nodes": [{
                        "Name": v.node,
                        "Endpoint": v.endpoint,
                        "Status": v.status,
                        "Version": format!("v{BUILDKIT_COMPAT_VERSION}"),
                        "Platforms": v.platforms.iter().map(|p| p.trim_end_matches('*')).collect::<Vec<_>>(),
                    }],
                });
                outln!("{line}");
            }
        }
        None | Some("table") => {
            let mut rows = vec![[
                "NAME/NODE".to_owned(),
                "DRIVER/ENDPOINT".to_owned(),
                "STATUS".to_owned(),
                "BUILDKIT".to_owned(),
                "PLATFORMS".to_owned(),
            ]];
            for v in &views {
                let mark = if is_current(v) { "*" } else { "" };
                rows.push([
                    format!("{}{mark}", v.name),
                    "kiln".to_owned(),
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
                rows.push([
                    format!(" \\_ {}", v.node),
                    format!(" \\_ {}", v.endpoint),
                    v.status.clone(),
                    format!("v{BUILDKIT_COMPAT_VERSION}"),
                    v.platforms.join(", "),
                ]);
            }
            let mut widths = [0usize; 5];
            for r in &rows {
                for (w, c) in widths.iter_mut().zip(r) {
                    *w = (*w).max(c.len());
                }
            }
            for r in rows {
                let mut line = String::new();
                for (i, c) in r.iter().enumerate() {
                    if i + 1 == r.len() {
                        line += c;
                    } else {
                        line += &format!("{c:<w$}   ", w = widths[i]);
                    }
                }
                outln!("{}", line.trim_end());
            }
        }
        Some(other) => anyhow::bail!(
            "--format {other:?}: kiln's `buildx ls` prints `table` (the default) or `json`"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `docker buildx create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Endpoint or docker context (recorded; kiln builds in-process)
    #[arg(value_name = "CONTEXT|ENDPOINT")]
    endpoint: Option<String>,
    /// Builder name (default: a generated one)
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Driver to ask for (docker-container, kubernetes, remote, ...): recorded and shown as
    /// a driver option; kiln's driver is always `kiln`
    #[arg(long, value_name = "DRIVER")]
    driver: Option<String>,
    /// Driver option (recorded)
    #[arg(long = "driver-opt", value_name = "KEY=VALUE")]
    driver_opts: Vec<String>,
    /// BuildKit daemon flags (recorded; kiln's entitlements come from `build --allow`)
    #[arg(
        long = "buildkitd-flags",
        value_name = "FLAGS",
        allow_hyphen_values = true
    )]
    buildkitd_flags: Option<String>,
    /// BuildKit daemon config file (accepted; kiln reads no buildkitd.toml)
    #[arg(long = "buildkitd-config", alias = "config", value_name = "FILE")]
    buildkitd_config: Option<String>,
    /// Platforms the builder is for (shown with `*` in `inspect`)
    #[arg(long = "platform", value_name = "PLATFORMS")]
    platforms: Vec<String>,
    /// Switch to the new builder
    #[arg(long = "use")]
    use_it: bool,
    /// Make sure the builder is ready (kiln: opens its state dir)
    #[arg(long)]
    bootstrap: bool,
    /// Add a node to an existing builder (kiln: the builder has its one node; accepted)
    #[arg(long)]
    append: bool,
    /// Remove a node from the builder (accepted; kiln's builder keeps its one node)
    #[arg(long)]
    leave: bool,
    /// Node name (accepted; kiln names the node NAME0)
    #[arg(long, value_name = "NODE")]
    node: Option<String>,
    /// Builder override (ignored by `create`, as in buildx)
    #[arg(long, value_name = "NAME")]
    pub(super) builder: Option<String>,
}

/// Runs `docker buildx create`: records the instance and prints its name.
pub fn create(args: CreateArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let _ = (
        &args.endpoint,
        &args.buildkitd_config,
        &args.node,
        &args.builder,
    );
    let mut store = BuilderStore::load()?;
    let name = match args.name.clone() {
        Some(n) => {
            validate_name(&n)?;
            n
        }
        None => generated_name(&store),
    };
    if is_builtin(&name) {
        anyhow::bail!("--name {name}: that is the name of kiln's own builder; pick another");
    }
    let exists = store.builders.iter().any(|b| b.name == name);
    if args.leave {
        if !exists {
            anyhow::bail!("--leave: no builder {name:?} found");
        }
    } else if exists && !args.append {
        anyhow::bail!(
            "existing instance for {name:?} but no --append (`docker buildx rm {name}` removes it)"
        );
    } else if !exists {
        if args.append {
            anyhow::bail!("--append: no builder {name:?} to append to");
        }
        let platforms = args
            .platforms
            .iter()
            .flat_map(|p| p.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                kiln_oci::Platform::parse(p)
                    .map(|pl| pl.to_string())
                    .map_err(|e| anyhow::anyhow!("--platform {p:?}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        store.builders.push(BuilderInstance {
            name: name.clone(),
            requested_driver: args.driver.clone(),
            driver_opts: args.driver_opts.clone(),
            buildkitd_flags: args.buildkitd_flags.clone(),
            platforms,
        });
    }
    if args.use_it {
        store.current = Some(name.clone());
    }
    store.save()?;
    if args.bootstrap {
        bootstrap(&name, globals)?;
    }
    outln!("{name}");
    Ok(ExitCode::SUCCESS)
}

fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok {
        anyhow::bail!(
            "--name {name:?}: a builder name is letters, digits, '-', '_' and '.', starting with a letter or digit"
        );
    }
    Ok(())
}

/// `kiln-builder-N`, the first N not taken.
fn generated_name(store: &BuilderStore) -> String {
    (1..)
        .map(|n| format!("kiln-builder-{n}"))
        .find(|n| !store.builders.iter().any(|b| &b.name == n))
        .unwrap_or_else(|| "kiln-builder".to_owned())
}

/// Arguments of `docker buildx use`.
#[derive(clap::Args, Debug)]
pub struct UseArgs {
    /// Builder to switch to
    #[arg(value_name = "NAME")]
    name: String,
    /// Set the builder as default for the current context (accepted)
    #[arg(long)]
    default: bool,
    /// Builder persists context changes (accepted)
    #[arg(long)]
    global: bool,
    /// Builder override (ignored by `use`, as in buildx)
    #[arg(long, value_name = "NAME")]
    pub(super) builder: Option<String>,
}

/// Runs `docker buildx use NAME`.
pub fn use_builder(args: UseArgs, _globals: &Globals) -> anyhow::Result<ExitCode> {
    let _ = (args.default, args.global, &args.builder);
    let mut store = BuilderStore::load()?;
    store.find(&args.name)?;
    store.current = if is_builtin(&args.name) {
        None
    } else {
        Some(args.name)
    };
    store.save()?;
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `docker buildx rm`.
#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// Builders to remove (default: the current one)
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    /// Remove every inactive builder (kiln's builders are never inactive: removes none)
    #[arg(long = "all-inactive")]
    all_inactive: bool,
    /// Do not prompt for confirmation (accepted)
    #[arg(short, long)]
    force: bool,
    /// Keep the BuildKit state (accepted: kiln's state dir is shared and always kept)
    #[arg(long = "keep-state")]
    keep_state: bool,
    /// Keep the BuildKit daemon running (accepted: kiln has none)
    #[arg(long = "keep-daemon")]
    keep_daemon: bool,
    /// Builder to remove (same as NAME)
    #[arg(long, value_name = "NAME")]
    pub(super) builder: Option<String>,
}

/// Runs `docker buildx rm`: forgets the instances (kiln's state dir, shared by every
/// instance, stays; `docker buildx prune` reclaims it).
pub fn rm(args: RmArgs, _globals: &Globals) -> anyhow::Result<ExitCode> {
    let _ = (args.force, args.keep_state, args.keep_daemon);
    let mut store = BuilderStore::load()?;
    if args.all_inactive {
        return Ok(ExitCode::SUCCESS);
    }
    let names = if args.names.is_empty() {
        vec![store.selected(args.builder.as_deref())]
    } else {
        args.names
    };
    for name in &names {
        if is_builtin(name) {
            anyhow::bail!("{name} is kiln's own builder and cannot be removed");
        }
        store.find(name)?;
        store.builders.retain(|b| &b.name != name);
        if store.current.as_deref() == Some(name) {
            store.current = None;
        }
    }
    store.save()?;
    for name in names {
        eprintln!("{name} removed");
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `docker buildx stop`.
#[derive(clap::Args, Debug)]
pub struct StopArgs {
    /// Builder to stop (default: the current one)
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// Builder to stop (same as NAME)
    #[arg(long, value_name = "NAME")]
    pub(super) builder: Option<String>,
}

/// Runs `docker buildx stop`: kiln runs no daemon, so there is nothing to stop once the
/// builder is known.
pub fn stop(args: StopArgs, _globals: &Globals) -> anyhow::Result<ExitCode> {
    let store = BuilderStore::load()?;
    let name = store.selected(args.name.as_deref().or(args.builder.as_deref()));
    store.find(&name)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_names_follow_buildx_rules() {
        assert!(validate_name("builder-1f2e").is_ok());
        assert!(validate_name("my_builder.2").is_ok());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("").is_err());
    }

    #[test]
    fn generated_names_skip_taken_ones() {
        let mut store = BuilderStore::default();
        assert_eq!(generated_name(&store), "kiln-builder-1");
        store.builders.push(BuilderInstance {
            name: "kiln-builder-1".into(),
            requested_driver: None,
            driver_opts: vec![],
            buildkitd_flags: None,
            platforms: vec![],
        });
        assert_eq!(generated_name(&store), "kiln-builder-2");
    }
}
