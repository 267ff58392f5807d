//! `kiln debug`: inspect and check kiln's local state.

use std::process::ExitCode;

use anyhow::Context as _;

use crate::Globals;

/// Arguments of `kiln debug`.
#[derive(clap::Args)]
pub struct DebugArgs {
    #[command(subcommand)]
    command: DebugCommand,
}

#[derive(clap::Subcommand)]
enum DebugCommand {
    /// Check the state dir: every blob's digest, DB records against blobs and snapshot
    /// dirs, leftovers of killed processes. Exits 1 when damage remains (leftovers of killed
    /// processes alone are reported and reclaimed by the next build).
    Fsck(FsckArgs),
    /// Probe what this environment allows (user namespaces, subordinate ids, overlay, proc,
    /// chroot, fuse, cgroups) and print the modes kiln can build in, strongest first; each
    /// mode that cannot be used says what to change. Exits 1 when no mode is usable.
    Env,
    /// List the platforms this machine can run RUN steps for: the native one (from the
    /// kernel's machine name) and those emulated through binfmt_misc (QEMU); for each common
    /// platform that cannot run, print the exact fix.
    Platforms(PlatformsArgs),
}

#[derive(clap::Args)]
struct PlatformsArgs {
    /// Output format: `text` or `json`
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
}

impl DebugArgs {
    /// True when the subcommand touches the state dir's snapshots (rootless: run in the user
    /// namespace); `kiln debug env` probes the environment as it is.
    pub fn needs_user_namespace(&self) -> bool {
        matches!(self.command, DebugCommand::Fsck(_))
    }
}

#[derive(clap::Args)]
struct FsckArgs {
    /// Delete corrupt blobs and leftovers and drop records that point at nothing
    #[arg(long)]
    repair: bool,
}

/// Runs `kiln debug`.
pub fn run(args: DebugArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    match args.command {
        DebugCommand::Fsck(a) => fsck(a, globals),
        DebugCommand::Env => env(globals),
        DebugCommand::Platforms(a) => platforms(&a),
    }
}

fn platforms(args: &PlatformsArgs) -> anyhow::Result<ExitCode> {
    use kiln_exec::platforms::{platform_support, COMMON_PLATFORMS};
    let s = platform_support();
    if args.format == "json" {
        println!("{}", serde_json::to_string_pretty(&s.to_json())?);
        return Ok(ExitCode::SUCCESS);
    }
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    println!(
        "native:      {} (machine {})",
        list(s.native.iter().map(ToString::to_string).collect()),
        s.machine
    );
    let dir = s.binfmt_dir.display();
    let state = match (s.binfmt_mounted, s.binfmt_enabled) {
        (false, _) => "not mounted",
        (true, false) => "mounted, disabled",
        (true, true) => "mounted, enabled",
    };
    println!("binfmt_misc: {dir} ({state})");
    println!(
        "emulated:    {}",
        list(
            s.emulated()
                .iter()
                .map(|(p, h)| format!("{p} ({})", h.name))
                .collect()
        )
    );
    if !s.handlers.is_empty() {
        println!("handlers:");
        for h in &s.handlers {
            println!(
                "  {:<16} {:<14} {:<8} flags {:<4} {}",
                h.name,
                h.platform()
                    .map_or_else(|| "-".to_owned(), |p| p.to_string()),
                if h.enabled { "enabled" } else { "disabled" },
                if h.flags.is_empty() { "-" } else { &h.flags },
                h.interpreter.as_deref().unwrap_or("-"),
            );
        }
    }
    for e in &s.errors {
        println!("warning: {e}");
    }
    println!("platforms:");
    for name in COMMON_PLATFORMS {
        let Ok(p) = kiln_oci::Platform::parse(name) else {
            continue;
        };
        let line = match s.can_run(&p) {
            Ok(()) if s.is_native(&p) => "yes (native)".to_owned(),
            Ok(()) => format!(
                "yes (emulated: {})",
                s.handler_for(&p).map_or("?", |h| h.name.as_str())
            ),
            Err(fix) => format!("no: {fix}"),
        };
        println!("  {name:<14} {line}");
    }
    Ok(ExitCode::SUCCESS)
}

fn check(c: &Result<(), String>) -> String {
    match c {
        Ok(()) => "yes".into(),
        Err(e) => format!("no: {e}"),
    }
}

