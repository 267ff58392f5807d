//! Build records and what is made from them: the history store under `<state root>/history/`,
//! `compare` (why a step lost its cache hit), the self-contained HTML timeline report, the
//! Chrome trace-event file and (feature `otel`) OpenTelemetry export.
//!
//! A build fills a [`Recorder`] from the solver's event stream and from pull/push/export code;
//! [`Recorder::finish`] yields the [`BuildRecord`] every other part consumes.

mod compare;
mod record;
mod recorder;
mod report;
mod store;
mod timeline;
mod trace;

pub use compare::{compare_records, Comparison, InputChange, StepChange};
pub use record::{
    BuildRecord, BuildStatus, CacheResult, Span, SpanKind, StepRecord, RECORD_VERSION,
};
pub use recorder::{Recorder, SpanGuard, SpanId, StepInfo};
pub use report::render_report;
pub use store::{HistoryError, HistoryStore, DEFAULT_KEEP};
pub use trace::chrome_trace;
