//! The layer cache in a registry (root: real containers), against kiln's own registry and
//! Debian's `docker-registry`: a new CI runner starts warm from one cache ref.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{
    get_json, image_layers, local_blobs, podman_runs_tests, require_root, strs, Fixture,
    TestRegistry,
};

struct Job {
    image: String,
    cache: String,
}

impl Job {
    fn new(reg: &TestRegistry) -> Self {
        Job {
            image: format!("{}/app:test", reg.addr),
            cache: format!("{}/app:buildcache", reg.addr),
        }
    }

    /// The pipeline's flags: push, export `mode`, import the same ref.
    fn flags(&self, mode: &str) -> Vec<String> {
        vec![
            "--output".into(),
            format!("type=image,name={},push=true", self.image),
            "--export-cache".into(),
            format!("type=registry,ref={},mode={mode}", self.cache),
            "--import-cache".into(),
            format!("type=registry,ref={}", self.cache),
        ]
    }
}

fn a_new_runner_starts_warm(reg: TestRegistry) {
    let f = Fixture::new();
    let base = f.push_base(&reg);
    let job = Job::new(&reg);
    let flags = job.flags("max");

    // (a) cold: nothing cached; the missing cache ref is only a warning.
    let cold = f.ci_build("runner1", "test", &base, &strs(&flags));
    assert!(
        cold.cached().is_empty(),
        "cold build had hits: {:?}",
        cold.cached()
    );
    assert!(
        cold.stderr().contains("does not exist yet"),
        "{}",
        cold.stderr()
    );
    let layers = image_layers(&job.image);

    // (b) a new runner, nothing changed: every step a hit from the registry, no layer
    // downloaded (the push mounts them in the registry), the same image.
    let warm = f.ci_build("runner2", "test", &base, &strs(&flags));
    assert!(warm.ran().is_empty(), "ran {:?}", warm.ran());
    assert_eq!(warm.cached(), ["[test 1/1] RUN sh tests/run.sh"]);
    let step = &warm.meta["kiln.steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["status"] == "cached")
        .unwrap()["cache_source"];
    assert!(
        step.as_str().unwrap().contains(&job.cache),
        "hit came from {step}"
    );
    let fetched: Vec<_> = local_blobs(&f, "runner2")
        .intersection(&layers)
        .cloned()
        .collect();
    assert!(
        fetched.is_empty(),
        "a warm runner downloaded layers {fetched:?}"
    );
    assert_eq!(warm.digest(), cold.digest());

    // (c) a new runner after one source file changed: only the steps after its COPY run,
    // and the dependency stages' own layers are never downloaded.
    let php = f.path("app/src/lib/Greeting.php");
    let text = std::fs::read_to_string(&php).unwrap() + "\n// edited\n";
    std::fs::write(&php, text).unwrap();
    let changed = f.ci_build("runner3", "test", &base, &strs(&flags));
    let ran = changed.ran();
    assert_eq!(ran.len(), 6, "ran {ran:?}");
    assert!(
        ran.iter()
            .all(|s| s.starts_with("[app ") || s.starts_with("[dev ") || s.starts_with("[test ")),
        "{ran:?}"
    );
    let dependency_only: BTreeSet<String> = local_blobs(&f, "runner1")
        .difference(&layers)
        .cloned()
        .collect::<BTreeSet<_>>();
    let pulled = local_blobs(&f, "runner3");
    assert!(
        pulled.intersection(&dependency_only).next().is_none(),
        "runner3 downloaded layers no rerun step needed"
    );

    // The pushed image runs: podman pulls it from the registry and runs its CMD (the tests).
    podman_runs_tests(&job.image);

    // The whole cache is one tag: no per-stage tags.
    let tags = get_json(&format!("http://{}/v2/app/tags/list", reg.addr));
    let mut tags: Vec<&str> = tags["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tags.sort();
    assert_eq!(tags, ["buildcache", "test"]);
}

#[test]
fn a_new_runner_starts_warm_from_kilns_registry() {
    require_root("a_new_runner_starts_warm_from_kilns_registry");
    a_new_runner_starts_warm(TestRegistry::kiln());
}

#[test]
fn a_new_runner_starts_warm_from_distribution() {
    require_root("a_new_runner_starts_warm_from_distribution");
    a_new_runner_starts_warm(TestRegistry::distribution());
}

#[test]
fn mode_min_keeps_only_the_image_chain_and_mode_max_every_stage() {
    require_root("mode_min_keeps...");
    let reg = TestRegistry::kiln();
    let f = Fixture::new();
    let base = f.push_base(&reg);
    let min = format!("{}/app:cache-min", reg.addr);
    let max = format!("{}/app:cache-max", reg.addr);
    f.ci_build(
        "runner1",
        "release",
        &base,
        &[
            "--export-cache",
            &format!("type=registry,ref={min},mode=min"),
            "--export-cache",
            &format!("type=registry,ref={max},mode=max"),
        ],
    );

    // The dependency stage alone, from the min cache: its steps are not in the image, so no hits.
    let from_min = f.ci_build(
        "runner2",
        "composer-deps",
        &base,
        &["--import-cache", &format!("type=registry,ref={min}")],
    );
    assert!(!from_min.ran().is_empty());
    assert!(from_min.cached().is_empty(), "{:?}", from_min.cached());
    // From the max cache it is a hit. (e) A first import that is missing is only a warning.
    let missing = format!("{}/app:no-such-cache", reg.addr);
    let from_max = f.ci_build(
        "runner3",
        "composer-deps",
        &base,
        &[
            "--import-cache",
            &format!("type=registry,ref={missing}"),
            "--import-cache",
            &format!("type=registry,ref={max}"),
        ],
    );
    assert!(from_max.ran().is_empty(), "ran {:?}", from_max.ran());
    assert!(from_max
        .stderr()
        .contains("no-such-cache does not exist yet"));
    // The release image itself is a hit from the min cache.
    let release = f.ci_build(
        "runner4",
        "release",
        &base,
        &["--import-cache", &format!("type=registry,ref={min}")],
    );
    assert!(release.ran().is_empty(), "ran {:?}", release.ran());
}

#[test]
fn exports_of_two_targets_to_one_ref_keep_both() {
    require_root("exports_of_two_targets...");
    let reg = TestRegistry::kiln();
    let f = Fixture::new();
    let base = f.push_base(&reg);
    let cache = format!("{}/app:shared", reg.addr);
    let io = [
        "--export-cache".to_owned(),
        format!("type=registry,ref={cache},mode=max"),
        "--import-cache".to_owned(),
        format!("type=registry,ref={cache}"),
    ];
    // Two jobs of the pipeline, each on its own runner, write one ref in turn.
    f.ci_build("job-release", "release", &base, &strs(&io));
    f.ci_build("job-dev", "dev", &base, &strs(&io));
    // A new runner gets hits for both targets.
    let release = f.ci_build(
        "check-release",
        "release",
        &base,
        &["--import-cache", &format!("type=registry,ref={cache}")],
    );
    assert!(release.ran().is_empty(), "release ran {:?}", release.ran());
    let dev = f.ci_build(
        "check-dev",
        "dev",
        &base,
        &["--import-cache", &format!("type=registry,ref={cache}")],
    );
    assert!(dev.ran().is_empty(), "dev ran {:?}", dev.ran());
}

#[test]
fn a_blob_deleted_from_the_registry_costs_a_rerun_of_its_step_only() {
    require_root("a_blob_deleted...");
    let reg = TestRegistry::kiln();
    let f = Fixture::new();
    let base = f.push_base(&reg);
    let cache = format!("{}/cache/app:main", reg.addr);
    f.ci_build(
        "runner1",
        "test",
        &base,
        &[
            "--export-cache",
            &format!("type=registry,ref={cache},mode=max"),
        ],
    );
    // The test step's own layer is the last one of the cache's biggest chain; delete it.
    let manifest = get_json(&format!("http://{}/v2/cache/app/manifests/main", reg.addr));
    let test_layer = {
        // Find it through the cache graph: the record with the longest chain ends with it.
        let cfg_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
        let cfg = get_json(&format!(
            "http://{}/v2/cache/app/blobs/{cfg_digest}",
            reg.addr
        ));
        let longest = common::longest_cache_record(&cfg);
        let last = longest["chain"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .as_u64()
            .unwrap() as usize;
        manifest["layers"][last]["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let del = Command::new("curl")
        .args(["-sf", "-X", "DELETE"])
        .arg(format!(
            "http://{}/v2/cache/app/blobs/{test_layer}",
            reg.addr
        ))
        .status()
        .unwrap();
    assert!(del.success(), "registry refused the blob delete");
    let again = f.ci_build(
        "runner2",
        "test",
        &base,
        &["--import-cache", &format!("type=registry,ref={cache}")],
    );
    assert_eq!(again.ran(), ["[test 1/1] RUN sh tests/run.sh"]);
    assert!(again.stderr().contains("lost blob"), "{}", again.stderr());
}

#[test]
fn ignore_error_turns_an_unreachable_cache_registry_into_a_warning() {
    require_root("ignore_error...");
    let f = Fixture::new();
    // Nothing listens on port 1.
    let b = f.build(
        "release",
        &[
            "--export-cache",
            "type=registry,ref=127.0.0.1:1/app:cache,ignore-error=true",
            "--import-cache",
            "type=registry,ref=127.0.0.1:1/app:cache",
        ],
    );
    assert!(
        b.stderr()
            .contains("cache export failed (ignore-error=true)"),
        "{}",
        b.stderr()
    );
    assert!(!b.ran().is_empty());
}

#[test]
fn cache_mounts_travel_with_the_cache_so_a_rerun_install_starts_warm() {
    require_root("cache_mounts_travel...");
    let reg = TestRegistry::kiln();
    let f = Fixture::new();
    let base = f.push_base(&reg);
    let cache = format!("{}/app:deps", reg.addr);
    f.ci_build(
        "runner1",
        "composer-deps",
        &base,
        &[
            "--export-cache",
            &format!("type=registry,ref={cache},mode=max,cache-mounts=true"),
        ],
    );

    // A new runner, with one more package in the lockfile: the install step must run again.
    let lock = f.path("app/composer.lock");
    let text = std::fs::read_to_string(&lock).unwrap().replacen(
        "\"packages\": [",
        "\"packages\": [\n        { \"name\": \"kiln/extra\", \"version\": \"1.0.0\" },",
        1,
    );
    std::fs::write(&lock, text).unwrap();
    let b = f.ci_build(
        "runner2",
        "composer-deps",
        &base,
        &["--import-cache", &format!("type=registry,ref={cache}")],
    );
    let install = "[composer-deps 4/4]";
    assert!(
        b.ran().iter().any(|s| s.starts_with(install)),
        "ran {:?}",
        b.ran()
    );
    // Its output says the package cache came from the registry before it ran.
    let step = b
        .events
        .iter()
        .find(|e| e["event"] == "started" && e["name"].as_str().unwrap().starts_with(install))
        .unwrap()["step"]
        .clone();
    let restored = b.events.iter().any(|e| {
        e["event"] == "log"
            && e["step"] == step
            && e["data"]
                .as_str()
                .unwrap_or("")
                .contains("cache mount composer restored from")
    });
    assert!(
        restored,
        "no restore in the install step's output:\n{}",
        b.stderr()
    );
}
