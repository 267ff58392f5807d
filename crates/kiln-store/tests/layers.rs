//! Layers from real changes (root): a busybox rootfs in an overlay snapshot, changed by a
//! real process and by direct filesystem calls, exported, listed and applied back.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;
use kiln_oci::compression::Compression;
use kiln_store::{
    list_layer, ActiveSnapshot, ApplyOptions, EntryKind, ExportOptions, SnapshotId,
    SnapshotterKind, Store, StoreOptions,
};

/// A committed base snapshot: busybox plus files the step will change.
fn base(store: &Store) -> SnapshotId {
    let a = store.prepare(None, None).unwrap();
    let r = &a.rootfs;
    write_busybox_rootfs(r);
    fs::write(r.join("etc/old"), "old\n").unwrap();
    fs::write(r.join("etc/keep"), "keep\n").unwrap();
    fs::set_permissions(r.join("etc/keep"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir_all(r.join("data/sub")).unwrap();
    fs::write(r.join("data/a"), "a").unwrap();
    fs::write(r.join("data/sub/b"), "b").unwrap();
    store.commit(&a).unwrap()
}

/// A file capability blob (VFS_CAP_REVISION_2, cap_net_raw permitted + effective).
const CAP_NET_RAW: [u8; 20] = [
    0x01, 0, 0, 0x02, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// The step: a real shell in a chroot writes, deletes, chmods, and replaces a dir; then
/// direct calls add an owned file with a capability, a hardlink and a symlink.
fn run_step(store: &Store, parent: SnapshotId) -> ActiveSnapshot {
    let a = store.prepare(Some(parent), None).unwrap();
    let status = Command::new("chroot")
        .arg(&a.rootfs)
        .args(["/bin/busybox", "sh", "-c"])
        .arg("echo hello > /etc/new && rm /etc/old && chmod 600 /etc/keep && rm -rf /data && mkdir /data && echo fresh > /data/fresh")
        .status()
        .unwrap();
    assert!(status.success(), "step failed: {status}");
    let r = &a.rootfs;
    fs::create_dir(r.join("opt")).unwrap();
    fs::write(r.join("opt/cap"), "#!/bin/sh\n").unwrap();
    std::os::unix::fs::chown(r.join("opt/cap"), Some(1000), Some(1000)).unwrap();
    fs::set_permissions(r.join("opt/cap"), fs::Permissions::from_mode(0o4755)).unwrap();
    set_xattr(&r.join("opt/cap"), "security.capability", &CAP_NET_RAW);
    fs::hard_link(r.join("opt/cap"), r.join("opt/cap-link")).unwrap();
    std::os::unix::fs::symlink("cap", r.join("opt/sym")).unwrap();
    a
}

fn set_xattr(p: &Path, name: &str, v: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    assert_eq!(r, 0, "setxattr {name}: {}", std::io::Error::last_os_error());
}

fn listing(store: &Store, digest: &kiln_oci::Digest) -> Vec<kiln_store::TarHeader> {
    list_layer(store.content().open_blob(digest).unwrap()).unwrap()
}

#[test]
fn overlay_step_layer_has_exact_entries_whiteouts_and_opaque_dir_as_root() {
    require_root("overlayfs and chroot");
    let tmp = TestDir::new();
    let store = store_at(tmp.path(), SnapshotterKind::Overlay);
    let b = base(&store);
    let step = run_step(&store, b);
    let s = store.commit(&step).unwrap();
    let layer = store
        .export_layer(s, Compression::Gzip, &ExportOptions::default())
        .unwrap();
    assert_eq!(
        layer.media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let hs = listing(&store, &layer.digest);
    let got: Vec<(String, EntryKind)> = hs
        .iter()
        .map(|h| (String::from_utf8_lossy(&h.path).into_owned(), h.kind))
        .collect();
    let want: Vec<(String, EntryKind)> = [
        ("data", EntryKind::Dir),
        ("data/.wh..wh..opq", EntryKind::File),
        ("data/fresh", EntryKind::File),
        ("etc", EntryKind::Dir),
        ("etc/keep", EntryKind::File),
        ("etc/new", EntryKind::File),
        ("etc/.wh.old", EntryKind::File),
        ("opt", EntryKind::Dir),
        ("opt/cap", EntryKind::File),
        ("opt/cap-link", EntryKind::Hardlink),
        ("opt/sym", EntryKind::Symlink),
    ]
    .iter()
    .map(|(p, k)| (p.to_string(), *k))
    .collect();
    assert_eq!(got, want);
    let by = |p: &str| hs.iter().find(|h| h.path == p.as_bytes()).unwrap();
    assert_eq!(by("etc/keep").mode, 0o600);
    assert_eq!(by("etc/new").size, 6);
    let cap = by("opt/cap");
    assert_eq!((cap.uid, cap.gid, cap.mode), (1000, 1000, 0o4755));
    assert_eq!(
        cap.xattrs,
        vec![(b"security.capability".to_vec(), CAP_NET_RAW.to_vec())]
    );
    assert_eq!(by("opt/cap-link").link, b"opt/cap");
    assert_eq!(by("opt/sym").link, b"cap");
    // No overlay-internal xattr leaks into the layer.
    assert!(hs.iter().all(|h| h
        .xattrs
        .iter()
        .all(|(k, _)| !k.starts_with(b"trusted.overlay."))));

    // Exporting again is a cache hit: same blob, nothing recompressed.
    let again = store
        .export_layer(s, Compression::Gzip, &ExportOptions::default())
        .unwrap();
    assert_eq!(again, layer);
    // zstd is a second blob of the same diff.
    let z = store
        .export_layer(s, Compression::Zstd, &ExportOptions::default())
        .unwrap();
    assert_eq!(z.diff_id, layer.diff_id);
    assert_ne!(z.digest, layer.digest);
}

#[test]
fn base_plus_layer_unpacks_to_the_same_tree_in_overlay_and_copy_stores_as_root() {
    require_root("overlayfs and chroot");
    let tmp = TestDir::new();
    let src = store_at(&tmp.path().join("src"), SnapshotterKind::Overlay);
    let b = base(&src);
    let step = run_step(&src, b);
    let s = src.commit(&step).unwrap();
    let opts = ExportOptions::default();
    let lb = src.export_layer(b, Compression::Gzip, &opts).unwrap();
    let ls = src.export_layer(s, Compression::Zstd, &opts).unwrap();
    let want = src.view(s, None).unwrap();

    for kind in [SnapshotterKind::Overlay, SnapshotterKind::Copy] {
        let dst = store_at(&tmp.path().join(format!("{kind:?}")), kind);
        for l in [&lb, &ls] {
            let bytes = fs::read(src.content().blob_path(&l.digest)).unwrap();
            let info = dst.content().put_bytes(&bytes).unwrap();
            assert_eq!(info.digest, l.digest);
        }
        let ub = dst
            .unpack_layer(None, &lb.digest, &ApplyOptions::default(), None)
            .unwrap();
        let us = dst
            .unpack_layer(Some(ub), &ls.digest, &ApplyOptions::default(), None)
            .unwrap();
        // Unpacking the same chain again reuses the snapshot (cached by chain id).
        assert_eq!(
            dst.unpack_layer(Some(ub), &ls.digest, &ApplyOptions::default(), None)
                .unwrap(),
            us
        );
        let got = dst.view(us, None).unwrap();
        assert_same_tree(&want.rootfs, &got.rootfs);
        let rec = dst.snapshot(us).unwrap();
        assert_eq!(
            rec.chain_id,
            Some(kiln_store::chain_id(Some(&lb.diff_id), &ls.diff_id))
        );
        dst.remove(got.id).unwrap();
        assert!(dst.fsck(false).unwrap().is_clean());
    }
    src.remove(want.id).unwrap();
}

#[test]
fn copy_snapshotter_diff_by_tree_compare_lists_changes_and_deletions_as_root() {
    require_root("chroot");
    let tmp = TestDir::new();
    let store = store_at(tmp.path(), SnapshotterKind::Copy);
    let b = base(&store);
    let step = run_step(&store, b);
    let s = store.commit(&step).unwrap();
    let layer = store
        .export_layer(s, Compression::Gzip, &ExportOptions::default())
        .unwrap();
    let paths: Vec<String> = listing(&store, &layer.digest)
        .iter()
        .map(|h| String::from_utf8_lossy(&h.path).into_owned())
        .collect();
    for p in [
        "data",
        "data/.wh.a",
        "data/fresh",
        "data/.wh.sub",
        "etc/keep",
        "etc/new",
        "etc/.wh.old",
        "opt/cap",
        "opt/cap-link",
        "opt/sym",
    ] {
        assert!(paths.contains(&p.to_owned()), "{p} missing from {paths:?}");
    }
    assert!(
        !paths.iter().any(|p| p.starts_with("bin/")),
        "unchanged files exported: {paths:?}"
    );
    // And it applies back into an overlay store to the same tree.
    let dst = store_at(&tmp.path().join("dst"), SnapshotterKind::Overlay);
    let lb = store
        .export_layer(b, Compression::Gzip, &ExportOptions::default())
        .unwrap();
    for l in [&lb, &layer] {
        dst.content()
            .put_bytes(&fs::read(store.content().blob_path(&l.digest)).unwrap())
            .unwrap();
    }
    let ub = dst
        .unpack_layer(None, &lb.digest, &ApplyOptions::default(), None)
        .unwrap();
    let us = dst
        .unpack_layer(Some(ub), &layer.digest, &ApplyOptions::default(), None)
        .unwrap();
    let v = dst.view(us, None).unwrap();
    let original = store.view(s, None).unwrap();
    assert_same_tree(&original.rootfs, &v.rootfs);
    dst.remove(v.id).unwrap();
}

#[test]
fn source_date_epoch_clamps_mtimes_and_makes_layers_reproducible_as_root() {
    require_root("overlayfs");
    let tmp = TestDir::new();
    let store = store_at(tmp.path(), SnapshotterKind::Overlay);
    let mut digests = Vec::new();
    for _ in 0..2 {
        let a = store.prepare(None, None).unwrap();
        fs::create_dir(a.rootfs.join("d")).unwrap();
        fs::write(a.rootfs.join("d/f"), "same").unwrap();
        let id = store.commit(&a).unwrap();
        let opts = ExportOptions {
            diff: kiln_store::DiffOptions {
                source_date_epoch: Some(1_000),
            },
        };
        let l = store.export_layer(id, Compression::Gzip, &opts).unwrap();
        let hs = listing(&store, &l.digest);
        assert!(hs.iter().all(|h| h.mtime <= 1_000));
        digests.push(l.digest);
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert_eq!(digests[0], digests[1]);
}

#[test]
fn chain_of_200_layers_mounts_and_shows_every_layer_as_root() {
    require_root("overlayfs");
    let tmp = TestDir::new();
    let store = store_at(tmp.path(), SnapshotterKind::Overlay);
    let mut parent = None;
    for i in 0..200 {
        let a = store.prepare(parent, None).unwrap();
        fs::write(a.rootfs.join(format!("layer-{i:03}")), i.to_string()).unwrap();
        if i > 0 {
            // Each layer also deletes the previous layer's marker file.
            fs::remove_file(a.rootfs.join(format!("gone-{:03}", i - 1))).unwrap();
        }
        fs::write(a.rootfs.join(format!("gone-{i:03}")), "x").unwrap();
        parent = Some(store.commit(&a).unwrap());
    }
    // 200 lowerdir paths under this root exceed one page of mount options.
    let lowers: usize = store.mounts(parent.unwrap()).unwrap()[0]
        .options
        .iter()
        .map(|o| o.len() + 1)
        .sum();
    assert!(
        lowers > 4096,
        "test does not exercise the long-option path ({lowers} bytes)"
    );
    let top = store.prepare(parent, None).unwrap();
    let names: Vec<String> = fs::read_dir(&top.rootfs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("layer-")).count(),
        200
    );
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("gone-"))
            .collect::<Vec<_>>(),
        vec!["gone-199"]
    );
    assert_eq!(
        fs::read_to_string(top.rootfs.join("layer-000")).unwrap(),
        "0"
    );
    let v = store.view(parent.unwrap(), None).unwrap();
    assert!(v.rootfs.join("layer-199").is_file());
    store.remove(v.id).unwrap();
    store.remove(top.id).unwrap();
}

#[test]
fn chains_deeper_than_overlay_can_stack_are_flattened_not_refused_as_root() {
    require_root("overlayfs");
    let tmp = TestDir::new();
    let store = Store::open_with(
        tmp.path(),
        StoreOptions {
            snapshotter: Some(SnapshotterKind::Overlay),
            max_overlay_layers: Some(8),
            ..Default::default()
        },
    )
    .unwrap();
    let mut parent = None;
    for i in 0..20 {
        let a = store.prepare(parent, None).unwrap();
        let r = &a.rootfs;
        fs::write(r.join(format!("layer-{i:02}")), i.to_string()).unwrap();
        if i > 0 {
            fs::remove_file(r.join(format!("gone-{:02}", i - 1))).unwrap();
        }
        fs::write(r.join(format!("gone-{i:02}")), "x").unwrap();
        if i == 3 {
            fs::create_dir_all(r.join("d/old")).unwrap();
        }
        if i == 6 {
            // Replace the dir: an opaque dir in the upper, which flattening must honour.
            fs::remove_dir_all(r.join("d")).unwrap();
            fs::create_dir(r.join("d")).unwrap();
            fs::write(r.join("d/new"), "n").unwrap();
        }
        parent = Some(store.commit(&a).unwrap());
    }
    let top = store.prepare(parent, None).unwrap();
    let mut names: Vec<String> = fs::read_dir(&top.rootfs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("layer-{i:02}")).collect();
    want.push("d".into());
    want.push("gone-19".into());
    want.sort();
    assert_eq!(names, want);
    let d: Vec<String> = fs::read_dir(top.rootfs.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(d, vec!["new".to_owned()]);
    store.remove(top.id).unwrap();
}

#[test]
fn several_layers_export_at_once_in_order_and_are_remembered_as_root() {
    require_root("overlayfs");
    let tmp = TestDir::new();
    let store = store_at(tmp.path(), SnapshotterKind::Overlay);
    let mut ids = Vec::new();
    let mut parent = None;
    for i in 0..4 {
        let a = store.prepare(parent, None).unwrap();
        // Big enough to be cut into several parallel gzip members.
        let data: Vec<u8> = (0..6_000_000u32)
            .map(|x| (x.wrapping_mul(2654435761) >> (i + 20)) as u8)
            .collect();
        fs::write(a.rootfs.join(format!("f{i}")), &data).unwrap();
        let id = store.commit(&a).unwrap();
        ids.push(id);
        parent = Some(id);
    }
    let all = store
        .export_layers(&ids, Compression::Gzip, &ExportOptions::default())
        .unwrap();
    for (id, l) in ids.iter().zip(&all) {
        let hs = listing(&store, &l.digest);
        assert_eq!(hs.len(), 1);
        assert_eq!(hs[0].path, format!("f{}", id.0 - ids[0].0).into_bytes());
        assert_eq!(
            store
                .export_layer(*id, Compression::Gzip, &ExportOptions::default())
                .unwrap(),
            *l
        );
        assert_eq!(
            store
                .layer_blob(&l.diff_id, Compression::Gzip)
                .unwrap()
                .as_ref(),
            Some(l)
        );
    }
}

/// Python's tarfile writing the shapes containerd and Docker accept: absolute names (a `/`
/// root entry as umoci writes it), directory entries after their children, duplicate
/// entries, PAX and GNU long names and long link targets, hard links (one with an absolute
/// target), and xattrs. Argument: the output directory.
const PY_LAYERS: &str = r##"
import io, sys, tarfile
out = sys.argv[1]
cap = bytes([1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])

def add(t, name, kind=tarfile.REGTYPE, data=b"", mode=0o644, link="", pax=None):
    i = tarfile.TarInfo(name)
    i.type, i.mode, i.mtime, i.linkname = kind, mode, 1700000000, link
    if pax:
        i.pax_headers = pax
    if kind == tarfile.REGTYPE:
        i.size = len(data)
        t.addfile(i, io.BytesIO(data))
    else:
        t.addfile(i)

long_dir = "deep/" + "d" * 120 + "/" + "e" * 120
with tarfile.open(out + "/python-pax.tar", "w", format=tarfile.PAX_FORMAT) as t:
    add(t, "/", tarfile.DIRTYPE, mode=0o755)
    add(t, "/abs", tarfile.DIRTYPE, mode=0o755)
    add(t, "/abs/file", data=b"absolute\n")
    add(t, "later/child/file", data=b"child first\n")
    add(t, "later/child", tarfile.DIRTYPE, mode=0o750)
    add(t, "later", tarfile.DIRTYPE, mode=0o705)
    add(t, "dup", data=b"first\n")
    add(t, "dup", data=b"second\n")
    add(t, "dupdir", tarfile.DIRTYPE, mode=0o755)
    add(t, "dupdir/inner", data=b"gone\n")
    add(t, "dupdir", data=b"now a file\n")
    add(t, "dupmode", tarfile.DIRTYPE, mode=0o700)
    add(t, "dupmode", tarfile.DIRTYPE, mode=0o711)
    add(t, long_dir + "/pax-long-name", data=b"pax long\n")
    add(t, "pax-long-link", tarfile.SYMTYPE, link="/" + long_dir + "/pax-long-name")
    add(t, "hard", tarfile.LNKTYPE, link="abs/file")
    add(t, "hard-abs", tarfile.LNKTYPE, link="/abs/file")
    add(t, "cap", data=b"#!/bin/sh\n", mode=0o755, pax={
        "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.kiln": "yes"})
with tarfile.open(out + "/python-gnu.tar", "w", format=tarfile.GNU_FORMAT) as t:
    add(t, "gnu/" + "g" * 150, data=b"gnu long\n")
    add(t, "gnu/long-link", tarfile.SYMTYPE, link="g" * 150)
    add(t, "./gnu/dotted", data=b"dot slash\n")
"##;

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 3 MiB file with two short data runs and holes around them.
fn write_sparse(p: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = fs::File::create(p).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(b"middle").unwrap();
    f.seek(SeekFrom::Start(3 << 20)).unwrap();
    f.write_all(b"end").unwrap();
}

/// The layers of the test set, in the order they are applied, each with a name.
fn real_tool_layers(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let src = dir.join("src");
    fs::create_dir_all(src.join("tree/sub")).unwrap();
    for name in ["s-gnu", "s-pax00", "s-pax01", "s-pax10"] {
        write_sparse(&src.join(name));
    }
    fs::write(src.join("tree/sub/f"), "from tar -C . \n").unwrap();
    let tar = |out: &str, args: &[&str]| {
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&src)
                .arg("-cf")
                .arg(dir.join(out))
                .args(args),
        );
        fs::read(dir.join(out)).unwrap()
    };
    let gnu = tar("gnu-sparse.tar", &["--format=gnu", "--sparse", "s-gnu"]);
    let pax00 = tar(
        "pax00.tar",
        &["--format=pax", "--sparse-version=0.0", "s-pax00"],
    );
    let pax01 = tar(
        "pax01.tar",
        &["--format=pax", "--sparse-version=0.1", "s-pax01"],
    );
    let pax10 = tar(
        "pax10.tar",
        &["--format=pax", "--sparse-version=1.0", "s-pax10"],
    );
    // The shapes are what the test is about: make sure tar really wrote them.
    assert_eq!(gnu[156], b'S', "GNU tar wrote no old-GNU sparse entry");
    for (t, marker) in [
        (&pax00, &b"GNU.sparse.offset"[..]),
        (&pax01, b"GNU.sparse.map"),
        (&pax10, b"GNU.sparse.major=1"),
    ] {
        assert!(
            t.windows(marker.len()).any(|w| w == marker),
            "tar wrote no {}",
            String::from_utf8_lossy(marker)
        );
    }
    let dotted = tar("dotted.tar", &["./tree"]);
    assert!(dotted.windows(8).any(|w| w == b"./tree/s"));
    run_ok(Command::new("python3").args(["-c", PY_LAYERS]).arg(dir));
    let py_pax = fs::read(dir.join("python-pax.tar")).unwrap();
    let py_gnu = fs::read(dir.join("python-gnu.tar")).unwrap();
    // Compressed with the real command-line tools, as image tools do.
    let compress = |tool: &str, args: &[&str], data: &[u8]| {
        let p = dir.join(format!("in-{tool}"));
        fs::write(&p, data).unwrap();
        let out = Command::new(tool)
            .args(args)
            .arg(&p)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(out.status.success(), "{tool} failed");
        out.stdout
    };
    vec![
        (
            "gnu-sparse (gzip -n)".into(),
            compress("gzip", &["-nc"], &gnu),
        ),
        (
            "pax 0.0 sparse (zstd)".into(),
            compress("zstd", &["-qc"], &pax00),
        ),
        ("pax 0.1 sparse".into(), pax01),
        ("pax 1.0 sparse".into(), pax10),
        ("tar -C src -cf - ./tree".into(), dotted),
        ("python tarfile PAX".into(), py_pax),
        (
            "python tarfile GNU (zstd)".into(),
            compress("zstd", &["-qc"], &py_gnu),
        ),
    ]
}

#[test]
fn layer_shapes_real_tools_write_apply_as_containerd_applies_them_as_root() {
    assert!(
        is_root(),
        "needs root (overlayfs, chown, security.* xattrs)"
    );
    let tmp = TestDir::new();
    let layers = real_tool_layers(&tmp.path().join("layers"));
    for kind in [SnapshotterKind::Overlay, SnapshotterKind::Copy] {
        let store = store_at(&tmp.path().join(format!("{kind:?}")), kind);
        let mut parent = None;
        for (name, bytes) in &layers {
            let info = store.content().put_bytes(bytes).unwrap();
            let id = store
                .unpack_layer(parent, &info.digest, &ApplyOptions::default(), None)
                .unwrap_or_else(|e| panic!("{kind:?}: layer {name}: {e}"));
            parent = Some(id);
        }
        let v = store.view(parent.unwrap(), None).unwrap();
        let r = &v.rootfs;
        let read = |p: &str| fs::read(r.join(p)).unwrap_or_else(|e| panic!("{kind:?}: {p}: {e}"));
        for name in ["s-gnu", "s-pax00", "s-pax01", "s-pax10"] {
            let got = read(name);
            assert_eq!(got.len(), (3 << 20) + 3, "{kind:?}: {name} size");
            assert_eq!(&got[1 << 20..(1 << 20) + 6], b"middle", "{kind:?}: {name}");
            assert_eq!(&got[3 << 20..], b"end", "{kind:?}: {name}");
            let zeros = got.iter().filter(|&&b| b == 0).count();
            assert_eq!(zeros, got.len() - 9, "{kind:?}: {name}: holes are zeros");
            if kind == SnapshotterKind::Overlay {
                use std::os::unix::fs::MetadataExt;
                let blocks = fs::metadata(r.join(name)).unwrap().blocks();
                assert!(blocks * 512 < 1 << 20, "{name}: holes were written out");
            }
        }
        assert_eq!(read("tree/sub/f"), b"from tar -C . \n");
        assert_eq!(read("abs/file"), b"absolute\n");
        assert_eq!(read("later/child/file"), b"child first\n");
        let mode = |p: &str| {
            fs::symlink_metadata(r.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(
            mode("later"),
            0o705,
            "{kind:?}: dir entry after its children"
        );
        assert_eq!(mode("later/child"), 0o750);
        assert_eq!(read("dup"), b"second\n", "{kind:?}: the later entry wins");
        assert_eq!(read("dupdir"), b"now a file\n");
        assert_eq!(mode("dupmode"), 0o711, "{kind:?}: the later dir entry wins");
        let long_dir = format!("deep/{}/{}", "d".repeat(120), "e".repeat(120));
        assert_eq!(read(&format!("{long_dir}/pax-long-name")), b"pax long\n");
        assert_eq!(
            fs::read_link(r.join("pax-long-link")).unwrap(),
            Path::new(&format!("/{long_dir}/pax-long-name"))
        );
        assert_eq!(read(&format!("gnu/{}", "g".repeat(150))), b"gnu long\n");
        assert_eq!(
            fs::read_link(r.join("gnu/long-link")).unwrap(),
            Path::new(&"g".repeat(150))
        );
        assert_eq!(read("gnu/dotted"), b"dot slash\n");
        {
            use std::os::unix::fs::MetadataExt;
            let ino = |p: &str| fs::metadata(r.join(p)).unwrap().ino();
            assert_eq!(ino("hard"), ino("abs/file"), "{kind:?}: hard link");
            assert_eq!(
                ino("hard-abs"),
                ino("abs/file"),
                "{kind:?}: absolute hard link"
            );
        }
        let line = describe_tree(r)
            .into_iter()
            .find(|l| l.starts_with("cap: "))
            .unwrap();
        assert!(
            line.contains(&format!(
                "{:?}",
                (b"security.capability".to_vec(), CAP_NET_RAW.to_vec())
            )) && line.contains(&format!("{:?}", (b"user.kiln".to_vec(), b"yes".to_vec()))),
            "{kind:?}: xattrs: {line}"
        );
        // The root entry and absolute names stay inside: nothing appeared next to the store.
        assert!(!tmp.path().join("abs").exists());
        store.remove(v.id).unwrap();
    }
}

#[test]
fn an_opaque_whiteout_from_a_real_tar_hides_only_lower_content_as_root() {
    assert!(is_root(), "needs root (overlay whiteouts are char devices)");
    let tmp = TestDir::new();
    let src = tmp.path().join("src");
    let mk = |layer: &str, files: &[(&str, &str)]| {
        let d = src.join(layer);
        for (p, data) in files {
            fs::create_dir_all(d.join(p).parent().unwrap()).unwrap();
            fs::write(d.join(p), data).unwrap();
        }
        let out = tmp.path().join(format!("{layer}.tar"));
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&d)
                .arg("-cf")
                .arg(&out)
                .arg("."),
        );
        fs::read(out).unwrap()
    };
    let lower = mk(
        "lower",
        &[("opq/a", "a"), ("opq/sub/b", "b"), ("keep", "k")],
    );
    let upper = mk("upper", &[("opq/.wh..wh..opq", ""), ("opq/c", "c")]);
    for kind in [SnapshotterKind::Overlay, SnapshotterKind::Copy] {
        let store = store_at(&tmp.path().join(format!("{kind:?}")), kind);
        let mut parent = None;
        for l in [&lower, &upper] {
            let info = store.content().put_bytes(l).unwrap();
            parent = Some(
                store
                    .unpack_layer(parent, &info.digest, &ApplyOptions::default(), None)
                    .unwrap(),
            );
        }
        let v = store.view(parent.unwrap(), None).unwrap();
        let mut names: Vec<String> = fs::read_dir(v.rootfs.join("opq"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["c"], "{kind:?}");
        assert_eq!(fs::read(v.rootfs.join("keep")).unwrap(), b"k");
        store.remove(v.id).unwrap();
    }
}

/// The superblock options of the mount at `target`, from /proc/self/mountinfo.
fn mount_options(target: &Path) -> String {
    let target = target.canonicalize().unwrap();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some(target.to_str().unwrap()))
        .and_then(|l| l.split(" - ").nth(1))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("{} is not a mount point", target.display()))
}

