//! `kiln import`: a root filesystem (directory or tar) as a one-layer image in the local
//! store, like `docker import`, so builds can start `FROM` it without a registry.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use kiln_store::Store;

use crate::Globals;

/// Arguments of `kiln import`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// A directory or a tar archive (plain, gzip or zstd) holding the root filesystem.
    source: PathBuf,
    /// Name(s) to store the image under, e.g. `busybox:latest`.
    #[arg(short = 't', long = "tag", required = true, value_name = "NAME")]
    tags: Vec<String>,
    /// Platform recorded in the image config.
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
}

/// `SOURCE_DATE_EPOCH` from the environment, if set; a value that is not a number of seconds
/// is an error rather than silently ignored.
fn source_date_epoch() -> anyhow::Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) if !s.trim().is_empty() => s.trim().parse::<u64>().map(Some).map_err(|_| {
            anyhow::anyhow!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds since 1970")
        }),
        _ => Ok(None),
    }
}

/// Runs `kiln import`.
pub fn run(args: ImportArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let platform = match &args.platform {
        Some(p) => {
            kiln_graph::Platform::parse(p).map_err(|e| anyhow::anyhow!("--platform {p}: {e}"))?
        }
        None => kiln_graph::Platform::host(),
    };
    let store = Store::open(&globals.root)
        .with_context(|| format!("opening kiln's state dir {}", globals.root.display()))?;
    let sde = source_date_epoch()?;
    // Without SOURCE_DATE_EPOCH the image is dated at the epoch (as ko and Bazel's image rules
    // do), never "now": two runners importing the same rootfs must get the same image, and so
    // the same cache keys for every step built on it.
    let created = kiln_worker::image::created_timestamp(Some(sde.unwrap_or(0)));
    let image = kiln_worker::images::import_rootfs(
        &store,
        &args.source,
        &args.tags,
        &platform,
        &created,
        sde.map(|s| s as i64),
    )
    .with_context(|| format!("importing {}", args.source.display()))?;
    outln!("{}", image.manifest.digest);
    Ok(ExitCode::SUCCESS)
}
