//! The build record: what one `kiln build` did, step by step, as stored in history.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Format version of [`BuildRecord`]; bumped when a field changes meaning. Readers refuse
/// records newer than they know.
pub const RECORD_VERSION: u32 = 1;

/// One build, as recorded: options, timing, cache results, spans and bytes moved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    /// Format version ([`RECORD_VERSION`] when written by this kiln).
    pub version: u32,
    /// Unique id, sortable by start time (hex ms timestamp + random suffix).
    pub id: String,
    /// The stage built (`--target`), or the last stage's name.
    pub target: String,
    /// The command line as given.
    #[serde(default)]
    pub argv: Vec<String>,
    /// A summary of the options that shape the result (outputs, caches, build args).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Start, unix milliseconds.
    pub started_at: u64,
    /// End, unix milliseconds.
    pub ended_at: u64,
    /// How the build ended.
    pub status: BuildStatus,
    /// The error, for a failed build.
    #[serde(default)]
    pub error: Option<String>,
    /// The digest of the image produced, if any.
    #[serde(default)]
    pub image_digest: Option<String>,
    /// Bytes fetched from registries (base layers, cache layers).
    #[serde(default)]
    pub bytes_downloaded: u64,
    /// Bytes sent to registries (image and cache blobs).
    #[serde(default)]
    pub bytes_uploaded: u64,
    /// Steps, by index (the solver's node id).
    pub steps: Vec<StepRecord>,
    /// Pulls, pushes, compression, cache export/import, context transfer, export.
    #[serde(default)]
    pub spans: Vec<Span>,
}

/// How a build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    /// Every step and export finished.
    Succeeded,
    /// A step or an export failed.
    Failed,
    /// Interrupted before it finished.
    Cancelled,
}

impl BuildStatus {
    /// The lower-case word shown in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Succeeded => "ok",
            BuildStatus::Failed => "failed",
            BuildStatus::Cancelled => "cancelled",
        }
    }
}

/// One step of a build (a vertex of the build graph).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The solver's node id; unique within a record.
    pub index: usize,
    /// e.g. `[app 3/7] RUN make`.
    pub description: String,
    /// The stage it belongs to; empty for shared sources (base images, contexts).
    #[serde(default)]
    pub stage: String,
    /// Indices of the steps whose results it consumes.
    #[serde(default)]
    pub depends_on: Vec<usize>,
    /// Whether it ran or came from a cache.
    pub cache: CacheResult,
    /// Its cache key, when computed.
    #[serde(default)]
    pub cache_key: Option<String>,
    /// Start, ms after the build started; `None` if it never ran (cached or not reached).
    #[serde(default)]
    pub start_ms: Option<u64>,
    /// End, ms after the build started; for a cache hit, when the hit was found.
    #[serde(default)]
    pub end_ms: Option<u64>,
    /// What the key was computed from: `file:PATH` → digest, `arg:NAME` → value,
    /// `base` → image digest, `env:NAME`, `cmd` …; compare diffs these to say why a hit was lost.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// The error, for a failed step.
    #[serde(default)]
    pub error: Option<String>,
}

impl StepRecord {
    /// How long it ran, in ms; `None` unless it ran (or failed) with both ends known.
    pub fn duration_ms(&self) -> Option<u64> {
        match (self.start_ms, self.end_ms) {
            (Some(s), Some(e)) => Some(e.saturating_sub(s)),
            _ => None,
        }
    }

    /// True when the step executed (successfully or not) rather than being cached or skipped.
    pub fn executed(&self) -> bool {
        matches!(self.cache, CacheResult::Run | CacheResult::Failed) && self.start_ms.is_some()
    }
}

/// Where a step's result came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheResult {
    /// It ran.
    Run,
    /// Found in this machine's state dir.
    CachedLocal,
    /// Found in an imported cache (named as the user gave it, e.g. a registry ref).
    CachedRemote(String),
    /// It ran and failed.
    Failed,
    /// Never reached (the build failed or was cancelled first, or a cached step above it made
    /// it unnecessary).
    NotRun,
}

impl CacheResult {
    /// True for a cache hit of either kind.
    pub fn is_cached(&self) -> bool {
        matches!(
            self,
            CacheResult::CachedLocal | CacheResult::CachedRemote(_)
        )
    }

    /// Short label for tables: `run`, `cached`, `cached (REF)`, `failed`, `-`.
    pub fn label(&self) -> String {
        match self {
            CacheResult::Run => "run".into(),
            CacheResult::CachedLocal => "cached".into(),
            CacheResult::CachedRemote(s) => format!("cached ({s})"),
            CacheResult::Failed => "failed".into(),
            CacheResult::NotRun => "-".into(),
        }
    }
}

/// Work that is not a step: moving and packing bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Span {
    /// What kind of work.
    pub kind: SpanKind,
    /// e.g. the image ref pulled, the layer digest compressed.
    pub name: String,
    /// Start, ms after the build started.
    pub start_ms: u64,
    /// End, ms after the build started.
    pub end_ms: u64,
    /// Bytes moved or produced.
    #[serde(default)]
    pub bytes: u64,
}

/// The kinds of [`Span`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanKind {
    /// Fetching an image's manifest, config or layers.
    Pull,
    /// Sending blobs and manifests to a registry.
    Push,
    /// Compressing a layer.
    Compress,
    /// Writing the build cache to a registry or directory.
    CacheExport,
    /// Reading a remote build cache's manifest and graph.
    CacheImport,
    /// Reading and hashing a local context.
    Context,
    /// Writing the result (image store, OCI tarball, local dir).
    Export,
}

impl SpanKind {
    /// Every kind, in display order.
    pub const ALL: [SpanKind; 7] = [
        SpanKind::Context,
        SpanKind::CacheImport,
        SpanKind::Pull,
        SpanKind::Compress,
        SpanKind::Export,
        SpanKind::Push,
        SpanKind::CacheExport,
    ];

    /// The name shown in lanes and traces.
    pub fn as_str(self) -> &'static str {
        match self {
            SpanKind::Pull => "pull",
            SpanKind::Push => "push",
            SpanKind::Compress => "compress",
            SpanKind::CacheExport => "cache export",
            SpanKind::CacheImport => "cache import",
            SpanKind::Context => "context",
            SpanKind::Export => "export",
        }
    }
}

impl BuildRecord {
    /// Wall time in ms.
    pub fn duration_ms(&self) -> u64 {
        self.ended_at.saturating_sub(self.started_at)
    }

    /// Number of steps that executed.
    pub fn steps_run(&self) -> usize {
        self.steps.iter().filter(|s| s.executed()).count()
    }

    /// Number of steps served from a cache.
    pub fn steps_cached(&self) -> usize {
        self.steps.iter().filter(|s| s.cache.is_cached()).count()
    }

    /// The step with this index.
    pub fn step(&self, index: usize) -> Option<&StepRecord> {
        self.steps.iter().find(|s| s.index == index)
    }
}
