//! COPY sources that are wildcards or several paths, as public Dockerfiles use them
//! (`COPY package.json yarn.lock* package-lock.json* pnpm-lock.yaml* ./` in the Next.js
//! example copies whichever lock file exists; `COPY target/*.jar app.jar` in Spring Boot
//! ones), checked on a real `kiln build` of a `FROM scratch` stage against what BuildKit v0.24
//! does with the same files (its results are written in each test).
//! Needs root, as every `kiln build` here does (CI runs as root).

use std::path::Path;
use std::process::{Command, Output};

fn kiln_build(root: &Path, ctx: &Path, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root)
        .arg("build")
        .arg(ctx)
        .arg("--progress")
        .arg("plain")
        .arg("--output")
        .arg(format!("type=local,dest={}", out.display()))
        .output()
        .expect("kiln runs")
}

/// Builds `dockerfile` over a context holding `files` (name, content); returns the output dir.
fn build_scratch(tmp: &Path, files: &[(&str, &str)], dockerfile: &str) -> std::path::PathBuf {
    kiln_test_env::require_root("a kiln build");
    let ctx = tmp.join("ctx");
    std::fs::create_dir_all(&ctx).expect("mkdir");
    for (name, content) in files {
        std::fs::write(ctx.join(name), content).expect("write");
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("write");
    let out = tmp.join("out");
    let o = kiln_build(&tmp.join("root"), &ctx, &out);
    assert!(
        o.status.success(),
        "kiln build failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn several_sources_onto_a_path_without_slash_leave_the_last_file_there() {
    for dockerfile in [
        "FROM scratch\nCOPY *.jar /app.jar\n",
        "FROM scratch\nCOPY app-plain.jar app.jar /app.jar\n",
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = build_scratch(
            tmp.path(),
            &[("app-plain.jar", "plain"), ("app.jar", "boot")],
            dockerfile,
        );
        let dest = out.join("app.jar");
        assert!(dest.is_file(), "{dockerfile:?}: /app.jar is not a file");
        assert_eq!(
            std::fs::read_to_string(&dest).expect("read"),
            "boot",
            "{dockerfile:?}"
        );
    }
}

#[test]
fn copy_wildcard_matching_nothing_copies_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = build_scratch(
        tmp.path(),
        &[("package.json", "{}"), ("package-lock.json", "{}")],
        "FROM scratch\nCOPY package.json yarn.lock* package-lock.json* pnpm-lock.yaml* /app/\n",
    );
    let mut got: Vec<String> = std::fs::read_dir(out.join("app"))
        .expect("/app exists")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    assert_eq!(got, ["package-lock.json", "package.json"]);
}

/// Builds and returns the failed build's stderr (the build must fail).
fn build_scratch_fails(tmp: &Path, files: &[(&str, &str)], dockerfile: &str) -> String {
    let ctx = tmp.join("ctx");
    std::fs::create_dir_all(&ctx).expect("mkdir");
    for (name, content) in files {
        std::fs::write(ctx.join(name), content).expect("write");
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("write");
    let o = kiln_build(&tmp.join("root"), &ctx, &tmp.join("out"));
    assert!(!o.status.success(), "{dockerfile:?} built but must fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn copy_where_every_wildcard_matches_nothing_still_builds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = build_scratch(
        tmp.path(),
        &[("kept.txt", "x")],
        "FROM scratch\nCOPY yarn.lock* pnpm-lock.yaml* /app/\nCOPY kept.txt /\n",
    );
    assert!(out.join("kept.txt").is_file(), "the next step ran");
    assert!(!out.join("app/yarn.lock").exists());
}

#[test]
fn copy_of_a_missing_literal_or_a_wildcard_under_a_missing_folder_fails() {
    for (dockerfile, named) in [
        (
            "FROM scratch\nCOPY package.json missing.lock /app/\n",
            "missing.lock",
        ),
        ("FROM scratch\nCOPY nodir/*.lock /app/\n", "nodir/*.lock"),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let stderr = build_scratch_fails(tmp.path(), &[("package.json", "{}")], dockerfile);
        assert!(stderr.contains(named), "{dockerfile:?}: {stderr}");
    }
}

#[test]
fn copy_through_a_file_where_a_folder_is_needed_says_so_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let stderr = build_scratch_fails(
        tmp.path(),
        &[("a", "file"), ("b", "file")],
        "FROM scratch\nCOPY a /x\nCOPY b /x/y/\n",
    );
    assert!(
        stderr.contains("/x: exists and is not a directory"),
        "{stderr}"
    );
    // The progress line and the final error each say it, once per line.
    for line in stderr.lines() {
        assert!(
            line.matches("not a directory").count() <= 1,
            "repeated: {line}"
        );
    }
}

/// `COPY link/ /x/` with `link -> realdir` copies realdir's files, so editing one of them
/// must change the step's cache key: the rebuild reruns the copy and the output holds the
/// new content, never the first build's cached layer.
#[test]
fn a_copy_through_a_symlinked_folder_reruns_when_a_file_behind_the_link_changes() {
    for dockerfile in [
        "FROM scratch\nCOPY link/ /x/\n",
        "FROM scratch\nCOPY link /x\n",
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ctx = tmp.path().join("ctx");
        std::fs::create_dir_all(ctx.join("realdir")).expect("mkdir");
        std::fs::write(ctx.join("realdir/file"), "first").expect("write");
        std::os::unix::fs::symlink("realdir", ctx.join("link")).expect("symlink");
        let out = build_scratch(tmp.path(), &[], dockerfile);
        assert_eq!(
            std::fs::read_to_string(out.join("x/file")).unwrap(),
            "first"
        );

        std::fs::write(ctx.join("realdir/file"), "second").expect("write");
        let out2 = tmp.path().join("out2");
        let o = kiln_build(&tmp.path().join("root"), &ctx, &out2);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "rebuild failed:\n{err}");
        assert_eq!(
            std::fs::read_to_string(out2.join("x/file")).unwrap(),
            "second",
            "{dockerfile:?}: the rebuild reused the stale copy:\n{err}"
        );
    }
}
