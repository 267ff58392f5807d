//! The inline cache (root: real containers), against kiln's own registry: an image pushed
//! with `--export-cache type=inline` carries its cache records in its config, and a new CI
//! runner importing the image itself (`--import-cache type=registry,ref=IMAGE`) starts warm.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::{
    image_layers, local_blobs, podman_runs_tests, put_manifest, require_root, skopeo_inspect, strs,
    upload_blob, Fixture, TestRegistry,
};

/// Pushes an OCI index holding `image`'s manifest as `index`, with podman.
fn push_index_of(image: &str, index: &str) {
    let conf = common::podman_conf();
    let podman = |args: &[&str]| {
        let out = Command::new("podman")
            .args(args)
            .env("CONTAINERS_CONF", &conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A list left over from an earlier run would be reused; start from none.
    let _ = Command::new("podman")
        .args(["manifest", "rm", index])
        .env("CONTAINERS_CONF", &conf)
        .output();
    podman(&["manifest", "create", index]);
    podman(&[
        "manifest",
        "add",
        "--tls-verify=false",
        index,
        &format!("docker://{image}"),
    ]);
    podman(&[
        "manifest",
        "push",
        "--tls-verify=false",
        "--all",
        index,
        &format!("docker://{index}"),
    ]);
    podman(&["manifest", "rm", index]);
    let raw = skopeo_inspect(index, &["--raw"]);
    assert!(raw["manifests"].is_array(), "not an index: {raw}");
}

/// Pushes under `target` a copy of `image` whose config is changed by `edit` (same layers).
fn push_with_edited_config(
    addr: &str,
    image: &str,
    target_tag: &str,
    edit: impl Fn(&mut serde_json::Value),
) {
    let mut config = skopeo_inspect(image, &["--config", "--raw"]);
    edit(&mut config);
    let bytes = serde_json::to_vec(&config).unwrap();
    let digest = upload_blob(addr, "app", &bytes);
    let mut manifest = skopeo_inspect(image, &["--raw"]);
    manifest["config"]["digest"] = serde_json::json!(digest);
    manifest["config"]["size"] = serde_json::json!(bytes.len());
    let media = manifest["mediaType"].as_str().unwrap().to_owned();
    put_manifest(addr, "app", target_tag, &media, &manifest);
}

#[test]
fn an_image_pushed_with_inline_cache_warms_a_new_runner_from_kilns_registry() {
    require_root("an_image_pushed_with_inline_cache_warms_a_new_runner_from_kilns_registry");
    an_image_pushed_with_inline_cache_warms_a_new_runner(TestRegistry::kiln());
}

#[test]
fn an_image_pushed_with_inline_cache_warms_a_new_runner_from_distribution() {
    require_root("an_image_pushed_with_inline_cache_warms_a_new_runner_from_distribution");
    an_image_pushed_with_inline_cache_warms_a_new_runner(TestRegistry::distribution());
}

fn an_image_pushed_with_inline_cache_warms_a_new_runner(reg: TestRegistry) {
    let f = Fixture::new();
    let base = f.push_base(&reg);
    let image = format!("{}/app:test", reg.addr);
    // The pipeline: push the image with its cache inside, import the same image.
    let flags = [
        "--output".to_owned(),
        format!("type=image,name={image},push=true"),
        "--export-cache".to_owned(),
        "type=inline".to_owned(),
        "--import-cache".to_owned(),
        format!("type=registry,ref={image}"),
    ];

    // Cold: nothing to import yet (a warning), the cache goes into the pushed image's config.
    let cold = f.ci_build("runner1", "test", &base, &strs(&flags));
    assert!(cold.cached().is_empty(), "cold hits: {:?}", cold.cached());
    assert!(
        cold.stderr().contains("does not exist yet"),
        "{}",
        cold.stderr()
    );
    assert!(
        cold.stderr().contains("records inline in the image config"),
        "{}",
        cold.stderr()
    );
    // The config is a valid image config that skopeo reads, with the cache beside the
    // standard fields, one layer time per layer.
    let parsed = skopeo_inspect(&image, &["--config"]);
    assert!(parsed["config"]["Cmd"].is_array(), "{parsed}");
    // skopeo's parsed view keeps the standard fields only; the raw bytes keep the cache.
    let config = skopeo_inspect(&image, &["--config", "--raw"]);
    let inline = &config["kiln.cache.v1"];
    assert_eq!(inline["version"], 1, "{config}");
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap().len();
    assert_eq!(inline["created"].as_array().unwrap().len(), diff_ids);
    let records = inline["records"].as_array().unwrap();
    // mode=min: the steps of the image's own chain (WORKDIR, the COPYs, the RUNs of app,
    // dev and test), never a dependency stage's.
    assert!(records.len() >= 8, "{} records: {inline}", records.len());
    let keys: Vec<&str> = records.iter().map(|r| r["key"].as_str().unwrap()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "records are sorted by key");
    for r in records {
        for i in r["chain"].as_array().unwrap() {
            assert!((i.as_u64().unwrap() as usize) < diff_ids, "{r}");
        }
    }
    let layers = image_layers(&image);

    // A new runner, nothing changed: the last step is a hit from the image itself, no layer
    // is downloaded (the push finds them in place), and the image is the same, cache included.
    let warm = f.ci_build("runner2", "test", &base, &strs(&flags));
    assert!(warm.ran().is_empty(), "ran {:?}", warm.ran());
    assert_eq!(warm.cached(), ["[test 1/1] RUN sh tests/run.sh"]);
    let source = warm.meta["kiln.steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["status"] == "cached")
        .unwrap()["cache_source"]
        .clone();
    assert!(
        source.as_str().unwrap_or("").contains(&image),
        "hit came from {source}"
    );
    let fetched: Vec<_> = local_blobs(&f, "runner2")
        .intersection(&layers)
        .cloned()
        .collect();
    assert!(
        fetched.is_empty(),
        "a warm runner downloaded layers {fetched:?}"
    );
    // Manifests and configs only (base image and app image): a few KiB, never a layer.
    assert!(
        warm.downloaded() < 64 << 10,
        "downloaded {} bytes",
        warm.downloaded()
    );
    assert_eq!(warm.digest(), cold.digest());

    // The image behind an index (as a multi-platform push makes it): the platform's manifest
    // carries the cache. Pushed to another repository of the registry, the layers are mounted,
    // never downloaded.
    let index = format!("{}/app:index", reg.addr);
    push_index_of(&image, &index);
    let other = format!("{}/other/app:test", reg.addr);
    let via_index = f.ci_build(
        "runner-index",
        "test",
        &base,
        &[
            "--output",
            &format!("type=image,name={other},push=true"),
            "--export-cache",
            "type=inline",
            "--import-cache",
            &format!("type=registry,ref={index}"),
        ],
    );
    assert!(via_index.ran().is_empty(), "ran {:?}", via_index.ran());
    assert_eq!(via_index.digest(), cold.digest());
    assert!(
        local_blobs(&f, "runner-index").is_disjoint(&layers),
        "layers were downloaded to push them to another repository"
    );
    assert_eq!(image_layers(&other), layers);

    // An image whose inline cache is of a format this kiln does not know: a clear warning,
    // never a misread, and the build runs without it.
    push_with_edited_config(&reg.addr, &image, "future", |c| {
        c["kiln.cache.v1"]["version"] = serde_json::json!(2);
    });
    let future = f.ci_build(
        "runner-future",
        "test",
        &base,
        &["--cache-from", &format!("{}/app:future", reg.addr)],
    );
    assert!(
        future
            .stderr()
            .contains("inline cache format version 2 is not supported by this kiln"),
        "{}",
        future.stderr()
    );
    assert!(future.cached().is_empty(), "hits {:?}", future.cached());

    // mode=min: a dependency stage's steps are not in the image, so nothing of it is a hit
    // (buildx's shorthand `--cache-from IMAGE` names the same cache).
    let deps = f.ci_build(
        "runner-deps",
        "composer-deps",
        &base,
        &["--cache-from", &image],
    );
    assert!(!deps.ran().is_empty());
    assert!(deps.cached().is_empty(), "hits {:?}", deps.cached());

    // The image still runs like any other: podman pulls it and runs its tests.
    podman_runs_tests(&image);

    // A new runner after one source file changed: only the steps after its COPY run, on top of
    // the image's bottom layers; the dependency stages are neither run nor downloaded.
    let php = f.path("app/src/lib/Greeting.php");
    let text = std::fs::read_to_string(&php).unwrap() + "\n// edited\n";
    std::fs::write(&php, text).unwrap();
    let changed = f.ci_build(
        "runner3",
        "test",
        &base,
        &[
            "--output",
            &format!("type=image,name={image},push=true"),
            "--cache-to",
            "type=inline",
            "--cache-from",
            &format!("type=registry,ref={image}"),
        ],
    );
    let ran = changed.ran();
    assert_eq!(ran.len(), 6, "ran {ran:?}");
    assert!(
        ran.iter()
            .all(|s| s.starts_with("[app ") || s.starts_with("[dev ") || s.starts_with("[test ")),
        "{ran:?}"
    );
    assert!(
        ran.iter().all(|s| !s.contains("COPY --from")),
        "a COPY --from reran: {ran:?}"
    );
    let dependency_only: BTreeSet<String> = local_blobs(&f, "runner1")
        .difference(&layers)
        .cloned()
        .collect();
    let pulled = local_blobs(&f, "runner3");
    assert!(
        pulled.intersection(&dependency_only).next().is_none(),
        "runner3 downloaded layers only dependency stages make"
    );
    assert_ne!(changed.digest(), cold.digest());
}

#[test]
fn importing_an_image_without_inline_cache_warns_and_builds() {
    require_root("importing_an_image_without_inline_cache_warns_and_builds");
    let reg = TestRegistry::kiln();
    let f = Fixture::new();
    // The base was pushed without any cache export.
    let base = f.push_base(&reg);
    let b = f.ci_build(
        "runner1",
        "php-ext",
        &base,
        &["--import-cache", &format!("type=registry,ref={base}")],
    );
    assert!(
        b.stderr().contains("carries no inline cache"),
        "{}",
        b.stderr()
    );
    assert!(!b.ran().is_empty());
    assert!(b.cached().is_empty(), "hits {:?}", b.cached());
}

#[test]
fn inline_cache_without_an_image_output_warns_and_exports_nothing() {
    require_root("inline_cache_without_an_image_output_warns_and_exports_nothing");
    let f = Fixture::new();
    let b = f.build("php-ext", &["--export-cache", "type=inline,mode=max"]);
    let err = b.stderr();
    assert!(err.contains("type=inline needs an image output"), "{err}");
    assert!(!err.contains("records inline"), "{err}");
}

#[test]
fn buildkit_inline_cache_build_arg_embeds_the_cache_too() {
    require_root("buildkit_inline_cache_build_arg_embeds_the_cache_too");
    let reg = TestRegistry::kiln();
    let f = Fixture::new();
    let base = f.push_base(&reg);
    let image = format!("{}/app:ext", reg.addr);
    f.ci_build(
        "runner1",
        "php-ext",
        &base,
        &[
            "--output",
            &format!("type=image,name={image},push=true"),
            "--opt",
            "build-arg:BUILDKIT_INLINE_CACHE=1",
        ],
    );
    let config = skopeo_inspect(&image, &["--config", "--raw"]);
    assert_eq!(config["kiln.cache.v1"]["version"], 1, "{config}");
    // A new runner importing the image gets every step of it from there.
    let warm = f.ci_build("runner2", "php-ext", &base, &["--cache-from", &image]);
    assert!(warm.ran().is_empty(), "ran {:?}", warm.ran());
    assert!(!warm.cached().is_empty());
}
