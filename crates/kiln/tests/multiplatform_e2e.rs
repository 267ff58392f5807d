//! Multi-platform builds end to end, as root, with QEMU emulation of arm64 on an amd64
//! machine (Debian's `qemu-user-static`, registered with the F flag) and base images made
//! here (busybox-static of both architectures, pushed as one index to kiln's registry):
//!
//! - `kiln build --platform linux/amd64,linux/arm64` of a Dockerfile with a native
//!   `FROM --platform=$BUILDPLATFORM` stage (run once, shared by both targets) and an
//!   emulated RUN pushes one index with both manifests and their `platform` fields;
//!   `podman run --arch arm64` of it prints `aarch64`;
//! - a fresh state dir importing the registry cache gets every step of both platforms as a
//!   hit, and a later `--platform linux/arm64` build hits the shared stages;
//! - with the arm64 handler missing (`KILN_BINFMT_DIR` an empty dir) the build fails before
//!   any step runs, printing the fix.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{require_root, skopeo_inspect, Build, TestRegistry};
use kiln_test_env::multiarch::{ensure_binfmt, push_busybox_index};

/// The registry, the base index on it, and arm64 emulation registered.
struct Setup {
    reg: TestRegistry,
    base: String,
    tmp: tempfile::TempDir,
}

fn setup() -> Setup {
    require_root("multiplatform_e2e");
    if let Err(e) = ensure_binfmt("arm64") {
        panic!("arm64 emulation: {e}");
    }
    let reg = TestRegistry::kiln();
    let base = push_busybox_index(&reg.addr, "base/busybox");
    Setup {
        reg,
        base,
        tmp: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// A build context holding `dockerfile`.
    fn context(&self, name: &str, dockerfile: &str) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
        dir
    }

    /// `kiln build` of `ctx` in the state dir `runner` (a runner of its own), buildctl's
    /// spelling, rawjson progress, a metadata file; the raw output and the metadata path.
    fn build_raw(
        &self,
        runner: &str,
        ctx: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> (Output, PathBuf) {
        let meta = self.path(&format!("{runner}-meta.json"));
        let d = ctx.display();
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--root")
            .arg(self.path(runner))
            .args(["build", "--frontend", "dockerfile.v0", "--local"])
            .arg(format!("context={d}"))
            .arg("--local")
            .arg(format!("dockerfile={d}"))
            .args(["--progress", "rawjson", "--metadata-file"])
            .arg(&meta)
            .args(extra)
            .env_remove("KILN_BINFMT_DIR");
        for (k, v) in env {
            c.env(k, v);
        }
        (c.output().unwrap(), meta)
    }

    /// [`Setup::build_raw`] of a build that must succeed.
    fn build(&self, runner: &str, ctx: &Path, extra: &[&str]) -> Build {
        let (out, meta) = self.build_raw(runner, ctx, extra, &[]);
        Build::from(out, &meta)
    }
}

/// Runs `image` for `arch` with podman (pulled from the test registry, no network, the
/// image removed after); what it printed.
fn podman_run_arch(image: &str, arch: &str) -> String {
    let conf = common::podman_conf();
    // One podman at a time: one test's `rmi` must not meet another's pull of an image
    // sharing its layers.
    static PODMAN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = PODMAN.lock().unwrap_or_else(|p| p.into_inner());
    let run = Command::new("podman")
        .args(["run", "--rm", "--network=none", "--tls-verify=false"])
        .args(["--arch", arch, image])
        .env("CONTAINERS_CONF", &conf)
        .output()
        .unwrap();
    let _ = Command::new("podman")
        .args(["rmi", "-f", image])
        .env("CONTAINERS_CONF", &conf)
        .output();
    assert!(
        run.status.success(),
        "podman run --arch {arch} {image}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    String::from_utf8_lossy(&run.stdout).into_owned()
}

/// The `(os, architecture)` of each image manifest in an index (attestation manifests,
/// whose platform is `unknown/unknown`, left out), in the index's order.
fn index_platforms(index: &serde_json::Value) -> Vec<(String, String)> {
    index["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("not an index: {index}"))
        .iter()
        .filter(|m| m["platform"]["os"] != "unknown")
        .map(|m| {
            (
                m["platform"]["os"].as_str().unwrap_or_default().to_owned(),
                m["platform"]["architecture"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

fn linux(arch: &str) -> (String, String) {
    ("linux".to_owned(), arch.to_owned())
}

/// The cross-compilation pattern: a native builder stage writes an output per target
/// architecture (and a nonce, and the machine it ran on); the target stage (its first RUN
/// changed by the build arg `VERSION`) copies its architecture's output and runs `uname -m`
/// (emulated for arm64).
fn cross_dockerfile(base: &str) -> String {
    format!(
        "FROM --platform=$BUILDPLATFORM {base} AS builder\n\
         RUN mkdir /out && cat /proc/sys/kernel/random/uuid > /out/nonce && uname -m > /out/built-on \\\n \
         && for a in amd64 arm64; do echo \"cross-built for $a\" > /out/hello-$a; done\n\
         \n\
         FROM {base}\n\
         ARG TARGETARCH\n\
         ARG VERSION=1\n\
         RUN echo \"$VERSION\" > /version\n\
         COPY --from=builder /out/nonce /out/built-on /\n\
         COPY --from=builder /out/hello-$TARGETARCH /hello\n\
         RUN uname -m > /run-arch\n\
         CMD [\"sh\", \"-c\", \"uname -m; cat /run-arch /built-on /nonce /hello\"]\n"
    )
}

/// Steps of `build` with `status` whose name contains `text`.
fn steps_with(build: &Build, status: &str, text: &str) -> Vec<String> {
    build.meta["kiln.steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == status)
        .filter_map(|s| s["name"].as_str())
        .filter(|n| n.contains(text))
        .map(str::to_owned)
        .collect()
}

#[test]
fn two_platforms_push_one_index_and_the_cache_serves_every_platform() {
    let s = setup();
    let ctx = s.context("cross", &cross_dockerfile(&s.base));
    let image = format!("{}/app/cross:1", s.reg.addr);
    let cache = format!("{}/app/cross:buildcache", s.reg.addr);
    let output = format!("type=image,name={image},push=true");
    let export = format!("type=registry,ref={cache},mode=max");
    let import = format!("type=registry,ref={cache}");

    let first = s.build(
        "runner-1",
        &ctx,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            &output,
            "--export-cache",
            &export,
        ],
    );
    // Both platforms' steps, labelled with their platform.
    for p in ["linux/amd64", "linux/arm64"] {
        assert!(
            !steps_with(&first, "run", p).is_empty(),
            "no step labelled {p} ran: {}",
            first.meta["kiln.steps"]
        );
    }
    // The native builder stage ran once for both targets.
    assert_eq!(
        steps_with(&first, "run", "RUN mkdir /out").len(),
        1,
        "{}",
        first.meta["kiln.steps"]
    );

    // One index, an image per platform in request order, each config saying so.
    let index = skopeo_inspect(&image, &["--raw"]);
    assert_eq!(
        index_platforms(&index),
        [linux("amd64"), linux("arm64")],
        "{index}"
    );
    assert_eq!(
        first.digest(),
        sha256_digest(&skopeo_raw_bytes(&image)),
        "the metadata's containerimage.digest is the index's"
    );
    for arch in ["amd64", "arm64"] {
        let config = skopeo_inspect(&image, &["--config", "--override-arch", arch]);
        assert_eq!(config["architecture"], arch, "{config}");
        assert_eq!(config["os"], "linux", "{config}");
    }

    // The images run: arm64 under emulation. The builder ran natively, once: both images
    // hold its one nonce.
    let arm = podman_run_arch(&image, "arm64");
    let amd = podman_run_arch(&image, "amd64");
    let arm: Vec<&str> = arm.lines().collect();
    let amd: Vec<&str> = amd.lines().collect();
    assert_eq!(arm.len(), 5, "{arm:?}");
    assert_eq!(amd.len(), 5, "{amd:?}");
    assert_eq!(arm[..3], ["aarch64", "aarch64", "x86_64"], "{arm:?}");
    assert_eq!(amd[..3], ["x86_64", "x86_64", "x86_64"], "{amd:?}");
    assert_eq!(arm[3], amd[3], "one builder run, one nonce");
    assert_eq!(arm[4], "cross-built for arm64");
    assert_eq!(amd[4], "cross-built for amd64");

    // A fresh runner importing the cache: every step of both platforms is a hit.
    let second = s.build(
        "runner-2",
        &ctx,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            &format!("type=image,name={}/app/cross:2,push=true", s.reg.addr),
            "--import-cache",
            &import,
        ],
    );
    assert_eq!(second.ran(), Vec::<String>::new(), "{}", second.stderr());
    for p in ["linux/amd64", "linux/arm64"] {
        assert!(
            !steps_with(&second, "cached", p).is_empty(),
            "no step of {p} was a hit: {}",
            second.meta["kiln.steps"]
        );
    }
    assert!(
        !steps_with(&second, "cached", "RUN uname -m").is_empty(),
        "the emulated RUN was no hit: {}",
        second.meta["kiln.steps"]
    );

    // Later, arm64 alone on another fresh runner, its target stage changed (a new
    // VERSION): the target stage runs again, the shared native stage is a hit from the
    // same cache ref.
    let third = s.build(
        "runner-3",
        &ctx,
        &[
            "--platform",
            "linux/arm64",
            "--opt",
            "build-arg:VERSION=2",
            "-o",
            &format!("type=image,name={}/app/cross:arm64,push=true", s.reg.addr),
            "--import-cache",
            &import,
        ],
    );
    assert!(
        !steps_with(&third, "run", "RUN echo \"$VERSION\"").is_empty(),
        "the changed step did not run: {}",
        third.meta["kiln.steps"]
    );
    assert!(
        steps_with(&third, "run", "RUN mkdir /out").is_empty(),
        "the shared stage ran again: {}",
        third.meta["kiln.steps"]
    );
    assert_eq!(
        steps_with(&third, "cached", "RUN mkdir /out").len(),
        1,
        "the shared stage was no hit: {}",
        third.meta["kiln.steps"]
    );
    assert_eq!(
        podman_run_arch(&format!("{}/app/cross:arm64", s.reg.addr), "arm64")
            .lines()
            .nth(3),
        Some(arm[3]),
        "the arm64 image reuses the builder's output"
    );
}

/// The raw manifest bytes of `image` (`skopeo inspect --raw`), unparsed.
fn skopeo_raw_bytes(image: &str) -> Vec<u8> {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

fn sha256_digest(bytes: &[u8]) -> String {
    kiln_oci::Digest::sha256_of(bytes).to_string()
}

#[test]
fn one_foreign_platform_runs_its_steps_under_emulation() {
    let s = setup();
    let ctx = s.context(
        "arm64",
        &format!(
            "FROM {}\nARG TARGETPLATFORM\nRUN echo \"$(uname -m) $TARGETPLATFORM\" > /arch\nCMD [\"cat\", \"/arch\"]\n",
            s.base
        ),
    );
    let image = format!("{}/app/arm64:1", s.reg.addr);
    s.build(
        "runner",
        &ctx,
        &[
            "--platform",
            "linux/arm64",
            "-o",
            &format!("type=image,name={image},push=true"),
        ],
    );
    let config = skopeo_inspect(&image, &["--config", "--override-arch", "arm64"]);
    assert_eq!(config["architecture"], "arm64", "{config}");
    assert_eq!(
        podman_run_arch(&image, "arm64").trim(),
        "aarch64 linux/arm64"
    );
}

/// A directory laid out like a mounted binfmt_misc (`status`, `register`), holding the
/// qemu-aarch64 handler with `flags` when given.
fn fake_binfmt(dir: &Path, aarch64_flags: Option<&str>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("status"), "enabled\n").unwrap();
    std::fs::write(dir.join("register"), "").unwrap();
    if let Some(flags) = aarch64_flags {
        let text = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n".to_owned()
            + &format!("flags: {flags}\noffset 0\n")
            + "magic 7f454c460201010000000000000000000200b700\n"
            + "mask ffffffffffffff00fffffffffffffffffeffffff\n";
        std::fs::write(dir.join("qemu-aarch64"), text).unwrap();
    }
    dir.to_path_buf()
}

/// Asserts a build failed before any step was cached or started, naming linux/arm64 and
/// printing every one of `fixes`.
#[track_caller]
fn assert_refused_before_steps(out: &Output, fixes: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the build passed:\n{stderr}");
    assert!(stderr.contains("linux/arm64"), "{stderr}");
    for fix in fixes {
        assert!(stderr.contains(fix), "no `{fix}` in:\n{stderr}");
    }
    let stepped: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("\"event\":\"started\"") || l.contains("\"event\":\"cached\""))
        .collect();
    assert!(stepped.is_empty(), "steps ran: {stepped:?}\n{stderr}");
}

#[test]
fn missing_emulator_fails_before_any_step_with_the_fix() {
    let s = setup();
    let ctx = s.context("missing", &cross_dockerfile(&s.base));
    let two = ["--platform", "linux/amd64,linux/arm64"];

    // The arm64 handler unregistered (binfmt_misc mounted, no qemu-aarch64).
    let no_handler = fake_binfmt(&s.path("no-handler"), None);
    let (out, _) = s.build_raw("runner", &ctx, &two, &[("KILN_BINFMT_DIR", &no_handler)]);
    assert_refused_before_steps(
        &out,
        &[
            "apt-get install qemu-user-static",
            "/usr/lib/binfmt.d/qemu-aarch64.conf",
        ],
    );

    // No binfmt_misc at all (an empty directory where it should be mounted).
    let unmounted = s.path("unmounted");
    std::fs::create_dir_all(&unmounted).unwrap();
    let mount = format!("mount -t binfmt_misc binfmt_misc {}", unmounted.display());
    let (out, _) = s.build_raw("runner", &ctx, &two, &[("KILN_BINFMT_DIR", &unmounted)]);
    assert_refused_before_steps(&out, &[&mount, "apt-get install qemu-user-static"]);
    // The same for one foreign platform alone.
    let (out, _) = s.build_raw(
        "runner",
        &ctx,
        &["--platform", "linux/arm64"],
        &[("KILN_BINFMT_DIR", &unmounted)],
    );
    assert_refused_before_steps(&out, &[&mount]);

    // Registered without F: the emulator would have to be inside each step's root.
    let no_f = fake_binfmt(&s.path("no-f"), Some("PO"));
    let (out, _) = s.build_raw("runner", &ctx, &two, &[("KILN_BINFMT_DIR", &no_f)]);
    assert_refused_before_steps(&out, &["F (fix-binary)", "echo -1 >"]);

    // A target stage without RUN (only the native stage runs anything) needs no emulator.
    let thin = s.context(
        "thin",
        &format!(
            "FROM --platform=$BUILDPLATFORM {0} AS builder\n\
             RUN mkdir /out && for a in amd64 arm64; do echo $a > /out/$a; done\n\
             FROM {0}\nARG TARGETARCH\nCOPY --from=builder /out/$TARGETARCH /arch\n",
            s.base
        ),
    );
    let (out, meta) = s.build_raw(
        "runner-thin",
        &thin,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            &format!("type=image,name={}/app/thin:1,push=true", s.reg.addr),
        ],
        &[("KILN_BINFMT_DIR", &unmounted)],
    );
    Build::from(out, &meta);
    assert_eq!(
        index_platforms(&skopeo_inspect(
            &format!("{}/app/thin:1", s.reg.addr),
            &["--raw"]
        )),
        [linux("amd64"), linux("arm64")]
    );
}
