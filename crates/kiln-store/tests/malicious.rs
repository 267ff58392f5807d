//! Crafted layers that try to write outside the rootfs or exhaust the machine. Each must be
//! refused with an error naming the layer digest and the entry, and leave the canary dir
//! (outside the store) untouched. Every case runs against both snapshotters.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use kiln_store::{
    ApplyOptions, DevicePolicy, SnapshotId, SnapshotterKind, Store, StoreError, StoreOptions,
};

struct Case {
    name: &'static str,
    /// Layers applied in order; the last one is the malicious one.
    layers: Vec<Vec<u8>>,
    opts: ApplyOptions,
    /// A substring the entry path or reason must contain.
    mentions: &'static str,
    check: fn(&StoreError) -> bool,
}

fn unsafe_entry(e: &StoreError) -> bool {
    matches!(e, StoreError::UnsafeEntry { .. })
}
fn limit(e: &StoreError) -> bool {
    matches!(e, StoreError::LimitExceeded { .. })
}
fn bad_archive(e: &StoreError) -> bool {
    matches!(e, StoreError::BadArchive { .. })
}

fn file(name: &str, data: &[u8]) -> Vec<u8> {
    raw_entry(name.as_bytes(), b'0', b"", data)
}
fn symlink(name: &str, target: &str) -> Vec<u8> {
    raw_entry(name.as_bytes(), b'2', target.as_bytes(), b"")
}
fn hardlink(name: &str, target: &str) -> Vec<u8> {
    raw_entry(name.as_bytes(), b'1', target.as_bytes(), b"")
}
fn tar(parts: &[Vec<u8>]) -> Vec<u8> {
    tar_end(parts.concat())
}

