//! COPY/ADD/WORKDIR file semantics as Docker users know them, and containment: no source or
//! destination trick writes outside the destination root.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use kiln_worker::fileop::{self, CopyOptions, FileOpError, Owner};

fn opts() -> CopyOptions {
    CopyOptions {
        dest_is_dir: false,
        parents: false,
        exclude: vec![],
        owner: Owner::Ids(0, 0),
        chmod: None,
        source_name: "build context".into(),
        extract_archives: false,
    }
}

fn context() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    fs::create_dir_all(p.join("src/lib")).unwrap();
    fs::write(p.join("composer.json"), "{}").unwrap();
    fs::write(p.join("composer.lock"), "lock").unwrap();
    fs::write(p.join("src/index.php"), "index").unwrap();
    fs::write(p.join("src/lib/util.php"), "util").unwrap();
    fs::write(p.join("src/lib/util_test.php"), "test").unwrap();
    d
}

fn list(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .map(|e| {
            e.unwrap()
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    out.sort();
    out
}

#[test]
fn copying_a_directory_copies_its_contents_not_the_directory() {
    let ctx = context();
    let dest = tempfile::tempdir().unwrap();
    fileop::copy(ctx.path(), &["src".into()], dest.path(), "/app", &opts()).unwrap();
    assert_eq!(
        list(dest.path()),
        [
            "app",
            "app/index.php",
            "app/lib",
            "app/lib/util.php",
            "app/lib/util_test.php"
        ]
    );
}

#[test]
fn a_file_goes_into_a_destination_with_trailing_slash_and_is_renamed_without() {
    let ctx = context();
    let dest = tempfile::tempdir().unwrap();
    fileop::copy(
        ctx.path(),
        &["composer.json".into()],
        dest.path(),
        "/app/",
        &opts(),
    )
    .unwrap();
    fileop::copy(
        ctx.path(),
        &["composer.lock".into()],
        dest.path(),
        "/app/renamed.lock",
        &opts(),
    )
    .unwrap();
    assert_eq!(
        list(dest.path()),
        ["app", "app/composer.json", "app/renamed.lock"]
    );
    assert_eq!(
        fs::read_to_string(dest.path().join("app/renamed.lock")).unwrap(),
        "lock"
    );
}

#[test]
fn globs_select_matching_files_and_several_sources_fill_a_directory() {
    let ctx = context();
    let dest = tempfile::tempdir().unwrap();
    fileop::copy(
        ctx.path(),
        &["composer.*".into()],
        dest.path(),
        "/deps/",
        &opts(),
    )
    .unwrap();
    assert_eq!(
        list(dest.path()),
        ["deps", "deps/composer.json", "deps/composer.lock"]
    );
}

#[test]
fn several_sources_onto_a_path_without_slash_leave_the_last_file_there() {
    // BuildKit v0.24: `COPY composer.* /deps` leaves composer.lock as the file /deps.
    let ctx = context();
    let dest = tempfile::tempdir().unwrap();
    fileop::copy(
        ctx.path(),
        &["composer.*".into()],
        dest.path(),
        "/deps",
        &opts(),
    )
    .unwrap();
    assert!(dest.path().join("deps").is_file());
    assert_eq!(
        fs::read(dest.path().join("deps")).unwrap(),
        fs::read(ctx.path().join("composer.lock")).unwrap()
    );
}

#[test]
fn exclude_leaves_out_matching_paths() {
    let ctx = context();
    let dest = tempfile::tempdir().unwrap();
    let o = CopyOptions {
        exclude: vec!["src/lib/*_test.php".into()],
        ..opts()
    };
    fileop::copy(ctx.path(), &["src".into()], dest.path(), "/app", &o).unwrap();
    assert!(dest.path().join("app/lib/util.php").exists());
    assert!(!dest.path().join("app/lib/util_test.php").exists());
}

#[test]
fn parents_keeps_the_source_directories() {
    let ctx = context();
    let dest = tempfile::tempdir().unwrap();
    let o = CopyOptions {
        parents: true,
        ..opts()
    };
    fileop::copy(
        ctx.path(),
        &["src/lib/util.php".into(), "composer.json".into()],
        dest.path(),
        "/app",
        &o,
    )
    .unwrap();
    assert!(dest.path().join("app/src/lib/util.php").is_file());
    assert!(dest.path().join("app/composer.json").is_file());
}

#[test]
fn missing_source_is_an_error_naming_the_pattern() {
    let ctx = context();
    let dest = tempfile::tempdir().unwrap();
    let err = fileop::copy(
        ctx.path(),
        &["nope/*.php".into()],
        dest.path(),
        "/app",
        &opts(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "nope/*.php: no such file or directory in the build context"
    );
}

#[test]
fn chmod_and_chown_apply_to_copied_files() {
    let ctx = context();
    let dest = tempfile::tempdir().unwrap();
    let o = CopyOptions {
        chmod: Some(fileop::parse_chmod("0750").unwrap()),
        owner: Owner::Ids(1000, 1001),
        ..opts()
    };
    fileop::copy(
        ctx.path(),
        &["composer.json".into()],
        dest.path(),
        "/c.json",
        &o,
    )
    .unwrap();
    let m = fs::metadata(dest.path().join("c.json")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o750);
    if nix_root() {
        assert_eq!((m.uid(), m.gid()), (1000, 1001));
    }
    assert!(matches!(
        fileop::parse_chmod("u+x"),
        Err(FileOpError::BadChmod(_))
    ));
}

#[test]
fn destination_symlink_to_host_path_stays_inside_the_root() {
    let ctx = context();
    let dest = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    // The image has /app -> <a real host directory> (absolute), and ../../ tricks.
    symlink(outside.path(), dest.path().join("app")).unwrap();
    symlink("../../../../..", dest.path().join("up")).unwrap();
    fileop::copy(
        ctx.path(),
        &["composer.json".into()],
        dest.path(),
        "/app/",
        &opts(),
    )
    .unwrap();
    fileop::copy(
        ctx.path(),
        &["composer.lock".into()],
        dest.path(),
        "/up/escaped.lock",
        &opts(),
    )
    .unwrap();
    assert!(
        list(outside.path()).is_empty(),
        "wrote outside: {:?}",
        list(outside.path())
    );
    let inside = dest
        .path()
        .join(outside.path().strip_prefix("/").unwrap())
        .join("composer.json");
    assert!(
        inside.is_file(),
        "absolute link target must be taken inside the root"
    );
    assert!(dest.path().join("escaped.lock").is_file());
}

#[test]
fn source_symlink_pointing_out_of_the_context_cannot_read_host_files() {
    let ctx = context();
    let secret_dir = tempfile::tempdir().unwrap();
    fs::write(secret_dir.path().join("shadow"), "host secret").unwrap();
    symlink(secret_dir.path().join("shadow"), ctx.path().join("evil")).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let err = fileop::copy(ctx.path(), &["evil".into()], dest.path(), "/x", &opts());
    // The link is resolved inside the context, where its target does not exist.
    assert!(err.is_err());
    assert!(!dest.path().join("x").exists());
}

#[test]
fn workdir_creation_makes_parents_with_owner() {
    let root = tempfile::tempdir().unwrap();
    let host =
        fileop::mkdir_all(root.path(), "/srv/app/../www/html", 0o755, Owner::Ids(0, 0)).unwrap();
    assert_eq!(host, root.path().join("srv/www/html"));
    assert!(host.is_dir());
}

#[test]
fn heredoc_file_is_written_with_mode() {
    let root = tempfile::tempdir().unwrap();
    fileop::write_inline(
        root.path(),
        "run.sh",
        "#!/bin/sh\necho hi\n",
        "/usr/local/bin/",
        false,
        Owner::Ids(0, 0),
        Some(0o755),
    )
    .unwrap();
    let p = root.path().join("usr/local/bin/run.sh");
    assert_eq!(fs::read_to_string(&p).unwrap(), "#!/bin/sh\necho hi\n");
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o755
    );
}

#[test]
fn chown_names_resolve_from_the_image_passwd_and_group() {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir_all(root.path().join("etc")).unwrap();
    fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nwww-data:x:33:34::/var/www:/bin/false\n",
    )
    .unwrap();
    fs::write(root.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
    assert_eq!(
        fileop::resolve_owner(root.path(), "www-data", None).unwrap(),
        (33, 34)
    );
    assert_eq!(
        fileop::resolve_owner(root.path(), "www-data", Some("staff")).unwrap(),
        (33, 50)
    );
    assert_eq!(
        fileop::resolve_owner(root.path(), "1000", Some("1000")).unwrap(),
        (1000, 1000)
    );
    assert!(matches!(
        fileop::resolve_owner(root.path(), "nobody", None),
        Err(FileOpError::UnknownUser(_))
    ));
}

#[test]
fn glob_matching_follows_go_filepath_match() {
    assert!(fileop::glob_match("*.php", "index.php"));
    assert!(!fileop::glob_match("*.php", "src/index.php"));
    assert!(fileop::glob_match("src/*/util?.php", "src/lib/util1.php"));
    assert!(fileop::glob_match("[a-c]*", "b.txt"));
    assert!(!fileop::glob_match("[^a-c]*", "b.txt"));
    assert!(fileop::glob_match("\\*", "*"));
}

/// What `selects` meant before patterns were compiled: each pattern cleaned, then matched
/// against the path and against every directory above it.
fn selects_by_ancestors(patterns: &[String], rel: &str) -> bool {
    patterns.iter().any(|p| {
        let p: Vec<&str> = p
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect();
        let p = p.join("/");
        if p.is_empty() {
            return true;
        }
        let mut candidate = rel;
        loop {
            if fileop::glob_match(&p, candidate) {
                return true;
            }
            match candidate.rsplit_once('/') {
                Some((parent, _)) => candidate = parent,
                None => return false,
            }
        }
    })
}

#[test]
fn compiled_selector_names_the_paths_and_ancestors_its_patterns_name() {
    let patterns = [
        "src",
        "src/",
        "./src/Module1",
        "/bin",
        "*.php",
        "src/*/Class?.php",
        "tests/[a-m]*",
        "assets/\\*x",
        "vendor/lib",
        "package*.json",
        "src/Module1/Class1.php",
    ];
    let paths = [
        "src",
        "src/Controller.php",
        "src/Module1",
        "src/Module1/Class1.php",
        "src/Module12/Class1.php",
        "src/Module1/deep/Class2.php",
        "srcx/a.php",
        "bin",
        "bin/start",
        "index.php",
        "lib/index.php",
        "tests/run.sh",
        "tests/zz.sh",
        "assets/*x",
        "assets/ax",
        "vendor",
        "vendor/lib/a.js",
        "vendor/libx",
        "package.json",
        "package-lock.json",
        "",
    ];
    // One pattern at a time, and all of them at once.
    let mut sets: Vec<Vec<String>> = patterns.iter().map(|p| vec![p.to_string()]).collect();
    sets.push(patterns.iter().map(|p| p.to_string()).collect());
    sets.push(Vec::new());
    for set in &sets {
        let compiled = fileop::PathSelector::new(set);
        for rel in paths {
            assert_eq!(
                compiled.selects(rel),
                selects_by_ancestors(set, rel),
                "patterns {set:?} on {rel:?}"
            );
            assert_eq!(fileop::selects(set, rel), compiled.selects(rel));
        }
    }
    let dot = fileop::PathSelector::new(&[".".to_string()]);
    assert!(dot.selects("anything/at/all") && !dot.is_empty());
    assert!(fileop::PathSelector::new(&[]).is_empty());
    assert!(fileop::PathSelector::new(&["src".into()]).selects("src/Module1/Class1.php"));
    assert!(!fileop::PathSelector::new(&["src".into()]).selects("srcx/a.php"));
}

fn nix_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn add_unpacks_local_tar_archives_and_refuses_one_with_entries_that_climb_out() {
    use std::io::Write;
    let ctx = context();
    // rootfs.tar.gz: two files, and an entry named `../escape.txt` written past the tar
    // builder's own checks.
    let mut raw = tar::Builder::new(Vec::new());
    for (name, body) in [
        ("pkg/README", &b"readme"[..]),
        ("pkg/bin/tool", &b"#!/bin/sh\n"[..]),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o755);
        raw.append_data(&mut h, name, body).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    let evil = b"../escape.txt";
    h.as_gnu_mut().unwrap().name[..evil.len()].copy_from_slice(evil);
    h.set_size(4);
    h.set_mode(0o644);
    h.set_cksum();
    raw.append(&h, &b"evil"[..]).unwrap();
    let tar_bytes = raw.into_inner().unwrap();
    let gzip = kiln_oci::compression::CompressOptions::default();
    let gz = |data: &[u8]| {
        let mut gz = kiln_oci::compression::Compressor::new(
            Vec::new(),
            kiln_oci::compression::Compression::Gzip,
            &gzip,
        )
        .unwrap();
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    };
    // The same archive without the climbing entry (its last 512-byte header and data
    // block, before the two end blocks).
    let clean_len = tar_bytes.len() - 1024 - 1024;
    let mut clean = tar_bytes[..clean_len].to_vec();
    clean.extend_from_slice(&[0u8; 1024]);
    fs::write(ctx.path().join("rootfs.tar.gz"), gz(&clean)).unwrap();
    fs::write(ctx.path().join("evil.tar.gz"), gz(&tar_bytes)).unwrap();
    assert!(fileop::is_tar_archive(&ctx.path().join("rootfs.tar.gz")));
    assert!(!fileop::is_tar_archive(&ctx.path().join("composer.json")));

    let dest = tempfile::tempdir().unwrap();
    let add = CopyOptions {
        extract_archives: true,
        ..opts()
    };
    fileop::copy(
        ctx.path(),
        &["rootfs.tar.gz".into(), "composer.json".into()],
        dest.path(),
        "/opt/",
        &add,
    )
    .unwrap();
    assert_eq!(
        fs::read_to_string(dest.path().join("opt/pkg/README")).unwrap(),
        "readme"
    );
    assert!(dest.path().join("opt/pkg/bin/tool").is_file());
    // Not an archive: copied as a file.
    assert!(dest.path().join("opt/composer.json").is_file());
    assert!(
        !dest.path().join("escape.txt").exists(),
        "an entry climbed out of the destination"
    );
    assert!(!dest.path().join("opt/rootfs.tar.gz").exists());

    // An archive with an entry climbing out fails the step, naming the archive and the entry
    // (BuildKit refuses it too); nothing lands outside.
    let err = fileop::copy(
        ctx.path(),
        &["evil.tar.gz".into()],
        dest.path(),
        "/evil/",
        &add,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, FileOpError::Archive { .. })
            && msg.contains("evil.tar.gz")
            && msg.contains("../escape.txt"),
        "{msg}"
    );
    assert!(
        !dest.path().join("escape.txt").exists(),
        "an entry climbed out of the destination"
    );
}

fn mknod(p: &Path, kind: u32, rdev: u64) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    let r = unsafe { libc::mknod(c.as_ptr(), kind | 0o640, rdev as libc::dev_t) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// A context with a FIFO and a character device (the kernel's null device, 1:3).
fn context_with_nodes() -> tempfile::TempDir {
    let ctx = context();
    fs::create_dir_all(ctx.path().join("nodes")).unwrap();
    mknod(&ctx.path().join("nodes/pipe"), libc::S_IFIFO, 0);
    mknod(
        &ctx.path().join("nodes/null"),
        libc::S_IFCHR,
        libc::makedev(1, 3),
    );
    ctx
}

fn assert_nodes(dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let pipe = fs::symlink_metadata(dir.join("pipe")).unwrap();
    assert!(pipe.file_type().is_fifo(), "pipe is {:?}", pipe.file_type());
    let null = fs::symlink_metadata(dir.join("null")).unwrap();
    assert!(
        null.file_type().is_char_device(),
        "null is {:?}",
        null.file_type()
    );
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert_eq!(null.permissions().mode() & 0o7777, 0o640);
}

#[test]
fn copy_recreates_fifos_and_device_nodes_as_buildkit_does() {
    assert!(nix_root(), "needs root (mknod of a device)");
    let ctx = context_with_nodes();
    let dest = tempfile::tempdir().unwrap();
    fileop::copy(ctx.path(), &[".".into()], dest.path(), "/copy/", &opts()).unwrap();
    assert_nodes(&dest.path().join("copy/nodes"));
    // Named directly, too.
    fileop::copy(
        ctx.path(),
        &["nodes/pipe".into()],
        dest.path(),
        "/one/",
        &opts(),
    )
    .unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(dest.path().join("one/pipe"))
        .unwrap()
        .file_type()
        .is_fifo());
}

#[test]
fn add_unpacks_fifos_and_device_nodes_from_an_archive_as_nodes_not_empty_files() {
    assert!(nix_root(), "needs root (mknod of a device)");
    let ctx = context_with_nodes();
    fs::write(ctx.path().join("nodes/.wh.not-a-whiteout"), "plain file").unwrap();
    let tar = ctx.path().join("nodes.tar");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(ctx.path().join("nodes"))
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let dest = tempfile::tempdir().unwrap();
    let add = CopyOptions {
        extract_archives: true,
        ..opts()
    };
    fileop::copy(
        ctx.path(),
        &["nodes.tar".into()],
        dest.path(),
        "/add/",
        &add,
    )
    .unwrap();
    assert_nodes(&dest.path().join("add"));
    // Only layers have whiteouts: in an archive `.wh.` names are files.
    assert_eq!(
        fs::read_to_string(dest.path().join("add/.wh.not-a-whiteout")).unwrap(),
        "plain file"
    );
}

#[test]
fn a_wildcard_matching_an_absolute_symlink_to_a_host_path_copies_the_link() {
    let ctx = context();
    symlink("/etc/kiln-host-only/secret", ctx.path().join("abs")).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let all = CopyOptions {
        dest_is_dir: true,
        ..opts()
    };
    fileop::copy(ctx.path(), &["*".into()], dest.path(), "/all/", &all).unwrap();
    assert_eq!(
        fs::read_link(dest.path().join("all/abs")).unwrap(),
        Path::new("/etc/kiln-host-only/secret")
    );
    assert_eq!(
        fs::read_to_string(dest.path().join("all/composer.lock")).unwrap(),
        "lock"
    );
    // `COPY .` gives the same link.
    fileop::copy(ctx.path(), &[".".into()], dest.path(), "/dot/", &all).unwrap();
    assert_eq!(
        fs::read_link(dest.path().join("dot/abs")).unwrap(),
        fs::read_link(dest.path().join("all/abs")).unwrap()
    );
}

#[test]
fn a_source_symlinked_to_a_context_dir_copies_what_the_dir_holds() {
    let ctx = context();
    symlink("/src/lib", ctx.path().join("lib-link")).unwrap();
    let idx = kiln_worker::context::ContextIndex::scan(
        ctx.path(),
        &|_: &str, _: bool| false,
        &|_: &str| false,
        None,
    )
    .unwrap();
    let dest = tempfile::tempdir().unwrap();
    fileop::copy_filtered(
        ctx.path(),
        &["lib-link".into()],
        dest.path(),
        "/via/",
        &opts(),
        &|rel: &str| idx.get(rel).is_some(),
    )
    .unwrap();
    assert_eq!(
        list(&dest.path().join("via")),
        ["util.php", "util_test.php"]
    );
}

/// A stage's tree as `COPY --from` sees it: nested dirs, modes (set-id bits included),
/// owners, mtimes to the nanosecond, an empty file, one larger than a copy chunk, links.
fn stage_tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    fs::create_dir_all(p.join("deps/a/b/c")).unwrap();
    fs::write(p.join("deps/a/b/c/deep.js"), "module.exports = 1;\n").unwrap();
    fs::write(p.join("deps/empty"), "").unwrap();
    let big: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 251) as u8).collect();
    fs::write(p.join("deps/big.bin"), &big).unwrap();
    fs::write(p.join("deps/tool"), "#!/bin/sh\n").unwrap();
    symlink("a/b/c/deep.js", p.join("deps/link")).unwrap();
    if nix_root() {
        std::os::unix::fs::lchown(p.join("deps/tool"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(p.join("deps/a/b"), Some(42), Some(43)).unwrap();
        std::os::unix::fs::lchown(p.join("deps/link"), Some(7), Some(8)).unwrap();
    }
    // After the owners: a change of owner clears set-id bits.
    fs::set_permissions(p.join("deps/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(p.join("deps/empty"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(p.join("deps/a/b"), fs::Permissions::from_mode(0o2750)).unwrap();
    let t = filetime::FileTime::from_unix_time(1_600_000_000, 123_456_789);
    for f in [
        "deps/a/b/c/deep.js",
        "deps/empty",
        "deps/big.bin",
        "deps/tool",
    ] {
        filetime::set_file_mtime(p.join(f), t).unwrap();
    }
    filetime::set_symlink_file_times(p.join("deps/link"), t, t).unwrap();
    for dir in ["deps/a/b/c", "deps/a/b", "deps/a", "deps"] {
        filetime::set_file_mtime(p.join(dir), t).unwrap();
    }
    d
}

#[test]
fn copy_from_a_stage_keeps_owner_mode_mtime_and_replaces_what_the_destination_had() {
    let stage = stage_tree();
    let dest = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let d = dest.path();
    // What the destination image already has where the copy lands: a symlink to a host file
    // where a file goes (must be replaced, never written through), a directory where a file
    // goes, a file where a directory goes.
    fs::create_dir_all(d.join("app/a")).unwrap();
    fs::write(outside.path().join("victim"), "host file").unwrap();
    symlink(outside.path().join("victim"), d.join("app/tool")).unwrap();
    fs::create_dir_all(d.join("app/empty/sub")).unwrap();
    fs::remove_dir_all(d.join("app/a")).unwrap();
    fs::write(d.join("app/a"), "a file in the way").unwrap();
    let o = CopyOptions {
        dest_is_dir: true,
        owner: Owner::Preserve,
        source_name: "stage deps".into(),
        ..opts()
    };
    let stats = fileop::copy(stage.path(), &["deps".into()], d, "/app/", &o).unwrap();
    assert_eq!((stats.files, stats.symlinks), (4, 1));
    assert_eq!(stats.bytes, (5 << 20) + 20 + 10);

    assert_eq!(
        fs::read_to_string(outside.path().join("victim")).unwrap(),
        "host file"
    );
    for rel in [
        "a/b/c/deep.js",
        "empty",
        "big.bin",
        "tool",
        "a/b/c",
        "a/b",
        "a",
        "link",
    ] {
        let (src, dst) = (stage.path().join("deps").join(rel), d.join("app").join(rel));
        let (s, t) = (
            fs::symlink_metadata(&src).unwrap(),
            fs::symlink_metadata(&dst).unwrap(),
        );
        assert_eq!(s.file_type(), t.file_type(), "{rel}: type");
        assert_eq!(s.mode(), t.mode(), "{rel}: mode (set-id bits included)");
        if rel == "tool" {
            assert_eq!(t.mode() & 0o7777, 0o4755);
        }
        assert_eq!(
            (s.mtime(), s.mtime_nsec()),
            (t.mtime(), t.mtime_nsec()),
            "{rel}: mtime"
        );
        if nix_root() {
            assert_eq!((s.uid(), s.gid()), (t.uid(), t.gid()), "{rel}: owner");
        }
        if s.is_file() {
            assert!(
                fs::read(&src).unwrap() == fs::read(&dst).unwrap(),
                "{rel}: content"
            );
            assert_eq!(
                t.nlink(),
                1,
                "{rel}: a copy, not a link to the stage's file"
            );
        }
    }
    assert_eq!(
        fs::read_link(d.join("app/link")).unwrap(),
        Path::new("a/b/c/deep.js")
    );

    // The same copy again over its own result changes nothing (the layer stays the same).
    let before: Vec<_> = list(d)
        .into_iter()
        .map(|rel| {
            let m = fs::symlink_metadata(d.join(&rel)).unwrap();
            (rel, m.mode(), m.mtime(), m.mtime_nsec(), m.size())
        })
        .collect();
    fileop::copy(stage.path(), &["deps".into()], d, "/app/", &o).unwrap();
    let after: Vec<_> = list(d)
        .into_iter()
        .map(|rel| {
            let m = fs::symlink_metadata(d.join(&rel)).unwrap();
            (rel, m.mode(), m.mtime(), m.mtime_nsec(), m.size())
        })
        .collect();
    assert_eq!(before, after);
}
