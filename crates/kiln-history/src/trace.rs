//! Chrome trace-event JSON (the format Perfetto and `chrome://tracing` open): one complete
//! (`"ph":"X"`) event per executed step and per span, a thread per stage lane and per span
//! kind, instant events for cache hits.

use serde_json::{json, Value};

use crate::record::{BuildRecord, SpanKind};
use crate::timeline::{critical_path, lane_of, stage_lanes, wait_ms};

/// The record as a Chrome trace-event document (`{"traceEvents": [...]}`), times in µs.
pub fn chrome_trace(record: &BuildRecord) -> Value {
    const PID: u64 = 1;
    let lanes = stage_lanes(record);
    let tid_of = |lane: &str| lanes.iter().position(|l| l == lane).unwrap_or(0) as u64 + 1;
    let span_tid = |kind: SpanKind| {
        lanes.len() as u64 + 1 + SpanKind::ALL.iter().position(|k| *k == kind).unwrap_or(0) as u64
    };
    let critical = critical_path(record);
    let mut events = vec![json!({
        "ph": "M", "pid": PID, "tid": 0, "name": "process_name",
        "args": { "name": format!("kiln build {} ({})", record.target, record.id) }
    })];
    for (n, lane) in lanes.iter().enumerate() {
        events.push(json!({
            "ph": "M", "pid": PID, "tid": n as u64 + 1, "name": "thread_name",
            "args": { "name": format!("stage {lane}") }
        }));
        events.push(json!({
            "ph": "M", "pid": PID, "tid": n as u64 + 1, "name": "thread_sort_index",
            "args": { "sort_index": n }
        }));
    }
    for kind in SpanKind::ALL {
        if record.spans.iter().any(|s| s.kind == kind) {
            events.push(json!({
                "ph": "M", "pid": PID, "tid": span_tid(kind), "name": "thread_name",
                "args": { "name": kind.as_str() }
            }));
        }
    }
    let mut steps: Vec<_> = record.steps.iter().collect();
    steps.sort_by_key(|s| s.index);
    for s in steps {
        let tid = tid_of(lane_of(s));
        let mut args = json!({
            "index": s.index,
            "stage": s.stage,
            "cache": s.cache.label(),
            "cache_key": s.cache_key,
            "depends_on": s.depends_on,
        });
        if let Some(e) = &s.error {
            args["error"] = json!(e);
        }
        if s.executed() {
            let (start, end) = (s.start_ms.unwrap_or(0), s.end_ms.unwrap_or(0));
            args["waited_ms"] = json!(wait_ms(record, s));
            args["critical_path"] = json!(critical.contains(&s.index));
            events.push(json!({
                "ph": "X", "pid": PID, "tid": tid, "name": s.description,
                "cat": if critical.contains(&s.index) { "step,critical" } else { "step" },
                "ts": start * 1000, "dur": end.saturating_sub(start) * 1000,
                "args": args,
            }));
        } else if s.cache.is_cached() {
            events.push(json!({
                "ph": "i", "s": "t", "pid": PID, "tid": tid, "name": s.description,
                "cat": "cached", "ts": s.end_ms.unwrap_or(0) * 1000, "args": args,
            }));
        }
    }
    for sp in &record.spans {
        events.push(json!({
            "ph": "X", "pid": PID, "tid": span_tid(sp.kind),
            "name": format!("{} {}", sp.kind.as_str(), sp.name),
            "cat": sp.kind.as_str(),
            "ts": sp.start_ms * 1000, "dur": sp.end_ms.saturating_sub(sp.start_ms) * 1000,
            "args": { "bytes": sp.bytes },
        }));
    }
    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "kiln_build_id": record.id,
            "target": record.target,
            "status": record.status.as_str(),
            "bytes_downloaded": record.bytes_downloaded,
            "bytes_uploaded": record.bytes_uploaded,
        }
    })
}
