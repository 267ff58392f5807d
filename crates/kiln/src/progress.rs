//! Build progress for people and machines: `tty` (a live view redrawn in place, see
//! [`tty`]), `plain` (numbered step lines with elapsed times, fit for CI logs, as BuildKit
//! prints them), `rawjson` (one JSON event per line), and a closing summary. Fed by the
//! solver's event stream. `auto` is `tty` when stderr is a terminal, `plain` otherwise.

mod tty;

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_graph::options::ProgressMode;
use kiln_graph::BuildGraph;
use kiln_history::Recorder;
use kiln_solver::{CacheSource, Event, EventSink};
use serde::Serialize;

/// How one step ended, for the summary and the metadata file.
#[derive(Debug, Clone, Serialize)]
pub struct StepOutcome {
    /// Step number as shown (vertex index + 1).
    pub step: usize,
    /// `[stage n/m] INSTRUCTION`.
    pub name: String,
    /// Stage name, if the step belongs to one.
    pub stage: Option<String>,
    /// `run`, `cached` or `failed`.
    pub status: &'static str,
    /// Where a cached result came from (`local`, or an imported cache ref).
    pub cache_source: Option<String>,
    /// Milliseconds since the build started when the step started running.
    pub started_ms: Option<u64>,
    /// How long it ran.
    pub duration_ms: Option<u64>,
}

struct State {
    started: HashMap<usize, Instant>,
    outcomes: BTreeMap<usize, StepOutcome>,
}

/// Receives solver events and renders them.
pub struct Progress {
    recorder: Arc<Recorder>,
    /// `auto` resolved: never `Auto`.
    mode: ProgressMode,
    begun: Instant,
    names: Vec<(String, Option<String>)>,
    state: Mutex<State>,
    /// What the live view shows (`tty` only).
    board: Option<Arc<Mutex<tty::Board>>>,
    /// The live view's drawing thread, until [`Progress::finish`].
    live: Mutex<Option<tty::LiveView>>,
    /// [`Progress::finish`] was called: the build's steps are over.
    finished: AtomicBool,
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
    /// Progress for `graph` in `mode`. In `tty` mode the live view starts drawing at once and
    /// holds stderr (other writers' lines appear above it) until [`Progress::finish`].
    pub fn new(mode: ProgressMode, graph: &BuildGraph, recorder: Arc<Recorder>) -> Self {
        let names = graph
            .vertices
            .iter()
            .map(|v| (v.meta.description.clone(), v.meta.stage.clone()))
            .collect();
        let mode = resolve_mode(mode);
        let begun = Instant::now();
        let (board, live) = if mode == ProgressMode::Tty {
            let color = std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal();
            let board = Arc::new(Mutex::new(tty::Board::new(begun, color)));
            let live = tty::LiveView::start(board.clone());
            (Some(board), live)
        } else {
            (None, None)
        };
        // Without its view (stderr could not be taken over) tty falls back to plain lines.
        let (mode, board) = match (&board, &live) {
            (Some(_), None) => (ProgressMode::Plain, None),
            _ => (mode, board),
        };
        Progress {
            recorder,
            mode,
            begun,
            names,
            state: Mutex::new(State {
                started: HashMap::new(),
                outcomes: BTreeMap::new(),
            }),
            board,
            live: Mutex::new(live),
            finished: AtomicBool::new(false),
        }
    }

