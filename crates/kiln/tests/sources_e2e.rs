//! End to end (root): sources that are neither a registry nor the build context. `ADD <url>`
//! downloads from a real HTTP server the test runs on 127.0.0.1 (it counts the requests it
//! gets), and `FROM`/`COPY --from` a named context that is an OCI layout kiln exported itself,
//! given with buildx's `--build-context NAME=oci-layout://DIR:TAG` and with buildctl's
//! `--oci-layout NAME=DIR` + `--opt context:X=oci-layout://NAME@DIGEST`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use common::{require_root, Build, Fixture};

/// `Last-Modified` of every file the server sends (1445412480 seconds after the epoch).
const LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";
const LAST_MODIFIED_SECS: i64 = 1_445_412_480;

/// A small HTTP/1.1 file server: `GET /path` answers the file set for that path with an
/// `ETag` and `Last-Modified`, 304 to a matching `If-None-Match`, 404 otherwise.
struct FileServer {
    port: u16,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    requests: Arc<AtomicUsize>,
    not_modified: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn etag_of(body: &[u8]) -> String {
    format!("\"{}\"", sha256_hex(body))
}

fn sha256_hex(body: &[u8]) -> String {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), body).unwrap();
    let out = Command::new("sha256sum").arg(tmp.path()).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

impl FileServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let not_modified = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, r, n, s) = (
            files.clone(),
            requests.clone(),
            not_modified.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    serve(conn, &f, &r, &n);
                }
            }
        });
        FileServer {
            port,
            files,
            requests,
            not_modified,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, path: &str, body: &[u8]) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_owned(), body.to_vec());
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    conn: TcpStream,
    files: &Mutex<HashMap<String, Vec<u8>>>,
    requests: &AtomicUsize,
    not_modified: &AtomicUsize,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut if_none_match = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("if-none-match") {
                if_none_match = Some(v.trim().to_owned());
            }
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let body = files.lock().unwrap().get(&path).cloned();
    let mut out = conn;
    let _ = match body {
        None => out
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        Some(b) => {
            let etag = etag_of(&b);
            if if_none_match.as_deref() == Some(etag.as_str()) {
                not_modified.fetch_add(1, Ordering::SeqCst);
                out.write_all(
                    format!(
                        "HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
            } else {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nETag: {etag}\r\nLast-Modified: {LAST_MODIFIED}\r\nConnection: close\r\n\r\n",
                    b.len()
                );
                out.write_all(head.as_bytes())
                    .and_then(|_| out.write_all(&b))
            }
        }
    };
    let _ = out.flush();
}

fn build_ok(f: &Fixture, dir: &Path, extra: &[&str]) -> Build {
    f.build_dir(dir, extra)
}

fn build_err(f: &Fixture, dir: &Path, extra: &[&str]) -> String {
    let (out, _) = f.build_dir_raw(dir, extra);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the build should fail:\n{stderr}");
    eprintln!("{stderr}");
    stderr
}

fn project(f: &Fixture, name: &str, dockerfile: &str) -> std::path::PathBuf {
    let dir = f.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir
}

