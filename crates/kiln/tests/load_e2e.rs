//! `--load` end to end: the built image goes into the local image store a user runs
//! containers from, and a container started from it there prints what the build put in.
//! Real stores only: a private dockerd (Debian's `docker.io`, see `common/dockerd.rs`) reached
//! over its socket, a docker context, plain TCP and TLS, checked with `docker run`; and podman
//! both through its API service and through `podman load`, checked with `podman run`.
//!
//! Needs root, `dockerd`, `containerd`, `/usr/bin/docker`, `podman`, `openssl`, `skopeo`
//! (`.ci/install`); nothing may answer on Docker's or podman's default socket.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::dockerd::Dockerd;
use common::{podman_conf, require_program, require_root, skopeo_inspect, Fixture, TestRegistry};

/// The Dockerfile every test loads: its RUN writes what the container prints.
const DOCKERFILE: &str = "\
FROM busybox
ARG WHO
RUN echo \"built by kiln for $WHO\" > /greeting
CMD [\"cat\", \"/greeting\"]
";

/// One podman at a time: the tests share the machine's podman store.
static PODMAN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn project(f: &Fixture, name: &str) -> PathBuf {
    let dir = f.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE).unwrap();
    dir
}

/// `kiln build` in buildx's spelling with `args`, the environment cleared of every variable
/// that picks an image store (the docker CLI's config dir an empty one of the fixture's) and
/// then given `env`.
fn kiln_build(f: &Fixture, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let config = f.path("docker-config");
    std::fs::create_dir_all(&config).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--root")
        .arg(f.root())
        .arg("build")
        .arg(dir)
        .args(["--progress", "plain"])
        .args(args)
        .env_remove("DOCKER_HOST")
        .env_remove("CONTAINER_HOST")
        .env_remove("DOCKER_CONTEXT")
        .env_remove("DOCKER_TLS_VERIFY")
        .env_remove("DOCKER_TLS")
        .env_remove("DOCKER_CERT_PATH")
        .env("DOCKER_CONFIG", config);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn metadata(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Fails unless nothing answers on the default sockets: the podman tests rely on kiln not
/// finding a Docker daemon there first.
#[track_caller]
fn require_no_default_daemon() {
    for socket in ["/var/run/docker.sock", "/run/podman/podman.sock"] {
        assert!(
            !Path::new(socket).exists(),
            "{socket} exists: a daemon of this machine would take the image before the \
             store under test; stop it to run these tests"
        );
    }
}

#[test]
fn load_into_a_running_dockerd_then_docker_run_prints_the_stage_output() {
    require_root("--load into dockerd");
    let dockerd = Dockerd::start();
    let f = Fixture::new();
    let dir = project(&f, "docker-ctx");
    let meta = f.path("docker-meta.json");
    let out = kiln_build(
        &f,
        &dir,
        &[
            "-t",
            "localhost/kiln-load:dockerd",
            "--build-arg",
            "WHO=dockerd",
            "--load",
            "--metadata-file",
            meta.to_str().unwrap(),
        ],
        &[("DOCKER_HOST", &dockerd.host())],
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = format!(
        "image loaded into the Docker daemon at {} (DOCKER_HOST) as localhost/kiln-load:dockerd",
        dockerd.host()
    );
    assert!(text(&out).contains(&said), "{}", text(&out));

    assert_eq!(
        docker_run(&dockerd, "localhost/kiln-load:dockerd"),
        "built by kiln for dockerd\n"
    );
    // The daemon's image id is the config digest kiln reports.
    let id = dockerd.docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        "localhost/kiln-load:dockerd",
    ]);
    assert!(id.status.success(), "{}", text(&id));
    assert_eq!(
        String::from_utf8_lossy(&id.stdout).trim(),
        metadata(&meta)["containerimage.config.digest"]
    );

    // buildx's other spelling: `--output type=docker` without dest, its own name.
    let out = kiln_build(
        &f,
        &dir,
        &[
            "--build-arg",
            "WHO=output",
            "--output",
            "type=docker,name=localhost/kiln-load:output",
        ],
        &[("DOCKER_HOST", &dockerd.host())],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        docker_run(&dockerd, "localhost/kiln-load:output"),
        "built by kiln for output\n"
    );

    // No name: loaded by id, which the progress line gives and `docker run` takes.
    let out = kiln_build(
        &f,
        &dir,
        &["--build-arg", "WHO=unnamed", "--load"],
        &[("DOCKER_HOST", &dockerd.host())],
    );
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    let id = all
        .split(" (DOCKER_HOST) as ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no loaded id in:\n{all}"));
    assert!(id.starts_with("sha256:"), "{all}");
    assert_eq!(docker_run(&dockerd, id), "built by kiln for unnamed\n");

    // `--push --load`: pushed and loaded by one build, as buildx does.
    let registry = TestRegistry::kiln();
    let pushed = format!("{}/load/app:both", registry.addr);
    let out = kiln_build(
        &f,
        &dir,
        &[
            "-t",
            &pushed,
            "--build-arg",
            "WHO=push-and-load",
            "--push",
            "--load",
        ],
        &[("DOCKER_HOST", &dockerd.host())],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        docker_run(&dockerd, &pushed),
        "built by kiln for push-and-load\n"
    );
    let remote = skopeo_inspect(&pushed, &[]);
    assert_eq!(
        remote["Layers"].as_array().map(Vec::len),
        Some(2),
        "{remote:#}"
    );
}

