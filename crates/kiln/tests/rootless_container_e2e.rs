//! kiln's own image, built by kiln (`deploy/Dockerfile` FROM a Debian rootfs made here with
//! debootstrap), and the `examples/` build inside it: under `podman run` without
//! `--privileged` with the minimal options, with no options at all (chroot isolation asked
//! for), and under Debian's dockerd with its default seccomp profile (no namespace can be made
//! there, so kiln falls back to chroot isolation by itself and says so). Each build exports its
//! cache to a registry in the container, a second build from an empty state imports it, both
//! give the root build's image digest (SOURCE_DATE_EPOCH), and the image runs under podman.
//! `docs/rootless.md` describes the modes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::dockerd::Dockerd;
use common::{require_program, require_root, Fixture};

const EPOCH: &str = "1700000000";

/// What runs in the container: `kiln debug env`, a registry on the container's loopback, then
/// the example twice from an empty state (cold with cache export, then with cache import).
const IN_CONTAINER: &str = r#"#!/bin/sh
set -e
export SOURCE_DATE_EPOCH=1700000000
kiln debug env > /job/out/env.txt 2>&1 || true
kiln registry serve --addr 127.0.0.1:5000 --no-fsync --root /tmp/reg > /job/out/registry.log 2>&1 &
i=0; while ! grep -q "listening on" /job/out/registry.log && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
cd /job/app
for run in 1 2; do
  rm -rf /var/lib/kiln
  kiln import /job/busybox -t busybox:latest > /dev/null
  if [ $run = 1 ]; then cache="--export-cache type=registry,ref=127.0.0.1:5000/app/cache,mode=max";
  else cache="--import-cache type=registry,ref=127.0.0.1:5000/app/cache"; fi
  kiln build --frontend dockerfile.v0 --local context=. --local dockerfile=. --opt target=test \
    --network host --allow network.host --progress plain --metadata-file /job/out/meta-$run.json \
    --output type=oci,dest=/job/out/app-$run.tar $cache > /job/out/build-$run.log 2>&1
done
"#;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn meta(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn steps_ran(meta: &serde_json::Value) -> Vec<String> {
    meta["kiln.steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "run" && !s["stage"].is_null())
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A Debian 12 root filesystem from `debootstrap --variant=minbase` with `uidmap` and
/// `ca-certificates`, made once per test target dir (deb.debian.org) and kept there.
fn debian_rootfs() -> PathBuf {
    static MADE: OnceLock<PathBuf> = OnceLock::new();
    MADE.get_or_init(|| {
        require_root("debootstrap");
        let debootstrap = require_program("debootstrap");
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-debian-minbase");
        let done = base.join("rootfs");
        if done.join("usr/bin/newuidmap").is_file() {
            return done;
        }
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let partial = base.join("partial");
        let out = Command::new(debootstrap)
            .args([
                "--variant=minbase",
                "--include=uidmap,ca-certificates",
                "bookworm",
            ])
            .arg(&partial)
            .arg("http://deb.debian.org/debian")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "debootstrap: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        // What no image should carry: apt's downloaded packages and lists.
        let _ = std::fs::remove_dir_all(partial.join("var/cache/apt/archives"));
        let _ = std::fs::remove_dir_all(partial.join("var/lib/apt/lists"));
        std::fs::rename(&partial, &done).unwrap();
        done
    })
    .clone()
}

/// kiln's image built by kiln from `deploy/Dockerfile` on the Debian rootfs, as an OCI tar
/// and a Docker tar; `podman` has it loaded as `localhost/kiln-e2e:<pid>`. Made once.
struct KilnImage {
    _fixture: Fixture,
    oci_tar: PathBuf,
    docker_tar: PathBuf,
    name: String,
}

fn kiln_image() -> &'static KilnImage {
    static IMAGE: OnceLock<KilnImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let rootfs = debian_rootfs();
        let conf = common::podman_conf();
        // Images an earlier run of these tests left in podman's store (a static has no drop).
        let old = Command::new("podman")
            .args(["images", "-q", "--filter", "reference=localhost/kiln-e2e"])
            .env("CONTAINERS_CONF", &conf)
            .output()
            .unwrap();
        for id in String::from_utf8_lossy(&old.stdout).split_whitespace() {
            let _ = Command::new("podman")
                .args(["rmi", "-f", id])
                .env("CONTAINERS_CONF", &conf)
                .output();
        }
        let f = Fixture::new();
        let out = f.kiln_env(
            &[
                "import",
                rootfs.to_str().unwrap(),
                "-t",
                "kiln-base:bookworm",
            ],
            &[("SOURCE_DATE_EPOCH", EPOCH)],
        );
        assert!(out.status.success(), "import: {}", stderr(&out));
        let ctx = f.path("deploy");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::copy(
            common::workspace().join("deploy/Dockerfile"),
            ctx.join("Dockerfile"),
        )
        .unwrap();
        std::fs::copy(env!("CARGO_BIN_EXE_kiln"), ctx.join("kiln")).unwrap();
        let name = format!("localhost/kiln-e2e:{}", std::process::id());
        let oci_tar = f.path("kiln-oci.tar");
        let docker_tar = f.path("kiln-docker.tar");
        let out = f.kiln_env(
            &[
                "build",
                "--frontend",
                "dockerfile.v0",
                "--local",
                &format!("context={}", ctx.display()),
                "--local",
                &format!("dockerfile={}", ctx.display()),
                "--progress",
                "plain",
                "--output",
                &format!("type=oci,dest={},name={name}", oci_tar.display()),
                "--output",
                &format!("type=docker,dest={},name={name}", docker_tar.display()),
            ],
            &[("SOURCE_DATE_EPOCH", EPOCH)],
        );
        assert!(
            out.status.success(),
            "building deploy/Dockerfile: {}",
            stderr(&out)
        );
        let pull = Command::new("podman")
            .args(["pull", "-q"])
            .arg(format!("oci-archive:{}", oci_tar.display()))
            .env("CONTAINERS_CONF", &conf)
            .output()
            .unwrap();
        assert!(pull.status.success(), "podman pull: {}", stderr(&pull));
        let id = String::from_utf8_lossy(&pull.stdout).trim().to_owned();
        let tag = Command::new("podman")
            .args(["tag", &id, &name])
            .env("CONTAINERS_CONF", &conf)
            .output()
            .unwrap();
        assert!(tag.status.success(), "podman tag: {}", stderr(&tag));
        KilnImage {
            _fixture: f,
            oci_tar,
            docker_tar,
            name,
        }
    })
}

