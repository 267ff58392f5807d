//! `kiln build` subrequests, dry runs and errors, driven through the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_ROOT", std::env::temp_dir().join("kiln-cli-test-root"))
        .output()
        .expect("run kiln")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "kiln failed: {}", stderr(o));
    serde_json::from_str(&stdout(o)).expect("stdout is JSON")
}

fn ex() -> String {
    examples().display().to_string()
}

#[test]
fn call_targets_json_lists_example_stages_and_default() {
    let v = json(&kiln(&["build", &ex(), "--call", "targets,format=json"]));
    // The frontend's result.json: `targets` and `sources`, no separate default key.
    assert!(v.get("target").is_none(), "{v}");
    let names: Vec<&str> = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "composer-deps",
            "npm-deps",
            "php-ext",
            "app",
            "release",
            "dev",
            "test"
        ]
    );
    let release = &v["targets"][4];
    assert_eq!(release["description"], "is the slim production image.");
    // buildx's JSON omits false and empty fields.
    assert!(release.get("default").is_none(), "{release}");
    assert_eq!(v["targets"][6]["default"], true);
    assert_eq!(
        release["location"],
        serde_json::json!({"ranges": [{"start": {"line": 78}, "end": {"line": 78}}]})
    );
}

#[test]
fn call_targets_text_is_a_table_marking_the_default() {
    let o = kiln(&["build", &ex(), "--call", "targets"]);
    assert!(o.status.success());
    let text = stdout(&o);
    let first: Vec<&str> = text.lines().take(2).collect();
    assert_eq!(first[0], "TARGET         DESCRIPTION");
    assert!(
        text.contains("test (default) runs the application's test suite."),
        "{text}"
    );
}

fn dry_run_stages(target: &str) -> serde_json::Value {
    json(&kiln(&[
        "build",
        &ex(),
        "--target",
        target,
        "--dry-run=json",
    ]))
}

fn stage_names(v: &serde_json::Value) -> Vec<String> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn dry_run_json_for_release_needs_exactly_its_stages() {
    let v = dry_run_stages("release");
    assert_eq!(v["target"], "release");
    assert_eq!(
        stage_names(&v),
        ["composer-deps", "npm-deps", "php-ext", "app", "release"]
    );
    let steps = v["steps"].as_array().unwrap();
    assert!(steps
        .iter()
        .all(|s| s["stage"] != "test" && s["stage"] != "dev"));
}

#[test]
fn dry_run_json_for_test_shows_dependency_stages_independent() {
    let v = dry_run_stages("test");
    assert_eq!(
        stage_names(&v),
        ["composer-deps", "npm-deps", "php-ext", "app", "dev", "test"]
    );
    let stages = v["stages"].as_array().unwrap();
    for s in &stages[..3] {
        assert_eq!(s["depends_on"], serde_json::json!([]), "{s}");
    }
    assert_eq!(
        stages[3]["depends_on"],
        serde_json::json!(["composer-deps", "npm-deps", "php-ext"])
    );
    // No step of one dependency stage waits on a step of another.
    let steps = v["steps"].as_array().unwrap();
    let stage_of = |id: u64| steps[id as usize]["stage"].as_str().map(String::from);
    for s in steps {
        let Some(me) = s["stage"].as_str() else {
            continue;
        };
        if !["composer-deps", "npm-deps", "php-ext"].contains(&me) {
            continue;
        }
        for w in s["waits_on"].as_array().unwrap() {
            let other = stage_of(w.as_u64().unwrap());
            assert!(
                other.is_none() || other.as_deref() == Some(me),
                "{me} waits on {other:?}"
            );
        }
    }
}