/// The steps that ran, without the base image source (resolved, never cached).
fn steps_ran(b: &Build) -> Vec<String> {
    b.ran()
        .into_iter()
        .filter(|s| !s.contains("] FROM "))
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn add_url_with_checksum_saves_the_file_0600_unextracted_and_a_rebuild_makes_no_request() {
    require_root("add_url_with_checksum...");
    let f = Fixture::new();
    let server = FileServer::start();
    let hello = b"hello from the server\n".to_vec();
    server.set("/files/hello.txt", &hello);
    // A gzip'd tar: ADD <url> must keep it as is (only local archives are unpacked).
    let src = f.path("tarsrc");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("inner.txt"), "inside\n").unwrap();
    let tgz = f.path("a.tar.gz");
    assert!(Command::new("tar")
        .arg("-czf")
        .arg(&tgz)
        .arg("-C")
        .arg(&src)
        .arg("inner.txt")
        .status()
        .unwrap()
        .success());
    let tgz_bytes = std::fs::read(&tgz).unwrap();
    server.set("/dl/a.tar.gz", &tgz_bytes);

    let dir = project(
        &f,
        "add-url",
        &format!(
            "FROM busybox:latest\n\
             ADD --checksum=sha256:{} {} /data/\n\
             ADD --checksum=sha256:{} --chmod=0755 {} /data/tool.tgz\n\
             RUN stat -c '%Y' /data/hello.txt > /mtime && ls /data > /listing\n",
            sha256_hex(&hello),
            server.url("/files/hello.txt"),
            sha256_hex(&tgz_bytes),
            server.url("/dl/a.tar.gz"),
        ),
    );
    let out1 = f.path("out1");
    let o1 = format!("type=local,dest={}", out1.display());
    let first = build_ok(&f, &dir, &["--output", &o1]);
    assert_eq!(steps_ran(&first).len(), 3, "ran {:?}", steps_ran(&first));
    assert_eq!(server.requests(), 2, "one request per URL");
    assert_eq!(std::fs::read(out1.join("data/hello.txt")).unwrap(), hello);
    assert_eq!(
        mode(&out1.join("data/hello.txt")),
        0o600,
        "URL downloads are 0600"
    );
    assert_eq!(
        std::fs::read_to_string(out1.join("mtime")).unwrap().trim(),
        LAST_MODIFIED_SECS.to_string(),
        "the file's mtime is the server's Last-Modified"
    );
    assert_eq!(
        std::fs::read(out1.join("data/tool.tgz")).unwrap(),
        tgz_bytes
    );
    assert_eq!(mode(&out1.join("data/tool.tgz")), 0o755, "--chmod applies");
    assert_eq!(
        std::fs::read_to_string(out1.join("listing")).unwrap(),
        "hello.txt\ntool.tgz\n",
        "a downloaded archive is not unpacked"
    );

    let second = build_ok(&f, &dir, &[]);
    assert!(second.ran().is_empty(), "ran {:?}", second.ran());
    assert_eq!(
        second.cached().len(),
        1,
        "the last step is a hit, so nothing below it is even looked at: {:?}",
        second.cached()
    );
    assert_eq!(
        server.requests(),
        2,
        "with --checksum a rebuild needs no request at all"
    );

    // The same bytes from another URL (a mirror) with the same checksum: the download is its
    // checksum, so every step stays cached and nothing is requested.
    server.set("/mirror/hello.txt", &hello);
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM busybox:latest\n\
             ADD --checksum=sha256:{} {} /data/\n\
             ADD --checksum=sha256:{} --chmod=0755 {} /data/tool.tgz\n\
             RUN stat -c '%Y' /data/hello.txt > /mtime && ls /data > /listing\n",
            sha256_hex(&hello),
            server.url("/mirror/hello.txt"),
            sha256_hex(&tgz_bytes),
            server.url("/dl/a.tar.gz"),
        ),
    )
    .unwrap();
    let mirrored = build_ok(&f, &dir, &[]);
    assert!(mirrored.ran().is_empty(), "ran {:?}", mirrored.ran());
    assert_eq!(
        server.requests(),
        2,
        "a mirror of a known checksum is not asked"
    );
}

#[test]
fn add_url_with_a_wrong_checksum_fails_naming_the_url_and_both_digests() {
    require_root("add_url_with_a_wrong_checksum...");
    let f = Fixture::new();
    let server = FileServer::start();
    let body = b"the real bytes\n";
    server.set("/f.bin", body);
    let wrong = "0".repeat(64);
    let url = server.url("/f.bin");
    let dir = project(
        &f,
        "bad-sum",
        &format!("FROM busybox:latest\nADD --checksum=sha256:{wrong} {url} /f.bin\n"),
    );
    let err = build_err(&f, &dir, &[]);
    assert!(err.contains(&url), "{err}");
    assert!(err.contains(&format!("sha256:{wrong}")), "{err}");
    assert!(
        err.contains(&format!("sha256:{}", sha256_hex(body))),
        "{err}"
    );
    assert!(err.contains("checksum mismatch"), "{err}");

    // A missing file and a closed port are errors naming the URL too.
    let missing = server.url("/nope.txt");
    let dir = project(
        &f,
        "missing",
        &format!("FROM busybox:latest\nADD {missing} /x\n"),
    );
    let err = build_err(&f, &dir, &[]);
    assert!(err.contains(&missing) && err.contains("404"), "{err}");
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}/x.txt", l.local_addr().unwrap().port())
    };
    let dir = project(
        &f,
        "refused",
        &format!("FROM busybox:latest\nADD {closed} /x\n"),
    );
    let err = build_err(&f, &dir, &[]);
    assert!(
        err.contains(&closed) && err.contains("request failed"),
        "{err}"
    );
}

#[test]
fn add_url_without_checksum_is_requested_again_and_reruns_dependents_only_when_it_changed() {
    require_root("add_url_without_checksum...");
    let f = Fixture::new();
    let server = FileServer::start();
    server.set("/v.txt", b"one\n");
    let dir = project(
        &f,
        "no-sum",
        &format!(
            "FROM busybox:latest\nADD {} /v.txt\nRUN cat /v.txt > /seen\n",
            server.url("/v.txt")
        ),
    );
    let first = build_ok(&f, &dir, &[]);
    assert_eq!(steps_ran(&first).len(), 2, "ran {:?}", steps_ran(&first));
    assert_eq!(server.requests(), 1);

    // Same content: the URL is asked again (conditionally), everything after it is cached.
    let second = build_ok(&f, &dir, &[]);
    assert_eq!(
        server.requests(),
        2,
        "without --checksum the URL is requested again"
    );
    assert_eq!(
        server.not_modified.load(Ordering::SeqCst),
        1,
        "the second request is conditional (If-None-Match with the ETag)"
    );
    assert!(second.ran().is_empty(), "ran {:?}", second.ran());

    // Changed content: the ADD and the RUN after it run again.
    server.set("/v.txt", b"two\n");
    let out = f.path("out-changed");
    let o = format!("type=local,dest={}", out.display());
    let third = build_ok(&f, &dir, &["--output", &o]);
    assert_eq!(server.requests(), 3);
    assert_eq!(steps_ran(&third).len(), 2, "ran {:?}", steps_ran(&third));
    assert_eq!(std::fs::read_to_string(out.join("seen")).unwrap(), "two\n");
}