/// A directory every container here can mount at `/job`: the example, a busybox tree to
/// import as the base (named as the fixture's: the base's history records the dir's name),
/// the script, and `out/` for what the builds write.
fn work_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("kiln-container-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let w = d.path();
    std::fs::set_permissions(w, std::fs::Permissions::from_mode(0o755)).unwrap();
    common::busybox_rootfs(&w.join("busybox"));
    common::copy_dir(&common::workspace().join("examples"), &w.join("app"));
    std::fs::create_dir_all(w.join("out")).unwrap();
    std::fs::write(w.join("run-example.sh"), IN_CONTAINER).unwrap();
    std::fs::set_permissions(
        w.join("run-example.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    d
}

/// The example built on the host as root with SOURCE_DATE_EPOCH: its image digest.
fn root_build_digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(|| {
        let f = Fixture::new();
        let m = f.path("root-meta.json");
        let out = f.kiln_env(
            &[
                "build",
                "--frontend",
                "dockerfile.v0",
                "--local",
                "context=.",
                "--local",
                "dockerfile=.",
                "--opt",
                "target=test",
                "--progress",
                "plain",
                "--metadata-file",
                m.to_str().unwrap(),
                "--output",
                &format!("type=oci,dest={}", f.path("root.tar").display()),
            ],
            &[("SOURCE_DATE_EPOCH", EPOCH)],
        );
        assert!(out.status.success(), "root build: {}", stderr(&out));
        meta(&m)["containerimage.digest"]
            .as_str()
            .unwrap()
            .to_owned()
    })
}

/// Checks what the script in a container left in `work/out`: both builds made the root
/// build's image, the second all from the imported cache, and the image runs under podman.
/// Returns `kiln debug env`'s output and the cold build's log.
fn check_container_builds(runtime: &str, run: &Output, work: &Path) -> (String, String) {
    let out = work.join("out");
    let log = |n: &str| std::fs::read_to_string(out.join(n)).unwrap_or_default();
    assert!(
        run.status.success(),
        "{runtime}: {}\nbuild 1:\n{}\nbuild 2:\n{}\nenv:\n{}",
        stderr(run),
        log("build-1.log"),
        log("build-2.log"),
        log("env.txt")
    );
    let want = root_build_digest();
    let m1 = meta(&out.join("meta-1.json"));
    let m2 = meta(&out.join("meta-2.json"));
    assert_eq!(
        m1["containerimage.digest"].as_str().unwrap(),
        want,
        "{runtime}: cold build\n{}",
        log("build-1.log")
    );
    assert_eq!(m2["containerimage.digest"].as_str().unwrap(), want);
    assert!(
        steps_ran(&m2).is_empty(),
        "{runtime}: the imported cache covers every step: ran {:?}",
        steps_ran(&m2)
    );
    let image = format!("oci-archive:{}", out.join("app-1.tar").display());
    let ran = Command::new("podman")
        .args(["run", "--rm", "--network=none", &image])
        .env("CONTAINERS_CONF", common::podman_conf())
        .output()
        .unwrap();
    assert!(
        ran.status.success() && String::from_utf8_lossy(&ran.stdout).contains("tests passed"),
        "podman run {image}: {}{}",
        String::from_utf8_lossy(&ran.stdout),
        stderr(&ran)
    );
    (log("env.txt"), log("build-1.log"))
}

/// Runs the example in kiln's image under podman with `opts` (never --privileged or an added
/// capability) and checks it; returns `kiln debug env`'s output and the cold build's log.
fn build_in_podman(opts: &[&str]) -> (String, String) {
    require_root("root podman");
    let image = kiln_image();
    let work = work_dir();
    let run = Command::new("podman")
        .args([
            "run",
            "--rm",
            "--network=none",
            "--entrypoint",
            "/job/run-example.sh",
        ])
        .args(opts)
        .arg("-v")
        .arg(format!("{}:/job", work.path().display()))
        .arg(&image.name)
        .env("CONTAINERS_CONF", common::podman_conf())
        .output()
        .unwrap();
    check_container_builds(&format!("podman run {opts:?}"), &run, work.path())
}

#[test]
fn kilns_own_image_is_built_by_kiln_from_debian_and_runs_under_podman() {
    let image = kiln_image();
    let ran = Command::new("podman")
        .args(["run", "--rm", "--network=none", &image.name, "--version"])
        .env("CONTAINERS_CONF", common::podman_conf())
        .output()
        .unwrap();
    assert!(ran.status.success(), "{}", stderr(&ran));
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout).trim(),
        format!("kiln {}", env!("CARGO_PKG_VERSION"))
    );
    // As an ordinary user in the image: its subordinate range and setuid helpers give the
    // rootless-userns mode.
    let env = Command::new("podman")
        .args(["run", "--rm", "--network=none", "--user", "1000:1000"])
        .arg(&image.name)
        .args(["debug", "env"])
        .env("CONTAINERS_CONF", common::podman_conf())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&env.stdout);
    assert!(text.contains("100000:65536"), "{text}{}", stderr(&env));
    assert!(image.oci_tar.is_file() && image.docker_tar.is_file());
}