fn cases(canary: &Path) -> Vec<Case> {
    let c = canary.display().to_string();
    let deep_up = format!("../../../../../../../../../..{c}");
    let d = ApplyOptions::default;
    let mut truncated = gzip(&tar(&[file("big", &vec![7u8; 300_000])]));
    truncated.truncate(truncated.len() / 2);
    let mut bad_sum = tar(&[file("x", b"x")]);
    bad_sum[148] = b'7';
    let many: Vec<Vec<u8>> = (0..50).map(|i| file(&format!("f{i}"), b"")).collect();
    vec![
        Case {
            name: "path traversal",
            layers: vec![tar(&[file("../escape", b"pwned")])],
            opts: d(),
            mentions: "../escape",
            check: unsafe_entry,
        },
        Case {
            name: "nested traversal",
            layers: vec![tar(&[file("a/../../escape", b"pwned")])],
            opts: d(),
            mentions: "..",
            check: unsafe_entry,
        },
        Case {
            name: "absolute path climbing out",
            layers: vec![tar(&[file("/../escape", b"pwned")])],
            opts: d(),
            mentions: "..",
            check: unsafe_entry,
        },
        Case {
            name: "absolute path through an absolute symlink",
            layers: vec![tar(&[symlink("evil", &c), file("/evil/pwned", b"pwned")])],
            opts: d(),
            mentions: "/evil/pwned",
            check: unsafe_entry,
        },
        Case {
            name: "a later entry turns a dir into an escaping symlink, then writes through it",
            layers: vec![tar(&[
                raw_entry(b"d/", b'5', b"", b""),
                file("d/ok", b"ok"),
                symlink("d", &c),
                file("d/pwned", b"pwned"),
            ])],
            opts: d(),
            mentions: "d/pwned",
            check: unsafe_entry,
        },
        Case {
            name: "absolute symlink then write through it",
            layers: vec![tar(&[symlink("evil", &c), file("evil/pwned", b"pwned")])],
            opts: d(),
            mentions: "evil/pwned",
            check: unsafe_entry,
        },
        Case {
            name: "relative symlink climbing out then write through it",
            layers: vec![tar(&[
                symlink("rel", &deep_up),
                file("rel/pwned", b"pwned"),
            ])],
            opts: d(),
            mentions: "rel/pwned",
            check: unsafe_entry,
        },
        Case {
            name: "symlink from a lower layer written through by the next layer",
            layers: vec![
                tar(&[symlink("evil", &c)]),
                tar(&[file("evil/pwned", b"pwned")]),
            ],
            opts: d(),
            mentions: "evil/pwned",
            check: unsafe_entry,
        },
        Case {
            name: "hardlink escape",
            layers: vec![tar(&[hardlink("hl", &format!("../../..{c}/secret"))])],
            opts: d(),
            mentions: "hl",
            check: unsafe_entry,
        },
        Case {
            // Re-rooted like every absolute name: the canary's path inside the rootfs has
            // no such file.
            name: "hardlink to absolute path",
            layers: vec![tar(&[hardlink("hl", &format!("{c}/secret"))])],
            opts: d(),
            mentions: "does not exist",
            check: unsafe_entry,
        },
        Case {
            name: "hardlink to an absolute path climbing out",
            layers: vec![tar(&[hardlink("hl", &format!("/../../..{c}/secret"))])],
            opts: d(),
            mentions: "..",
            check: unsafe_entry,
        },
        Case {
            name: "hardlink through a symlinked dir",
            layers: vec![tar(&[symlink("evil", &c), hardlink("hl", "evil/secret")])],
            opts: d(),
            mentions: "hl",
            check: unsafe_entry,
        },
        Case {
            name: "device node in an untrusted layer",
            layers: vec![tar(&[raw_entry(b"dev/mem-like", b'3', b"", b"")])],
            opts: ApplyOptions {
                devices: DevicePolicy::Reject,
                ..d()
            },
            mentions: "device",
            check: unsafe_entry,
        },
        Case {
            name: "whiteout of ..",
            layers: vec![tar(&[file("sub/.wh...", b"")])],
            opts: d(),
            mentions: "..",
            check: unsafe_entry,
        },
        Case {
            name: "whiteout of .",
            layers: vec![tar(&[file(".wh..", b"")])],
            opts: d(),
            mentions: "whiteout",
            check: unsafe_entry,
        },
        Case {
            name: "oversized PAX header",
            layers: vec![raw_entry_sized(b"PaxHeaders/x", b'x', b"", 100 << 20, b"")],
            opts: d(),
            mentions: "extended",
            check: limit,
        },
        Case {
            name: "oversized GNU long name",
            layers: vec![raw_entry_sized(b"././@LongLink", b'L', b"", 50 << 20, b"")],
            opts: d(),
            mentions: "extended",
            check: limit,
        },
        Case {
            name: "truncated gzip",
            layers: vec![truncated],
            opts: d(),
            mentions: "truncated",
            check: bad_archive,
        },
        Case {
            name: "decompression bomb over the byte limit",
            layers: vec![gzip(&tar(&[file("zeros", &vec![0u8; 3 << 20])]))],
            opts: ApplyOptions {
                max_total_bytes: 1 << 20,
                ..d()
            },
            mentions: "total size",
            check: limit,
        },
        Case {
            name: "too many entries",
            layers: vec![tar(&many)],
            opts: ApplyOptions {
                max_entries: 10,
                ..d()
            },
            mentions: "number of entries",
            check: limit,
        },
        Case {
            name: "corrupt header checksum",
            layers: vec![bad_sum],
            opts: d(),
            mentions: "checksum",
            check: bad_archive,
        },
        Case {
            name: "size field larger than the data",
            layers: vec![raw_entry_sized(b"short", b'0', b"", 10_000, b"only this")],
            opts: d(),
            mentions: "truncated",
            check: bad_archive,
        },
    ]
}

