//! [`Recorder`]: filled live by a running build (from many tasks at once), it produces the
//! [`BuildRecord`].

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::record::{
    BuildRecord, BuildStatus, CacheResult, Span, SpanKind, StepRecord, RECORD_VERSION,
};

/// What is known about a step before it runs (from the build graph).
#[derive(Debug, Clone, Default)]
pub struct StepInfo {
    /// e.g. `[app 3/7] RUN make`.
    pub description: String,
    /// Stage name; empty for shared sources.
    pub stage: String,
    /// Node ids of the steps whose results it consumes.
    pub depends_on: Vec<usize>,
    /// What its cache key is computed from (see [`StepRecord::inputs`]).
    pub inputs: BTreeMap<String, String>,
}

/// Handle of a span begun with [`Recorder::span_begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(usize);

/// Ends its span when dropped; bytes can be added while it is open.
pub struct SpanGuard<'a> {
    recorder: &'a Recorder,
    id: SpanId,
}

impl SpanGuard<'_> {
    /// Adds to the bytes moved by this span.
    pub fn add_bytes(&self, n: u64) {
        self.recorder.span_add_bytes(self.id, n);
    }
}

impl Drop for SpanGuard<'_> {
    fn drop(&mut self) {
        self.recorder.span_end(self.id, 0);
    }
}

/// Collects a build's events into a [`BuildRecord`]. All methods take `&self` and may be called
/// from any thread; events for unknown steps create them.
pub struct Recorder {
    id: String,
    origin: Instant,
    started_at: u64,
    state: Mutex<State>,
}

struct State {
    target: String,
    argv: Vec<String>,
    options: BTreeMap<String, String>,
    steps: BTreeMap<usize, StepRecord>,
    spans: Vec<(Span, bool)>,
    bytes_downloaded: u64,
    bytes_uploaded: u64,
    image_digest: Option<String>,
}

impl Recorder {
    /// Starts recording a build of `target` run with `argv`; the build's clock starts now.
    pub fn new(target: &str, argv: Vec<String>) -> Recorder {
        let started_at = unix_ms();
        Recorder {
            id: new_build_id(started_at),
            origin: Instant::now(),
            started_at,
            state: Mutex::new(State {
                target: target.to_string(),
                argv,
                options: BTreeMap::new(),
                steps: BTreeMap::new(),
                spans: Vec::new(),
                bytes_downloaded: 0,
                bytes_uploaded: 0,
                image_digest: None,
            }),
        }
    }

    /// The id the record will have.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep recording.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Records one option of the build (e.g. `output`, `cache-to`, `build-arg:VERSION`).
    pub fn set_option(&self, key: &str, value: &str) {
        self.state()
            .options
            .insert(key.to_string(), value.to_string());
    }

    /// Declares step `node` (the solver's node id) with what the graph knows about it.
    pub fn declare_step(&self, node: usize, info: StepInfo) {
        let mut st = self.state();
        let step = step_entry(&mut st.steps, node);
        step.description = info.description;
        step.stage = info.stage;
        step.depends_on = info.depends_on;
        step.inputs.extend(info.inputs);
    }

    /// Adds entries to what step `node`'s key was computed from (see [`StepRecord::inputs`]).
    pub fn set_step_inputs(&self, node: usize, inputs: BTreeMap<String, String>) {
        step_entry(&mut self.state().steps, node)
            .inputs
            .extend(inputs);
    }

    /// Step `node` found its result in a cache (`remote`: the imported cache's name, or `None`
    /// for the local store).
    pub fn step_cached(&self, node: usize, cache_key: &str, remote: Option<&str>) {
        let now = self.now_ms();
        let mut st = self.state();
        let step = step_entry(&mut st.steps, node);
        step.cache = match remote {
            Some(r) => CacheResult::CachedRemote(r.to_string()),
            None => CacheResult::CachedLocal,
        };
        step.cache_key = Some(cache_key.to_string());
        step.start_ms = None;
        step.end_ms = Some(now);
    }

    /// Step `node` started running.
    pub fn step_started(&self, node: usize, cache_key: &str) {
        let now = self.now_ms();
        let mut st = self.state();
        let step = step_entry(&mut st.steps, node);
        step.cache = CacheResult::Run;
        step.cache_key = Some(cache_key.to_string());
        step.start_ms = Some(now);
        step.end_ms = None;
    }

    /// Step `node` finished running after `duration` (used for its start if `step_started`
    /// was never called).
    pub fn step_completed(&self, node: usize, cache_key: &str, duration: std::time::Duration) {
        let now = self.now_ms();
        let mut st = self.state();
        let step = step_entry(&mut st.steps, node);
        step.cache = CacheResult::Run;
        step.cache_key = Some(cache_key.to_string());
        if step.start_ms.is_none() {
            step.start_ms = Some(now.saturating_sub(duration.as_millis() as u64));
        }
        step.end_ms = Some(now);
    }

