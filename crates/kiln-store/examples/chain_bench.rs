//! Per-step store overhead against layer-chain depth (release build:
//! `cargo run --release -p kiln-store --example chain_bench`; results in docs/store.md).
//! Builds one chain of `DEPTH` committed snapshots (copy snapshotter, empty trees) and, per
//! step, does what the worker does around a build step: prepare on the parent (reads the
//! chain's dirs, protects the snapshot), commit, protect a blob, write a cache record whose
//! value holds the whole layer chain (about 260 bytes of JSON per layer, as the worker's)
//! and read it back. Between steps it sleeps `GAP_MS` as a step's process would. Prints
//! the mean ms of each part per depth bucket, and the DB file's size at the end.
//!
//! Usage: chain_bench [DEPTH (500)] [GAP_MS (10)]

use std::time::{Duration, Instant};

use kiln_oci::Digest;
use kiln_store::{SnapshotterKind, Store, StoreOptions};

fn layer_json(i: usize) -> String {
    let d = Digest::sha256_of(format!("diff {i}").as_bytes());
    let b = Digest::sha256_of(format!("blob {i}").as_bytes());
    format!(
        "{{\"diff_id\":\"{d}\",\"blob\":{{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\
         \"digest\":\"{b}\",\"size\":{}}},\"created\":\"2026-11-28T00:00:00Z\"}}",
        1000 + i
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let depth: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let gap = Duration::from_millis(args.next().and_then(|a| a.parse().ok()).unwrap_or(10));
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open_with(
        dir.path(),
        StoreOptions {
            snapshotter: Some(SnapshotterKind::Copy),
            ..Default::default()
        },
    )
    .expect("open store");
    let lease = store.lease().expect("lease");
    // Columns: prepare (chain read + protect), commit, protect_blob, cache_put, cache_get.
    const PARTS: [&str; 5] = [
        "prepare",
        "commit",
        "protect_blob",
        "cache_put",
        "cache_get",
    ];
    let bucket = 50usize;
    let mut sums = vec![[0f64; 5]; depth.div_ceil(bucket)];
    let mut layers: Vec<String> = Vec::new();
    let mut blobs: Vec<Digest> = Vec::new();
    let mut parent = None;
    for i in 0..depth {
        let mut t = [0f64; 5];
        let s = Instant::now();
        let active = store.prepare(parent, Some(&lease)).expect("prepare");
        t[0] = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let id = store.commit(&active).expect("commit");
        t[1] = s.elapsed().as_secs_f64();
        let blob = Digest::sha256_of(format!("blob {i}").as_bytes());
        let s = Instant::now();
        lease.protect_blob(&blob).expect("protect blob");
        t[2] = s.elapsed().as_secs_f64();
        layers.push(layer_json(i));
        blobs.push(blob);
        let value = format!("{{\"layers\":[{}]}}", layers.join(","));
        let key = format!("sha256:{}", Digest::sha256_of(value.as_bytes()).hex());
        let s = Instant::now();
        store
            .cache_put(key.as_bytes(), value.as_bytes(), &[id], &blobs, 1000)
            .expect("cache put");
        t[3] = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let rec = store.cache_get(key.as_bytes()).expect("cache get");
        t[4] = s.elapsed().as_secs_f64();
        assert_eq!(rec.map(|r| r.value), Some(value.into_bytes()));
        for (sum, x) in sums[i / bucket].iter_mut().zip(t) {
            *sum += x;
        }
        parent = Some(id);
        std::thread::sleep(gap);
    }
    println!(
        "depth chain_bench: {depth} steps, {} ms gap; mean ms per call",
        gap.as_millis()
    );
    print!("| depth |");
    for p in PARTS {
        print!(" {p} |");
    }
    println!(" total |");
    for (b, s) in sums.iter().enumerate() {
        let n = (depth - b * bucket).min(bucket) as f64;
        print!(
            "| {}-{} |",
            b * bucket,
            (b * bucket + bucket).min(depth) - 1
        );
        for x in s {
            print!(" {:.2} |", x / n * 1e3);
        }
        println!(" {:.2} |", s.iter().sum::<f64>() / n * 1e3);
    }
    let db = dir.path().join("db/meta.redb");
    println!(
        "db file: {} KiB",
        std::fs::metadata(&db).map(|m| m.len() / 1024).unwrap_or(0)
    );
}
