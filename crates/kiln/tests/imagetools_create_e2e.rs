//! The matrix pattern of multi-platform CI: each platform built on a runner of its own
//! (`--platform linux/amd64` on one, `linux/arm64` on another, each with a state dir of its
//! own) and pushed by digest to kiln's registry, then `imagetools create` joining the two
//! digests into one index under a tag. The result is read back with skopeo. No `RUN`
//! steps, so no emulation is needed.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

const DOCKERFILE: &str = "\
FROM scratch
ARG TARGETARCH
COPY shared.txt /shared.txt
COPY arch-${TARGETARCH}.txt /arch.txt
";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `kiln build` of `ctx` in the runner's own state dir (`root`), pushing the image of
/// `platform` by digest to `name`: the digest the metadata file gives.
fn build_on_runner(root: &Path, ctx: &Path, platform: &str, name: &str, extra: &[&str]) -> String {
    let meta = root.with_extension("json");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root)
        .args(["build", "--platform", platform, "--metadata-file"])
        .arg(&meta)
        .args([
            "--output",
            &format!("type=image,name={name},push-by-digest=true,push=true"),
        ])
        .args(extra)
        .arg(ctx)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    assert!(out.status.success(), "{platform}: {}", text(&out));
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    meta["containerimage.digest"].as_str().unwrap().to_owned()
}

#[test]
fn imagetools_create_joins_two_runners_push_by_digest_results_into_one_index() {
    let reg = TestRegistry::kiln();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
    std::fs::write(ctx.join("shared.txt"), "shared\n").unwrap();
    for arch in ["amd64", "arm64"] {
        std::fs::write(ctx.join(format!("arch-{arch}.txt")), format!("{arch}\n")).unwrap();
    }
    let name = format!("{}/matrix/app", reg.addr);
    // Runner 1: amd64, a plain image manifest. Runner 2: arm64 with a provenance
    // attestation, so its digest is an index of the image and its attestation manifest.
    let amd = build_on_runner(
        &tmp.path().join("runner-amd64"),
        &ctx,
        "linux/amd64",
        &name,
        &["--provenance=false"],
    );
    let arm = build_on_runner(
        &tmp.path().join("runner-arm64"),
        &ctx,
        "linux/arm64",
        &name,
        &["--provenance=mode=min"],
    );
    assert_ne!(amd, arm);

    let tag = format!("{name}:1");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["buildx", "imagetools", "create", "-t", &tag])
        .arg(format!("{name}@{amd}"))
        .arg(format!("{name}@{arm}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let index = skopeo_inspect(&tag, &["--raw"]);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let m = index["manifests"].as_array().unwrap();
    let images: Vec<&serde_json::Value> = m
        .iter()
        .filter(|d| d["annotations"]["vnd.docker.reference.type"].is_null())
        .collect();
    let platforms: Vec<String> = images
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["platform"]["os"].as_str().unwrap(),
                d["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"], "{index:#}");
    assert_eq!(
        images[0]["digest"],
        amd.as_str(),
        "the amd64 image as pushed"
    );
    // The arm64 runner's attestation manifest comes along, still pointing at its image.
    let att = m
        .iter()
        .find(|d| d["annotations"]["vnd.docker.reference.type"] == "attestation-manifest")
        .expect("the arm64 attestation manifest is kept");
    assert_eq!(
        att["annotations"]["vnd.docker.reference.digest"],
        images[1]["digest"]
    );
    // Each platform resolves through the tag to its own image.
    for arch in ["amd64", "arm64"] {
        let inspect = skopeo_inspect(&tag, &["--override-arch", arch]);
        assert_eq!(inspect["Architecture"], arch, "{inspect:#}");
    }
    // Pulled through the index, each platform has the shared layer and its own.
    let amd_layers = image_layers(&format!("{name}@{amd}"));
    let arm_layers = image_layers(&format!("{name}@{}", images[1]["digest"].as_str().unwrap()));
    assert_eq!(amd_layers.intersection(&arm_layers).count(), 1);
}
