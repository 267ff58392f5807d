//! Real clients against the registry: skopeo copies in and out, podman push/pull/run.
//! Images are made here from Debian's busybox-static; there is no Docker Hub.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use kiln_oci::Digest;
use kiln_test_env::{require_program, require_root};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_blob(layout: &Path, data: &[u8]) -> (Digest, usize) {
    let d = Digest::sha256_of(data);
    let p = layout.join("blobs/sha256").join(d.hex());
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
    (d, data.len())
}

/// A busybox layer, tar+gzip, reproducible.
fn busybox_layer(work: &Path) -> Vec<u8> {
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static is installed");
    for applet in ["sh", "echo", "cat", "ls"] {
        let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
    }
    let tar = work.join("layer.tar");
    let _ = std::fs::remove_file(work.join("layer.tar.gz"));
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-cf",
        ])
        .arg(&tar)
        .arg("-C")
        .arg(&rootfs)
        .arg("."));
    // Compressed, so clients copy the layer as is instead of compressing it on push.
    run(Command::new("gzip").arg("-n").arg(&tar));
    std::fs::read(work.join("layer.tar.gz")).unwrap()
}

/// Writes an OCI layout holding a busybox image per architecture; with more than one
/// architecture the layout's `latest` is an index. Returns the top manifest digest.
fn busybox_layout(work: &Path, archs: &[&str]) -> (PathBuf, Digest) {
    let layout = work.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let layer = busybox_layer(work);
    let (ld, ln) = write_blob(&layout, &layer);
    let mut manifests = Vec::new();
    for arch in archs {
        let config = serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [ld.to_string()]}
        }))
        .unwrap();
        let (cd, cn) = write_blob(&layout, &config);
        let mut m: Value =
            serde_json::from_slice(&image_manifest(&cd, cn, &[(ld.clone(), ln)], None)).unwrap();
        m["layers"][0]["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar+gzip");
        let m = serde_json::to_vec(&m).unwrap();
        let (md, mn) = write_blob(&layout, &m);
        manifests.push(
            json!({"mediaType": OCI_MANIFEST, "digest": md.to_string(), "size": mn,
            "platform": {"architecture": arch, "os": "linux"}}),
        );
    }
    let top = if manifests.len() == 1 {
        manifests.pop().unwrap()
    } else {
        let idx = serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}),
        )
        .unwrap();
        let (d, n) = write_blob(&layout, &idx);
        json!({"mediaType": OCI_INDEX, "digest": d.to_string(), "size": n})
    };
    let digest: Digest = top["digest"].as_str().unwrap().parse().unwrap();
    let mut top = top;
    top["annotations"] = json!({"org.opencontainers.image.ref.name": "latest"});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [top]})).unwrap(),
    )
    .unwrap();
    (layout, digest)
}

fn layout_top_digest(layout: &Path) -> String {
    let v: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    v["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_an_image_in_and_out_with_identical_digests() {
    require_program("skopeo");
    let r = start().await;
    let work = tempfile::tempdir().unwrap();
    let (layout, digest) = busybox_layout(work.path(), &["amd64"]);
    let dest = format!(
        "docker://{}/skopeo/busybox:1",
        r.reg.as_ref().unwrap().host()
    );
    let out = work.path().join("out");
    let (l2, d2, o2) = (layout.clone(), dest.clone(), out.clone());
    tokio::task::spawn_blocking(move || {
        run(Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", l2.display()))
            .arg(&d2));
        run(Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .arg(&d2)
            .arg(format!("oci:{}:latest", o2.display())));
    })
    .await
    .unwrap();
    let resp = r.head("/v2/skopeo/busybox/manifests/1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "Docker-Content-Digest"), digest.to_string());
    assert_eq!(
        layout_top_digest(&out),
        digest.to_string(),
        "pulled copy has the pushed digest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_a_multi_arch_index_in_and_out_with_identical_digests() {
    require_program("skopeo");
    let r = start().await;
    let work = tempfile::tempdir().unwrap();
    let (layout, digest) = busybox_layout(work.path(), &["amd64", "arm64"]);
    let dest = format!(
        "docker://{}/skopeo/multi:latest",
        r.reg.as_ref().unwrap().host()
    );
    let out = work.path().join("out");
    let (l2, d2, o2) = (layout.clone(), dest.clone(), out.clone());
    tokio::task::spawn_blocking(move || {
        run(Command::new("skopeo")
            .args(["copy", "--all", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", l2.display()))
            .arg(&d2));
        run(Command::new("skopeo")
            .args(["copy", "--all", "--src-tls-verify=false"])
            .arg(&d2)
            .arg(format!("oci:{}:latest", o2.display())));
    })
    .await
    .unwrap();
    let resp = r.get("/v2/skopeo/multi/manifests/latest").await;
    assert_eq!(header(&resp, "Content-Type"), OCI_INDEX);
    assert_eq!(header(&resp, "Docker-Content-Digest"), digest.to_string());
    assert_eq!(layout_top_digest(&out), digest.to_string());
}

/// podman's settings for this machine (for `CONTAINERS_CONF`), written into the tests' temp
/// dir; fails the calling test when podman is not installed.
fn podman_conf() -> PathBuf {
    kiln_test_env::podman_conf(Path::new(env!("CARGO_TARGET_TMPDIR")))
}

/// Podman with private storage (vfs: no mounts left behind) under `dir`.
fn podman(conf: &Path, dir: &Path) -> Command {
    let mut c = Command::new("podman");
    c.env("CONTAINERS_CONF", conf)
        .arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["--storage-driver", "vfs"]);
    c
}

/// Needs root (podman's rootful mode, as in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pushes_pulls_and_runs_an_image_as_root() {
    require_root("podman's rootful mode");
    require_program("skopeo");
    let conf = podman_conf();
    let r = start().await;
    let host = r.reg.as_ref().unwrap().host();
    let work = tempfile::tempdir().unwrap();
    let (layout, _) = busybox_layout(work.path(), &["amd64"]);
    let w = work.path().to_owned();
    let h2 = host.clone();
    let output = tokio::task::spawn_blocking(move || {
        run(Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{h2}/podman/src:1")));
        run(podman(&conf, &w)
            .args(["pull", "--tls-verify=false"])
            .arg(format!("{h2}/podman/src:1")));
        let out = run(podman(&conf, &w)
            .args(["run", "--rm", "--network=none"])
            .arg(format!("{h2}/podman/src:1"))
            .args(["/bin/echo", "hello from kiln registry"]));
        run(podman(&conf, &w)
            .arg("tag")
            .arg(format!("{h2}/podman/src:1"))
            .arg(format!("{h2}/podman/copy:2")));
        run(podman(&conf, &w)
            .args(["push", "--tls-verify=false"])
            .arg(format!("{h2}/podman/copy:2")));
        run(podman(&conf, &w).args(["rmi", "-a", "-f"]));
        run(podman(&conf, &w)
            .args(["pull", "--tls-verify=false"])
            .arg(format!("{h2}/podman/copy:2")));
        let _ = podman(&conf, &w).args(["system", "reset", "-f"]).output();
        out
    })
    .await
    .unwrap();
    assert_eq!(output.trim(), "hello from kiln registry");
    let resp = r.get("/v2/podman/copy/manifests/2").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let tags: Value = r.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(tags["repositories"], json!(["podman/copy", "podman/src"]));
}
