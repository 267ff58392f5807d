//! The registry cache at scale and under damage (root: overlayfs), against kiln's own
//! registry: a `mode=max` cache graph over 4 MiB imports on a fresh runner, and a blob lost
//! from the middle of a cached chain costs a rerun of its own step only.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use common::{get, get_json, put_manifest, require_root, upload_blob, TestRegistry};

/// One `kiln build` of a generated Dockerfile, in a state dir of its own (a new CI runner).
struct Run {
    meta: serde_json::Value,
    stderr: String,
    seconds: f64,
}

impl Run {
    fn with_status(&self, status: &str) -> Vec<String> {
        let mut v: Vec<String> = self.meta["kiln.steps"]
            .as_array()
            .expect("metadata lists the steps")
            .iter()
            .filter(|s| s["status"] == status && !s["stage"].is_null())
            .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        v.sort();
        v
    }

    fn ran(&self) -> Vec<String> {
        self.with_status("run")
    }

    fn cached(&self) -> Vec<String> {
        self.with_status("cached")
    }

    /// The "cache exported in Ns" line's seconds.
    fn export_seconds(&self) -> Option<f64> {
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with("cache exported in "))?;
        line.trim_start_matches("cache exported in ")
            .split('s')
            .next()?
            .parse()
            .ok()
    }
}

struct Project {
    tmp: tempfile::TempDir,
}

impl Project {
    fn new(dockerfile: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("ctx")).unwrap();
        std::fs::write(tmp.path().join("ctx/Dockerfile"), dockerfile).unwrap();
        Project { tmp }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn build(&self, runner: &str, target: &str, extra: &[&str]) -> Run {
        let meta = self.path(&format!("{runner}-{target}.json"));
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            // Layers are the same bytes whenever a step reruns.
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .arg("--root")
            .arg(self.path(runner))
            .args(["build", "--progress", "quiet", "--target", target])
            .arg("--metadata-file")
            .arg(&meta)
            .args(extra)
            .arg(self.path("ctx"))
            .output()
            .unwrap();
        let seconds = started.elapsed().as_secs_f64();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "build failed:\n{stderr}");
        let meta = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        Run {
            meta,
            stderr,
            seconds,
        }
    }
}

/// The cache ref's manifest and config blob bytes.
fn cache_manifest_and_config(
    reg: &TestRegistry,
    repo: &str,
    tag: &str,
) -> (serde_json::Value, Vec<u8>) {
    let manifest = get_json(&format!("http://{}/v2/{repo}/manifests/{tag}", reg.addr));
    let digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
    let config = get(&format!("http://{}/v2/{repo}/blobs/{digest}", reg.addr));
    (manifest, config)
}

/// A Dockerfile whose `mode=max` cache graph is large: a `base` chain of `depth` steps, then
/// `branches` stages of `length` steps each on top of it, and a `final` stage that takes one
/// directory from each branch. `WORKDIR` is the cheapest step that makes a cache record (a
/// directory in a new layer; no container), and keeping every chain under overlayfs's 500
/// lower dirs spares the store from flattening. Each record lists its whole chain, so
/// branch records on a deep base are what make the graph big.
fn scale_dockerfile(depth: usize, branches: usize, length: usize) -> String {
    let mut d = String::from("FROM scratch AS base\n");
    for i in 0..depth {
        d.push_str(&format!("WORKDIR /base/{i}\n"));
    }
    for b in 0..branches {
        d.push_str(&format!("FROM base AS branch{b}\n"));
        for i in 0..length {
            d.push_str(&format!("WORKDIR /branch{b}/{i}\n"));
        }
    }
    d.push_str("FROM scratch AS final\n");
    for b in 0..branches {
        d.push_str(&format!("COPY --from=branch{b} /branch{b}/0 /branch{b}\n"));
    }
    d
}