#[test]
fn load_follows_the_docker_cli_context_and_reaches_a_daemon_over_plain_tcp() {
    require_root("--load into dockerd");
    let dockerd = Dockerd::start_with_tcp();
    let f = Fixture::new();
    let dir = project(&f, "docker-context-ctx");

    // A TLS-less tcp:// DOCKER_HOST, as CI jobs reach a `docker:dind` service.
    let tcp = dockerd.tcp_host().unwrap();
    let out = kiln_build(
        &f,
        &dir,
        &[
            "-t",
            "localhost/kiln-load:tcp",
            "--build-arg",
            "WHO=tcp",
            "--load",
        ],
        &[("DOCKER_HOST", tcp)],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("the Docker daemon at {tcp} (DOCKER_HOST)")),
        "{}",
        text(&out)
    );
    assert_eq!(
        docker_run(&dockerd, "localhost/kiln-load:tcp"),
        "built by kiln for tcp\n"
    );

    // No DOCKER_HOST: the docker CLI's current context (made and chosen with the CLI itself)
    // names the daemon, as it does for `docker run`.
    let config = f.path("context-config");
    std::fs::create_dir_all(&config).unwrap();
    let config_env = config.to_str().unwrap();
    let docker_cli = |args: &[&str]| {
        let o = Command::new(common::dockerd::docker_cli())
            .args(args)
            .env_remove("DOCKER_HOST")
            .env("DOCKER_CONFIG", config_env)
            .output()
            .unwrap();
        assert!(o.status.success(), "docker {args:?}: {}", text(&o));
    };
    let host = format!("host={}", dockerd.host());
    docker_cli(&["context", "create", "kiln-private", "--docker", &host]);
    // buildx's `context=` names it, whatever DOCKER_HOST says.
    let nowhere = format!("unix://{}/docker.sock", f.path("nowhere").display());
    let out = kiln_build(
        &f,
        &dir,
        &[
            "--build-arg",
            "WHO=context-attr",
            "--output",
            "type=docker,context=kiln-private,name=localhost/kiln-load:context-attr",
        ],
        &[("DOCKER_CONFIG", config_env), ("DOCKER_HOST", &nowhere)],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        docker_run(&dockerd, "localhost/kiln-load:context-attr"),
        "built by kiln for context-attr\n"
    );
    docker_cli(&["context", "use", "kiln-private"]);
    let out = kiln_build(
        &f,
        &dir,
        &[
            "-t",
            "localhost/kiln-load:context",
            "--build-arg",
            "WHO=context",
            "--load",
        ],
        &[("DOCKER_CONFIG", config_env)],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        docker_run(&dockerd, "localhost/kiln-load:context"),
        "built by kiln for context\n"
    );
}

