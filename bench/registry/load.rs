//! Load client for `bench/registry/run.sh`: drives any OCI registry with the same requests
//! so kiln's registry and distribution are measured alike. Also starts kiln's registry in a
//! process of its own (`serve`), so the benchmark needs only this one release binary.
//!
//! ```text
//! registry-load serve --root DIR --addr 127.0.0.1:PORT [--no-fsync]
//! registry-load run --url http://127.0.0.1:PORT --label NAME [--large-mb N] [--small N]
//!               [--small-kb N] [--small-clients N] [--manifest-reqs N] [--manifest-clients N]
//! ```
//! `run` prints one JSON object per scenario.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use kiln_oci::{Algorithm, Digest, Hasher};
use serde_json::json;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str, default: usize) -> usize {
    arg(args, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") => serve(&args),
        Some("run") => {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(run(&args));
        }
        _ => {
            eprintln!("usage: registry-load serve|run ... (see the file's doc comment)");
            std::process::exit(2);
        }
    }
}

fn serve(args: &[String]) {
    let cfg = kiln_registry::Config {
        root: arg(args, "--root").expect("--root DIR").into(),
        addr: arg(args, "--addr").expect("--addr HOST:PORT"),
        fsync: !args.iter().any(|a| a == "--no-fsync"),
        ..kiln_registry::Config::default()
    };
    kiln_registry::init_logging();
    if let Err(e) = kiln_registry::serve_blocking(cfg, |url| eprintln!("serving {url}")) {
        eprintln!("registry-load serve: {e}");
        std::process::exit(1);
    }
}

struct Stats {
    lat: Vec<Duration>,
    wall: Duration,
}

impl Stats {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.lat.clone();
        v.sort();
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i].as_secs_f64() * 1000.0
    }

    fn report(&self, label: &str, scenario: &str, ops: usize, bytes: u64) {
        let secs = self.wall.as_secs_f64();
        println!(
            "{}",
            json!({
                "registry": label, "scenario": scenario, "ops": ops,
                "seconds": (secs * 1000.0).round() / 1000.0,
                "ops_per_sec": (ops as f64 / secs * 10.0).round() / 10.0,
                "mb_per_sec": (bytes as f64 / secs / 1e6 * 10.0).round() / 10.0,
                "p50_ms": (self.pct(0.50) * 1000.0).round() / 1000.0,
                "p99_ms": (self.pct(0.99) * 1000.0).round() / 1000.0,
            })
        );
    }
}

