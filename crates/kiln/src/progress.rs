//! Build progress for people and machines: `tty` (a live view redrawn in place, see
//! [`tty`]), `plain` (numbered step lines with elapsed times, fit for CI logs, as BuildKit
//! prints them), `rawjson` (one JSON event per line), and a closing summary. Renders the
//! events of a [`kiln_build`] session. `auto` is `tty` when stderr is a terminal, `plain`
//! otherwise.

mod tty;

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_build::{BuildEvent, EventSink, StepName, StepOutcome};
use kiln_graph::options::ProgressMode;
use kiln_solver::{CacheSource, Event};

/// What the display knows once the steps are planned.
struct State {
    /// `auto` resolved: never `Auto`.
    mode: ProgressMode,
    /// When the steps began (the summary's time, `elapsed_ms` of JSON events).
    begun: Instant,
    names: Vec<(String, Option<String>)>,
    started: HashMap<usize, Instant>,
    /// What the live view shows (`tty` only).
    board: Option<Arc<Mutex<tty::Board>>>,
    /// The live view's drawing thread, until the steps finish.
    live: Option<tty::LiveView>,
}

/// Renders a build's events on stderr, in the mode asked for.
pub struct Progress {
    /// The mode as asked (`quiet` hides the closing summary).
    requested: ProgressMode,
    state: Mutex<State>,
}

/// `auto` as BuildKit resolves it: the live view on a terminal (unless `TERM=dumb`), plain
/// lines everywhere else (CI logs, pipes, files).
fn resolve_mode(mode: ProgressMode) -> ProgressMode {
    match mode {
        ProgressMode::Auto => {
            let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
            if std::io::stderr().is_terminal() && !dumb {
                ProgressMode::Tty
            } else {
                ProgressMode::Plain
            }
        }
        m => m,
    }
}