    /// Step `node` failed with `message`.
    pub fn step_failed(&self, node: usize, message: &str) {
        let now = self.now_ms();
        let mut st = self.state();
        let step = step_entry(&mut st.steps, node);
        step.cache = CacheResult::Failed;
        step.start_ms.get_or_insert(now);
        step.end_ms = Some(now);
        step.error = Some(message.to_string());
    }

    /// Begins a span of `kind` named `name` (a ref, a digest); end it with [`Recorder::span_end`].
    pub fn span_begin(&self, kind: SpanKind, name: &str) -> SpanId {
        let now = self.now_ms();
        let mut st = self.state();
        st.spans.push((
            Span {
                kind,
                name: name.to_string(),
                start_ms: now,
                end_ms: now,
                bytes: 0,
            },
            true,
        ));
        SpanId(st.spans.len() - 1)
    }

    /// Adds to a span's bytes.
    pub fn span_add_bytes(&self, id: SpanId, bytes: u64) {
        if let Some((span, _)) = self.state().spans.get_mut(id.0) {
            span.bytes += bytes;
        }
    }

    /// Ends a span, adding `bytes` to it; ending it twice keeps the first end.
    pub fn span_end(&self, id: SpanId, bytes: u64) {
        let now = self.now_ms();
        if let Some((span, open)) = self.state().spans.get_mut(id.0) {
            span.bytes += bytes;
            if *open {
                span.end_ms = now;
                *open = false;
            }
        }
    }

    /// Begins a span that ends when the returned guard is dropped.
    pub fn span(&self, kind: SpanKind, name: &str) -> SpanGuard<'_> {
        SpanGuard {
            recorder: self,
            id: self.span_begin(kind, name),
        }
    }

    /// Counts bytes fetched from registries.
    pub fn add_bytes_downloaded(&self, n: u64) {
        self.state().bytes_downloaded += n;
    }

    /// Counts bytes sent to registries.
    pub fn add_bytes_uploaded(&self, n: u64) {
        self.state().bytes_uploaded += n;
    }

    /// Records the digest of the image produced.
    pub fn set_image_digest(&self, digest: &str) {
        self.state().image_digest = Some(digest.to_string());
    }

    /// The record so far, ended now: `Ok(())` for a finished build, `Err(message)` for a
    /// failed one, `cancelled` if interrupted. Steps still running are marked failed ("did not
    /// finish"), open spans end now. May be called more than once.
    pub fn finish(&self, result: Result<(), String>, cancelled: bool) -> BuildRecord {
        let now = self.now_ms();
        let st = self.state();
        let mut steps: Vec<StepRecord> = st.steps.values().cloned().collect();
        for s in &mut steps {
            if s.cache == CacheResult::Run && s.end_ms.is_none() {
                s.cache = CacheResult::Failed;
                s.end_ms = Some(now);
                s.error = Some("did not finish".into());
            }
        }
        let spans = st
            .spans
            .iter()
            .map(|(span, open)| {
                let mut span = span.clone();
                if *open {
                    span.end_ms = now;
                }
                span
            })
            .collect();
        let (status, error) = match (result, cancelled) {
            (_, true) => (BuildStatus::Cancelled, None),
            (Ok(()), false) => (BuildStatus::Succeeded, None),
            (Err(e), false) => (BuildStatus::Failed, Some(e)),
        };
        BuildRecord {
            version: RECORD_VERSION,
            id: self.id.clone(),
            target: st.target.clone(),
            argv: st.argv.clone(),
            options: st.options.clone(),
            started_at: self.started_at,
            ended_at: self.started_at + now,
            status,
            error,
            image_digest: st.image_digest.clone(),
            bytes_downloaded: st.bytes_downloaded,
            bytes_uploaded: st.bytes_uploaded,
            steps,
            spans,
        }
    }
}

fn step_entry(steps: &mut BTreeMap<usize, StepRecord>, node: usize) -> &mut StepRecord {
    steps.entry(node).or_insert_with(|| StepRecord {
        index: node,
        description: format!("step {node}"),
        stage: String::new(),
        depends_on: Vec::new(),
        cache: CacheResult::NotRun,
        cache_key: None,
        start_ms: None,
        end_ms: None,
        inputs: BTreeMap::new(),
        error: None,
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new build id: the start time in hex (so ids sort by time) and 32 random bits.
fn new_build_id(started_at: u64) -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(started_at);
    h.write_u32(std::process::id());
    let random = h.finish() as u32;
    format!("{started_at:012x}{random:08x}")
}
