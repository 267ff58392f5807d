//! Registries that stop answering: `kiln build` against a real misbehaving server written
//! here (a tokio listener on 127.0.0.1 that answers `/v2/` properly, then stalls forever on
//! chosen requests, or drips their body one byte every 2 s). Cache imports that stall are a
//! warning; base-image pulls and pushes fail with an error naming the registry after retries;
//! Ctrl-C ends a stalled request; a build that fails while a download is in flight exits with
//! its own error. Also: no TLS roots are needed while no TLS registry is used.
//!
//! Every run of `kiln` here has a deadline far above what the behaviour needs: a run past it
//! is a hang (the bug), reported as a failure, never a measured time.

mod common;

use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Fixture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Short timeouts, so a stall is noticed within seconds.
const SHORT: &str = "connect=2s,response=1s,idle=1s";
/// Timeouts no test waits out: only cancellation can end a stalled request.
const LONG: &str = "10m";
/// A run of `kiln` that is still going after this long hangs.
const HANG: Duration = Duration::from_secs(120);

/// What the server does with a request that matches a rule.
#[derive(Clone)]
enum Answer {
    /// 200 with this media type and body.
    Serve(&'static str, Vec<u8>),
    /// Reads the request and never answers.
    Stall,
    /// Sends the headers of a 200 with this body, then the body one byte every 2 s.
    Drip(Vec<u8>),
    /// 401 with a Bearer challenge whose token realm is this path on the same server.
    Challenge(&'static str),
}

/// A registry that misbehaves on chosen requests. It serves `/v2/`, whatever its rules name,
/// 404 for the rest, and `GET /seen/<text>` answers 200 once a request whose line contained
/// `<text>` has arrived (404 before): a container step can wait for that.
struct MisbehavingRegistry {
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
    _runtime: tokio::runtime::Runtime,
}

impl MisbehavingRegistry {
    /// A server whose requests `METHOD PATH` containing a rule's text get the rule's answer
    /// (the first rule that matches).
    fn start(rules: Vec<(String, Answer)>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let rules = Arc::new(rules);
        let log2 = log.clone();
        runtime.spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve_connection(conn, rules.clone(), log2.clone()));
            }
        });
        MisbehavingRegistry {
            addr,
            log,
            _runtime: runtime,
        }
    }

    /// How many requests whose line contains `text` arrived.
    fn count(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    /// Waits until a request containing `text` has arrived; panics after [`HANG`].
    fn wait_for(&self, text: &str) {
        let start = Instant::now();
        while self.count(text) == 0 {
            assert!(
                start.elapsed() < HANG,
                "no request containing {text:?} arrived; log: {:?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn serve_connection(
    mut conn: tokio::net::TcpStream,
    rules: Arc<Vec<(String, Answer)>>,
    log: Arc<Mutex<Vec<String>>>,
) {
    let mut buf = Vec::new();
    loop {
        // One request head, then its body (Content-Length) discarded.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let line = head.lines().next().unwrap_or("").to_owned();
        let body_len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        log.lock().unwrap().push(line.clone());
        let mut parts = line.split(' ');
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let answer = if path == "/v2/" {
            Some(Answer::Serve("application/json", b"{}".to_vec()))
        } else if let Some(text) = path.strip_prefix("/seen/") {
            let seen = log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(text) && !l.contains("/seen/"));
            seen.then(|| Answer::Serve("text/plain", b"seen".to_vec()))
        } else {
            rules
                .iter()
                .find(|(text, _)| line.contains(text.as_str()))
                .map(|(_, a)| a.clone())
        };
        if matches!(answer, Some(Answer::Stall)) {
            // Hold the connection open, answering nothing, until the client goes away.
            let mut sink = [0u8; 4096];
            while let Ok(n) = conn.read(&mut sink).await {
                if n == 0 {
                    return;
                }
            }
            return;
        }
        while buf.len() < body_len {
            let mut chunk = [0u8; 65536];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..body_len);
        let head_only = method == "HEAD";
        let reply = match answer {
            Some(Answer::Serve(media_type, body)) => response(200, media_type, &body, head_only),
            Some(Answer::Drip(body)) => {
                let headers = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                if conn.write_all(headers.as_bytes()).await.is_err() {
                    return;
                }
                for b in body {
                    if conn.write_all(&[b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                continue;
            }
            Some(Answer::Stall) => return,
            Some(Answer::Challenge(realm)) => {
                let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
                format!(
                    "HTTP/1.1 401 Unauthorized\r\nWww-Authenticate: Bearer realm=\"http://{local}{realm}\",service=\"test\"\r\nContent-Length: 0\r\n\r\n"
                )
                .into_bytes()
            }
            None => response(
                404,
                "application/json",
                br#"{"errors":[{"code":"NAME_UNKNOWN","message":"not here"}]}"#,
                head_only,
            ),
        };
        if conn.write_all(&reply).await.is_err() {
            return;
        }
    }
}

fn response(status: u16, media_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let reason = if status == 200 { "OK" } else { "Not Found" };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {media_type}\r\nContent-Length: {}\r\nDocker-Distribution-API-Version: registry/2.0\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// An image `base/img:1` the server can describe: its manifest and config rules (served), and
/// the digest of its one layer (whose GET the caller decides on).
fn base_image_rules() -> (Vec<(String, Answer)>, String) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let layer = b"a layer the server never sends".to_vec();
    let layer_digest = kiln_oci::Digest::sha256_of(&layer).to_string();
    let diff_id = kiln_oci::Digest::sha256_of(b"its uncompressed bytes").to_string();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap();
    let config_digest = kiln_oci::Digest::sha256_of(&config).to_string();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .unwrap();
    let rules = vec![
        (
            "/v2/base/img/manifests/1 ".to_owned(),
            Answer::Serve("application/vnd.oci.image.manifest.v1+json", manifest),
        ),
        (
            format!("/v2/base/img/blobs/{config_digest} "),
            Answer::Serve("application/octet-stream", config),
        ),
    ];
    (rules, layer_digest)
}

/// `kiln build` of a Dockerfile in a fresh context dir, with `env`; returns the process,
/// still running.
fn spawn_build(
    f: &Fixture,
    name: &str,
    dockerfile: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Child {
    let dir = f.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--root")
        .arg(f.root())
        .args(["build", "--progress", "plain"])
        .arg(&dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// Waits for `child` to exit; kills it and fails if it is still running after [`HANG`].
fn finish(mut child: std::process::Child, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: kiln hung (still running after {HANG:?}); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn fixture() -> Fixture {
    assert!(
        common::is_root(),
        "these tests run builds in containers and need root (CI runs as root)"
    );
    Fixture::new()
}

#[test]
fn a_stalled_or_dripping_cache_import_is_a_warning_and_the_build_completes() {
    let f = fixture();
    let reg = MisbehavingRegistry::start(vec![
        ("/v2/cache/stall/manifests/".into(), Answer::Stall),
        (
            "/v2/cache/drip/manifests/".into(),
            Answer::Drip(vec![b'{'; 4096]),
        ),
    ]);
    let stall = format!("type=registry,ref={}/cache/stall:latest", reg.addr);
    let drip = format!("type=registry,ref={}/cache/drip:latest", reg.addr);
    let child = spawn_build(
        &f,
        "import",
        "FROM busybox:latest\nRUN echo built > /built\n",
        &["--import-cache", &stall, "--cache-from", &drip],
        &[("KILN_REGISTRY_TIMEOUT", SHORT)],
    );
    let out = finish(child, "build with stalled cache imports");
    let err = stderr(&out);
    assert!(out.status.success(), "the build must go on:\n{err}");
    for repo in ["cache/stall", "cache/drip"] {
        assert!(
            err.lines().any(|l| l.contains("warning")
                && l.contains("cache import failed")
                && l.contains(&reg.addr)
                && l.contains(repo)
                && l.contains("stopped answering")),
            "a warning naming {repo}:\n{err}"
        );
    }
    assert!(
        reg.count("/v2/cache/stall/manifests/") > 1,
        "the stalled request is retried"
    );
}

#[test]
fn a_stalled_base_image_pull_fails_naming_the_registry_and_image_after_retries() {
    let f = fixture();
    let reg = MisbehavingRegistry::start(vec![("/v2/base/img/manifests/1".into(), Answer::Stall)]);
    let child = spawn_build(
        &f,
        "pull",
        &format!("FROM {}/base/img:1\nRUN true\n", reg.addr),
        &[],
        &[("KILN_REGISTRY_TIMEOUT", SHORT)],
    );
    let out = finish(child, "build with a stalled base image");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}/base/img:1", reg.addr)) && err.contains("stopped answering"),
        "the error names the image and says the registry stopped answering:\n{err}"
    );
    assert!(err.contains("after 5 attempt(s)"), "{err}");
    assert_eq!(
        reg.count("/v2/base/img/manifests/1"),
        5,
        "one try and four retries"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_stalled_push_fails_naming_the_registry_after_retries() {
    let f = fixture();
    let reg = MisbehavingRegistry::start(vec![
        ("HEAD /v2/app/blobs/".into(), Answer::Stall),
        ("/v2/app/blobs/uploads/".into(), Answer::Stall),
    ]);
    let output = format!("type=image,name={}/app:1,push=true", reg.addr);
    let child = spawn_build(
        &f,
        "push",
        "FROM busybox:latest\nRUN echo pushed > /pushed\n",
        &["--output", &output],
        &[("KILN_REGISTRY_TIMEOUT", SHORT)],
    );
    let out = finish(child, "push to a stalled registry");
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&reg.addr) && err.contains("app") && err.contains("stopped answering"),
        "the error names the registry and the repository:\n{err}"
    );
    assert!(err.contains("after 5 attempt(s)"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_stalled_token_server_fails_the_pull_naming_the_token_request() {
    let f = fixture();
    let reg = MisbehavingRegistry::start(vec![
        (
            "/v2/base/img/manifests/1".into(),
            Answer::Challenge("/token"),
        ),
        ("/token".into(), Answer::Stall),
    ]);
    let child = spawn_build(
        &f,
        "token",
        &format!("FROM {}/base/img:1\nRUN true\n", reg.addr),
        &[],
        &[("KILN_REGISTRY_TIMEOUT", SHORT)],
    );
    let out = finish(child, "build whose token server stalls");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("stopped answering") && err.contains("token request to http://"),
        "{err}"
    );
    assert_eq!(reg.count("GET /token"), 5, "one try and four retries");
}

#[test]
fn a_stalled_add_url_download_fails_naming_the_url() {
    let f = fixture();
    let reg = MisbehavingRegistry::start(vec![
        ("/files/stall.txt".into(), Answer::Stall),
        ("/files/drip.txt".into(), Answer::Drip(vec![b'x'; 4096])),
    ]);
    for file in ["stall.txt", "drip.txt"] {
        let url = format!("http://{}/files/{file}", reg.addr);
        let child = spawn_build(
            &f,
            &format!("add-{file}"),
            &format!("FROM busybox:latest\nADD {url} /downloaded\n"),
            &[],
            &[("KILN_REGISTRY_TIMEOUT", SHORT)],
        );
        let out = finish(child, "ADD from a stalled server");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("ADD {url}: the server stopped answering")),
            "{err}"
        );
    }
}

/// Sends SIGINT to `child`, as Ctrl-C in a terminal does.
fn interrupt(child: &std::process::Child) {
    // SAFETY: kill has no memory preconditions; the pid is our own child's.
    let r = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(r, 0, "kill(SIGINT)");
}

#[test]
fn ctrl_c_during_a_stalled_manifest_request_exits_130() {
    let f = fixture();
    let reg = MisbehavingRegistry::start(vec![("/v2/base/img/manifests/1".into(), Answer::Stall)]);
    let child = spawn_build(
        &f,
        "sigint-resolve",
        &format!("FROM {}/base/img:1\nRUN true\n", reg.addr),
        &[],
        &[("KILN_REGISTRY_TIMEOUT", LONG)],
    );
    reg.wait_for("/v2/base/img/manifests/1");
    interrupt(&child);
    let out = finish(child, "Ctrl-C during a stalled manifest request");
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
}

#[test]
fn ctrl_c_during_a_stalled_layer_download_exits_130() {
    let f = fixture();
    let (mut rules, layer) = base_image_rules();
    rules.push((format!("/v2/base/img/blobs/{layer}"), Answer::Stall));
    let reg = MisbehavingRegistry::start(rules);
    let child = spawn_build(
        &f,
        "sigint-layer",
        &format!("FROM {}/base/img:1\nRUN true\n", reg.addr),
        &[],
        &[("KILN_REGISTRY_TIMEOUT", LONG)],
    );
    reg.wait_for(&layer);
    interrupt(&child);
    let out = finish(child, "Ctrl-C during a stalled layer download");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_failing_build_with_a_download_in_flight_exits_with_its_error() {
    let f = fixture();
    let (mut rules, layer) = base_image_rules();
    rules.push((
        format!("/v2/base/img/blobs/{layer}"),
        Answer::Drip(vec![0; 1024]),
    ));
    let reg = MisbehavingRegistry::start(rules);
    // The failing step waits (over the host network) until the layer download has started.
    let dockerfile = format!(
        "FROM {addr}/base/img:1 AS slow\nRUN true\n\n\
         FROM busybox:latest AS broken\n\
         RUN --network=host until wget -q -O /dev/null http://{addr}/seen/{layer}; do sleep 0.1; done; exit 3\n\n\
         FROM busybox:latest\nCOPY --from=slow /etc /slow\nCOPY --from=broken /etc /broken\n",
        addr = reg.addr
    );
    let child = spawn_build(
        &f,
        "fail-in-flight",
        &dockerfile,
        &["--allow", "network.host"],
        &[("KILN_REGISTRY_TIMEOUT", LONG)],
    );
    let out = finish(child, "a failing build with a download in flight");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("exit 3") && err.contains("did not complete successfully"),
        "the build's own error:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(reg.count(&layer) > 0, "the download was in flight");
}

#[test]
fn a_build_needs_no_tls_roots_until_it_uses_a_tls_registry() {
    let f = fixture();
    let empty = f.path("no-certs");
    std::fs::create_dir_all(&empty).unwrap();
    let no_roots = [
        ("SSL_CERT_FILE", "/dev/null"),
        ("SSL_CERT_DIR", empty.to_str().unwrap()),
    ];
    let child = spawn_build(
        &f,
        "no-tls",
        "FROM busybox:latest\nRUN echo local > /local\n",
        &[],
        &no_roots,
    );
    let out = finish(child, "a local build without TLS roots");
    assert!(out.status.success(), "{}", stderr(&out));

    // A registry reached over HTTPS needs them: the error says so, before any connection.
    let child = spawn_build(
        &f,
        "tls",
        "FROM registry.example.invalid/img:1\n",
        &[],
        &no_roots,
    );
    let out = finish(child, "a build from an HTTPS registry without TLS roots");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("registry.example.invalid") && err.contains("CA certificates"),
        "{err}"
    );
}