impl Progress {
    /// Progress in `mode`. In `tty` mode the live view starts drawing when the steps are
    /// planned and holds stderr (other writers' lines appear above it) until they finish.
    pub fn new(mode: ProgressMode) -> Self {
        Progress {
            requested: mode,
            state: Mutex::new(State {
                mode: resolve_mode(mode),
                begun: Instant::now(),
                names: Vec::new(),
                started: HashMap::new(),
                board: None,
                live: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The steps are known: names them, and starts the live view in `tty` mode.
    fn planned(&self, steps: Vec<StepName>) {
        let mut st = self.state();
        st.names = steps
            .into_iter()
            .map(|s| (s.description, s.stage))
            .collect();
        st.begun = Instant::now();
        if st.mode == ProgressMode::Tty {
            let color = std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal();
            let board = Arc::new(Mutex::new(tty::Board::new(st.begun, color)));
            match tty::LiveView::start(board.clone()) {
                Some(live) => {
                    st.board = Some(board);
                    st.live = Some(live);
                }
                // Without its view (stderr could not be taken over) tty falls back to plain
                // lines.
                None => st.mode = ProgressMode::Plain,
            }
        }
    }

    /// Ends the live view: draws its final static frame and gives stderr back. Idempotent; a
    /// no-op in the other modes.
    fn finish(&self) {
        let view = self.state().live.take();
        if let Some(mut v) = view {
            v.finish();
        }
    }

    /// The closing summary: total time, steps run vs cached, time per stage.
    fn summary(&self, what: &str, outcomes: &[StepOutcome]) -> String {
        let elapsed = self.state().begun.elapsed();
        // Reading the build context is not a build step.
        let run = outcomes
            .iter()
            .filter(|o| o.status == "run" && o.stage.is_some())
            .count();
        let cached = outcomes.iter().filter(|o| o.status == "cached").count();
        let remote = outcomes
            .iter()
            .filter(|o| o.status == "cached" && o.cache_source.as_deref() != Some("local"))
            .count();
        let mut out = format!(
            "{what} in {:.1}s: {run} steps run, {cached} cached{}\n",
            elapsed.as_secs_f64(),
            if remote > 0 {
                format!(" ({remote} from imported caches)")
            } else {
                String::new()
            }
        );
        let mut stages: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for o in outcomes.iter().filter(|o| o.status == "run") {
            let (Some(s), Some(d)) = (o.started_ms, o.duration_ms) else {
                continue;
            };
            let e = stages
                .entry(o.stage.clone().unwrap_or_else(|| "(sources)".into()))
                .or_insert((u64::MAX, 0));
            e.0 = e.0.min(s);
            e.1 = e.1.max(s + d);
        }
        for (stage, (start, end)) in stages {
            out.push_str(&format!(
                "  {stage:<24} {:>7.1}s\n",
                (end - start) as f64 / 1000.0
            ));
        }
        out
    }

    fn step(&self, event: Event) {
        let mut st = self.state();
        let st = &mut *st;
        let now = st.begun.elapsed().as_millis() as u64;
        let mode = st.mode;
        let name = |node: usize| -> (String, Option<String>) {
            st.names
                .get(node)
                .cloned()
                .unwrap_or_else(|| (format!("step {node}"), None))
        };
        let on_board = |f: &dyn Fn(&mut tty::Board)| {
            if let Some(b) = &st.board {
                f(&mut b.lock().unwrap_or_else(|e| e.into_inner()));
            }
        };
        match event {
            Event::Cached { node, source, .. } => {
                let (name, stage) = name(node);
                let src = match &source {
                    CacheSource::Local => "local".to_owned(),
                    CacheSource::Remote(r) => r.clone(),
                };
                emit_plain(mode, || {
                    format!(
                        "#{} {name}\n#{} CACHED{}",
                        node + 1,
                        node + 1,
                        if src == "local" {
                            String::new()
                        } else {
                            format!(" (from {src})")
                        }
                    )
                });
                emit_json(
                    mode,
                    || serde_json::json!({"time": unix_ms(), "elapsed_ms": now, "event": "cached", "step": node + 1, "name": name, "stage": stage, "source": src}),
                );
                on_board(&|b| b.cached(node, &name));
            }
            Event::Started { node, .. } => {
                let (name, stage) = name(node);
                emit_plain(mode, || format!("#{} {name}", node + 1));
                emit_json(
                    mode,
                    || serde_json::json!({"time": unix_ms(), "elapsed_ms": now, "event": "started", "step": node + 1, "name": name, "stage": stage}),
                );
                on_board(&|b| b.started(node, &name));
                st.started.insert(node, Instant::now());
            }
            Event::Log { node, stream, line } => {
                let t = st
                    .started
                    .get(&node)
                    .map(|s| s.elapsed().as_secs_f64())
                    .unwrap_or(0.0);
                let text = String::from_utf8_lossy(&line);
                emit_plain(mode, || format!("#{} {t:.3} {text}", node + 1));
                emit_json(
                    mode,
                    || serde_json::json!({"time": unix_ms(), "elapsed_ms": now, "event": "log", "step": node + 1, "stream": stream, "data": text}),
                );
                on_board(&|b| b.log(node, &name(node).0, &line));
            }
            Event::Completed { node, duration, .. } => {
                emit_plain(mode, || {
                    format!("#{} DONE {:.1}s", node + 1, duration.as_secs_f64())
                });
                emit_json(
                    mode,
                    || serde_json::json!({"time": unix_ms(), "elapsed_ms": now, "event": "completed", "step": node + 1, "duration_ms": duration.as_millis() as u64}),
                );
                on_board(&|b| b.completed(node, &name(node).0, duration));
            }
            Event::Failed { node, message } => {
                emit_plain(mode, || format!("#{} ERROR: {message}", node + 1));
                emit_json(
                    mode,
                    || serde_json::json!({"time": unix_ms(), "elapsed_ms": now, "event": "failed", "step": node + 1, "error": message}),
                );
                on_board(&|b| b.failed(node, &name(node).0));
            }
        }
    }
}

fn emit_plain(mode: ProgressMode, line: impl FnOnce() -> String) {
    if mode == ProgressMode::Plain {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{}", line());
    }
}

fn emit_json(mode: ProgressMode, value: impl FnOnce() -> serde_json::Value) {
    if mode == ProgressMode::Rawjson {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{}", value());
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

impl EventSink for Progress {
    fn event(&self, event: BuildEvent) {
        match event {
            BuildEvent::Warning(message) => eprintln!("kiln: warning: {message}"),
            BuildEvent::Planned { steps } => self.planned(steps),
            BuildEvent::Step(e) => self.step(e),
            BuildEvent::StepsFinished => self.finish(),
            BuildEvent::OutputExported {
                destination: Some(destination),
                ..
            } if self.requested != ProgressMode::Quiet => eprintln!("{destination}"),
            BuildEvent::CacheImported { .. } | BuildEvent::OutputExported { .. } => {}
            BuildEvent::CacheExported { summary, elapsed } => {
                eprintln!("cache exported in {:.1}s: {summary}", elapsed.as_secs_f64())
            }
            BuildEvent::ReportWritten { path } => {
                eprintln!("timeline report: {}", path.display())
            }
            BuildEvent::Failed { error, steps } => {
                self.finish();
                eprintln!("kiln: error: {error}");
                eprint!("{}", self.summary("build failed", &steps));
            }
            BuildEvent::Finished {
                target,
                steps,
                bytes_downloaded,
                bytes_uploaded,
                image_digest,
            } => {
                if self.requested == ProgressMode::Quiet {
                    return;
                }
                eprint!(
                    "{}",
                    self.summary(&format!("built target {target}"), &steps)
                );
                eprintln!(
                    "registry traffic: {} downloaded, {} uploaded",
                    human_bytes(bytes_downloaded),
                    human_bytes(bytes_uploaded)
                );
                if let Some(digest) = image_digest {
                    eprintln!("image {digest}");
                }
            }
        }
    }
}
