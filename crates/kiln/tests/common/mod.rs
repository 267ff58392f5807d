//! Shared helpers for end-to-end tests that drive the `kiln` binary.
// Each test binary uses a part of this module.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use kiln_test_env::{is_root, require_program, require_root};

/// A private Docker daemon (`dockerd` of Debian's `docker.io`) for `--load` and the CLI plugin.
pub mod dockerd;

/// podman's settings for this machine (for `CONTAINERS_CONF`), written into the tests' temp
/// dir; fails the calling test when podman is not installed.
#[track_caller]
pub fn podman_conf() -> PathBuf {
    kiln_test_env::podman_conf(Path::new(env!("CARGO_TARGET_TMPDIR")))
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A root filesystem with Debian's static busybox and its applets.
pub fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static is installed (.ci/install)");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\nwww-data:x:33:\n").unwrap();
}

/// A state dir with `busybox:latest` imported, and a copy of `examples/`.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        busybox_rootfs(&tmp.path().join("busybox"));
        let f = Fixture { tmp };
        copy_dir(&workspace().join("examples"), &f.path("app"));
        // A fixed epoch makes the base layer the same bytes in every fixture.
        let out = f.kiln_env(
            &[
                "import",
                f.path("busybox").to_str().unwrap(),
                "-t",
                "busybox:latest",
            ],
            &[("SOURCE_DATE_EPOCH", "1700000000")],
        );
        assert!(
            out.status.success(),
            "import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        f
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    pub fn root(&self) -> PathBuf {
        self.path("state")
    }

    pub fn kiln(&self, args: &[&str]) -> Output {
        self.kiln_env(args, &[])
    }

    pub fn kiln_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--root")
            .arg(self.root())
            .args(args)
            .current_dir(self.path("app"));
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// `kiln build` of the example in buildctl's spelling, with a metadata file.
    pub fn build(&self, target: &str, extra: &[&str]) -> Build {
        let meta = self.path(&format!("meta-{}.json", rand_suffix()));
        let mut args = vec![
            "build",
            "--frontend",
            "dockerfile.v0",
            "--local",
            "context=.",
            "--local",
            "dockerfile=.",
            "--opt",
        ];
        let t = format!("target={target}");
        args.push(&t);
        let m = meta.to_str().unwrap().to_owned();
        args.extend(["--metadata-file", &m, "--progress", "rawjson"]);
        args.extend(extra);
        let out = self.kiln(&args);
        Build::from(out, &meta)
    }
}

impl Fixture {
    /// `kiln build` of `dir`'s Dockerfile with `dir` as its context (buildctl spelling,
    /// rawjson progress, a metadata file): the raw output and the metadata file's path.
    pub fn build_dir_raw(&self, dir: &Path, extra: &[&str]) -> (Output, PathBuf) {
        self.build_dir_raw_env(dir, extra, &[])
    }

    /// [`Fixture::build_dir_raw`] with extra environment variables for kiln.
    pub fn build_dir_raw_env(
        &self,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (Output, PathBuf) {
        let meta = dir.join(format!("meta-{}.json", rand_suffix()));
        let d = dir.to_str().unwrap();
        let ctx = format!("context={d}");
        let df = format!("dockerfile={d}");
        let mut args = vec![
            "build",
            "--frontend",
            "dockerfile.v0",
            "--local",
            &ctx,
            "--local",
            &df,
            "--progress",
            "rawjson",
            "--metadata-file",
            meta.to_str().unwrap(),
        ];
        args.extend(extra);
        (self.kiln_env(&args, env), meta)
    }

    /// `kiln debug fsck ARGS` on the fixture's state dir: whether it passed, and its output.
    pub fn fsck(&self, args: &[&str]) -> (bool, String) {
        let out = self.kiln(&[&["debug", "fsck"], args].concat());
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), report)
    }

    /// Asserts the state dir has neither damage nor leftovers of killed processes.
    pub fn assert_store_clean(&self, when: &str) {
        let (ok, report) = self.fsck(&[]);
        assert!(
            ok && report.contains(": 0 problem(s), 0 leftover(s)"),
            "fsck {when}:\n{report}"
        );
    }

    /// [`Fixture::build_dir_raw`] of a build that must succeed.
    pub fn build_dir(&self, dir: &Path, extra: &[&str]) -> Build {
        let (out, meta) = self.build_dir_raw(dir, extra);
        Build::from(out, &meta)
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) * 1000 + std::process::id() as u64 % 1000
}