/// `docker run --rm --network none IMAGE` on `dockerd`: what it printed. A failure says
/// what the image holds (its `/bin`, its history) beside docker's error.
#[track_caller]
fn docker_run(dockerd: &Dockerd, image: &str) -> String {
    let run = dockerd.docker(&["run", "--rm", "--network", "none", image]);
    if !run.status.success() {
        let ls = dockerd.docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "/bin/busybox",
            image,
            "ls",
            "-la",
            "/",
            "/bin/cat",
        ]);
        let history = dockerd.docker(&["history", "--no-trunc", image]);
        panic!(
            "docker run {image}: {}\nits files: {}\nits history: {}\ndockerd's log:\n{}",
            text(&run),
            text(&ls),
            text(&history),
            tail(&dockerd.log(), 40)
        );
    }
    String::from_utf8_lossy(&run.stdout).into_owned()
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn load_into_dockerd_over_tcp_with_tls_as_docker_tls_verify_asks() {
    require_root("--load into dockerd");
    let dockerd = Dockerd::start_with_tls();
    let f = Fixture::new();
    let dir = project(&f, "tls-ctx");
    let certs = dockerd.client_certs();
    let tcp = dockerd.tcp_host().unwrap();
    let out = kiln_build(
        &f,
        &dir,
        &[
            "-t",
            "localhost/kiln-load:tls",
            "--build-arg",
            "WHO=tls",
            "--load",
        ],
        &[
            ("DOCKER_HOST", tcp),
            ("DOCKER_TLS_VERIFY", "1"),
            ("DOCKER_CERT_PATH", certs.to_str().unwrap()),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "the Docker daemon at {tcp} over TLS (DOCKER_HOST)"
        )),
        "{}",
        text(&out)
    );
    assert_eq!(
        docker_run(&dockerd, "localhost/kiln-load:tls"),
        "built by kiln for tls\n"
    );
    // Without TLS the daemon does not answer kiln's plain HTTP.
    let out = kiln_build(&f, &dir, &["--load"], &[("DOCKER_HOST", tcp)]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("--load: DOCKER_HOST={tcp} does not answer")),
        "{}",
        text(&out)
    );
}