fn canary_state(canary: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(canary)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

fn apply_all(
    store: &Store,
    layers: &[Vec<u8>],
    opts: &ApplyOptions,
) -> (kiln_oci::Digest, Result<SnapshotId, StoreError>) {
    let mut parent = None;
    let mut last = None;
    for (i, l) in layers.iter().enumerate() {
        let info = store.content().put_bytes(l).unwrap();
        last = Some(info.digest.clone());
        let o = if i + 1 == layers.len() {
            opts.clone()
        } else {
            ApplyOptions::default()
        };
        match store.unpack_layer(parent, &info.digest, &o, None) {
            Ok(id) => parent = Some(id),
            Err(e) => return (info.digest, Err(e)),
        }
    }
    (last.unwrap(), Ok(parent.unwrap()))
}

#[test]
fn crafted_layers_are_refused_and_write_nothing_outside_as_root() {
    require_root("overlay upper dirs (trusted.* xattrs, whiteout devices)");
    let tmp = TestDir::new();
    let canary = tmp.path().join("canary");
    fs::create_dir(&canary).unwrap();
    fs::write(canary.join("secret"), "do not touch").unwrap();
    let before = canary_state(&canary);
    let all = cases(&canary);
    assert!(all.len() >= 12);
    for kind in [SnapshotterKind::Overlay, SnapshotterKind::Copy] {
        let store = Store::open_with(
            tmp.path().join(format!("store-{kind:?}")),
            StoreOptions {
                snapshotter: Some(kind),
                ..Default::default()
            },
        )
        .unwrap();
        for case in &all {
            let (digest, res) = apply_all(&store, &case.layers, &case.opts);
            let err = match res {
                Ok(id) => panic!(
                    "{kind:?}: case {:?} was accepted as snapshot {id}",
                    case.name
                ),
                Err(e) => e,
            };
            let msg = err.to_string();
            eprintln!("{kind:?} / {}: {msg}", case.name);
            assert!(
                (case.check)(&err),
                "{kind:?}: case {:?}: wrong error kind: {msg}",
                case.name
            );
            assert!(
                msg.contains(&digest.to_string()),
                "{kind:?}: case {:?}: error does not name the layer: {msg}",
                case.name
            );
            assert!(
                msg.contains(case.mentions),
                "{kind:?}: case {:?}: error does not mention {:?}: {msg}",
                case.name,
                case.mentions
            );
            assert_eq!(
                canary_state(&canary),
                before,
                "{kind:?}: case {:?} wrote outside the rootfs",
                case.name
            );
            assert!(!tmp.path().join("escape").exists() && !tmp.path().join("pwned").exists());
        }
        // Refused layers leave no half-made snapshots behind.
        let report = store.fsck(false).unwrap();
        assert!(report.is_clean(), "{kind:?}: {:?}", report.problems);
        let leftovers: Vec<_> = store
            .snapshots()
            .unwrap()
            .into_iter()
            .filter(|s| s.state != kiln_store::SnapshotState::Committed)
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[test]
fn device_nodes_are_skipped_by_default_and_reported_as_root() {
    require_root("device nodes");
    let tmp = TestDir::new();
    let store = Store::open_with(
        tmp.path(),
        StoreOptions {
            snapshotter: Some(SnapshotterKind::Copy),
            ..Default::default()
        },
    )
    .unwrap();
    let t = tar(&[
        raw_entry(b"dev/", b'5', b"", b""),
        raw_entry(b"dev/null-ish", b'3', b"", b""),
        file("ok", b"ok"),
    ]);
    let info = store.content().put_bytes(&t).unwrap();
    let id = store
        .unpack_layer(None, &info.digest, &ApplyOptions::default(), None)
        .unwrap();
    let v = store.view(id, None).unwrap();
    assert!(v.rootfs.join("ok").is_file());
    assert!(fs::symlink_metadata(v.rootfs.join("dev/null-ish")).is_err());
}

#[test]
fn a_file_replacing_an_escaping_symlink_is_written_inside_as_root() {
    require_root("overlayfs");
    let tmp = TestDir::new();
    let canary = tmp.path().join("canary");
    fs::create_dir(&canary).unwrap();
    fs::write(canary.join("secret"), "do not touch").unwrap();
    for kind in [SnapshotterKind::Overlay, SnapshotterKind::Copy] {
        let store = Store::open_with(
            tmp.path().join(format!("{kind:?}")),
            StoreOptions {
                snapshotter: Some(kind),
                ..Default::default()
            },
        )
        .unwrap();
        let l1 = tar(&[symlink("link", &format!("{}/secret", canary.display()))]);
        let l2 = tar(&[file("link", b"replaced")]);
        let (_, res) = apply_all(&store, &[l1, l2], &ApplyOptions::default());
        let id = res.unwrap();
        let v = store.view(id, None).unwrap();
        assert_eq!(fs::read(v.rootfs.join("link")).unwrap(), b"replaced");
        assert_eq!(fs::read(canary.join("secret")).unwrap(), b"do not touch");
        store.remove(v.id).unwrap();
    }
}

/// A PAX extended header carrying one record, then the entry it describes.
fn with_pax(record_key: &str, value: &[u8], entry: Vec<u8>) -> Vec<u8> {
    let body = record_key.len() + value.len() + 3;
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len = len.to_string().len() + body;
    }
    let mut rec = format!("{len} {record_key}=").into_bytes();
    rec.extend_from_slice(value);
    rec.push(b'\n');
    let mut v = raw_entry(b"PaxHeaders/x", b'x', b"", &rec);
    v.extend(entry);
    v
}

#[test]
fn absolute_names_are_rerooted_inside_the_rootfs_as_root() {
    assert!(
        is_root(),
        "needs root (overlay upper dirs use trusted.* xattrs)"
    );
    let tmp = TestDir::new();
    let canary = tmp.path().join("canary");
    fs::create_dir(&canary).unwrap();
    fs::write(canary.join("secret"), "do not touch").unwrap();
    let before = canary_state(&canary);
    let c = canary.display().to_string();
    for kind in [SnapshotterKind::Overlay, SnapshotterKind::Copy] {
        let store = Store::open_with(
            tmp.path().join(format!("{kind:?}")),
            StoreOptions {
                snapshotter: Some(kind),
                ..Default::default()
            },
        )
        .unwrap();
        let layer = tar(&[
            raw_entry(b"/", b'5', b"", b""),
            file(&format!("{c}/secret"), b"inside"),
            file("/bin/sh", b"shell"),
            hardlink("/bin/sh-link", "/bin/sh"),
        ]);
        let (_, res) = apply_all(&store, &[layer], &ApplyOptions::default());
        let id = res.unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        let v = store.view(id, None).unwrap();
        let inside = v.rootfs.join(c.trim_start_matches('/')).join("secret");
        assert_eq!(fs::read(&inside).unwrap(), b"inside", "{kind:?}");
        assert_eq!(fs::read(v.rootfs.join("bin/sh")).unwrap(), b"shell");
        assert_eq!(fs::read(v.rootfs.join("bin/sh-link")).unwrap(), b"shell");
        assert_eq!(
            canary_state(&canary),
            before,
            "{kind:?}: wrote outside the rootfs"
        );
        store.remove(v.id).unwrap();
    }
}

#[test]
fn overlay_xattrs_in_a_layer_do_not_steer_overlayfs_as_root() {
    assert!(
        is_root(),
        "needs root (overlay upper dirs use trusted.* xattrs)"
    );
    let tmp = TestDir::new();
    let store = Store::open_with(
        tmp.path(),
        StoreOptions {
            snapshotter: Some(SnapshotterKind::Overlay),
            ..Default::default()
        },
    )
    .unwrap();
    let lower = tar(&[raw_entry(b"dir/", b'5', b"", b""), file("dir/keep", b"k")]);
    let upper = tar(&[
        with_pax(
            "SCHILY.xattr.trusted.overlay.opaque",
            b"y",
            raw_entry(b"dir/", b'5', b"", b""),
        ),
        file("dir/new", b"n"),
    ]);
    let (_, res) = apply_all(&store, &[lower, upper], &ApplyOptions::default());
    let v = store.view(res.unwrap(), None).unwrap();
    assert_eq!(fs::read(v.rootfs.join("dir/keep")).unwrap(), b"k");
    assert_eq!(fs::read(v.rootfs.join("dir/new")).unwrap(), b"n");
}
