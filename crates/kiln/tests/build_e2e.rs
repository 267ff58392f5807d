//! `kiln build` end to end on one machine (root: real containers and overlayfs), on the
//! PHP + JS shaped example in `examples/`, FROM a busybox base made in the test.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{require_root, Fixture};

fn stage_of(step: &str) -> &str {
    step.trim_start_matches('[').split(' ').next().unwrap_or("")
}

#[test]
fn test_target_builds_and_an_unchanged_rebuild_is_all_cached_with_the_same_digest() {
    require_root("test_target_builds...");
    let f = Fixture::new();
    let first = f.build("test", &["--output", "type=image,name=app:test"]);
    assert!(
        first.cached().is_empty(),
        "cold build had hits: {:?}",
        first.cached()
    );
    let ran = first.ran();
    let stages: BTreeSet<&str> = ran.iter().map(|s| stage_of(s)).collect();
    assert_eq!(
        stages,
        ["app", "composer-deps", "dev", "npm-deps", "php-ext", "test"]
            .into_iter()
            .collect(),
        "release is not needed by test and must not run"
    );
    assert!(first
        .ran()
        .iter()
        .any(|s| s.contains("RUN sh tests/run.sh")));

    let second = f.build("test", &["--output", "type=image,name=app:test"]);
    assert!(second.ran().is_empty(), "rebuild ran {:?}", second.ran());
    // The target's last step is a hit, so nothing below it is even looked at.
    assert_eq!(second.cached(), ["[test 1/1] RUN sh tests/run.sh"]);
    assert_eq!(
        second.digest(),
        first.digest(),
        "a fully cached rebuild makes the same image"
    );
}