/// `podman system service` on a socket of the test's own, stopped when dropped.
struct PodmanService {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl PodmanService {
    #[track_caller]
    fn start(conf: &Path) -> Self {
        let podman = require_program("podman");
        let dir = tempfile::Builder::new()
            .prefix("kiln-podman.")
            .tempdir_in("/tmp")
            .unwrap();
        let socket = dir.path().join("podman.sock");
        let log = std::fs::File::create(dir.path().join("service.log")).unwrap();
        let child = Command::new(podman)
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .env("CONTAINERS_CONF", conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut s = PodmanService { child, dir };
        // Bounds a hang on a loaded machine; no timing is checked.
        let started = Instant::now();
        loop {
            let ping = Command::new("curl")
                .args(["-sf", "--max-time", "5", "--unix-socket"])
                .arg(&socket)
                .arg("http://localhost/_ping")
                .output()
                .unwrap();
            if ping.status.success() {
                break;
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("podman system service exited ({status}): {}", s.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "podman's API service did not answer: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        s
    }

    fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("podman.sock").display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }
}

impl Drop for PodmanService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `podman run` of `image` (then removed): what it printed.
#[track_caller]
fn podman_run(conf: &Path, image: &str) -> String {
    let run = Command::new("podman")
        .args(["run", "--rm", "--network=none", image])
        .env("CONTAINERS_CONF", conf)
        .output()
        .unwrap();
    let _ = Command::new("podman")
        .args(["rmi", "-f", image])
        .env("CONTAINERS_CONF", conf)
        .output();
    assert!(run.status.success(), "podman run {image}: {}", text(&run));
    String::from_utf8_lossy(&run.stdout).into_owned()
}

#[test]
fn load_into_podman_through_its_api_service() {
    require_root("--load into podman");
    let _one = PODMAN.lock().unwrap_or_else(|p| p.into_inner());
    let conf = podman_conf();
    let service = PodmanService::start(&conf);
    let f = Fixture::new();
    let dir = project(&f, "podman-api-ctx");
    let out = kiln_build(
        &f,
        &dir,
        &[
            "-t",
            "localhost/kiln-load:podman-api",
            "--build-arg",
            "WHO=podman-api",
            "--load",
        ],
        &[("CONTAINER_HOST", &service.host())],
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = format!(
        "image loaded into podman's API service at {} (CONTAINER_HOST)",
        service.host()
    );
    assert!(text(&out).contains(&said), "{}", text(&out));
    assert_eq!(
        podman_run(&conf, "localhost/kiln-load:podman-api"),
        "built by kiln for podman-api\n"
    );
}

#[test]
fn load_into_podman_with_podman_load_when_no_daemon_answers() {
    require_root("--load into podman");
    require_no_default_daemon();
    let _one = PODMAN.lock().unwrap_or_else(|p| p.into_inner());
    let conf = podman_conf();
    let f = Fixture::new();
    let dir = project(&f, "podman-cli-ctx");
    let out = kiln_build(
        &f,
        &dir,
        &[
            "-t",
            "localhost/kiln-load:podman-cli",
            "--build-arg",
            "WHO=podman-load",
            "--load",
        ],
        &[("CONTAINERS_CONF", conf.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("image loaded into podman's store (`"),
        "{}",
        text(&out)
    );
    assert_eq!(
        podman_run(&conf, "localhost/kiln-load:podman-cli"),
        "built by kiln for podman-load\n"
    );
}

#[test]
fn load_with_no_image_store_fails_naming_load_and_what_was_tried() {
    require_root("kiln build");
    require_no_default_daemon();
    let f = Fixture::new();
    let dir = f.path("no-store-ctx");
    std::fs::create_dir_all(&dir).unwrap();
    // No RUN: the build itself needs no program, so PATH can hold none (no podman).
    std::fs::write(dir.join("Dockerfile"), "FROM busybox\nCOPY Dockerfile /\n").unwrap();
    let empty = f.path("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let out = kiln_build(
        &f,
        &dir,
        &["--load"],
        &[("PATH", empty.to_str().unwrap()), ("XDG_RUNTIME_DIR", "")],
    );
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        !all.contains("COPY Dockerfile"),
        "the store is looked up before any step runs:\n{all}"
    );
    for said in [
        "--load: no local image store",
        "Docker's default socket unix:///var/run/docker.sock (absent)",
        "`podman` on PATH (not found)",
        "--output type=docker,dest=FILE",
    ] {
        assert!(all.contains(said), "missing {said:?} in:\n{all}");
    }

    // A DOCKER_HOST that does not answer is the user's choice: an error, not a fallback.
    let gone = format!("unix://{}/docker.sock", f.path("nowhere").display());
    let out = kiln_build(&f, &dir, &["--load"], &[("DOCKER_HOST", &gone)]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains(&format!("--load: DOCKER_HOST={gone} does not answer")),
        "{all}"
    );
    let out = kiln_build(
        &f,
        &dir,
        &["--load"],
        &[("DOCKER_HOST", "ssh://me@build-host")],
    );
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains(
            "DOCKER_HOST=ssh://me@build-host: kiln reaches a daemon over unix:// or tcp:// only"
        ),
        "{all}"
    );
    let out = kiln_build(
        &f,
        &dir,
        &["--load"],
        &[("DOCKER_HOST", "tcp://127.0.0.1:2376"), ("DOCKER_TLS", "1")],
    );
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("TLS without verifying the daemon (DOCKER_TLS, or the context's SkipTLSVerify) is not supported"),
        "{all}"
    );

    // Several platforms cannot go into one image store's single image: refused before any
    // step runs, with buildx's message.
    let out = kiln_build(
        &f,
        &dir,
        &["--load", "--platform", "linux/amd64,linux/arm64"],
        &[],
    );
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("docker exporter does not currently support exporting manifest lists"),
        "{all}"
    );
    assert!(!all.contains("COPY Dockerfile"), "{all}");
}
