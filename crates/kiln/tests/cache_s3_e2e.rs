//! The layer cache in S3 (`type=s3`) against a real 3-node Garage cluster with replication
//! factor 3 (root: real containers). A cold runner exports to the bucket, a fresh runner
//! imports it and every step is a hit with the same image digest; the objects sit where
//! BuildKit puts them; credentials given in the flag reach no file of the state dir; a build
//! with one Garage node stopped still reads and writes its cache.

mod common;

use std::process::{Command, Stdio};

use common::{require_root, strs, Build, Fixture, TestRegistry};
use kiln_test_env::garage::GarageCluster;

const BUCKET: &str = "kiln-cache";

/// The cache flags of one job against `cluster` (node `node`'s endpoint), credentials
/// in the flag: export under `name` and `also` (`name=a;b`), import `name`.
fn s3_flags(
    cluster: &GarageCluster,
    node: usize,
    name: &str,
    also: &str,
    image: &str,
) -> Vec<String> {
    let (id, secret) = cluster.key();
    let common = format!(
        "type=s3,bucket={BUCKET},region={},endpoint_url={},use_path_style=true,\
         access_key_id={id},secret_access_key={secret},name={name}",
        cluster.region(),
        cluster.endpoint_of(node),
    );
    vec![
        "--output".into(),
        format!("type=image,name={image},push=true"),
        "--export-cache".into(),
        format!("{common};{also},mode=max"),
        "--import-cache".into(),
        common,
    ]
}

