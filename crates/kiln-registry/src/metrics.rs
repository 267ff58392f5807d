//! Prometheus text-format metrics: requests by method and status, bytes in and out, a
//! latency histogram and the size of the blob store.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use crate::storage::UploadStats;

/// Histogram bucket upper bounds, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// The methods the registry API uses get a label series each; every other method string a
/// client sends is counted as `other`, so clients cannot grow the label set.
const METHOD_LABELS: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"];

/// The `method` label of a request: its method when the API knows it, `other` otherwise.
fn method_label(method: &str) -> &'static str {
    METHOD_LABELS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

/// Counters of one running registry. Every label set is bounded: methods by
/// [`METHOD_LABELS`] plus `other`, statuses by the codes the server itself answers with.
#[derive(Default)]
pub(crate) struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Metrics {
    pub(crate) fn observe(&self, method: &str, status: u16, _in: u64, out: u64, took: Duration) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((method_label(method), status))
            .or_default() += 1;
        self.bytes_out.fetch_add(out, Relaxed);
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(took.as_micros() as u64, Relaxed);
    }

    pub(crate) fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Relaxed);
    }

    /// The exposition text, with the storage's size and its upload counters.
    pub(crate) fn render(&self, storage_bytes: u64, uploads: UploadStats) -> String {
        let hash_states = uploads.hash_states;
        let mut s = String::new();
        s.push_str("# HELP kiln_registry_requests_total HTTP requests by method and status.\n");
        s.push_str("# TYPE kiln_registry_requests_total counter\n");
        for ((m, st), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "kiln_registry_requests_total{{method=\"{m}\",status=\"{st}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP kiln_registry_received_bytes_total Request body bytes received."
        );
        let _ = writeln!(s, "# TYPE kiln_registry_received_bytes_total counter");
        let _ = writeln!(
            s,
            "kiln_registry_received_bytes_total {}",
            self.bytes_in.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP kiln_registry_sent_bytes_total Response body bytes sent."
        );
        let _ = writeln!(s, "# TYPE kiln_registry_sent_bytes_total counter");
        let _ = writeln!(
            s,
            "kiln_registry_sent_bytes_total {}",
            self.bytes_out.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP kiln_registry_request_duration_seconds Request latency."
        );
        let _ = writeln!(s, "# TYPE kiln_registry_request_duration_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "kiln_registry_request_duration_seconds_bucket{{le=\"{b}\"}} {}",
                self.buckets[i].load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(
            s,
            "kiln_registry_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            s,
            "kiln_registry_request_duration_seconds_sum {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(s, "kiln_registry_request_duration_seconds_count {count}");
        let _ = writeln!(
            s,
            "# HELP kiln_registry_storage_bytes Bytes in the blob store."
        );
        let _ = writeln!(s, "# TYPE kiln_registry_storage_bytes gauge");
        let _ = writeln!(s, "kiln_registry_storage_bytes {storage_bytes}");
        let _ = writeln!(
            s,
            "# HELP kiln_registry_upload_hash_states Open uploads with streaming hash state in memory."
        );
        let _ = writeln!(s, "# TYPE kiln_registry_upload_hash_states gauge");
        let _ = writeln!(s, "kiln_registry_upload_hash_states {hash_states}");
        let _ = writeln!(
            s,
            "# HELP kiln_registry_upload_rehashes_total Upload chunks that re-hashed the staged data from disk."
        );
        let _ = writeln!(s, "# TYPE kiln_registry_upload_rehashes_total counter");
        let _ = writeln!(
            s,
            "kiln_registry_upload_rehashes_total {}",
            uploads.rehashes
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_share_one_label_series() {
        let m = Metrics::default();
        for i in 0..1000 {
            m.observe(&format!("X{i}"), 405, 0, 0, Duration::ZERO);
        }
        m.observe("GET", 200, 0, 0, Duration::ZERO);
        let text = m.render(0, UploadStats::default());
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kiln_registry_requests_total{"))
            .collect();
        assert_eq!(
            series,
            [
                "kiln_registry_requests_total{method=\"GET\",status=\"200\"} 1",
                "kiln_registry_requests_total{method=\"other\",status=\"405\"} 1000",
            ]
        );
    }
}
