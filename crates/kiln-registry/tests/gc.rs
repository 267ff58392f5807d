//! Garbage collection: an overwritten cache ref does not grow the disk, referenced content
//! survives, and pushes racing a collection lose nothing.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use kiln_oci::Digest;
use kiln_registry::{collect_garbage, GcOptions};
use reqwest::StatusCode;
use serde_json::json;

fn blobs_on_disk(root: &Path) -> HashSet<Digest> {
    let mut out = HashSet::new();
    for alg in ["sha256", "sha512"] {
        let Ok(prefixes) = std::fs::read_dir(root.join("blobs").join(alg)) else {
            continue;
        };
        for p in prefixes.flatten() {
            for f in std::fs::read_dir(p.path()).unwrap().flatten() {
                if let Ok(d) = format!("{alg}:{}", f.file_name().to_string_lossy()).parse() {
                    out.insert(d);
                }
            }
        }
    }
    out
}

/// Makes every file under `root` look `age` old, as if pushed long ago.
fn age_everything(root: &Path, age: Duration) {
    let past = SystemTime::now() - age;
    fn walk(p: &Path, t: SystemTime) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                walk(&e.path(), t);
            } else if ft.is_file() {
                let f = std::fs::File::options()
                    .append(true)
                    .open(e.path())
                    .unwrap();
                f.set_modified(t).unwrap();
            }
        }
    }
    walk(root, past);
}

fn collect(root: &Path, delete_untagged: bool, grace: Duration) -> kiln_registry::GcReport {
    collect_garbage(
        root,
        &GcOptions {
            delete_untagged,
            dry_run: false,
            grace,
        },
    )
    .unwrap()
}

/// One CI run's cache export: a stable base layer, a changing layer, a changing config.
async fn push_cache(r: &Reg, run: usize) -> (Digest, Vec<Digest>) {
    let base = r.push_blob("app", b"base layer that never changes").await;
    let layer = r
        .push_blob("app", format!("layer of run {run}").as_bytes())
        .await;
    let config = format!("{{\"run\":{run}}}");
    let cd = r.push_blob("app", config.as_bytes()).await;
    let m = image_manifest(
        &cd,
        config.len(),
        &[(base.clone(), 29), (layer.clone(), 10)],
        None,
    );
    assert_eq!(
        r.put_manifest("app", "buildcache", OCI_MANIFEST, &m)
            .await
            .status(),
        StatusCode::CREATED
    );
    let md = Digest::sha256_of(&m);
    (md.clone(), vec![md, cd, base, layer])
}

#[tokio::test]
async fn cache_ref_pushed_twenty_times_keeps_only_current_blobs_after_gc() {
    let r = start().await;
    let mut current = Vec::new();
    for run in 0..20 {
        current = push_cache(&r, run).await.1;
    }
    assert!(
        blobs_on_disk(&r.root()).len() >= 20 * 3,
        "old runs piled up before GC"
    );
    let report = collect(&r.root(), true, Duration::ZERO);
    assert_eq!(report.manifests_deleted.len(), 19);
    let want: HashSet<Digest> = current.iter().cloned().collect();
    assert_eq!(
        blobs_on_disk(&r.root()),
        want,
        "only the current run's blobs remain"
    );
    // The current ref still pulls completely.
    let m = r.get("/v2/app/manifests/buildcache").await;
    assert_eq!(m.status(), StatusCode::OK);
    for d in &current[1..] {
        assert_eq!(
            r.get(&format!("/v2/app/blobs/{d}")).await.status(),
            StatusCode::OK
        );
    }
    // Old layers are gone from the repository's view too.
    let old = Digest::sha256_of(b"layer of run 3");
    assert_eq!(
        r.head(&format!("/v2/app/blobs/{old}")).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn gc_without_delete_untagged_keeps_untagged_manifests_and_their_blobs() {
    let r = start().await;
    let (first, first_blobs) = push_cache(&r, 0).await;
    push_cache(&r, 1).await;
    collect(&r.root(), false, Duration::ZERO);
    assert_eq!(
        r.get(&format!("/v2/app/manifests/{first}")).await.status(),
        StatusCode::OK
    );
    let disk = blobs_on_disk(&r.root());
    assert!(first_blobs.iter().all(|d| disk.contains(d)));
}

#[tokio::test]
async fn gc_keeps_index_children_and_referrers_and_deletes_unreferenced_blobs() {
    let r = start().await;
    let (child, cd) = r.push_image("app", "child-tag", b"child layer").await;
    let idx = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": cd.to_string(), "size": child.len()}]}))
    .unwrap();
    assert_eq!(
        r.put_manifest("app", "multi", OCI_INDEX, &idx)
            .await
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        r.delete("/v2/app/manifests/child-tag").await.status(),
        StatusCode::ACCEPTED
    );
    // A signature referring to the child, pushed by digest only.
    let empty = r.push_blob("app", b"{}").await;
    let sig = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x-sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
        "layers": [], "subject": {"mediaType": OCI_MANIFEST, "digest": cd.to_string(), "size": child.len()}}))
    .unwrap();
    let sd = Digest::sha256_of(&sig);
    assert_eq!(
        r.put_manifest("app", &sd.to_string(), OCI_MANIFEST, &sig)
            .await
            .status(),
        StatusCode::CREATED
    );
    let orphan = r.push_blob("app", b"pushed but never referenced").await;
    let report = collect(&r.root(), true, Duration::ZERO);
    assert!(report.manifests_deleted.is_empty(), "{report:?}");
    let disk = blobs_on_disk(&r.root());
    assert!(disk.contains(&cd) && disk.contains(&sd) && disk.contains(&empty));
    assert!(!disk.contains(&orphan));
    assert_eq!(report.blobs_deleted, vec![orphan]);
}

