//! OpenTelemetry export against a small OTLP/HTTP receiver (axum) that decodes what it gets.
#![cfg(feature = "otel")]

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

type Received = Arc<Mutex<Vec<Span>>>;

async fn receive(
    State(got): State<Received>,
    body: Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/plain")],
            b"not OTLP protobuf".to_vec(),
        );
    };
    let spans = req
        .resource_spans
        .into_iter()
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans);
    got.lock().expect("lock").extend(spans);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

/// Starts the receiver on 127.0.0.1 (port 0); returns its traces URL.
fn start_collector(rt: &tokio::runtime::Runtime, got: Received) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(got);
    rt.spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1/traces")
}

#[test]
fn a_build_record_arrives_at_an_otlp_collector_as_one_trace() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let got: Received = Arc::default();
    let url = start_collector(&rt, got.clone());
    let record = common::example_rebuild("0199aa0000000002", "sha256:edited", "1.0.0");

    kiln_history::export_otlp(&record, Some(&url)).expect("export");

    let spans = got.lock().expect("lock").clone();
    let expected = 1 + record.steps_run() + record.steps_cached() + record.spans.len();
    assert_eq!(
        spans.len(),
        expected,
        "root + one span per step + one per transfer"
    );
    let root = spans
        .iter()
        .find(|s| s.name == "kiln build release")
        .expect("root span");
    assert!(root.parent_span_id.is_empty());
    assert_eq!(root.start_time_unix_nano, record.started_at * 1_000_000);
    assert_eq!(root.end_time_unix_nano, record.ended_at * 1_000_000);
    for s in spans.iter().filter(|s| s.span_id != root.span_id) {
        assert_eq!(s.trace_id, root.trace_id, "{} in another trace", s.name);
        assert_eq!(
            s.parent_span_id, root.span_id,
            "{} not under the build",
            s.name
        );
    }
    let step = record
        .steps
        .iter()
        .find(|s| s.executed())
        .expect("an executed step");
    let span = spans
        .iter()
        .find(|s| s.name == step.description)
        .expect("the step's span");
    let start = (record.started_at + step.start_ms.unwrap_or(0)) * 1_000_000;
    assert_eq!(span.start_time_unix_nano, start);
    let cache = span
        .attributes
        .iter()
        .find(|a| a.key == "kiln.cache")
        .expect("kiln.cache attribute");
    assert!(
        format!("{:?}", cache.value).contains("\"run\""),
        "{cache:?}"
    );
}

#[test]
fn an_unreachable_collector_is_an_error_naming_it() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}/v1/traces");
    let err = kiln_history::export_otlp(&common::example_cold(), Some(&url))
        .expect_err("nothing listens");
    assert!(err.to_string().contains(&url), "{err}");
}