/// What a build printed and recorded.
pub struct Build {
    pub out: Output,
    pub meta: serde_json::Value,
    pub events: Vec<serde_json::Value>,
}

impl Build {
    pub fn from(out: Output, meta: &Path) -> Self {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "build failed:\n{stderr}");
        let meta = serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
        let events = stderr
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        Build { out, meta, events }
    }

    /// Names of the steps that ran (not cached), sorted.
    pub fn ran(&self) -> Vec<String> {
        self.with_status("run")
    }

    /// Names of the steps that were cache hits, sorted.
    pub fn cached(&self) -> Vec<String> {
        self.with_status("cached")
    }

    fn with_status(&self, status: &str) -> Vec<String> {
        let mut v: Vec<String> = self.meta["kiln.steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == status && !s["stage"].is_null())
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    }

    pub fn digest(&self) -> String {
        self.meta["containerimage.digest"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A registry started for one test, stopped when dropped.
pub struct TestRegistry {
    pub addr: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestRegistry {
    /// `kiln registry serve` on a port it picks (it prints the address it bound).
    pub fn kiln() -> Self {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "registry",
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--no-fsync",
                "--root",
            ])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // It says where it listens on stderr, with its access log.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("kiln registry exited before listening")
                .unwrap();
            if let Some(a) = line.split("listening on http://").nth(1) {
                break a.trim().to_owned();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        TestRegistry {
            addr,
            child,
            _dir: dir,
        }
    }

    /// Debian's `docker-registry` (CNCF distribution) with filesystem storage.
    pub fn distribution() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry is installed (.ci/install)");
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..200 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        TestRegistry {
            addr,
            child,
            _dir: dir,
        }
    }
}

impl Fixture {
    /// Pushes the fixture's busybox to `reg` as `base/busybox:1`; returns the reference.
    pub fn push_base(&self, reg: &TestRegistry) -> String {
        let ctx = self.path("base-ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("Dockerfile"), "FROM busybox:latest\n").unwrap();
        let name = format!("{}/base/busybox:1", reg.addr);
        let out = self.kiln(&[
            "build",
            ctx.to_str().unwrap(),
            "--progress",
            "quiet",
            "-o",
            &format!("type=image,name={name},push=true"),
        ]);
        assert!(
            out.status.success(),
            "pushing the base: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        name
    }

    /// The CI job's build, in a state dir of its own (a new runner each time).
    pub fn ci_build(&self, runner: &str, target: &str, base: &str, extra: &[&str]) -> Build {
        let meta = self.path(&format!("{runner}.json"));
        let mut args: Vec<String> = vec![
            "--root".into(),
            self.path(runner).display().to_string(),
            "build".into(),
            "--frontend".into(),
            "dockerfile.v0".into(),
            "--local".into(),
            "context=.".into(),
            "--local".into(),
            "dockerfile=.".into(),
            "--opt".into(),
            format!("target={target}"),
            "--opt".into(),
            format!("build-arg:BASE_IMAGE={base}"),
            "--metadata-file".into(),
            meta.display().to_string(),
            "--progress".into(),
            "rawjson".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&args)
            .current_dir(self.path("app"))
            .output()
            .unwrap();
        Build::from(out, &meta)
    }
}

impl Build {
    /// Registry bytes downloaded by the build.
    pub fn downloaded(&self) -> u64 {
        self.meta["kiln.bytes_downloaded"].as_u64().unwrap_or(0)
    }

    /// What the build printed on stderr.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
}

/// `&[String]` as `Vec<&str>`, for argument lists.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `skopeo inspect` of an image in a registry (plain HTTP on loopback), with extra flags.
pub fn skopeo_inspect(image: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .args(extra)
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect {extra:?} {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Layer digests of an image in a registry.
pub fn image_layers(image: &str) -> std::collections::BTreeSet<String> {
    skopeo_inspect(image, &[])["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect()
}

/// Blobs a runner's state dir (`f.path(runner)`) holds.
pub fn local_blobs(f: &Fixture, runner: &str) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(f.path(runner).join("content/blobs/sha256"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default()
}

/// Pulls and runs `image` with podman (no network; the image removed after) and returns what
/// it printed; fails the test when the run fails.
pub fn podman_run(image: &str) -> String {
    let conf = podman_conf();
    // One podman at a time: tests of one binary run side by side, and one test's `rmi`
    // should never meet another's pull and run of an image sharing its layers.
    static PODMAN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = PODMAN.lock().unwrap_or_else(|p| p.into_inner());
    // The image only has to run: no network, so podman's own netns setup (which flaked
    // under heavy load here with `netavark: setns: EINVAL`) is out of the picture.
    let run = Command::new("podman")
        .args(["run", "--rm", "--network=none", "--tls-verify=false", image])
        .env("CONTAINERS_CONF", &conf)
        .output()
        .unwrap();
    let _ = Command::new("podman")
        .args(["rmi", "-f", image])
        .env("CONTAINERS_CONF", &conf)
        .output();
    assert!(
        run.status.success(),
        "podman run {image}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    String::from_utf8_lossy(&run.stdout).into_owned()
}

/// Pulls and runs `image` with podman and checks that the example's tests passed.
pub fn podman_runs_tests(image: &str) {
    let printed = podman_run(image);
    assert!(printed.contains("tests passed"), "{printed}");
}

/// GET `url` from a test registry (plain HTTP on loopback): the body.
pub fn get(url: &str) -> Vec<u8> {
    let out = Command::new("curl").args(["-sf", url]).output().unwrap();
    assert!(out.status.success(), "GET {url} failed");
    out.stdout
}

/// GET `url`, as JSON.
pub fn get_json(url: &str) -> serde_json::Value {
    serde_json::from_slice(&get(url)).unwrap()
}

/// Uploads `bytes` as a blob of `repo` on the registry at `addr` (POST, then PUT with the
/// digest); returns the digest.
pub fn upload_blob(addr: &str, repo: &str, bytes: &[u8]) -> String {
    let digest = kiln_oci::Digest::sha256_of(bytes).to_string();
    let out = Command::new("curl")
        .args(["-sf", "-X", "POST", "-D", "-", "-o", "/dev/null"])
        .arg(format!("http://{addr}/v2/{repo}/blobs/uploads/"))
        .output()
        .unwrap();
    assert!(out.status.success(), "starting an upload failed");
    let headers = String::from_utf8_lossy(&out.stdout).into_owned();
    let location = headers
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_owned())
        })
        .expect("upload location");
    let url = if location.starts_with('/') {
        format!("http://{addr}{location}")
    } else {
        location
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    // Tests run side by side in one process: each upload has a file of its own.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    let put = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", file.path().display()))
        .arg(format!("{url}{sep}digest={digest}"))
        .status()
        .unwrap();
    assert!(put.success(), "uploading blob {digest} failed");
    digest
}

/// Pushes `manifest` (of media type `media_type`) as `repo:tag` on the registry at `addr`.
pub fn put_manifest(
    addr: &str,
    repo: &str,
    tag: &str,
    media_type: &str,
    manifest: &serde_json::Value,
) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(manifest).unwrap()).unwrap();
    let put = Command::new("curl")
        .args(["-sf", "-X", "PUT", "-H"])
        .arg(format!("Content-Type: {media_type}"))
        .arg("--data-binary")
        .arg(format!("@{}", file.path().display()))
        .arg(format!("http://{addr}/v2/{repo}/manifests/{tag}"))
        .status()
        .unwrap();
    assert!(put.success(), "pushing manifest {repo}:{tag} failed");
}

/// The record with the longest layer chain in a registry cache's config (its `records`).
pub fn longest_cache_record(graph: &serde_json::Value) -> serde_json::Value {
    graph["records"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|r| r["chain"].as_array().unwrap().len())
        .unwrap()
        .clone()
}