#[test]
fn editing_one_source_file_reruns_only_the_steps_after_its_copy() {
    require_root("editing_one_source_file...");
    let f = Fixture::new();
    f.build("test", &[]);
    let php = f.path("app/src/lib/Greeting.php");
    let mut text = std::fs::read_to_string(&php).unwrap();
    text.push_str("\n// edited\n");
    std::fs::write(&php, text).unwrap();
    let again = f.build("test", &[]);
    assert_eq!(
        again.ran(),
        [
            "[app 6/8] COPY src/ ./src/",
            "[app 7/8] COPY bin/ ./bin/",
            "[app 8/8] RUN echo \"$APP_VERSION\" > VERSION && n=$(find . -type f | wc -l) && echo \"$n\" > FILES",
            "[dev 1/2] RUN mkdir -p var/log && echo \"xdebug.mode=debug\" > /usr/local/lib/php/extensions/dev.ini",
            "[dev 2/2] COPY tests/ ./tests/",
            "[test 1/1] RUN sh tests/run.sh",
        ]
    );
    // History explains it: comparing the two builds names the edited file.
    let ls = f.kiln(&["history", "ls"]);
    let ids: Vec<String> = String::from_utf8_lossy(&ls.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(
        ids.len() >= 2,
        "history: {}",
        String::from_utf8_lossy(&ls.stdout)
    );
    let cmp = f.kiln(&["history", "compare", &ids[1], &ids[0]]);
    let text = String::from_utf8_lossy(&cmp.stdout);
    assert!(
        text.contains("file src/lib/Greeting.php changed"),
        "compare said:\n{text}"
    );
    // The dependency stages' work is reused: the copy from php-ext is the hit they sit under.
    assert_eq!(
        again.cached(),
        ["[app 5/8] COPY --from=php-ext /build/modules/ /usr/local/lib/php/extensions/"]
    );

    // A file that .dockerignore leaves out changes nothing.
    std::fs::write(f.path("app/debug.log"), "noise").unwrap();
    let ignored = f.build("test", &[]);
    assert!(
        ignored.ran().is_empty(),
        "ignored file triggered {:?}",
        ignored.ran()
    );
}

#[test]
fn release_target_never_runs_dev_or_test_steps() {
    require_root("release_target...");
    let f = Fixture::new();
    let b = f.build("release", &[]);
    for step in b.ran() {
        assert!(
            !["dev", "test"].contains(&stage_of(&step)),
            "release ran {step}"
        );
    }
    assert!(b.ran().iter().any(|s| s.starts_with("[app ")));
}

#[test]
fn the_three_dependency_stages_run_at_the_same_time() {
    require_root("the_three_dependency_stages...");
    let f = Fixture::new();
    let b = f.build("app", &[]);
    // Each dependency stage's install step, as [started, completed] in ms since build start.
    let mut spans = Vec::new();
    for stage in ["composer-deps", "npm-deps", "php-ext"] {
        let started = b
            .events
            .iter()
            .find(|e| {
                e["event"] == "started"
                    && e["stage"] == stage
                    && e["name"].as_str().unwrap().contains("RUN")
            })
            .unwrap_or_else(|| panic!("no RUN started in {stage}"));
        let step = started["step"].clone();
        let done = b
            .events
            .iter()
            .find(|e| e["event"] == "completed" && e["step"] == step)
            .unwrap();
        spans.push((
            started["elapsed_ms"].as_u64().unwrap(),
            done["elapsed_ms"].as_u64().unwrap(),
        ));
    }
    let latest_start = spans.iter().map(|s| s.0).max().unwrap();
    let earliest_end = spans.iter().map(|s| s.1).min().unwrap();
    assert!(
        latest_start <= earliest_end,
        "dependency stages ran one after another: {spans:?}"
    );
}

#[test]
fn oci_tarball_passes_skopeo_and_runs_under_podman() {
    require_root("oci_tarball...");
    let f = Fixture::new();
    let tar = f.path("app-test.tar");
    let out = format!("type=oci,dest={},name=kiln-e2e/app:test", tar.display());
    let b = f.build("test", &["--output", &out]);
    let inspect = Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci-archive:{}", tar.display()))
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v["Digest"].as_str().unwrap(), b.digest());
    assert!(v["Layers"].as_array().unwrap().len() > 5);

    let conf = common::podman_conf();
    let podman = |args: &[&str]| {
        Command::new("podman")
            .args(args)
            .env("CONTAINERS_CONF", &conf)
            .output()
            .unwrap()
    };
    let load = podman(&["load", "-i", tar.to_str().unwrap()]);
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let run = podman(&[
        "run",
        "--rm",
        "--network=none",
        "localhost/kiln-e2e/app:test",
    ]);
    let _ = podman(&["rmi", "-f", "localhost/kiln-e2e/app:test"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The test stage's CMD runs the app's test suite.
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("tests passed"),
        "{}",
        String::from_utf8_lossy(&run.stdout)
    );
}

#[test]
fn cold_builds_with_source_date_epoch_give_identical_digests() {
    require_root("cold_builds_with_source_date_epoch...");
    // Each build in a fresh fixture (its own state dir, busybox tree and copy of the app).
    let build = || {
        let f = Fixture::new();
        let meta = f.path("meta.json");
        let tar = f.path("image.tar");
        let out = format!("type=oci,dest={},name=app:r", tar.display());
        let run = f.kiln_env(
            &[
                "build",
                ".",
                "--target",
                "release",
                "--metadata-file",
                meta.to_str().unwrap(),
                "-o",
                &out,
            ],
            &[("SOURCE_DATE_EPOCH", "1700000000")],
        );
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
        // The config (layers and history) explains a mismatch.
        let x = f.path("x");
        std::fs::create_dir_all(&x).unwrap();
        assert!(Command::new("tar")
            .arg("xf")
            .arg(&tar)
            .arg("-C")
            .arg(&x)
            .status()
            .unwrap()
            .success());
        let digest = m["containerimage.digest"].as_str().unwrap().to_owned();
        let read = |d: &str| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(x.join("blobs/sha256").join(&d[7..])).unwrap())
                .unwrap()
        };
        let manifest = read(&digest);
        let config = read(manifest["config"]["digest"].as_str().unwrap());
        (digest, config)
    };
    let (a, config_a) = build();
    let (b, config_b) = build();
    assert!(a.starts_with("sha256:"));
    assert_eq!(config_a, config_b, "image configs differ");
    assert_eq!(a, b, "same config, different manifests");
}