#[test]
fn writable_overlays_are_volatile_and_commits_keep_small_and_large_uppers_as_root() {
    let d = TestDir::new();
    let store = store_at(d.path(), SnapshotterKind::Overlay);
    let parent = base(&store);

    // A step that writes a few files: its upper dir is fsynced entry by entry.
    let small = store.prepare(Some(parent), None).unwrap();
    let opts = mount_options(&small.rootfs);
    // Every kernel this project supports has it (5.10+); without it kiln mounts plainly.
    assert!(
        opts.contains("volatile"),
        "writable overlay options: {opts}"
    );
    fs::write(small.rootfs.join("etc/new"), "new\n").unwrap();
    fs::create_dir_all(small.rootfs.join("srv/app")).unwrap();
    fs::write(small.rootfs.join("srv/app/FILES"), "3\n").unwrap();
    let small_id = store.commit(&small).unwrap();

    // A step that writes more than the per-entry limit: one syncfs instead.
    let large = store.prepare(Some(small_id), None).unwrap();
    for i in 0..300 {
        fs::write(large.rootfs.join(format!("data/f{i}")), format!("{i}\n")).unwrap();
    }
    let large_id = store.commit(&large).unwrap();

    let v = store.view(large_id, None).unwrap();
    assert_eq!(
        fs::read_to_string(v.rootfs.join("etc/new")).unwrap(),
        "new\n"
    );
    assert_eq!(
        fs::read_to_string(v.rootfs.join("srv/app/FILES")).unwrap(),
        "3\n"
    );
    assert_eq!(
        fs::read_to_string(v.rootfs.join("data/f299")).unwrap(),
        "299\n"
    );
    assert!(
        !mount_options(&v.rootfs).contains("volatile"),
        "a read-only view is a plain overlay"
    );
    // The layer of the large step holds exactly its 300 files (and their directory).
    let rec = store
        .export_layer(large_id, Compression::Gzip, &ExportOptions::default())
        .unwrap();
    let files = listing(&store, &rec.digest)
        .iter()
        .filter(|h| h.path.starts_with(b"data/f"))
        .count();
    assert_eq!(files, 300);
    store.remove(v.id).unwrap();
}
