//! Build records and what is made from them: the history store under `<state root>/history/`,
//! `compare` (why a step lost its cache hit), the self-contained HTML timeline report, the
//! Chrome trace-event file and (feature `otel`) OpenTelemetry export.
//!
//! A build fills a [`Recorder`] from the solver's event stream and from pull/push/export code;
//! [`Recorder::finish`] yields the [`BuildRecord`] every other part consumes.

mod compare;
#[cfg(feature = "otel")]
mod otel;
mod record;
mod recorder;
mod report;
mod store;
mod timeline;
mod trace;

pub use compare::{compare_records, Comparison, InputChange, StepChange};
#[cfg(feature = "otel")]
pub use otel::{export_otlp, otlp_configured, OtelError};
pub use record::{
    BuildRecord, BuildStatus, CacheResult, Span, SpanKind, StepRecord, RECORD_VERSION,
};
pub use recorder::{Recorder, SpanGuard, SpanId, StepInfo};
pub use report::render_report;
pub use store::{HistoryError, HistoryStore, DEFAULT_KEEP};
pub use trace::chrome_trace;

/// Writes the HTML timeline report of `record` to `path` (for `--report FILE.html`).
pub fn write_report(record: &BuildRecord, path: &std::path::Path) -> Result<(), HistoryError> {
    store::write_atomic(path, render_report(record).as_bytes(), "writing report")
}

/// Writes the Chrome trace-event JSON of `record` to `path` (for `--trace FILE.json`).
pub fn write_trace(record: &BuildRecord, path: &std::path::Path) -> Result<(), HistoryError> {
    let json =
        serde_json::to_vec(&chrome_trace(record)).map_err(|source| HistoryError::Encode {
            id: record.id.clone(),
            source,
        })?;
    store::write_atomic(path, &json, "writing trace")
}

/// Formats milliseconds for people: `850ms`, `12.3s`, `4m05s`.
pub fn format_ms(ms: u64) -> String {
    compare::fmt_ms(ms)
}

/// Formats a byte count for people: `512 B`, `1.5 KiB`, `3.2 MiB`.
pub fn format_bytes(n: u64) -> String {
    report::fmt_bytes(n)
}

/// Formats a unix time in ms as RFC 3339 UTC, to the second: `2026-11-28T19:45:26Z`.
pub fn format_unix_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}
