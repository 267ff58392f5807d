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
    /// dirs, leftovers of killed processes. Exits 1 when problems remain.
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
        println!("problem: {p}");
    }
    println!(
        "checked {} blobs and {} snapshots: {} problem(s){}",
        report.blobs_checked,
        report.snapshots_checked,
        report.problems.len(),
        if args.repair {
            format!(", {} repaired", report.repaired)
        } else {
            String::new()
        }
    );
    let remaining = report.problems.len().saturating_sub(report.repaired);
    Ok(if remaining == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
