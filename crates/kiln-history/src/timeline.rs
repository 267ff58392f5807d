//! What the report and the trace share: lanes, the critical path and waits of a build.

use std::collections::{BTreeMap, HashSet};

use crate::record::{BuildRecord, StepRecord};

/// Lane name for steps outside any stage (base images, contexts).
pub(crate) const SOURCES_LANE: &str = "(sources)";

/// A stage's lane name.
pub(crate) fn lane_of(step: &StepRecord) -> &str {
    if step.stage.is_empty() {
        SOURCES_LANE
    } else {
        &step.stage
    }
}

/// Stage lanes in the order their first step appears (by index).
pub(crate) fn stage_lanes(record: &BuildRecord) -> Vec<String> {
    let mut steps: Vec<&StepRecord> = record.steps.iter().collect();
    steps.sort_by_key(|s| s.index);
    let mut seen = HashSet::new();
    let mut lanes = Vec::new();
    for s in steps {
        let lane = lane_of(s);
        if seen.insert(lane.to_string()) {
            lanes.push(lane.to_string());
        }
    }
    lanes
}

/// When every input of `step` was available (ms after start): the latest end among its deps.
pub(crate) fn ready_ms(record: &BuildRecord, step: &StepRecord) -> u64 {
    step.depends_on
        .iter()
        .filter_map(|d| record.step(*d))
        .filter_map(|d| d.end_ms)
        .max()
        .unwrap_or(0)
}

/// How long an executed step waited after its inputs were ready (a parallelism limit, a lock,
/// a pull), in ms.
pub(crate) fn wait_ms(record: &BuildRecord, step: &StepRecord) -> u64 {
    match step.start_ms {
        Some(start) if step.executed() => start.saturating_sub(ready_ms(record, step)),
        _ => 0,
    }
}

/// The critical path: starting at the executed step that ended last, repeatedly the executed
/// dependency that ended last — the chain that set the build's length. First step first.
pub(crate) fn critical_path(record: &BuildRecord) -> Vec<usize> {
    let mut current = record
        .steps
        .iter()
        .filter(|s| s.executed() && s.end_ms.is_some())
        .max_by_key(|s| (s.end_ms, s.index));
    let mut path = Vec::new();
    let mut seen = HashSet::new();
    while let Some(s) = current {
        if !seen.insert(s.index) {
            break;
        }
        path.push(s.index);
        current = s
            .depends_on
            .iter()
            .filter_map(|d| record.step(*d))
            .filter(|d| d.executed() && d.end_ms.is_some())
            .max_by_key(|d| (d.end_ms, d.index));
    }
    path.reverse();
    path
}

/// Per-stage figures for the summary.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct StageSummary {
    pub steps: usize,
    pub run: usize,
    pub cached_local: usize,
    pub cached_remote: usize,
    /// Time at least one of its steps was running (union of intervals), ms.
    pub busy_ms: u64,
    /// First start to last end, ms.
    pub span_ms: u64,
}

/// Summary per stage lane, keyed by lane name.
pub(crate) fn stage_summaries(record: &BuildRecord) -> BTreeMap<String, StageSummary> {
    let mut out: BTreeMap<String, StageSummary> = BTreeMap::new();
    let mut intervals: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for s in &record.steps {
        let lane = lane_of(s).to_string();
        let e = out.entry(lane.clone()).or_default();
        e.steps += 1;
        match &s.cache {
            crate::CacheResult::CachedLocal => e.cached_local += 1,
            crate::CacheResult::CachedRemote(_) => e.cached_remote += 1,
            _ if s.executed() => e.run += 1,
            _ => {}
        }
        if let (true, Some(a), Some(b)) = (s.executed(), s.start_ms, s.end_ms) {
            intervals.entry(lane).or_default().push((a, b.max(a)));
        }
    }
    for (lane, mut iv) in intervals {
        iv.sort_unstable();
        let mut busy = 0;
        let mut cur: Option<(u64, u64)> = None;
        for (a, b) in iv.iter().copied() {
            cur = match cur {
                Some((x, y)) if a <= y => Some((x, y.max(b))),
                Some((x, y)) => {
                    busy += y - x;
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((x, y)) = cur {
            busy += y - x;
        }
        let first = iv.iter().map(|i| i.0).min().unwrap_or(0);
        let last = iv.iter().map(|i| i.1).max().unwrap_or(0);
        if let Some(e) = out.get_mut(&lane) {
            e.busy_ms = busy;
            e.span_ms = last.saturating_sub(first);
        }
    }
    out
}
