//! The Dockerfile dialect end to end: `RUN --mount` targets, where variables expand, how
//! COPY splits its arguments, and the bound on variable expansion, checked on what a real
//! `kiln build` (root: containers and overlayfs) or `--dry-run` / `--call check` does.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{require_root, Fixture};

/// Address space given to `kiln` in the expansion tests: far above what a bounded
/// expansion needs, far below the gigabytes an unbounded one asks for, so a regression fails
/// here instead of exhausting the machine's memory.
const KILN_ADDRESS_SPACE: u64 = 2 << 30;

/// `kiln --root ROOT ARGS` in `dir`, its address space capped at [`KILN_ADDRESS_SPACE`].
fn kiln_capped(root: &Path, dir: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--root").arg(root).args(args).current_dir(dir);
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: KILN_ADDRESS_SPACE,
                rlim_max: KILN_ADDRESS_SPACE,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().expect("kiln runs")
}

/// A Dockerfile whose ARGs double a value on each of 30 lines (10 GiB at the end).
fn doubling_args_dockerfile() -> String {
    let mut s = String::from("FROM scratch\nARG V0=0123456789\n");
    for i in 1..=30 {
        s.push_str(&format!("ARG V{i}=${{V{}}}${{V{}}}\n", i - 1, i - 1));
    }
    s.push_str("LABEL big=$V30\n");
    s
}

#[test]
fn doubling_args_fail_with_the_line_for_dry_run_check_and_build() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctx");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), doubling_args_dockerfile()).unwrap();
    let root = tmp.path().join("state");
    // V17 (line 19) is the first value past the per-word limit.
    for args in [
        &["build", ".", "--dry-run"][..],
        &["build", ".", "--call", "check"][..],
        &["build", ".", "--output", "type=local,dest=out"][..],
    ] {
        let out = kiln_capped(&root, &dir, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "kiln {args:?} must fail with a Dockerfile error, not crash:\n{stderr}"
        );
        assert!(
            stderr.contains("Dockerfile:19:") && stderr.contains("grows past"),
            "kiln {args:?} must name line 19 (ARG V17) and say why:\n{stderr}"
        );
        assert!(
            stderr.contains("ARG V17=${V16}${V16}"),
            "the offending line is shown:\n{stderr}"
        );
    }
}

#[test]
fn variables_in_copy_from_and_mount_from_are_refused_with_the_workaround() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state");
    for (name, text, line, needle) in [
        (
            "copy",
            "FROM scratch AS tools\nFROM scratch\nARG S=tools\nCOPY --from=$S /a /a\n",
            "Dockerfile:4:",
            "variable expansion is not supported for --from",
        ),
        (
            "mount",
            "FROM scratch AS tools\nFROM scratch\nARG S=tools\nRUN --mount=from=${S},target=/t ls\n",
            "Dockerfile:4:",
            "'from' doesn't support variable expansion",
        ),
    ] {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("Dockerfile"), text).unwrap();
        let out = kiln_capped(&root, &dir, &["build", ".", "--dry-run"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}:\n{stderr}");
        assert!(
            stderr.contains(line) && stderr.contains(needle) && stderr.contains("global"),
            "{name}: BuildKit's message, the line and the global-ARG workaround:\n{stderr}"
        );
    }
}

#[test]
fn run_mounts_without_a_target_see_their_files_at_the_workdir() {
    require_root("run_mounts_without_a_target_see_their_files_at_the_workdir");
    let f = Fixture::new();
    let dir = f.path("mounts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ctx.txt"), "from the context\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox:latest AS binaries\n\
         RUN mkdir -p /out && echo built > /out/b.txt\n\
         FROM busybox:latest\n\
         WORKDIR /w\n\
         RUN --mount=type=bind cat /w/ctx.txt > /r-bind\n\
         RUN --mount=from=binaries cat /w/out/b.txt > /r-from\n\
         RUN --mount=ro cat ctx.txt > /r-ro\n\
         RUN --mount=type=bind,target=sub cat /w/sub/ctx.txt > /r-relative\n\
         RUN --mount=type=cache,id=e1 sh -c 'echo cached > /w/c && cat /w/c' > /r-cache\n\
         RUN --mount=type=tmpfs sh -c 'grep \" /w tmpfs \" /proc/mounts | wc -l' > /r-tmpfs\n\
         RUN --mount=from=,target=/ctx cat /ctx/ctx.txt > /r-empty-from\n\
         RUN\n\
         RUN ls -A /w > /r-left\n",
    )
    .unwrap();
    let out = f.path("mounts-out");
    let o = format!("type=local,dest={}", out.display());
    f.build_dir(&dir, &["--output", &o]);
    let read =
        |n: &str| std::fs::read_to_string(out.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
    assert_eq!(read("r-bind"), "from the context\n");
    assert_eq!(read("r-from"), "built\n");
    assert_eq!(read("r-ro"), "from the context\n");
    assert_eq!(read("r-relative"), "from the context\n");
    assert_eq!(read("r-cache"), "cached\n");
    assert_eq!(read("r-tmpfs").trim(), "1");
    assert_eq!(read("r-empty-from"), "from the context\n");
    // The mounts covered the WORKDIR only while their step ran: nothing they showed there
    // is left in the image.
    let left = read("r-left");
    for name in ["ctx.txt", "Dockerfile", "out", "c"] {
        assert!(
            !left.lines().any(|l| l == name),
            "{name} leaked into /w: {left:?}"
        );
    }
}

#[test]
fn copy_arguments_that_expand_to_nothing_stay_in_place() {
    require_root("copy_arguments_that_expand_to_nothing_stay_in_place");
    let f = Fixture::new();
    let dir = f.path("split");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), "a\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox:latest\n\
         ARG EMPTY\n\
         WORKDIR /w\n\
         COPY a.txt $EMPTY\n\
         COPY $EMPTY /all/\n",
    )
    .unwrap();
    let out = f.path("split-out");
    let o = format!("type=local,dest={}", out.display());
    f.build_dir(&dir, &["--output", &o]);
    // An empty destination is the WORKDIR; an empty source is the whole context.
    assert_eq!(std::fs::read_to_string(out.join("w/a.txt")).unwrap(), "a\n");
    assert_eq!(
        std::fs::read_to_string(out.join("all/a.txt")).unwrap(),
        "a\n"
    );
    assert!(out.join("all/Dockerfile").is_file());
}