#[test]
fn a_cache_graph_over_four_mib_imports_on_a_fresh_runner_as_root() {
    require_root("a_cache_graph_over_four_mib_imports_on_a_fresh_runner_as_root");
    let reg = TestRegistry::kiln();
    let (depth, branches, length) = (440, 40, 50);
    let p = Project::new(&scale_dockerfile(depth, branches, length));
    let cache = format!("{}/scale/app:cache", reg.addr);
    let export = format!("type=registry,ref={cache},mode=max");
    let import = format!("type=registry,ref={cache}");

    let cold = p.build("runner1", "final", &["--export-cache", &export]);
    assert!(cold.cached().is_empty(), "cold hits: {:?}", cold.cached());
    let steps = depth + branches * length + branches;
    assert_eq!(cold.ran().len(), steps);

    let (manifest, config) = cache_manifest_and_config(&reg, "scale/app", "cache");
    let graph: serde_json::Value = serde_json::from_slice(&config).unwrap();
    let records = graph["records"].as_array().unwrap().len();
    assert_eq!(records, steps, "one record per step");
    assert_eq!(
        manifest["config"]["size"].as_u64().unwrap() as usize,
        config.len()
    );
    assert!(
        config.len() > 4 << 20,
        "the cache config is only {} bytes",
        config.len()
    );

    // A new runner: the whole graph imports, and nothing runs. It exports back to the same
    // ref, so every blob is remote (existence checks, then HEADs on push): the same day and
    // nothing changed, the manifest comes out byte for byte the same.
    let day = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 86_400
    };
    let day_before = day();
    let warm = p.build(
        "runner2",
        "final",
        &["--import-cache", &import, "--export-cache", &export],
    );
    assert!(warm.ran().is_empty(), "ran {:?}", warm.ran());
    assert!(!warm.cached().is_empty());
    let (again, _) = cache_manifest_and_config(&reg, "scale/app", "cache");
    if day() == day_before {
        assert_eq!(again, manifest, "an unchanged re-export rewrote the cache");
    }
    // Another new runner asks for a stage in the middle of the graph: a hit there too.
    let mid = p.build("runner3", "branch17", &["--import-cache", &import]);
    assert!(mid.ran().is_empty(), "ran {:?}", mid.ran());
    let top = format!("WORKDIR /branch17/{}", length - 1);
    assert!(
        mid.cached().len() == 1 && mid.cached()[0].ends_with(&top),
        "hits {:?}",
        mid.cached()
    );
    eprintln!(
        "scale: {records} records, config {} bytes, {} layers; cold build {:.1}s (export {:?}s); \
         fresh runner import + re-export {:.1}s (export {:?}s); mid-graph target {:.1}s",
        config.len(),
        manifest["layers"].as_array().unwrap().len(),
        cold.seconds,
        cold.export_seconds(),
        warm.seconds,
        warm.export_seconds(),
        mid.seconds
    );
}

