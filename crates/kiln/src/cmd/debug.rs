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
    }
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
