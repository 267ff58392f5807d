//! The timeline report: one self-contained HTML page (inline CSS, JS and SVG; no external
//! assets) with a lane per stage, a bar per step, the critical path, waits, transfer spans and
//! a summary. The summary tables are plain HTML; the timeline is drawn by the page's script from
//! the embedded data so it can zoom, pack rows and show only the labels that fit.

use std::fmt::Write as _;

use serde_json::json;

use crate::compare::fmt_ms;
use crate::record::{BuildRecord, CacheResult, SpanKind};
use crate::timeline::{critical_path, lane_of, ready_ms, stage_lanes, stage_summaries, wait_ms};

/// Renders the HTML report of `record`.
pub fn render_report(record: &BuildRecord) -> String {
    let critical = critical_path(record);
    let data = timeline_data(record, &critical);
    // `</script` or `<!--` inside a <script> would change how HTML parses it; `\u003c` is the
    // same character to JSON.parse.
    let data = data.to_string().replace('<', "\\u003c");
    let mut html = String::with_capacity(64 * 1024);
    let title = format!("kiln build {} — {}", record.target, record.id);
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{CSS}</style></head>\n<body data-rendered=\"no\">\n",
        esc(&title)
    );
    let _ = writeln!(
        html,
        "<header><h1>kiln build <code>{}</code></h1><p class=\"meta\">build {} · {} · {} · status <b class=\"status-{}\">{}</b>{}</p></header>",
        esc(&record.target),
        esc(&record.id),
        esc(&humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(record.started_at)
        )
        .to_string()),
        fmt_ms(record.duration_ms()),
        record.status.as_str(),
        record.status.as_str(),
        record.error.as_ref().map(|e| format!(" — {}", esc(e))).unwrap_or_default(),
    );
    html.push_str(
        "<section id=\"timeline-section\"><h2>Timeline</h2>\
         <div class=\"controls\"><button id=\"zoom-out\" title=\"zoom out (ctrl+wheel)\">−</button>\
         <button id=\"zoom-fit\">fit</button><button id=\"zoom-in\" title=\"zoom in (ctrl+wheel)\">+</button>\
         <span class=\"legend\"><i class=\"lg run\"></i>ran <i class=\"lg cached\"></i>cached \
         <i class=\"lg crit\"></i>critical path <i class=\"lg wait\"></i>waiting for a slot/lock \
         <i class=\"lg failed\"></i>failed <i class=\"lg span\"></i>transfer/compress</span></div>\
         <div id=\"timeline\"><div id=\"lane-names\"></div><div id=\"chart\"></div></div>\
         <div id=\"script-error\" hidden></div></section>\n",
    );
    summary_tables(record, &critical, &mut html);
    let _ = write!(
        html,
        "<script id=\"build-data\" type=\"application/json\">{data}</script>\n<script>{JS}</script>\n</body></html>\n"
    );
    html
}

fn timeline_data(record: &BuildRecord, critical: &[usize]) -> serde_json::Value {
    let mut lanes = Vec::new();
    for lane in stage_lanes(record) {
        let mut steps: Vec<_> = record.steps.iter().filter(|s| lane_of(s) == lane).collect();
        steps.sort_by_key(|s| (s.start_ms.or(s.end_ms), s.index));
        let bars: Vec<_> = steps
            .iter()
            .filter(|s| s.executed() || s.cache.is_cached())
            .map(|s| {
                let cls = match &s.cache {
                    CacheResult::Failed => "failed",
                    c if c.is_cached() => "cached",
                    _ if critical.contains(&s.index) => "run crit",
                    _ => "run",
                };
                let mut title = format!("{}\n{}", s.description, s.cache.label());
                if let Some(d) = s.duration_ms() {
                    let _ = write!(title, " · {}", fmt_ms(d));
                }
                let wait = wait_ms(record, s);
                if wait > 0 {
                    let _ = write!(
                        title,
                        " · waited {} after its inputs were ready",
                        fmt_ms(wait)
                    );
                }
                if let Some(k) = &s.cache_key {
                    let _ = write!(title, "\nkey {}", short(k));
                }
                if let Some(e) = &s.error {
                    let _ = write!(title, "\nerror: {e}");
                }
                let (start, end) = match (s.start_ms, s.end_ms) {
                    (Some(a), Some(b)) => (a, b.max(a)),
                    (None, Some(b)) => (b, b),
                    _ => (0, 0),
                };
                json!({
                    "s": start, "e": end, "c": cls, "l": s.description, "t": title,
                    "w": (wait > 0).then(|| ready_ms(record, s)),
                })
            })
            .collect();
        lanes.push(json!({ "name": lane, "kind": "stage", "bars": bars }));
    }
    for kind in SpanKind::ALL {
        let mut spans: Vec<_> = record.spans.iter().filter(|s| s.kind == kind).collect();
        if spans.is_empty() {
            continue;
        }
        spans.sort_by_key(|s| s.start_ms);
        let bars: Vec<_> = spans
            .iter()
            .map(|s| {
                let label = if s.bytes > 0 {
                    format!("{} ({})", s.name, fmt_bytes(s.bytes))
                } else {
                    s.name.clone()
                };
                json!({
                    "s": s.start_ms, "e": s.end_ms.max(s.start_ms),
                    "c": format!("span {}", kind.as_str().replace(' ', "-")),
                    "l": label.clone(),
                    "t": format!("{} {}\n{}", kind.as_str(), label, fmt_ms(s.end_ms.saturating_sub(s.start_ms))),
                })
            })
            .collect();
        lanes.push(json!({ "name": kind.as_str(), "kind": "span", "bars": bars }));
    }
    json!({ "total": record.duration_ms().max(1), "lanes": lanes })
}