#[test]
fn dry_run_text_prints_steps_with_their_waits() {
    let o = kiln(&["build", &ex(), "--target", "php-ext", "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    // Snapshot with the volatile host platform removed.
    let expected = "target: php-ext
stages:
  php-ext
steps:
  #0 [php-ext 1/4] FROM docker.io/library/busybox:latest
  #1 [php-ext 2/4] WORKDIR /build  (waits on #0)
  #2 [internal] load build context
  #3 [php-ext 3/4] COPY ext/ ./ext/  (waits on #1 #2)
";
    assert!(text.starts_with(expected), "got:\n{text}");
    assert!(text.contains("#4 [php-ext 4/4] RUN mkdir -p modules"));
}

#[test]
fn buildctl_spelling_gives_the_same_plan_as_buildx_spelling() {
    let a = json(&kiln(&[
        "build",
        &ex(),
        "--target",
        "release",
        "--dry-run=json",
    ]));
    let b = json(&kiln(&[
        "build",
        "--frontend",
        "dockerfile.v0",
        "--local",
        &format!("context={}", ex()),
        "--local",
        &format!("dockerfile={}", ex()),
        "--opt",
        "target=release",
        "--dry-run=json",
    ]));
    assert_eq!(a, b);
}

#[test]
fn call_outline_json_lists_args_and_secrets_of_target() {
    let v = json(&kiln(&[
        "build",
        &ex(),
        "--target",
        "release",
        "--call",
        "outline,format=json",
        "--build-arg",
        "APP_VERSION=2.0",
    ]));
    let args: Vec<&str> = v["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        ["BASE_IMAGE", "APP_VERSION", "NODE_ENV", "PHP_VERSION"]
    );
    assert_eq!(v["args"][1]["value"], "2.0");
    assert_eq!(
        v["args"][1]["description"],
        "is the version string baked into the application."
    );
    assert_eq!(
        v["args"][1]["location"],
        serde_json::json!({"ranges": [{"start": {"line": 8}, "end": {"line": 8}}]})
    );
    assert_eq!(v["name"], "release");
    assert_eq!(v["secrets"][0]["name"], "composer_auth");
    assert!(v["secrets"][0].get("required").is_none());
    assert_eq!(v["sources"].as_array().map(Vec::len), Some(1));
}

#[test]
fn check_on_example_is_clean_and_json_has_no_warnings() {
    let o = kiln(&["build", &ex(), "--check"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(stdout(&o).trim(), "Check complete, no warnings found.");
    let v = json(&kiln(&["build", &ex(), "--call", "check,format=json"]));
    assert_eq!(v["warnings"], serde_json::json!([]));
}

/// A throwaway context directory, removed on drop.
struct TempProject(PathBuf);

impl TempProject {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempProject {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_project(dockerfile: &str) -> TempProject {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kiln-cli-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    TempProject(dir)
}

#[test]
fn check_reports_warnings_and_error_directive_fails_the_command() {
    let d = temp_project("# check=error=true\nfrom busybox AS Base\nCMD echo hi\n");
    let o = kiln(&["build", d.path().to_str().unwrap(), "--call", "check"]);
    assert_eq!(o.status.code(), Some(1));
    let text = stdout(&o).replace(&d.path().display().to_string(), "[CTX]");
    assert!(text.contains("WARNING: StageNameCasing - https://docs.docker.com/go/dockerfile/rule/stage-name-casing/\nStage name 'Base' should be lowercase\n[CTX]/Dockerfile:2\n"), "{text}");
    assert!(text.contains("WARNING: JSONArgsRecommended"));
    assert!(text.contains("WARNING: FromAsCasing"));
    assert!(text.contains("WARNING: ConsistentInstructionCasing"));
    assert!(
        text.ends_with("Check complete, 4 warnings have been found!\n"),
        "{text}"
    );
    let v = json(
        &kiln(&[
            "build",
            d.path().to_str().unwrap(),
            "--call",
            "check,format=json",
            "--target",
            "base",
        ])
        .with_success_ignored(),
    );
    assert_eq!(v["warnings"].as_array().unwrap().len(), 4);
    assert_eq!(
        v["warnings"][0]["location"]["ranges"][0]["start"]["line"],
        2
    );
}

trait IgnoreStatus {
    fn with_success_ignored(self) -> Output;
}

impl IgnoreStatus for Output {
    fn with_success_ignored(mut self) -> Output {
        // `--call check` exits 1 with error=true; the JSON is still complete.
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            self.status = std::process::ExitStatus::from_raw(0);
        }
        self
    }
}

#[test]
fn malformed_dockerfile_prints_file_line_col_and_caret_with_exit_1() {
    let d = temp_project("FROM busybox\nRUN true\nCOPY onlyone\n");
    let o = kiln(&["build", d.path().to_str().unwrap(), "--dry-run"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o).replace(&d.path().display().to_string(), "[CTX]");
    assert_eq!(
        err,
        "[CTX]/Dockerfile:3:1: COPY requires at least two arguments, but only one was provided. Destination could not be determined\nCOPY onlyone\n^\n"
    );
}

#[test]
fn missing_target_and_cycles_are_errors() {
    let o = kiln(&["build", &ex(), "--target", "nope", "--dry-run"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("target stage \"nope\" could not be found"),
        "{}",
        stderr(&o)
    );
    let d = temp_project(
        "FROM busybox AS a\nCOPY --from=b /x /x\nFROM busybox AS b\nCOPY --from=a /y /y\n",
    );
    let o = kiln(&["build", d.path().to_str().unwrap(), "--dry-run"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("circular dependency detected on stage"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_flag_values_name_the_flag_and_value() {
    for (args, needle) in [
        (
            vec!["--output", "type=nope"],
            "invalid value \"type=nope\" for --output",
        ),
        (
            vec!["--progress", "fancy"],
            "invalid value \"fancy\" for --progress",
        ),
        (
            vec!["--call", "explode"],
            "invalid value \"explode\" for --call",
        ),
        (
            vec!["--cache-to", "type=gha"],
            "invalid value \"type=gha\" for --cache-to",
        ),
        (
            vec!["--opt", "bogus=1"],
            "invalid value \"bogus=1\" for --opt",
        ),
        (vec!["--platform", "linux/amd64/v2/x"], "for --platform"),
        (
            vec!["--max-parallelism", "0"],
            "invalid value \"0\" for --max-parallelism",
        ),
        (
            vec!["--dry-run=yaml"],
            "invalid value \"yaml\" for --dry-run",
        ),
    ] {
        let mut a = vec!["build", "/nonexistent-context"];
        a.extend(args);
        let o = kiln(&a);
        assert_eq!(o.status.code(), Some(1), "{a:?}");
        assert!(stderr(&o).contains(needle), "{a:?}: {}", stderr(&o));
    }
}

#[test]
fn build_help_shows_both_spellings() {
    let o = kiln(&["build", "--help"]);
    let text = stdout(&o);
    for flag in [
        "--local",
        "--opt",
        "--export-cache",
        "--import-cache",
        "--build-context",
        "--no-cache-filter",
        "--dry-run",
        "--call",
    ] {
        assert!(text.contains(flag), "missing {flag}");
    }
}

#[test]
fn call_outline_text_snapshot() {
    let o = kiln(&["build", &ex(), "--target", "release", "--call", "outline"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Go tabwriter layout as buildx prints it, trailing spaces of empty cells included.
    let expected = "TARGET:      release
DESCRIPTION: is the slim production image.

BUILD ARG     VALUE            DESCRIPTION
BASE_IMAGE    busybox:latest   is the image every stage starts from.
APP_VERSION   1.0.0            is the version string baked into the application.
NODE_ENV      production       \nPHP_VERSION   8.3              \n
SECRET          REQUIRED
composer_auth   \n
";
    assert_eq!(stdout(&o), expected);
}

#[test]
fn build_context_replacing_a_stage_skips_its_steps_in_the_plan() {
    let v = json(&kiln(&[
        "build",
        &ex(),
        "--target",
        "app",
        "--build-context",
        "composer-deps=docker-image://busybox:1.36",
        "--dry-run=json",
    ]));
    let steps = v["steps"].as_array().unwrap();
    let composer: Vec<&str> = steps
        .iter()
        .filter(|s| s["stage"] == "composer-deps")
        .map(|s| s["description"].as_str().unwrap())
        .collect();
    assert_eq!(
        composer,
        ["[composer-deps] load build context composer-deps"]
    );
    assert_eq!(
        v["stages"][3]["depends_on"],
        serde_json::json!(["composer-deps", "npm-deps", "php-ext"])
    );
}

#[test]
fn buildctl_filename_opt_and_build_args_reach_the_frontend() {
    let d = temp_project("FROM busybox\n");
    std::fs::write(
        d.path().join("Custom.dockerfile"),
        "ARG V=default\nFROM busybox:${V}\n",
    )
    .unwrap();
    let ctx = d.path().display().to_string();
    let v = json(&kiln(&[
        "build",
        "--frontend",
        "dockerfile.v0",
        "--local",
        &format!("context={ctx}"),
        "--local",
        &format!("dockerfile={ctx}"),
        "--opt",
        "filename=Custom.dockerfile",
        "--opt",
        "build-arg:V=1.36",
        "--dry-run=json",
    ]));
    assert_eq!(
        v["steps"][0]["description"],
        "[stage-0 1/1] FROM docker.io/library/busybox:1.36"
    );
}

#[test]
fn max_parallelism_comes_from_the_environment_and_is_checked_there_too() {
    let run = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["build", &ex(), "--dry-run"])
            .env("KILN_ROOT", std::env::temp_dir().join("kiln-cli-test-root"))
            .env("KILN_MAX_PARALLELISM", value)
            .output()
            .expect("run kiln")
    };
    let bad = run("zero");
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        stderr(&bad).contains("invalid value \"zero\" for --max-parallelism"),
        "{}",
        stderr(&bad)
    );
    let good = run("2");
    assert!(good.status.success(), "{}", stderr(&good));
}

#[test]
fn bad_cache_export_attributes_fail_before_any_step_runs() {
    for (attr, named) in [
        ("max-age=soon", "--export-cache max-age=soon"),
        ("max-records=many", "--export-cache max-records=many"),
        ("connections=0", "--export-cache connections"),
    ] {
        let spec = format!("type=registry,ref=127.0.0.1:9/app:cache,{attr}");
        let o = kiln(&[
            "build",
            &ex(),
            "--progress",
            "plain",
            "--export-cache",
            &spec,
        ]);
        assert_eq!(o.status.code(), Some(1), "{attr}: {}", stderr(&o));
        assert!(stderr(&o).contains(named), "{attr}: {}", stderr(&o));
        assert!(
            !stderr(&o).contains("RUN"),
            "{attr}: steps ran before the check: {}",
            stderr(&o)
        );
    }
}

#[test]
fn call_targets_lists_unnamed_stages_with_their_lines() {
    let d = temp_project(
        "FROM busybox AS base\n\n# build compiles it\n# (more words)\nFROM base \\\n  AS build\nFROM --platform=linux/arm64 build\n",
    );
    let dir = d.path().to_str().unwrap();
    let o = kiln(&["build", dir, "--call", "targets"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "TARGET    DESCRIPTION\nbase      \nbuild     compiles it\n(default) \n"
    );
    let v = json(&kiln(&["build", dir, "--call", "targets,format=json"]));
    let t = v["targets"].as_array().unwrap();
    assert_eq!(t.len(), 3, "{v}");
    assert!(t[2].get("name").is_none());
    assert_eq!(t[2]["default"], true);
    assert_eq!(t[2]["base"], "build");
    assert_eq!(t[2]["platform"], "linux/arm64");
    // The continued FROM spans lines 5 and 6.
    assert_eq!(
        t[1]["location"],
        serde_json::json!({"ranges": [{"start": {"line": 5}, "end": {"line": 6}}]})
    );
    assert_eq!(
        v["sources"][0],
        "RlJPTSBidXN5Ym94IEFTIGJhc2UKCiMgYnVpbGQgY29tcGlsZXMgaXQKIyAobW9yZSB3b3JkcykKRlJPTSBiYXNlIFwKICBBUyBidWlsZApGUk9NIC0tcGxhdGZvcm09bGludXgvYXJtNjQgYnVpbGQK"
    );
}

#[test]
fn call_outline_of_an_unnamed_target_has_no_target_line() {
    let d = temp_project(
        "FROM busybox AS build\n# V picks the version\nARG V=1\nRUN --mount=type=secret,id=tok,required=true --mount=type=secret,id=aaa --mount=type=ssh true\nFROM build\n",
    );
    let o = kiln(&["build", d.path().to_str().unwrap(), "--call", "outline"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "BUILD ARG   VALUE   DESCRIPTION\nV           1       picks the version\n\n\
         SECRET   REQUIRED\ntok      true\naaa      \n\n\
         SSH       REQUIRED\ndefault   \n\n"
    );
}

#[test]
fn error_directive_stops_a_build_before_any_step_and_skip_is_honoured() {
    let d = temp_project("# check=error=true\nFROM busybox AS Build\nCMD echo hi\n");
    let dir = d.path().to_str().unwrap();
    for args in [vec!["build", dir], vec!["build", dir, "--dry-run"]] {
        let o = kiln(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains(" - StageNameCasing: Stage name 'Build' should be lowercase (line 2)"),
            "{err}"
        );
        assert!(
            err.contains("lint violation found for rules: JSONArgsRecommended, StageNameCasing"),
            "{err}"
        );
        assert!(
            stdout(&o).is_empty(),
            "{args:?} printed a plan: {}",
            stdout(&o)
        );
    }
    // Skipped rules neither warn nor fail the build.
    let d = temp_project(
        "# check=skip=StageNameCasing,JSONArgsRecommended;error=true\nFROM busybox AS Build\nCMD echo hi\n",
    );
    let o = kiln(&["build", d.path().to_str().unwrap(), "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("StageNameCasing"), "{}", stderr(&o));
    // The BUILDKIT_DOCKERFILE_CHECK build arg replaces the directive, as in BuildKit.
    let d = temp_project("# check=error=true\nFROM busybox AS Build\n");
    let o = kiln(&[
        "build",
        d.path().to_str().unwrap(),
        "--dry-run",
        "--build-arg",
        "BUILDKIT_DOCKERFILE_CHECK=skip=all",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A directive BuildKit refuses is an error naming the file.
    let d = temp_project("# check=error=maybe\nFROM busybox\n");
    let o = kiln(&["build", d.path().to_str().unwrap(), "--dry-run"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("Dockerfile: failed to parse check options"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn step_counters_skip_from_stage_and_from_scratch_as_buildkit_numbers_them() {
    // BuildKit v0.24 prints [a 1/1] COPY x /x, [b 1/2] COPY x /y, [b 2/2] WORKDIR /w for
    // this file: neither `FROM scratch` nor `FROM <stage>` is a step.
    let d = temp_project(
        "FROM scratch AS a\nCOPY x /x\nFROM a AS b\nCOPY x /y\nWORKDIR /w\nFROM busybox AS img\nRUN true\n",
    );
    std::fs::write(d.path().join("x"), "x").unwrap();
    let dir = d.path().to_str().unwrap();
    let steps = |target: &str| -> Vec<String> {
        let v = json(&kiln(&["build", dir, "--target", target, "--dry-run=json"]));
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["description"].as_str().unwrap().to_string())
            .filter(|s| !s.starts_with("[internal]"))
            .collect()
    };
    assert_eq!(
        steps("b"),
        [
            "[a 1/1] COPY x /x",
            "[b 1/2] COPY x /y",
            "[b 2/2] WORKDIR /w"
        ]
    );
    // An image base is step 1.
    assert_eq!(
        steps("img"),
        [
            "[img 1/2] FROM docker.io/library/busybox:latest",
            "[img 2/2] RUN true"
        ]
    );
}

#[test]
fn a_build_reports_lint_warnings_in_its_progress_format() {
    let d = temp_project("FROM busybox\nCMD echo hi\n");
    let dir = d.path().to_str().unwrap();
    let o = kiln(&["build", dir, "--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1 warning found in ")
            && stderr(&o).contains(" - JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended behavior related to OS signals (line 2)\n"),
        "{}",
        stderr(&o)
    );
    let o = kiln(&["build", dir, "--dry-run", "--progress", "rawjson"]);
    let events: Vec<serde_json::Value> = stderr(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "warning");
    assert_eq!(events[0]["rule"], "JSONArgsRecommended");
    assert_eq!(events[0]["line"], 2);
    let o = kiln(&["build", dir, "--dry-run", "--progress", "quiet"]);
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
}

/// Runs kiln with its stdout a pipe whose reading end is already closed (as `| head` leaves
/// it once head has read enough), and returns how it ended.
fn kiln_into_closed_pipe(args: &[&str]) -> Output {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    // The reading end is closed before kiln starts, so every write it makes fails with
    // EPIPE (closing it after the spawn let a quick kiln write into the pipe first).
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills both descriptors on success; each is owned exactly once below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (read_end, write_end) =
        // SAFETY: both descriptors are open and owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("kiln runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert_ne!(o.status.code(), Some(101), "{args:?}: {err}");
    assert!(
        o.status.signal() == Some(libc::SIGPIPE) || o.status.code() == Some(141),
        "{args:?} ends as a closed pipe ends other tools: {:?} {err}",
        o.status
    );
    o
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let e = ex();
    for args in [
        &["build", e.as_str(), "--dry-run=json"][..],
        &["build", e.as_str(), "--dry-run"],
        &["build", e.as_str(), "--call", "targets"],
        &["build", e.as_str(), "--call", "outline"],
        &["build", e.as_str(), "--call", "check"],
    ] {
        kiln_into_closed_pipe(args);
    }
}

/// Every command's output, not only `kiln build`'s, ends by SIGPIPE into a closed pipe
/// (`kiln du | head`), never by a panic (exit 101).
#[test]
fn other_commands_into_a_closed_pipe_end_quietly() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path().to_str().unwrap();
    for args in [
        &["--root", root, "du"][..],
        &["--root", root, "history", "ls"],
    ] {
        kiln_into_closed_pipe(args);
    }
}