#[tokio::test]
async fn gc_dry_run_deletes_nothing() {
    let r = start().await;
    let orphan = r.push_blob("app", b"orphan").await;
    let before = blobs_on_disk(&r.root());
    let report = collect_garbage(
        &r.root(),
        &GcOptions {
            delete_untagged: true,
            dry_run: true,
            grace: Duration::ZERO,
        },
    )
    .unwrap();
    assert_eq!(report.blobs_deleted, vec![orphan]);
    assert_eq!(blobs_on_disk(&r.root()), before);
}

#[tokio::test]
async fn gc_grace_period_keeps_blobs_uploaded_but_not_yet_referenced() {
    let r = start().await;
    let fresh = r
        .push_blob("app", b"just uploaded, manifest comes next")
        .await;
    collect(&r.root(), true, Duration::from_secs(3600));
    assert!(blobs_on_disk(&r.root()).contains(&fresh));
    // The client's manifest push that follows still succeeds.
    let c = r.push_blob("app", b"{}").await;
    let m = image_manifest(&c, 2, &[(fresh, 34)], None);
    assert_eq!(
        r.put_manifest("app", "late", OCI_MANIFEST, &m)
            .await
            .status(),
        StatusCode::CREATED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_racing_gc_lose_nothing() {
    let r = start().await;
    // Old garbage for the collector to chew on while pushes run.
    for run in 0..10 {
        push_cache(&r, run).await;
    }
    assert_eq!(
        r.delete("/v2/app/manifests/buildcache").await.status(),
        StatusCode::ACCEPTED
    );
    age_everything(&r.root(), Duration::from_secs(7200));
    let garbage = blobs_on_disk(&r.root());

    let root = r.root();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let gc = tokio::task::spawn_blocking(move || {
        let mut runs = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) || runs < 3 {
            collect_garbage(
                &root,
                &GcOptions {
                    delete_untagged: true,
                    dry_run: false,
                    grace: Duration::from_secs(600),
                },
            )
            .unwrap();
            runs += 1;
        }
        runs
    });
    let mut pushed = Vec::new();
    for i in 0..40 {
        let (m, d) = r
            .push_image(
                &format!("race/{}", i % 4),
                &format!("t{i}"),
                format!("racing layer {i}").as_bytes(),
            )
            .await;
        pushed.push((i, m, d));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = gc.await.unwrap();
    assert!(runs >= 3);
    collect(&r.root(), true, Duration::from_secs(600));
    for (i, m, d) in pushed {
        let repo = format!("race/{}", i % 4);
        let resp = r.get(&format!("/v2/{repo}/manifests/t{i}")).await;
        assert_eq!(resp.status(), StatusCode::OK, "t{i}");
        assert_eq!(resp.bytes().await.unwrap().as_ref(), &m[..]);
        let layer = Digest::sha256_of(format!("racing layer {i}").as_bytes());
        assert_eq!(
            r.get(&format!("/v2/{repo}/blobs/{layer}")).await.status(),
            StatusCode::OK,
            "layer of t{i}"
        );
        assert!(blobs_on_disk(&r.root()).contains(&d));
    }
    let left = blobs_on_disk(&r.root());
    assert!(garbage.iter().all(|g| !left.contains(g) || g == &Digest::sha256_of(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#)),
        "old garbage collected");
}

#[tokio::test]
async fn periodic_gc_in_the_server_removes_unreferenced_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = kiln_registry::Config {
        addr: "127.0.0.1:0".into(),
        root: dir.path().join("root"),
        gc_interval_secs: 1,
        gc_grace_secs: 0,
        gc_delete_untagged: true,
        fsync: false,
        ..kiln_registry::Config::default()
    };
    let root = cfg.root.clone();
    let r = start_with(|b| b.config(cfg)).await;
    let (_, kept) = r.push_image("app", "v1", b"kept layer").await;
    let orphan = r.push_blob("app", b"orphan").await;
    assert!(blobs_on_disk(&root).contains(&orphan));
    let mut gone = false;
    for _ in 0..100 {
        if !blobs_on_disk(&root).contains(&orphan) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "periodic GC deleted the orphan");
    assert!(blobs_on_disk(&root).contains(&kept));
    assert_eq!(r.get("/v2/app/manifests/v1").await.status(), StatusCode::OK);
}

/// Sets one file's mtime `age` in the past.
fn age_file(path: &Path, age: Duration) {
    let f = std::fs::File::options().append(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

#[tokio::test]
async fn gc_removes_temporary_files_of_killed_manifest_and_tag_writers() {
    let r = start().await;
    let (_, md) = r.push_image("app", "v1", b"layer").await;
    let repo = r.root().join("repos/app");
    // What a writer killed between creating its temporary file and renaming it leaves.
    let left = [
        repo.join("_manifests/tags/.tmp-0011223344556677"),
        repo.join("_manifests/revisions/sha256/.tmp-8899aabbccddeeff"),
        repo.join(format!(
            "_referrers/sha256/{}/.tmp-0123456789abcdef",
            md.hex()
        )),
    ];
    for p in &left {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, md.to_string()).unwrap();
        age_file(p, Duration::from_secs(2 * 3600));
    }
    // A write in progress right now.
    let live = repo.join("_manifests/tags/.tmp-fedcba9876543210");
    std::fs::write(&live, md.to_string()).unwrap();

    collect(&r.root(), true, Duration::from_secs(3600));

    for p in &left {
        assert!(!p.exists(), "{} is left after gc", p.display());
    }
    assert!(
        live.exists(),
        "a temporary file younger than the grace period is kept"
    );
    let tags: serde_json::Value = r.get("/v2/app/tags/list").await.json().await.unwrap();
    assert_eq!(tags["tags"], json!(["v1"]));
    assert_eq!(r.get("/v2/app/manifests/v1").await.status(), StatusCode::OK);
}

#[path = "drivers/memory.rs"]
mod memory_storage;

#[tokio::test]
async fn gc_through_the_storage_trait_works_on_another_driver() {
    let store = std::sync::Arc::new(memory_storage::MemoryStorage::default());
    let r = start_with(|b| b.storage(store.clone())).await;
    let (_, kept) = push_cache(&r, 1).await;
    let loose = r.push_blob("app", b"pushed, never referenced").await;
    let report = kiln_registry::collect_garbage_in(
        &*store,
        &GcOptions {
            delete_untagged: true,
            dry_run: false,
            grace: Duration::ZERO,
        },
    )
    .await
    .unwrap();
    assert_eq!(report.blobs_deleted, vec![loose.clone()]);
    assert_eq!(report.blobs_kept, kept.len());
    let manifest = &kept[0];
    let path = format!("/v2/app/manifests/{manifest}");
    assert_eq!(r.get(&path).await.status(), StatusCode::OK, "manifest kept");
    for d in &kept[1..] {
        let path = format!("/v2/app/blobs/{d}");
        assert_eq!(r.get(&path).await.status(), StatusCode::OK, "{d} kept");
    }
    let gone = r.get(&format!("/v2/app/blobs/{loose}")).await;
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
}
