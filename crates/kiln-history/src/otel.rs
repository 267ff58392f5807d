//! OpenTelemetry export of a finished build (feature `otel`): one trace per build — a root span
//! for the build, a child span per step (cached steps as zero-length spans marked
//! `kiln.cache`), and a child span per pull/push/compress/export — sent with the
//! opentelemetry-otlp exporter over OTLP/HTTP (protobuf) to `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), as BuildKit users expect.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Span as _, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor};
use opentelemetry_sdk::Resource;

use crate::record::BuildRecord;
use crate::timeline::wait_ms;

/// Why a record could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// The exporter could not be set up (bad endpoint URL, ...).
    #[error("setting up the OTLP exporter for {endpoint}: {message}")]
    Setup {
        /// The endpoint, or the environment variable it came from.
        endpoint: String,
        /// The exporter's error.
        message: String,
    },
    /// The collector did not accept the spans.
    #[error("sending build {id} to the OTLP collector at {endpoint}: {message}; check that it listens for OTLP/HTTP (protobuf)")]
    Export {
        /// The build.
        id: String,
        /// The endpoint, or the environment variable it came from.
        endpoint: String,
        /// The exporter's error.
        message: String,
    },
}

/// True when the environment names an OTLP endpoint (so [`export_otlp`] would send).
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

/// Sends `record` as a trace to `endpoint` (the full traces URL, e.g.
/// `http://127.0.0.1:4318/v1/traces`), or — when `None` — to the endpoint the standard
/// `OTEL_EXPORTER_OTLP_*` variables name. Blocks until the collector answered (on its own thread
/// and runtime, so it is safe to call from async code).
pub fn export_otlp(record: &BuildRecord, endpoint: Option<&str>) -> Result<(), OtelError> {
    // The workspace builds reqwest without a built-in TLS crypto provider (kiln picks ring):
    // make sure the process has one before the exporter builds its HTTP client. An error only
    // means another part of kiln installed it first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let record = record.clone();
    let endpoint = endpoint.map(str::to_string);
    std::thread::spawn(move || export_blocking(&record, endpoint))
        .join()
        .unwrap_or_else(|_| {
            Err(OtelError::Setup {
                endpoint: "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                message: "the exporter thread panicked".into(),
            })
        })
}

fn export_blocking(record: &BuildRecord, endpoint: Option<String>) -> Result<(), OtelError> {
    let shown = endpoint
        .clone()
        .unwrap_or_else(|| "$OTEL_EXPORTER_OTLP_ENDPOINT".into());
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(Duration::from_secs(10));
    if let Some(e) = endpoint {
        builder = builder.with_endpoint(e);
    }
    let mut exporter = builder.build().map_err(|e| OtelError::Setup {
        endpoint: shown.clone(),
        message: e.to_string(),
    })?;
    // Spans are collected first and sent in one request, so a failed send is an error here
    // (the SDK's own processors only log export errors).
    let resource = Resource::builder().with_service_name("kiln").build();
    let collected = Arc::new(Collected::default());
    let provider = SdkTracerProvider::builder()
        .with_span_processor(CollectingProcessor(collected.clone()))
        .with_resource(resource.clone())
        .build();
    emit_spans(&provider, record);
    let _ = provider.shutdown();
    let spans = std::mem::take(&mut *collected.0.lock().unwrap_or_else(|e| e.into_inner()));
    exporter.set_resource(&resource);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| OtelError::Setup {
            endpoint: shown.clone(),
            message: e.to_string(),
        })?;
    runtime
        .block_on(exporter.export(spans))
        .map_err(|e| OtelError::Export {
            id: record.id.clone(),
            endpoint: shown,
            message: e.to_string(),
        })
}

#[derive(Debug, Default)]
struct Collected(Mutex<Vec<SpanData>>);

/// Keeps ended spans in memory for one explicit export.
#[derive(Debug)]
struct CollectingProcessor(Arc<Collected>);

impl SpanProcessor for CollectingProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.0
             .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

fn at(record: &BuildRecord, offset_ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(record.started_at + offset_ms)
}

fn emit_spans(provider: &SdkTracerProvider, record: &BuildRecord) {
    let tracer = provider.tracer("kiln");
    let root = tracer
        .span_builder(format!("kiln build {}", record.target))
        .with_start_time(at(record, 0))
        .with_attributes([
            KeyValue::new("kiln.build.id", record.id.clone()),
            KeyValue::new("kiln.target", record.target.clone()),
            KeyValue::new("kiln.status", record.status.as_str()),
            KeyValue::new("kiln.steps.run", record.steps_run() as i64),
            KeyValue::new("kiln.steps.cached", record.steps_cached() as i64),
            KeyValue::new("kiln.bytes.downloaded", record.bytes_downloaded as i64),
            KeyValue::new("kiln.bytes.uploaded", record.bytes_uploaded as i64),
        ])
        .start(&tracer);
    let cx = Context::current_with_span(root);
    for s in &record.steps {
        let (start, end) = match (s.start_ms, s.end_ms) {
            (Some(a), Some(b)) => (a, b.max(a)),
            (None, Some(b)) if s.cache.is_cached() => (b, b),
            _ => continue,
        };
        let mut attrs = vec![
            KeyValue::new("kiln.step.index", s.index as i64),
            KeyValue::new("kiln.stage", s.stage.clone()),
            KeyValue::new("kiln.cache", s.cache.label()),
        ];
        if let Some(k) = &s.cache_key {
            attrs.push(KeyValue::new("kiln.cache_key", k.clone()));
        }
        if s.executed() {
            attrs.push(KeyValue::new("kiln.waited_ms", wait_ms(record, s) as i64));
        }
        if let Some(e) = &s.error {
            attrs.push(KeyValue::new("kiln.error", e.clone()));
        }
        let mut span = tracer
            .span_builder(s.description.clone())
            .with_start_time(at(record, start))
            .with_attributes(attrs)
            .start_with_context(&tracer, &cx);
        span.end_with_timestamp(at(record, end));
    }
    for sp in &record.spans {
        let mut span = tracer
            .span_builder(format!("{} {}", sp.kind.as_str(), sp.name))
            .with_start_time(at(record, sp.start_ms))
            .with_attributes([
                KeyValue::new("kiln.span.kind", sp.kind.as_str()),
                KeyValue::new("kiln.bytes", sp.bytes as i64),
            ])
            .start_with_context(&tracer, &cx);
        span.end_with_timestamp(at(record, sp.end_ms.max(sp.start_ms)));
    }
    cx.span()
        .end_with_timestamp(at(record, record.duration_ms()));
}