#[test]
fn in_podman_with_proc_unmasked_the_example_builds_in_a_user_namespace() {
    let (env, _) = build_in_podman(&["--security-opt", "unmask=/proc/*"]);
    assert!(env.contains("kiln builds in mode rootless-userns"), "{env}");
    assert!(
        env.contains("isolation: KILN_ISOLATION=auto -> namespaces"),
        "{env}"
    );
}

#[test]
fn in_podman_with_no_options_chroot_isolation_builds_the_root_image_and_warns() {
    let (env, log) = build_in_podman(&["-e", "KILN_ISOLATION=chroot"]);
    assert!(
        env.contains("isolation: KILN_ISOLATION=chroot -> chroot"),
        "{env}"
    );
    assert!(
        log.contains("WARNING: chroot isolation") && log.contains("share this container's network"),
        "{log}"
    );
}

#[test]
fn under_dockerd_default_seccomp_kiln_falls_back_to_chroot_by_itself() {
    require_root("a private dockerd");
    let image = kiln_image();
    let d = Dockerd::start();
    let load = d.docker(&["load", "-i", image.docker_tar.to_str().unwrap()]);
    assert!(load.status.success(), "docker load: {}", stderr(&load));
    let work = work_dir();
    let run = d.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "/job/run-example.sh",
        "-v",
        &format!("{}:/job", work.path().display()),
        &image.name,
    ]);
    let (env, log) = check_container_builds("docker run (no options)", &run, work.path());
    assert!(
        env.contains("new user namespace") && env.contains("kiln builds in mode chroot"),
        "{env}"
    );
    assert!(
        env.contains("isolation: KILN_ISOLATION=auto -> chroot (no namespace can be made here"),
        "{env}"
    );
    assert!(log.contains("WARNING: chroot isolation"), "{log}");
}