#[test]
fn two_builds_at_once_on_one_state_dir_agree_and_a_killed_one_harms_nothing() {
    require_root("two_builds_at_once...");
    let f = Fixture::new();
    let spawn = |meta: &str| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(f.root())
            .args([
                "build",
                ".",
                "--target",
                "release",
                "--progress",
                "quiet",
                "-o",
                "type=image,name=app:c",
                "--metadata-file",
            ])
            .arg(f.path(meta))
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .current_dir(f.path("app"))
            .spawn()
            .unwrap()
    };
    // A third build is killed mid-way while the other two run.
    let mut victim = spawn("victim.json");
    let a = spawn("a.json");
    let b = spawn("b.json");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let _ = victim.kill();
    let _ = victim.wait();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success());
    let read = |m: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(f.path(m)).unwrap()).unwrap()
    };
    assert_eq!(
        read("a.json")["containerimage.digest"],
        read("b.json")["containerimage.digest"]
    );
    // The killed build leaves only leftovers (its lease, an active snapshot, a partial
    // ingest), never a partial blob, a corrupt blob or a dangling record...
    let (ok, report) = f.fsck(&[]);
    assert!(
        ok && report.contains(": 0 problem(s)")
            && !report.lines().any(|l| l.starts_with("problem:")),
        "fsck found damage: {report}"
    );
    // And the store still builds: everything is a hit now.
    let again = f.build("release", &[]);
    assert!(again.ran().is_empty(), "ran {:?}", again.ran());
    // ...and the next build reclaimed them (an ingest younger than a few seconds may wait
    // for the one after; `--repair` takes anything left).
    let (_, after) = f.fsck(&[]);
    assert!(
        !after.contains("lease ") && !after.contains("is still active"),
        "the next build left the killed one's leftovers: {after}"
    );
    let (ok, repaired) = f.fsck(&["--repair"]);
    assert!(ok, "{repaired}");
    let (ok, clean) = f.fsck(&[]);
    assert!(
        ok && clean.contains(": 0 problem(s), 0 leftover(s)"),
        "{clean}"
    );
}

#[test]
fn copy_link_layer_is_reused_as_is_when_the_stage_below_changes() {
    require_root("copy_link_layer_is_reused...");
    let f = Fixture::new();
    let dir = f.path("link");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox:latest AS out\n\
         ARG V=1\n\
         RUN echo \"$V\" > /v\n\
         COPY --link --chmod=0640 app.txt /srv/app/\n\
         RUN cat /srv/app/app.txt /v > /seen\n",
    )
    .unwrap();
    std::fs::write(dir.join("app.txt"), "linked\n").unwrap();
    let out1 = f.path("out1");
    let out2 = f.path("out2");
    let o1 = format!("type=local,dest={}", out1.display());
    let o2 = format!("type=local,dest={}", out2.display());
    let first = f.build_dir(&dir, &["--opt", "build-arg:V=1", "--output", &o1]);
    assert!(
        first.cached().is_empty(),
        "cold build: {:?}",
        first.cached()
    );

    let second = f.build_dir(&dir, &["--opt", "build-arg:V=2", "--output", &o2]);
    let copy = "[out 3/4] COPY --link --chmod=0640 app.txt /srv/app/";
    assert!(
        second.cached().iter().any(|s| s == copy),
        "the linked copy must be a hit when only the stage below it changed: ran {:?}, cached {:?}",
        second.ran(),
        second.cached()
    );
    assert!(
        second.ran().iter().any(|s| s.starts_with("[out 2/4] RUN")),
        "the changed step reruns: {:?}",
        second.ran()
    );
    assert!(
        second.ran().iter().any(|s| s.starts_with("[out 4/4] RUN")),
        "steps on the rebased layer rerun: {:?}",
        second.ran()
    );
    // The rebased filesystem has both the new base and the linked file.
    assert_eq!(
        std::fs::read_to_string(out2.join("seen")).unwrap(),
        "linked\n2\n"
    );
    let meta = std::fs::metadata(out2.join("srv/app/app.txt")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
        0o640
    );
    assert_eq!(
        std::fs::read_to_string(out1.join("seen")).unwrap(),
        "linked\n1\n"
    );
}