/// Builds an image with ENV, WORKDIR and a file in `f` and exports it as an OCI layout
/// directory named `base:v1`; returns the directory and the image's manifest digest.
fn export_layout(f: &Fixture) -> (std::path::PathBuf, String) {
    let dir = project(
        f,
        "base",
        "FROM busybox:latest\nENV GREETING=hello-from-layout\nWORKDIR /srv\n\
         RUN echo base > /srv/base.txt\n",
    );
    let tar = f.path("base.tar");
    let o = format!("type=oci,dest={},name=base:v1", tar.display());
    let b = build_ok(f, &dir, &["--output", &o]);
    let layout = f.path("layout");
    std::fs::create_dir_all(&layout).unwrap();
    assert!(Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(&layout)
        .status()
        .unwrap()
        .success());
    (layout, b.digest())
}

#[test]
fn from_an_oci_layout_build_context_inherits_its_files_and_config() {
    require_root("from_an_oci_layout...");
    let producer = Fixture::new();
    let (layout, _) = export_layout(&producer);
    // A fresh state dir: every layer must come from the layout.
    let f = Fixture::new();
    let dir = project(
        &f,
        "consumer",
        "FROM base\nRUN echo \"$GREETING\" > /greeting && pwd > /pwd && cat /srv/base.txt > /copied\n",
    );
    let ctx = format!("base=oci-layout://{}:v1", layout.display());
    let out = f.path("out");
    let o = format!("type=local,dest={}", out.display());
    build_ok(&f, &dir, &["--build-context", &ctx, "--output", &o]);
    let read = |p: &str| std::fs::read_to_string(out.join(p)).unwrap();
    assert_eq!(
        read("greeting"),
        "hello-from-layout\n",
        "ENV from the layout image"
    );
    assert_eq!(read("pwd"), "/srv\n", "WORKDIR from the layout image");
    assert_eq!(read("copied"), "base\n", "files from the layout image");

    // The image config carries the ENV too.
    let tar = f.path("consumer.tar");
    let o = format!("type=oci,dest={},name=consumer:1", tar.display());
    build_ok(&f, &dir, &["--build-context", &ctx, "--output", &o]);
    let inspect = Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("oci-archive:{}", tar.display()))
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let cfg: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let env: Vec<&str> = cfg["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(env.contains(&"GREETING=hello-from-layout"), "{env:?}");
    assert_eq!(cfg["config"]["WorkingDir"], "/srv");
}

#[test]
fn buildctl_oci_layout_store_is_used_by_digest_for_from_and_copy_from() {
    require_root("buildctl_oci_layout_store...");
    let f = Fixture::new();
    let (layout, digest) = export_layout(&f);
    assert!(digest.starts_with("sha256:"), "{digest}");
    let dir = project(
        &f,
        "consumer",
        "FROM alpine\nCOPY --from=assets /srv/base.txt /from-copy.txt\n\
         RUN echo \"$GREETING\" > /greeting\n",
    );
    let store = format!("store={}", layout.display());
    let alpine = format!("context:alpine=oci-layout://store@{digest}");
    let assets = format!("context:assets=oci-layout://store@{digest}");
    let out = f.path("out");
    let o = format!("type=local,dest={}", out.display());
    build_ok(
        &f,
        &dir,
        &[
            "--oci-layout",
            &store,
            "--opt",
            &alpine,
            "--opt",
            &assets,
            "--output",
            &o,
        ],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("from-copy.txt")).unwrap(),
        "base\n"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("greeting")).unwrap(),
        "hello-from-layout\n"
    );
    assert!(out.join("srv/base.txt").is_file());
}

#[test]
fn unknown_tag_or_missing_layout_is_an_error_naming_the_context_and_path() {
    require_root("unknown_tag_or_missing_layout...");
    let f = Fixture::new();
    let (layout, _) = export_layout(&f);
    let dir = project(&f, "consumer", "FROM base\nRUN true\n");
    let ctx = format!("base=oci-layout://{}:nope", layout.display());
    let err = build_err(&f, &dir, &["--build-context", &ctx]);
    assert!(err.contains("\"nope\""), "{err}");
    assert!(err.contains(&layout.display().to_string()), "{err}");
    assert!(
        err.contains("base:v1"),
        "the error lists the tags there are: {err}"
    );
    assert!(err.contains("--build-context base="), "{err}");

    let gone = f.path("no-such-layout");
    let ctx = format!("base=oci-layout://{}:v1", gone.display());
    let err = build_err(&f, &dir, &["--build-context", &ctx]);
    assert!(
        err.contains(&gone.display().to_string()) && err.contains("no such directory"),
        "{err}"
    );
}
