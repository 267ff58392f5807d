//! What a build reports while it runs: the solver's step events and the session's own
//! (warnings, caches, exports, the end). A caller renders them through an [`EventSink`]; the
//! session never prints.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// Receives a build's events. Called from the thread that runs [`crate::run`], in order;
/// must not block for long.
pub trait EventSink: Send + Sync {
    /// Handles one event.
    fn event(&self, event: BuildEvent);
}

impl<F: Fn(BuildEvent) + Send + Sync> EventSink for F {
    fn event(&self, event: BuildEvent) {
        self(event)
    }
}

/// The name a step is shown under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepName {
    /// `[stage n/m] INSTRUCTION`.
    pub description: String,
    /// The stage the step belongs to, if any; in a build of several platforms, with the
    /// platform it builds for (`linux/arm64 builder`), so each stage and platform is a lane.
    pub stage: Option<String>,
    /// The platform the step builds for (`linux/arm64`); `Some` only when the build has
    /// several target platforms (the description then starts `[linux/arm64 builder 3/5]`).
    pub platform: Option<String>,
}

/// How one step ended, for summaries and the metadata file (`kiln.steps`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepOutcome {
    /// Step number as shown (vertex index + 1).
    pub step: usize,
    /// `[stage n/m] INSTRUCTION`.
    pub name: String,
    /// Stage name, if the step belongs to one.
    pub stage: Option<String>,
    /// `run`, `cached`, `running` (never finished) or `failed`.
    pub status: &'static str,
    /// Where a cached result came from (`local`, or an imported cache ref).
    pub cache_source: Option<String>,
    /// Milliseconds since the steps began when the step started running.
    pub started_ms: Option<u64>,
    /// How long it ran.
    pub duration_ms: Option<u64>,
}

/// One thing that happened during a build, in the order it happened.
#[derive(Debug, Clone)]
pub enum BuildEvent {
    /// Something the user should know that does not fail the build (shown as
    /// `kiln: warning: MESSAGE`).
    Warning(String),
    /// The build graph is known and its steps are about to be solved; step `i` of
    /// [`BuildEvent::Step`] events is `steps[i]`.
    Planned {
        /// Every step of the graph, by step index.
        steps: Vec<StepName>,
    },
    /// A step was cached, started, logged, completed or failed.
    Step(kiln_solver::Event),
    /// No step runs any more (the solve ended, well or not); exporting follows.
    StepsFinished,
    /// An imported cache was read.
    CacheImported {
        /// Its ref or directory.
        name: String,
    },
    /// An output was written (`--output`).
    OutputExported {
        /// The output's type (`image`, `registry`, `oci`, `docker`, `local`, `tar`, ...).
        kind: String,
        /// Where it went, when the exporter says ([`crate::export::Exporter::destination`]).
        destination: Option<String>,
    },
    /// A cache was exported (`--export-cache`).
    CacheExported {
        /// What was written where (`N records, M blobs to REF`).
        summary: String,
        /// How long the export took.
        elapsed: Duration,
    },
    /// The `--report` timeline page was written.
    ReportWritten {
        /// Where.
        path: PathBuf,
    },
    /// A step failed or the build was cancelled; the session ends after recording history.
    Failed {
        /// The error, with its causes.
        error: String,
        /// Every step that got as far as being cached or started.
        steps: Vec<StepOutcome>,
    },
    /// The build succeeded: outputs and caches are written.
    Finished {
        /// The target stage's name (`stage-N` for an unnamed one).
        target: String,
        /// Every step's outcome.
        steps: Vec<StepOutcome>,
        /// Registry bytes downloaded by this build.
        bytes_downloaded: u64,
        /// Registry bytes uploaded by this build.
        bytes_uploaded: u64,
        /// The manifest digest of the image made, if any output made one.
        image_digest: Option<String>,
    },
}