/// Deterministic pseudo-random bytes (xorshift), so both registries get the same data.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// POST an upload session, then PUT the whole body with `?digest=`: the flow both
/// registries support for monolithic pushes.
async fn push_blob(c: &reqwest::Client, url: &str, repo: &str, d: &Digest, body: reqwest::Body) {
    let r = c
        .post(format!("{url}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .expect("POST upload");
    assert_eq!(r.status(), 202, "POST upload");
    let loc = r.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("{url}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{loc}{sep}digest={d}"))
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .expect("PUT upload");
    assert_eq!(
        r.status(),
        201,
        "PUT upload: {}",
        r.text().await.unwrap_or_default()
    );
}

async fn run(args: &[String]) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = arg(args, "--url").expect("--url");
    let label = arg(args, "--label").unwrap_or_else(|| url.clone());
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let large_mb = num(args, "--large-mb", 1024);
    let small = num(args, "--small", 5000);
    let small_kb = num(args, "--small-kb", 8);
    let small_clients = num(args, "--small-clients", 16);
    let manifest_reqs = num(args, "--manifest-reqs", 20000);
    let manifest_clients = num(args, "--manifest-clients", 64);

    // ---- large blob: one stream of `large_mb` MiB, pushed then pulled.
    if large_mb > 0 {
        let chunk = Bytes::from(pseudo_random(7, 1 << 20));
        let mut h = Hasher::new(Algorithm::Sha256);
        for _ in 0..large_mb {
            h.update(&chunk);
        }
        let d = h.finish();
        let total = (large_mb as u64) << 20;
        let ch = chunk.clone();
        let stream =
            futures::stream::iter((0..large_mb).map(move |_| Ok::<_, std::io::Error>(ch.clone())));
        let t = Instant::now();
        push_blob(
            &c,
            &url,
            "bench/large",
            &d,
            reqwest::Body::wrap_stream(stream),
        )
        .await;
        let wall = t.elapsed();
        Stats {
            lat: vec![wall],
            wall,
        }
        .report(&label, "large_push", 1, total);
        let t = Instant::now();
        let r = c
            .get(format!("{url}/v2/bench/large/blobs/{d}"))
            .send()
            .await
            .expect("GET large");
        assert!(r.status().is_success(), "GET large: {}", r.status());
        let mut got = 0u64;
        let mut s = r.bytes_stream();
        while let Some(b) = s.next().await {
            got += b.expect("body").len() as u64;
        }
        assert_eq!(got, total);
        let wall = t.elapsed();
        Stats {
            lat: vec![wall],
            wall,
        }
        .report(&label, "large_pull", 1, total);
    }

    // ---- small blobs: `small` distinct blobs, `small_clients` at a time.
    if small > 0 {
        let blobs: Arc<Vec<(Digest, Bytes)>> = Arc::new(
            (0..small)
                .map(|i| {
                    let b = pseudo_random(1000 + i as u64, small_kb << 10);
                    (Digest::sha256_of(&b), Bytes::from(b))
                })
                .collect(),
        );
        let bytes = (small * (small_kb << 10)) as u64;
        let t = Instant::now();
        let lat = futures::stream::iter(0..small)
            .map(|i| {
                let (c, url, blobs) = (c.clone(), url.clone(), blobs.clone());
                async move {
                    let t = Instant::now();
                    let (d, b) = &blobs[i];
                    push_blob(&c, &url, "bench/small", d, b.clone().into()).await;
                    t.elapsed()
                }
            })
            .buffer_unordered(small_clients)
            .collect::<Vec<_>>()
            .await;
        Stats {
            lat,
            wall: t.elapsed(),
        }
        .report(&label, "small_push", small, bytes);
        let t = Instant::now();
        let lat = futures::stream::iter(0..small)
            .map(|i| {
                let (c, url, blobs) = (c.clone(), url.clone(), blobs.clone());
                async move {
                    let t = Instant::now();
                    let (d, b) = &blobs[i];
                    let r = c
                        .get(format!("{url}/v2/bench/small/blobs/{d}"))
                        .send()
                        .await
                        .expect("GET");
                    assert_eq!(r.status(), 200);
                    assert_eq!(r.bytes().await.expect("body").len(), b.len());
                    t.elapsed()
                }
            })
            .buffer_unordered(small_clients)
            .collect::<Vec<_>>()
            .await;
        Stats {
            lat,
            wall: t.elapsed(),
        }
        .report(&label, "small_pull", small, bytes);
    }

    // ---- manifests: HEAD and GET by tag, `manifest_clients` at a time.
    if manifest_reqs > 0 {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cd = Digest::sha256_of(config);
        push_blob(&c, &url, "bench/manifest", &cd, config.to_vec().into()).await;
        let layer = pseudo_random(99, 1000);
        let ld = Digest::sha256_of(&layer);
        push_blob(&c, &url, "bench/manifest", &ld, layer.into()).await;
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld.to_string(), "size": 1000}]
        }))
        .expect("json");
        let r = c
            .put(format!("{url}/v2/bench/manifest/manifests/v1"))
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(m.clone())
            .send()
            .await
            .expect("PUT manifest");
        assert_eq!(r.status(), 201);
        for method in ["HEAD", "GET"] {
            let t = Instant::now();
            let lat = futures::stream::iter(0..manifest_reqs)
                .map(|_| {
                    let (c, url) = (c.clone(), url.clone());
                    let want = m.len();
                    async move {
                        let t = Instant::now();
                        let req = c
                            .request(
                                method.parse().expect("method"),
                                format!("{url}/v2/bench/manifest/manifests/v1"),
                            )
                            .header("Accept", "application/vnd.oci.image.manifest.v1+json");
                        let r = req.send().await.expect("manifest request");
                        assert_eq!(r.status(), 200);
                        let body = r.bytes().await.expect("body");
                        if method == "GET" {
                            assert_eq!(body.len(), want);
                        }
                        t.elapsed()
                    }
                })
                .buffer_unordered(manifest_clients)
                .collect::<Vec<_>>()
                .await;
            let scenario = if method == "HEAD" {
                "manifest_head"
            } else {
                "manifest_get"
            };
            Stats {
                lat,
                wall: t.elapsed(),
            }
            .report(&label, scenario, manifest_reqs, 0);
        }
    }
}