/// Replaces the config of the cache at `repo:tag` by `config` (a new manifest, same layers).
fn replace_cache_config(reg: &TestRegistry, repo: &str, tag: &str, config: &[u8]) {
    let (mut manifest, _) = cache_manifest_and_config(reg, repo, tag);
    let digest = upload_blob(&reg.addr, repo, config);
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = config.len().into();
    put_manifest(
        &reg.addr,
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
}

fn record_count(config: &[u8]) -> usize {
    let graph: serde_json::Value = serde_json::from_slice(config).unwrap();
    graph["records"].as_array().unwrap().len()
}

#[test]
fn merged_records_older_than_max_age_are_dropped_on_the_next_export_as_root() {
    require_root("merged_records_older_than_max_age_are_dropped_on_the_next_export_as_root");
    let reg = TestRegistry::kiln();
    let p = Project::new(
        "FROM scratch AS old\nWORKDIR /old/1\nWORKDIR /old/2\n\
         FROM scratch AS new\nWORKDIR /new/1\n",
    );
    let cache = format!("{}/aging/app:cache", reg.addr);
    let import = format!("type=registry,ref={cache}");
    p.build(
        "runner1",
        "old",
        &[
            "--export-cache",
            &format!("type=registry,ref={cache},mode=max"),
        ],
    );
    // Every record of that export was last used 30 days ago.
    let (_, config) = cache_manifest_and_config(&reg, "aging/app", "cache");
    assert_eq!(record_count(&config), 2);
    let mut graph: serde_json::Value = serde_json::from_slice(&config).unwrap();
    let day = 86_400u64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let month_ago = (now - 30 * day) / day * day;
    for r in graph["records"].as_array_mut().unwrap() {
        assert!(
            r["last_used"].as_u64().is_some(),
            "records carry a last-used day"
        );
        r["last_used"] = month_ago.into();
    }
    replace_cache_config(
        &reg,
        "aging/app",
        "cache",
        &serde_json::to_vec(&graph).unwrap(),
    );

    // Another job exports to the same ref within a 60-day bound: the old records stay.
    let kept = p.build(
        "runner2",
        "new",
        &[
            "--import-cache",
            &import,
            "--export-cache",
            &format!("type=registry,ref={cache},mode=max,max-age=60d"),
        ],
    );
    let (_, config) = cache_manifest_and_config(&reg, "aging/app", "cache");
    assert_eq!(record_count(&config), 3, "{}", kept.stderr);
    let graph: serde_json::Value = serde_json::from_slice(&config).unwrap();
    let ages: Vec<u64> = graph["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["last_used"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ages.iter().filter(|&&t| t == month_ago).count(),
        2,
        "merged records keep their day: {ages:?}"
    );

    // With max-age=168h they are dropped; this build's own record stays.
    let bounded = p.build(
        "runner3",
        "new",
        &[
            "--import-cache",
            &import,
            "--export-cache",
            &format!("type=registry,ref={cache},mode=max,max-age=168h"),
        ],
    );
    assert!(
        bounded.stderr.contains("2 old records dropped"),
        "{}",
        bounded.stderr
    );
    let (manifest, config) = cache_manifest_and_config(&reg, "aging/app", "cache");
    assert_eq!(record_count(&config), 1);
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
    // The dropped stage is no longer a hit for a new runner.
    let old = p.build("runner4", "old", &["--import-cache", &import]);
    assert_eq!(old.ran().len(), 2, "ran {:?}", old.ran());

    // Bad bounds and connection counts are errors that name them.
    for (flag, env) in [
        ("connections=0", None),
        ("connections=many", None),
        ("connections=8", Some("lots")),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        if let Some(v) = env {
            cmd.env("KILN_REGISTRY_CONNECTIONS", v);
        }
        let out = cmd
            .arg("--root")
            .arg(p.path("runner5"))
            .args(["build", "--progress", "quiet", "--target", "new"])
            .args([
                "--export-cache",
                &format!("type=registry,ref={cache},{flag}"),
            ])
            .arg(p.path("ctx"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {env:?} was accepted");
        let named = match env {
            Some(v) => format!("KILN_REGISTRY_CONNECTIONS={v}"),
            None => format!("--export-cache {flag}"),
        };
        assert!(stderr.contains(&named), "{named}: {stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(p.path("runner5"))
        .args(["build", "--progress", "quiet", "--target", "new"])
        .args([
            "--export-cache",
            &format!("type=registry,ref={cache},max-age=7 days"),
        ])
        .arg(p.path("ctx"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("max-age=7 days"), "{stderr}");
}

#[test]
fn a_blob_lost_mid_chain_costs_a_rerun_of_its_step_only_as_root() {
    require_root("a_blob_lost_mid_chain_costs_a_rerun_of_its_step_only_as_root");
    let reg = TestRegistry::kiln();
    let p = Project::new(
        "FROM scratch AS app\n\
         WORKDIR /s1\n\
         COPY <<EOF /s2/notes.txt\nsecond step\nEOF\n\
         WORKDIR /s3\n\
         COPY <<EOF /s4/notes.txt\nfourth step\nEOF\n\
         WORKDIR /s5\n\
         WORKDIR /s6\n",
    );
    let cache = format!("{}/lost/app:cache", reg.addr);
    let cold = p.build(
        "runner1",
        "app",
        &[
            "--export-cache",
            &format!("type=registry,ref={cache},mode=max"),
        ],
    );
    assert_eq!(cold.ran().len(), 6);

    // The third step's own layer is the third of the longest chain; delete its blob.
    let (manifest, config) = cache_manifest_and_config(&reg, "lost/app", "cache");
    let graph: serde_json::Value = serde_json::from_slice(&config).unwrap();
    let longest = common::longest_cache_record(&graph);
    assert_eq!(longest["chain"].as_array().unwrap().len(), 6);
    let third = longest["chain"][2].as_u64().unwrap() as usize;
    let lost = manifest["layers"][third]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let del = Command::new("curl")
        .args(["-sf", "-X", "DELETE"])
        .arg(format!("http://{}/v2/lost/app/blobs/{lost}", reg.addr))
        .status()
        .unwrap();
    assert!(del.success(), "registry refused the blob delete");

    // A new runner: the third step reruns (its layer is the same bytes again), and the
    // steps above it are hits on top of it.
    let again = p.build(
        "runner2",
        "app",
        &["--import-cache", &format!("type=registry,ref={cache}")],
    );
    let ran = again.ran();
    assert_eq!(ran.len(), 1, "ran {ran:?}");
    assert!(ran[0].ends_with("WORKDIR /s3"), "ran {ran:?}");
    let cached = again.cached();
    assert!(
        cached.iter().any(|s| s.ends_with("WORKDIR /s6")),
        "hits {cached:?}"
    );
    assert!(again.stderr.contains("lost blob"), "{}", again.stderr);
}
