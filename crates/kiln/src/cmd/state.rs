//! `kiln du` and `kiln prune`: the state dir's space by kind, and reclaiming it without ever
//! touching what a running build holds (leases) or an image ref names.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use kiln_store::{PruneOptions, Store};

use crate::Globals;

/// Arguments of `kiln du`.
#[derive(clap::Args)]
pub struct DuArgs {}

/// Arguments of `kiln prune`.
#[derive(clap::Args)]
pub struct PruneArgs {
    /// Keep at most this much cache (e.g. `10GB`, `500MiB`), dropping least recently used first
    #[arg(long = "keep-storage", value_name = "SIZE")]
    keep_storage: Option<String>,
    /// `until=DURATION`: drop cache not used for longer than DURATION (e.g. `24h`, `7d`)
    #[arg(long, value_name = "until=DURATION")]
    filter: Vec<String>,
    /// Drop every cache record (snapshots and blobs of running builds and image refs stay)
    #[arg(long)]
    all: bool,
}

impl PruneArgs {
    /// Prune settings from another spelling of the command (`docker buildx prune`).
    pub(crate) fn new(keep_storage: Option<String>, filter: Vec<String>, all: bool) -> Self {
        PruneArgs {
            keep_storage,
            filter,
            all,
        }
    }
}

fn open(globals: &Globals) -> anyhow::Result<Store> {
    Store::open(&globals.root)
        .with_context(|| format!("opening kiln's state dir {}", globals.root.display()))
}

/// Runs `kiln du`.
pub fn run_du(_args: DuArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let u = open(globals)?.usage().context("measuring the state dir")?;
    let h = kiln_history::format_bytes;
    outln!("{:<22} {:>8} {:>12}", "KIND", "COUNT", "SIZE");
    outln!(
        "{:<22} {:>8} {:>12}",
        "blobs (layers, images)",
        u.blobs,
        h(u.blob_bytes)
    );
    outln!(
        "{:<22} {:>8} {:>12}",
        "snapshots",
        u.snapshots,
        h(u.snapshot_bytes)
    );
    outln!(
        "{:<22} {:>8} {:>12}",
        "  in use now",
        u.active_snapshots,
        ""
    );
    outln!(
        "{:<22} {:>8} {:>12}",
        "cache records",
        u.cache_records,
        h(u.cache_bytes)
    );
    let (downloads, download_bytes) = kiln_worker::sources::downloads_usage(&globals.root);
    outln!(
        "{:<22} {:>8} {:>12}",
        "downloads (ADD <url>)",
        downloads,
        h(download_bytes)
    );
    outln!(
        "{:<22} {:>8} {:>12}",
        "leases (running builds)",
        u.leases,
        ""
    );
    Ok(ExitCode::SUCCESS)
}

/// Parses `10GB`, `500MiB`, `1024` (bytes).
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--keep-storage {s:?}: expected a size like 10GB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        u => anyhow::bail!("--keep-storage {s:?}: unknown unit {u:?} (use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB)"),
    };
    Ok((n * mult) as u64)
}

fn parse_until(filter: &str) -> anyhow::Result<Duration> {
    let v = filter
        .strip_prefix("until=")
        .ok_or_else(|| anyhow::anyhow!("--filter {filter:?}: only until=DURATION is supported"))?;
    humantime::parse_duration(v)
        .map_err(|e| anyhow::anyhow!("--filter {filter:?}: {e} (e.g. until=24h)"))
}

/// Runs `kiln prune`.
pub fn run_prune(args: PruneArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let mut opts = PruneOptions::default();
    for f in &args.filter {
        opts.older_than = Some(parse_until(f)?);
    }
    if let Some(s) = &args.keep_storage {
        opts.keep_bytes = Some(parse_size(s)?);
    }
    if args.all {
        opts.older_than = Some(Duration::ZERO);
    }
    if opts.older_than.is_none() && opts.keep_bytes.is_none() {
        // Like `docker builder prune` without flags: everything not in use.
        opts.older_than = Some(Duration::ZERO);
    }
    let store = open(globals)?;
    let busy = store.usage().map(|u| u.leases > 0).unwrap_or(true);
    let r = store.prune(&opts).context("pruning the state dir")?;
    let (downloads, download_bytes) = match opts.older_than {
        Some(age) => kiln_worker::sources::prune_downloads(&globals.root, age, busy),
        None => (0, 0),
    };
    let history = kiln_history::HistoryStore::new(&globals.root)
        .prune()
        .unwrap_or(0);
    outln!(
        "removed {} cache records, {} snapshots, {} blobs ({}), {} downloads ({}), {} history records",
        r.cache_records,
        r.snapshots.len(),
        r.blobs.len(),
        kiln_history::format_bytes(r.blob_bytes),
        downloads,
        kiln_history::format_bytes(download_bytes),
        history
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse_as_docker_spells_them() {
        assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert_eq!(
            parse_until("until=24h").unwrap(),
            Duration::from_secs(86400)
        );
        assert!(parse_until("label=x").is_err());
    }
}
