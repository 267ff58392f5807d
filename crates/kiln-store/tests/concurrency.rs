//! Several processes on one state dir, and a process killed mid-write. The children are this
//! test binary re-run with `KILN_STORE_TEST_CHILD` set, so they are real separate processes
//! with their own DB handles and locks.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::TestDir;
use kiln_oci::compression::Compression;
use kiln_oci::Digest;
use kiln_store::{ApplyOptions, ExportOptions, FsckProblem, SnapshotState, Store};

const CHILD_ENV: &str = "KILN_STORE_TEST_CHILD";
const ROOT_ENV: &str = "KILN_STORE_TEST_ROOT";

fn spawn_child(mode: &str, root: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .env(ROOT_ENV, root)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A blob whose content depends only on `seed` and `len`.
fn blob_bytes(seed: &str, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(format!("{seed}:{i};").as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// Streams `data` into the store in small writes, like a download, and commits it.
fn stream_put(store: &Store, data: &[u8]) -> Digest {
    let want = Digest::sha256_of(data);
    let mut w = store.content().writer().unwrap();
    for part in data.chunks(64 << 10) {
        w.write_all(part).unwrap();
    }
    w.commit(&want, data.len() as u64).unwrap().digest
}

fn layer_tar(name: &str, data: &[u8]) -> Vec<u8> {
    common::tar_end(common::raw_entry(name.as_bytes(), b'0', b"", data))
}

/// One round of everything a build does to the store.
fn build_round(store: &Store, i: usize) {
    let lease = store.lease().unwrap();
    let shared = stream_put(store, &blob_bytes(&format!("shared-{i}"), 300_000));
    let own = stream_put(
        store,
        &blob_bytes(&format!("own-{}-{i}", std::process::id()), 200_000),
    );
    lease.protect_blob(&own).unwrap();
    let a = store.prepare(None, Some(&lease)).unwrap();
    std::fs::write(a.rootfs.join("f"), format!("{} {i}", std::process::id())).unwrap();
    let id = store.commit(&a).unwrap();
    let layer = store
        .export_layer(id, Compression::Gzip, &ExportOptions::default())
        .unwrap();
    // Both processes unpack the same layer: one snapshot per chain must survive.
    let l = store
        .content()
        .put_bytes(&layer_tar(&format!("same-{i}"), &blob_bytes("x", 1000)))
        .unwrap();
    let u = store
        .unpack_layer(None, &l.digest, &ApplyOptions::default(), Some(&lease))
        .unwrap();
    store
        .cache_put(
            format!("key-{i}").as_bytes(),
            format!("{}", u.0).as_bytes(),
            &[u],
            &[shared, layer.digest],
            1000,
        )
        .unwrap();
}

#[test]
fn child_process_entry_point() {
    // Not a test on its own: the body of the child processes spawned below.
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let root = PathBuf::from(std::env::var(ROOT_ENV).unwrap());
    let store = Store::open(&root).unwrap();
    match mode.as_str() {
        "rounds" => {
            for i in 0..12 {
                build_round(&store, i);
            }
        }
        "forever" => {
            let progress = root.join(format!("progress-{}", std::process::id()));
            let mut big = blob_bytes(&format!("big-{}", std::process::id()), 16 << 20);
            for i in 0u64.. {
                // Large streamed blobs so a kill usually lands in the middle of one.
                big[..8].copy_from_slice(&i.to_le_bytes());
                stream_put(&store, &big);
                build_round(&store, (i % 4) as usize);
                std::fs::write(&progress, i.to_string()).unwrap();
            }
        }
        other => panic!("unknown child mode {other}"),
    }
}

#[test]
fn two_processes_building_at_once_leave_a_consistent_store() {
    let tmp = TestDir::new();
    let root = tmp.path().join("state");
    Store::open(&root).unwrap();
    let mut kids = [spawn_child("rounds", &root), spawn_child("rounds", &root)];
    for k in &mut kids {
        let st = k.wait().unwrap();
        assert!(st.success(), "child failed: {st}");
    }
    let store = Store::open(&root).unwrap();
    let report = store.fsck(false).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert!(report.blobs_checked >= 12 * 3);
    for i in 0..12 {
        let rec = store
            .cache_get(format!("key-{i}").as_bytes())
            .unwrap()
            .expect("cache record");
        assert_eq!(rec.snapshots.len(), 1);
        let snap = store.snapshot(rec.snapshots[0]).unwrap();
        assert_eq!(snap.state, SnapshotState::Committed);
        // The shared layer was unpacked by both; exactly one snapshot holds its chain.
        let holders = store
            .snapshots()
            .unwrap()
            .into_iter()
            .filter(|s| s.chain_id == snap.chain_id)
            .count();
        assert_eq!(holders, 1, "chain {:?} unpacked twice", snap.chain_id);
    }
    assert_eq!(
        store.usage().unwrap().leases,
        0,
        "leases outlived their processes"
    );
}

#[test]
fn sigkill_mid_commit_leaves_no_partial_blob_and_its_leftovers_are_reclaimed() {
    let tmp = TestDir::new();
    let root = tmp.path().join("state");
    let store = Store::open(&root).unwrap();
    for attempt in 0..4u64 {
        let mut kid = spawn_child("forever", &root);
        let progress = root.join(format!("progress-{}", kid.id()));
        let start = Instant::now();
        while !progress.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "child made no progress"
            );
            if let Some(st) = kid.try_wait().unwrap() {
                panic!("child exited early: {st}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Kill at a different point in the child's loop each attempt.
        std::thread::sleep(Duration::from_millis([5, 30, 60, 120][attempt as usize]));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(kid.id() as i32, libc::SIGKILL) };
        kid.wait().unwrap();

        let report = store.fsck(false).unwrap();
        for p in &report.problems {
            assert!(
                matches!(
                    p,
                    FsckProblem::StaleIngest(_)
                        | FsckProblem::StaleActiveSnapshot { .. }
                        | FsckProblem::DeadLease { .. }
                ),
                "attempt {attempt}: kill left a real inconsistency: {p}"
            );
        }
        // Every visible blob is complete (fsck hashed them all) and no ingest file is
        // visible under its digest name.
        for b in store.content().list().unwrap() {
            let b = b.unwrap();
            assert_eq!(Some(b.size), store.content().size(&b.digest).unwrap());
        }
        // What the next build does first: every leftover goes, and nothing else is touched.
        assert!(report.problems.iter().all(|p| p.is_leftover()));
        assert_eq!(store.reclaim_leftovers().unwrap(), report.problems.len());
        let after = store.fsck(false).unwrap();
        assert!(after.is_clean(), "attempt {attempt}: {:#?}", after.problems);
        eprintln!(
            "attempt {attempt}: leftovers repaired: {:?}",
            report.problems
        );
    }
}

#[test]
fn a_blob_with_the_wrong_digest_is_refused_and_never_visible() {
    let tmp = TestDir::new();
    let store = Store::open(tmp.path()).unwrap();
    let data = blob_bytes("x", 100_000);
    let wrong = Digest::sha256_of(b"something else");
    let mut w = store.content().writer().unwrap();
    w.write_all(&data).unwrap();
    let err = w.commit(&wrong, data.len() as u64).unwrap_err();
    assert!(err.to_string().contains(&wrong.to_string()), "{err}");
    assert!(!store.content().has(&wrong));
    assert!(!store.content().has(&Digest::sha256_of(&data)));
    // Right digest, wrong size: refused too.
    let mut w = store.content().writer().unwrap();
    w.write_all(&data).unwrap();
    assert!(w.commit(&Digest::sha256_of(&data), 5).is_err());
    assert!(store.content().list().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(tmp.path().join("content/ingest"))
            .unwrap()
            .count(),
        0,
        "refused writes leave no ingest file"
    );
}

#[test]
fn fsck_reports_a_corrupted_blob_and_repair_removes_it() {
    let tmp = TestDir::new();
    let store = Store::open(tmp.path()).unwrap();
    let info = store.content().put_bytes(b"hello").unwrap();
    std::fs::write(store.content().blob_path(&info.digest), b"jello").unwrap();
    let r = store.fsck(false).unwrap();
    assert!(
        matches!(&r.problems[..], [FsckProblem::CorruptBlob { digest, .. }] if *digest == info.digest),
        "{:?}",
        r.problems
    );
    store.fsck(true).unwrap();
    assert!(!store.content().has(&info.digest));
    assert!(store.fsck(false).unwrap().is_clean());
}

#[test]
fn prune_deletes_only_what_no_cache_record_lease_or_ref_names() {
    let tmp = TestDir::new();
    let store = Store::open_with(
        tmp.path(),
        kiln_store::StoreOptions {
            snapshotter: Some(kiln_store::SnapshotterKind::Copy),
            ..Default::default()
        },
    )
    .unwrap();
    let mk = |name: &str| {
        let a = store.prepare(None, None).unwrap();
        std::fs::write(a.rootfs.join(name), name).unwrap();
        let id = store.commit(&a).unwrap();
        let l = store
            .export_layer(id, Compression::Gzip, &ExportOptions::default())
            .unwrap();
        (id, l.digest)
    };
    let (cached, cached_blob) = mk("cached");
    let (leased, _) = mk("leased");
    let (garbage, garbage_blob) = mk("garbage");
    let lease = store.lease().unwrap();
    lease.protect_snapshot(leased).unwrap();
    store.cache_put(b"k", b"v", &[cached], &[], 1).unwrap();
    let manifest = format!(r#"{{"layers":[{{"digest":"{cached_blob}"}}]}}"#);
    let m = store.content().put_bytes(manifest.as_bytes()).unwrap();
    store.set_ref("app:latest", &m.digest).unwrap();
    let loose = store.content().put_bytes(b"nobody needs me").unwrap();

    let opts = kiln_store::PruneOptions {
        grace: Duration::ZERO,
        ..Default::default()
    };
    let r = store.prune(&opts).unwrap();
    assert_eq!(r.snapshots, vec![garbage]);
    let mut gone = r.blobs.clone();
    gone.sort();
    let mut want = vec![garbage_blob, loose.digest];
    want.sort();
    assert_eq!(gone, want);
    assert!(store.content().has(&m.digest) && store.content().has(&cached_blob));
    assert!(store.snapshot(cached).is_ok() && store.snapshot(leased).is_ok());
    assert!(store.fsck(false).unwrap().is_clean());

    // Dropping the cache record by size frees its snapshot (the ref still keeps the blob).
    let r = store
        .prune(&kiln_store::PruneOptions {
            keep_bytes: Some(0),
            ..opts.clone()
        })
        .unwrap();
    assert_eq!(r.cache_records, 1);
    assert_eq!(r.snapshots, vec![cached]);
    assert!(store.content().has(&cached_blob));
    drop(lease);
    assert_eq!(store.prune(&opts).unwrap().snapshots, vec![leased]);
    assert!(store.fsck(false).unwrap().is_clean());
}
