//! `kiln history`: the builds recorded in the state dir — list, inspect, compare, report.

use std::path::PathBuf;
use std::process::ExitCode;

use std::fmt::Write as _;

use kiln_history::{format_bytes, format_ms, BuildRecord, HistoryStore};

use crate::Globals;

/// Arguments of `kiln history`.
#[derive(clap::Args)]
#[command(
    after_help = "Build ids can be abbreviated to a unique prefix; `latest` is the newest build."
)]
pub struct HistoryArgs {
    #[command(subcommand)]
    command: HistoryCommand,
}

#[derive(clap::Subcommand)]
enum HistoryCommand {
    /// List recorded builds, newest first
    Ls {
        /// Print JSON (one object per build) instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one build's steps: cache result, timing, key
    Inspect {
        /// Build id, unique prefix, or `latest`
        id: String,
        /// Print the whole record as JSON
        #[arg(long)]
        json: bool,
    },
    /// Compare two builds: steps that ran and why (changed files, build args, base image), slower/faster steps
    Compare {
        /// The earlier build
        before: String,
        /// The later build
        after: String,
    },
    /// Write the HTML timeline report of a build
    Report {
        /// Build id, unique prefix, or `latest`
        id: String,
        /// Where to write the report
        #[arg(short, long, value_name = "FILE.html")]
        output: PathBuf,
    },
    /// Write a build's Chrome trace-event JSON (opens in Perfetto and chrome://tracing)
    Trace {
        /// Build id, unique prefix, or `latest`
        id: String,
        /// Where to write the trace
        #[arg(short, long, value_name = "FILE.json")]
        output: PathBuf,
    },
    /// Delete all but the newest N builds
    Prune {
        /// How many builds to keep
        #[arg(long, default_value_t = kiln_history::DEFAULT_KEEP)]
        keep: usize,
    },
}

/// Runs `kiln history`.
pub fn run(args: HistoryArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let store = HistoryStore::new(&globals.root);
    match args.command {
        HistoryCommand::Ls { json } => ls(&store, json)?,
        HistoryCommand::Inspect { id, json } => {
            let record = store.find(&id)?;
            if json {
                super::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&record)?))?;
            } else {
                super::print_stdout(&inspect(&record))?;
            }
        }
        HistoryCommand::Compare { before, after } => {
            let (a, b) = (store.find(&before)?, store.find(&after)?);
            super::print_stdout(&kiln_history::compare_records(&a, &b).render_text())?;
        }
        HistoryCommand::Report { id, output } => {
            let record = store.find(&id)?;
            kiln_history::write_report(&record, &output)?;
            eprintln!(
                "wrote report of build {} to {}",
                record.id,
                output.display()
            );
        }
        HistoryCommand::Trace { id, output } => {
            let record = store.find(&id)?;
            kiln_history::write_trace(&record, &output)?;
            eprintln!("wrote trace of build {} to {}", record.id, output.display());
        }
        HistoryCommand::Prune { keep } => {
            let removed = store.with_limits(keep, u64::MAX).prune()?;
            eprintln!("removed {removed} build record(s)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn when(record: &BuildRecord) -> String {
    kiln_history::format_unix_ms(record.started_at)
}

fn ls(store: &HistoryStore, json: bool) -> anyhow::Result<()> {
    let ids = store.ids()?;
    let mut out = String::new();
    if !json {
        let _ = writeln!(
            out,
            "{:<20}  {:<20}  {:<16}  {:>9}  {:>5}  {:>6}  STATUS",
            "ID", "STARTED", "TARGET", "DURATION", "RUN", "CACHED"
        );
    }
    for id in ids {
        let record = match store.load(&id) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("kiln: warning: {e}");
                continue;
            }
        };
        if json {
            let row = serde_json::json!({
                "id": record.id, "started_at": record.started_at, "ended_at": record.ended_at,
                "target": record.target, "status": record.status,
                "steps_run": record.steps_run(), "steps_cached": record.steps_cached(),
            });
            let _ = writeln!(out, "{row}");
        } else {
            let _ = writeln!(
                out,
                "{:<20}  {:<20}  {:<16}  {:>9}  {:>5}  {:>6}  {}",
                record.id,
                when(&record),
                record.target,
                format_ms(record.duration_ms()),
                record.steps_run(),
                record.steps_cached(),
                record.status.as_str()
            );
        }
    }
    super::print_stdout(&out)
}

fn inspect(r: &BuildRecord) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "build    {}", r.id);
    let _ = writeln!(out, "target   {}", r.target);
    let _ = writeln!(
        out,
        "started  {}, took {}",
        when(r),
        format_ms(r.duration_ms())
    );
    let _ = writeln!(
        out,
        "status   {}{}",
        r.status.as_str(),
        r.error
            .as_ref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    );
    if !r.argv.is_empty() {
        let _ = writeln!(out, "command  {}", r.argv.join(" "));
    }
    if let Some(d) = &r.image_digest {
        let _ = writeln!(out, "image    {d}");
    }
    let _ = writeln!(
        out,
        "moved    {} down, {} up",
        format_bytes(r.bytes_downloaded),
        format_bytes(r.bytes_uploaded)
    );
    let _ = writeln!(
        out,
        "steps    {} ({} ran, {} cached)\n",
        r.steps.len(),
        r.steps_run(),
        r.steps_cached()
    );
    let _ = writeln!(
        out,
        "{:>4}  {:<16}  {:<12}  {:>8}  {:>8}  DESCRIPTION",
        "#", "STAGE", "CACHE", "START", "TOOK"
    );
    let mut steps: Vec<_> = r.steps.iter().collect();
    steps.sort_by_key(|s| (s.start_ms.or(s.end_ms), s.index));
    for s in steps {
        let cache = s.cache.label();
        let cache = if cache.len() > 12 {
            "cached (rem)".to_string()
        } else {
            cache
        };
        let _ = writeln!(
            out,
            "{:>4}  {:<16}  {:<12}  {:>8}  {:>8}  {}",
            s.index,
            if s.stage.is_empty() { "-" } else { &s.stage },
            cache,
            s.start_ms
                .or(s.end_ms)
                .map(format_ms)
                .unwrap_or_else(|| "-".into()),
            s.duration_ms().map(format_ms).unwrap_or_else(|| "-".into()),
            s.description
        );
        if let Some(e) = &s.error {
            let _ = writeln!(out, "{:>52}error: {e}", "");
        }
    }
    if !r.spans.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<12}  {:>8}  {:>8}  {:>10}  NAME",
            "SPAN", "START", "TOOK", "BYTES"
        );
        for sp in &r.spans {
            let _ = writeln!(
                out,
                "{:<12}  {:>8}  {:>8}  {:>10}  {}",
                sp.kind.as_str(),
                format_ms(sp.start_ms),
                format_ms(sp.end_ms.saturating_sub(sp.start_ms)),
                format_bytes(sp.bytes),
                sp.name
            );
        }
    }
    out
}