/// Object keys in the bucket, listed with curl's SigV4 signing (a client independent of kiln).
fn list_keys(cluster: &GarageCluster) -> Vec<String> {
    let (id, secret) = cluster.key();
    let out = Command::new(kiln_test_env::require_program("curl"))
        .args([
            "-sS",
            "--fail",
            "-H",
            "x-amz-content-sha256: UNSIGNED-PAYLOAD",
        ])
        .arg("--aws-sigv4")
        .arg(format!("aws:amz:{}:s3", cluster.region()))
        .arg("--user")
        .arg(format!("{id}:{secret}"))
        .arg(format!("{}/{BUCKET}?list-type=2", cluster.endpoint()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "listing the bucket: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("<Key>")
        .skip(1)
        .filter_map(|s| s.split("</Key>").next())
        .map(str::to_owned)
        .collect()
}

/// Files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let out = Command::new("grep")
        .args(["-rlF", "--", needle])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn start_cluster() -> GarageCluster {
    let cluster = GarageCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    cluster
        .create_bucket(BUCKET)
        .unwrap_or_else(|e| panic!("{e}"));
    cluster
}

#[test]
fn a_fresh_runner_hits_every_step_from_s3() {
    require_root("a_fresh_runner_hits_every_step_from_s3");
    let cluster = start_cluster();
    let reg = TestRegistry::kiln();
    let f = Fixture::new();
    let base = f.push_base(&reg);
    let image = format!("{}/app:test", reg.addr);
    let flags = s3_flags(&cluster, 0, "main", "branch-x", &image);

    // Cold: nothing in the bucket; the missing manifest is only a warning.
    let cold = f.ci_build("runner1", "test", &base, &strs(&flags));
    assert!(cold.cached().is_empty(), "cold hits: {:?}", cold.cached());
    assert!(
        cold.stderr().contains("does not exist yet"),
        "{}",
        cold.stderr()
    );

    // BuildKit's layout: the manifest under manifests/NAME for each name, blobs under
    // blobs/sha256:….
    let keys = list_keys(&cluster);
    assert!(keys.contains(&"manifests/main".to_owned()), "{keys:?}");
    assert!(keys.contains(&"manifests/branch-x".to_owned()), "{keys:?}");
    let blobs = keys
        .iter()
        .filter(|k| k.starts_with("blobs/sha256:"))
        .count();
    assert!(blobs >= 2, "{keys:?}");
    assert_eq!(
        keys.len(),
        blobs + 2,
        "only blobs and the two manifests: {keys:?}"
    );

    // A fresh runner: every step a hit from the bucket, the same image.
    let warm = f.ci_build("runner2", "test", &base, &strs(&flags));
    assert!(warm.ran().is_empty(), "ran {:?}", warm.ran());
    assert!(!warm.cached().is_empty());
    let source = warm.meta["kiln.steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["status"] == "cached")
        .unwrap()["cache_source"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        source.contains(&format!("s3://{BUCKET}/manifests/main")),
        "hit came from {source}"
    );
    assert_eq!(warm.digest(), cold.digest());
    // The unchanged rebuild uploaded no layer again: every object is still there, and at
    // most a new config (its records' day changes at midnight UTC) was added.
    let after = list_keys(&cluster);
    assert!(keys.iter().all(|k| after.contains(k)), "{after:?}");
    assert!(after.len() <= keys.len() + 1, "{keys:?} then {after:?}");

    // touch_refresh=0s: every blob the bucket holds is older than that, so each gets a new
    // date (a copy onto itself on Garage's side) and none is uploaded again.
    let touch: Vec<String> = flags
        .iter()
        .map(|f| f.replace(",mode=max", ",mode=max,touch_refresh=0s"))
        .collect();
    let touched = f.ci_build("runner3", "test", &base, &strs(&touch));
    assert!(touched.ran().is_empty(), "ran {:?}", touched.ran());
    let line = touched
        .stderr()
        .lines()
        .find(|l| l.starts_with("cache exported"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no export line: {}", touched.stderr()));
    let refreshed: usize = line
        .split(" refreshed")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no refreshed count in {line}"));
    assert!(refreshed >= 2, "{line}");
    assert!(line.contains("(0 uploaded,"), "{line}");
    // No layer again; at most a new config, as above.
    assert!(list_keys(&cluster).len() <= after.len() + 1, "new objects");

    // The secret given in the flags reached no file of any state dir (history included).
    let (_, secret) = cluster.key();
    for runner in ["runner1", "runner2", "runner3"] {
        let leaks = files_containing(&f.path(runner), &secret);
        assert!(leaks.is_empty(), "{runner}: the secret is in {leaks:?}");
    }
}

#[test]
fn a_build_with_a_garage_node_stopped_still_succeeds() {
    require_root("a_build_with_a_garage_node_stopped_still_succeeds");
    let mut cluster = start_cluster();
    let reg = TestRegistry::kiln();
    let f = Fixture::new();
    let base = f.push_base(&reg);
    let image = format!("{}/app:test", reg.addr);
    let flags = s3_flags(&cluster, 0, "main", "branch-x", &image);
    let cold = f.ci_build("runner1", "test", &base, &strs(&flags));
    assert!(cold.cached().is_empty());

    // A changed source file: the build reads the cache and uploads new layers. Node 2 is
    // stopped once the build has started; replication 3 keeps a quorum of 2.
    let php = f.path("app/src/lib/Greeting.php");
    let text = std::fs::read_to_string(&php).unwrap() + "\n// edited\n";
    std::fs::write(&php, text).unwrap();
    let meta = f.path("runner2.json");
    let mut args: Vec<String> = vec![
        "--root".into(),
        f.path("runner2").display().to_string(),
        "build".into(),
        "--frontend".into(),
        "dockerfile.v0".into(),
        "--local".into(),
        "context=.".into(),
        "--local".into(),
        "dockerfile=.".into(),
        "--opt".into(),
        "target=test".into(),
        "--opt".into(),
        format!("build-arg:BASE_IMAGE={base}"),
        "--metadata-file".into(),
        meta.display().to_string(),
        "--progress".into(),
        "rawjson".into(),
    ];
    args.extend(flags.iter().cloned());
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .current_dir(f.path("app"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    cluster.stop_node(2);
    assert!(!cluster.is_running(2));
    let out = child.wait_with_output().unwrap();
    let changed = Build::from(out, &meta);
    assert!(!changed.ran().is_empty(), "the edit reran nothing");
    assert!(!changed.cached().is_empty(), "no hits with a node stopped");

    // Still with node 2 down: a fresh runner reads what was written during the outage.
    let warm = f.ci_build("runner3", "test", &base, &strs(&flags));
    assert!(warm.ran().is_empty(), "ran {:?}", warm.ran());
    assert_eq!(warm.digest(), changed.digest());
    assert!(!cluster.is_running(2));
}