fn env(globals: &Globals) -> anyhow::Result<ExitCode> {
    use kiln_exec::probe::EnvironmentProbe;
    let p = EnvironmentProbe::run();
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let range = |r: Option<kiln_exec::userns::IdRange>| {
        r.map_or_else(|| "none".to_owned(), |r| r.to_string())
    };
    let helper = |h: &Result<std::path::PathBuf, String>| match h {
        Ok(p) => format!("{} (usable)", p.display()),
        Err(e) => format!("no: {e}"),
    };
    let rows: Vec<(&str, String)> = vec![
        ("user", format!("{} (euid {})", p.user, p.euid)),
        (
            "kernel",
            format!(
                "{}{}",
                p.kernel,
                if p.kernel_overlay_userns {
                    ""
                } else {
                    " (older than 5.11: no overlayfs in a user namespace)"
                }
            ),
        ),
        (
            "in a user namespace",
            match (&p.rootless_child, p.nested_userns) {
                (Some(m), _) => format!("yes (kiln's own, {m})"),
                (None, true) => "yes (a rootless container?)".into(),
                (None, false) => "no (the host's)".into(),
            },
        ),
        ("user.max_user_namespaces", opt(p.max_user_namespaces)),
        (
            "kernel.unprivileged_userns_clone",
            opt(p.unprivileged_userns_clone),
        ),
        (
            "kernel.apparmor_restrict_unprivileged_userns",
            opt(p.apparmor_restrict_userns),
        ),
        (
            "new namespaces (mount, pid, uts, ipc)",
            check(&p.namespaces),
        ),
        ("fresh /proc in a new pid namespace", check(&p.proc_mount)),
        ("overlayfs", check(&p.overlay)),
        ("new user namespace", check(&p.userns)),
        ("fresh /proc in a user namespace", check(&p.proc_in_userns)),
        ("overlayfs in a user namespace", check(&p.overlay_in_userns)),
        ("chroot", check(&p.chroot)),
        ("/etc/subuid range", range(p.subuid)),
        ("/etc/subgid range", range(p.subgid)),
        ("newuidmap", helper(&p.newuidmap)),
        ("newgidmap", helper(&p.newgidmap)),
        ("fuse-overlayfs and /dev/fuse", check(&p.fuse_overlayfs)),
        ("own cgroup writable", check(&p.cgroup)),
    ];
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    outln!("{:<w$}  RESULT", "CHECK");
    for (k, v) in &rows {
        outln!("{k:<w$}  {v}");
    }
    outln!("");
    let best = p.best_mode();
    outln!(
        "{:<20}  {:<6}  WHAT IT MEANS / WHAT TO CHANGE",
        "MODE",
        "USABLE"
    );
    for m in p.modes() {
        let mark = if best.as_ref().is_some_and(|b| b.name == m.name) {
            "yes *"
        } else if m.usable() {
            "yes"
        } else {
            "no"
        };
        outln!("{:<20}  {:<6}  {}", m.name, mark, m.summary);
        for fix in &m.missing {
            outln!("{:<20}  {:<6}  - {fix}", "", "");
        }
        if m.usable() {
            for note in &m.notes {
                outln!("{:<20}  {:<6}  note: {note}", "", "");
            }
        }
    }
    outln!("");
    outln!("snapshotter: {}", p.snapshotter());
    outln!("state dir: {}", globals.root.display());
    let requested = kiln_exec::probe::Isolation::from_env();
    let isolation = match requested
        .clone()
        .and_then(kiln_exec::probe::choose_isolation)
    {
        Ok(c) => format!("{} ({})", c.isolation.as_str(), c.reason),
        Err(e) => format!("none: {e}"),
    };
    outln!(
        "isolation: {} -> {isolation}",
        requested.map_or_else(
            |e| e,
            |r| format!("{}={}", kiln_exec::probe::Isolation::ENV, r.as_str())
        )
    );
    Ok(match best {
        Some(m) => {
            outln!("kiln builds in mode {} (* above)", m.name);
            ExitCode::SUCCESS
        }
        None => {
            outln!("no mode is usable here: change one of the items above");
            ExitCode::FAILURE
        }
    })
}

fn fsck(args: FsckArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let root = &globals.root;
    if !root.join("db").is_dir() {
        anyhow::bail!(
            "{} holds no kiln state (no db/ directory); pass --root DIR",
            root.display()
        );
    }
    let store = kiln_store::Store::open(root)
        .with_context(|| format!("opening the kiln state at {}", root.display()))?;
    let report = store.fsck(args.repair).context("checking the store")?;
    for p in &report.problems {
        let kind = if p.is_leftover() {
            "leftover"
        } else {
            "problem"
        };
        outln!("{kind}: {p}");
    }
    let damage = report.damage().count();
    let leftovers = report.problems.len() - damage;
    outln!(
        "checked {} blobs and {} snapshots: {damage} problem(s), {leftovers} leftover(s) of killed processes{}",
        report.blobs_checked,
        report.snapshots_checked,
        if args.repair {
            format!(", {} repaired", report.repaired)
        } else if leftovers > 0 {
            " (the next build or --repair removes them)".to_owned()
        } else {
            String::new()
        }
    );
    // Leftovers are reclaimed by the next build; only damage fails the check.
    let remaining = if args.repair {
        report.problems.len().saturating_sub(report.repaired)
    } else {
        damage
    };
    Ok(if remaining == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