    /// Whether [`Progress::finish`] was called (the steps are over).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// Ends the live view: draws its final static frame and gives stderr back. Call it before
    /// printing anything after the build's steps (errors, the summary). Idempotent; a no-op
    /// in the other modes.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        let view = self.live.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut v) = view {
            v.finish();
        }
    }

    fn on_board(&self, f: impl FnOnce(&mut tty::Board)) {
        if let Some(b) = &self.board {
            f(&mut b.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    fn emit_plain(&self, line: String) {
        if self.mode == ProgressMode::Plain {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
        }
    }

    fn emit_json(&self, value: serde_json::Value) {
        if matches!(self.mode, ProgressMode::Rawjson) {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{value}");
        }
    }

    fn since_start(&self) -> u64 {
        self.begun.elapsed().as_millis() as u64
    }

    /// Everything that happened to each step, by step number.
    pub fn outcomes(&self) -> Vec<StepOutcome> {
        self.state
            .lock()
            .expect("progress state")
            .outcomes
            .values()
            .cloned()
            .collect()
    }

    /// The closing summary: total time, steps run vs cached, time per stage.
    pub fn summary(&self, what: &str) -> String {
        let outcomes = self.outcomes();
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
            self.begun.elapsed().as_secs_f64(),
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

    fn name(&self, node: usize) -> (String, Option<String>) {
        self.names
            .get(node)
            .cloned()
            .unwrap_or_else(|| (format!("step {node}"), None))
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

impl EventSink for Progress {
    fn event(&self, event: Event) {
        match &event {
            Event::Cached { node, key, source } => {
                let remote = match source {
                    CacheSource::Local => None,
                    CacheSource::Remote(r) => Some(r.as_str()),
                };
                self.recorder.step_cached(*node, &key.to_string(), remote);
            }
            Event::Started { node, key } => self.recorder.step_started(*node, &key.to_string()),
            Event::Completed {
                node,
                key,
                duration,
            } => self
                .recorder
                .step_completed(*node, &key.to_string(), *duration),
            Event::Failed { node, message } => self.recorder.step_failed(*node, message),
            Event::Log { .. } => {}
        }
        let now = self.since_start();
        let mut st = self.state.lock().expect("progress state");
        match event {
            Event::Cached { node, source, .. } => {
                let (name, stage) = self.name(node);
                let src = match &source {
                    CacheSource::Local => "local".to_owned(),
                    CacheSource::Remote(r) => r.clone(),
                };
                self.emit_plain(format!(
                    "#{} {name}\n#{} CACHED{}",
                    node + 1,
                    node + 1,
                    if src == "local" {
                        String::new()
                    } else {
                        format!(" (from {src})")
                    }
                ));
                self.emit_json(serde_json::json!({"time": unix_ms(), "elapsed_ms": now, "event": "cached", "step": node + 1, "name": name, "stage": stage, "source": src}));
                self.on_board(|b| b.cached(node, &name));
                st.outcomes.insert(
                    node,
                    StepOutcome {
                        step: node + 1,
                        name,
                        stage,
                        status: "cached",
                        cache_source: Some(src),
                        started_ms: None,
                        duration_ms: None,
                    },
                );
            }
            Event::Started { node, .. } => {
                let (name, stage) = self.name(node);
                st.started.insert(node, Instant::now());
                self.emit_plain(format!("#{} {name}", node + 1));
                self.emit_json(serde_json::json!({"time": unix_ms(), "elapsed_ms": now, "event": "started", "step": node + 1, "name": name, "stage": stage}));
                self.on_board(|b| b.started(node, &name));
                st.outcomes.insert(
                    node,
                    StepOutcome {
                        step: node + 1,
                        name,
                        stage,
                        status: "running",
                        cache_source: None,
                        started_ms: Some(now),
                        duration_ms: None,
                    },
                );
            }
            Event::Log { node, stream, line } => {
                let t = st
                    .started
                    .get(&node)
                    .map(|s| s.elapsed().as_secs_f64())
                    .unwrap_or(0.0);
                let text = String::from_utf8_lossy(&line);
                self.emit_plain(format!("#{} {t:.3} {text}", node + 1));
                self.emit_json(serde_json::json!({"time": unix_ms(), "elapsed_ms": now, "event": "log", "step": node + 1, "stream": stream, "data": text}));
                self.on_board(|b| b.log(node, &self.name(node).0, &line));
            }
            Event::Completed { node, duration, .. } => {
                self.emit_plain(format!("#{} DONE {:.1}s", node + 1, duration.as_secs_f64()));
                self.emit_json(serde_json::json!({"time": unix_ms(), "elapsed_ms": now, "event": "completed", "step": node + 1, "duration_ms": duration.as_millis() as u64}));
                self.on_board(|b| b.completed(node, &self.name(node).0, duration));
                if let Some(o) = st.outcomes.get_mut(&node) {
                    o.status = "run";
                    o.duration_ms = Some(duration.as_millis() as u64);
                }
            }
            Event::Failed { node, message } => {
                self.emit_plain(format!("#{} ERROR: {message}", node + 1));
                self.emit_json(serde_json::json!({"time": unix_ms(), "elapsed_ms": now, "event": "failed", "step": node + 1, "error": message}));
                self.on_board(|b| b.failed(node, &self.name(node).0));
                if let Some(o) = st.outcomes.get_mut(&node) {
                    o.status = "failed";
                }
            }
        }
    }
}