fn summary_tables(record: &BuildRecord, critical: &[usize], html: &mut String) {
    let cached_local = record
        .steps
        .iter()
        .filter(|s| s.cache == CacheResult::CachedLocal)
        .count();
    let cached_remote = record
        .steps
        .iter()
        .filter(|s| matches!(s.cache, CacheResult::CachedRemote(_)))
        .count();
    let mut sources: Vec<&str> = record
        .steps
        .iter()
        .filter_map(|s| match &s.cache {
            CacheResult::CachedRemote(r) => Some(r.as_str()),
            _ => None,
        })
        .collect();
    sources.sort_unstable();
    sources.dedup();
    let crit_ms: u64 = critical
        .iter()
        .filter_map(|i| record.step(*i))
        .filter_map(|s| s.duration_ms())
        .sum();
    let _ = writeln!(
        html,
        "<section id=\"summary\"><h2>Summary</h2><table class=\"kv\">\
         <tr><th>total wall time</th><td>{}</td></tr>\
         <tr><th>steps</th><td>{} ({} ran, {} cached: {} local, {} remote{})</td></tr>\
         <tr><th>critical path</th><td>{} steps, {} of running</td></tr>\
         <tr><th>downloaded</th><td>{}</td></tr><tr><th>uploaded</th><td>{}</td></tr>{}</table>",
        fmt_ms(record.duration_ms()),
        record.steps.len(),
        record.steps_run(),
        record.steps_cached(),
        cached_local,
        cached_remote,
        if sources.is_empty() {
            String::new()
        } else {
            format!(" from {}", esc(&sources.join(", ")))
        },
        critical.len(),
        fmt_ms(crit_ms),
        fmt_bytes(record.bytes_downloaded),
        fmt_bytes(record.bytes_uploaded),
        record
            .image_digest
            .as_ref()
            .map(|d| format!("<tr><th>image</th><td><code>{}</code></td></tr>", esc(d)))
            .unwrap_or_default(),
    );
    html.push_str(
        "<h3>Stages</h3><table id=\"stage-table\"><tr><th>stage</th><th>steps</th><th>ran</th>\
         <th>cached local</th><th>cached remote</th><th>busy</th><th>first start → last end</th></tr>",
    );
    let sums = stage_summaries(record);
    for lane in stage_lanes(record) {
        if let Some(s) = sums.get(&lane) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&lane), s.steps, s.run, s.cached_local, s.cached_remote, fmt_ms(s.busy_ms), fmt_ms(s.span_ms)
            );
        }
    }
    html.push_str("</table>\n");
    if !record.spans.is_empty() {
        html.push_str("<h3>Transfers and packing</h3><table id=\"span-table\"><tr><th>kind</th><th>count</th><th>time</th><th>bytes</th></tr>");
        for kind in SpanKind::ALL {
            let spans: Vec<_> = record.spans.iter().filter(|s| s.kind == kind).collect();
            if spans.is_empty() {
                continue;
            }
            let time: u64 = spans
                .iter()
                .map(|s| s.end_ms.saturating_sub(s.start_ms))
                .sum();
            let bytes: u64 = spans.iter().map(|s| s.bytes).sum();
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                kind.as_str(),
                spans.len(),
                fmt_ms(time),
                fmt_bytes(bytes)
            );
        }
        html.push_str("</table>\n");
    }
    if !critical.is_empty() {
        html.push_str("<h3>Critical path</h3><table id=\"critical-table\"><tr><th>step</th><th>start</th><th>duration</th><th>waited</th></tr>");
        for s in critical.iter().filter_map(|i| record.step(*i)) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&s.description),
                fmt_ms(s.start_ms.unwrap_or(0)),
                fmt_ms(s.duration_ms().unwrap_or(0)),
                fmt_ms(wait_ms(record, s))
            );
        }
        html.push_str("</table>\n");
    }
    let mut slow: Vec<_> = record.steps.iter().filter(|s| s.executed()).collect();
    slow.sort_by_key(|s| std::cmp::Reverse((s.duration_ms(), s.index)));
    if !slow.is_empty() {
        html.push_str("<h3>Slowest steps</h3><table id=\"slow-table\"><tr><th>step</th><th>duration</th><th>waited</th></tr>");
        for s in slow.iter().take(10) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&s.description),
                fmt_ms(s.duration_ms().unwrap_or(0)),
                fmt_ms(wait_ms(record, s))
            );
        }
        html.push_str("</table>\n");
    }
    html.push_str("</section>\n");
}

fn short(key: &str) -> &str {
    let hex = key.split_once(':').map(|(_, h)| h).unwrap_or(key);
    hex.get(..12).unwrap_or(hex)
}

/// Formats a byte count as `512 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB`.
pub(crate) fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = include_str!("report.css");
const JS: &str = include_str!("report.js");
