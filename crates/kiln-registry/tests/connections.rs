//! Slow and idle clients: a registry whose descriptors are nearly all held by clients that
//! never finish their request still serves a normal client, does not flood its log when
//! `accept` runs out of descriptors, and closes connections that overstay the header and
//! idle timeouts.
//!
//! The registry runs in a child process (this test binary re-executed) whose descriptor
//! limit is lowered to 128, so the slow clients can exhaust it without touching the test's.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use kiln_registry::Config;
use reqwest::StatusCode;

const CHILD_ENV: &str = "KILN_REGISTRY_TEST_CHILD_CONFIG";

/// Descriptor limit of the child registry.
const CHILD_NOFILE: u64 = 128;

/// Slow clients opened against it: more than its descriptor limit.
const SLOW_CLIENTS: usize = 200;

/// Not a test of its own: the body of the child process the other tests start. Lowers
/// its descriptor limit, serves the registry configured by the JSON file named in
/// `CHILD_ENV`, and writes its URL next to that file.
#[test]
fn child_registry_process() {
    let Some(config) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let config = PathBuf::from(config);
    let lim = libc::rlimit {
        rlim_cur: CHILD_NOFILE,
        rlim_max: CHILD_NOFILE,
    };
    // SAFETY: setrlimit reads the struct we pass and nothing else.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    kiln_registry::init_logging();
    let cfg = Config::from_file(&config).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reg = kiln_registry::Registry::builder()
            .config(cfg)
            .start()
            .await
            .unwrap();
        let addr_file = config.with_extension("addr");
        std::fs::write(addr_file.with_extension("tmp"), reg.url()).unwrap();
        std::fs::rename(addr_file.with_extension("tmp"), &addr_file).unwrap();
        reg.serve_until_signal().await.unwrap();
    });
    std::process::exit(0);
}

struct ChildRegistry {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for ChildRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ChildRegistry {
    fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts the child registry with `extra` settings (JSON object fields) on top of a
/// loopback address and a storage root in `dir`.
fn spawn_child(dir: &Path, extra: serde_json::Value) -> ChildRegistry {
    let mut cfg = serde_json::json!({
        "addr": "127.0.0.1:0",
        "root": dir.join("root"),
        "fsync": false,
    });
    if let serde_json::Value::Object(x) = extra {
        for (k, v) in x {
            cfg[k] = v;
        }
    }
    let config = dir.join("registry.json");
    std::fs::write(&config, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let addr_file = config.with_extension("addr");
    let log = dir.join("registry.log");
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_registry_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut c = ChildRegistry {
        child,
        url: String::new(),
        log,
    };
    for _ in 0..600 {
        if let Ok(url) = std::fs::read_to_string(&addr_file) {
            c.url = url;
            return c;
        }
        if let Ok(Some(status)) = c.child.try_wait() {
            panic!("child registry exited with {status}: {}", c.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("child registry did not start: {}", c.log_text());
}

/// Opens `n` connections that each send half a request head and then nothing.
fn open_slow_clients(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(addr).expect("connect (the kernel backlog takes it)");
            s.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nX-Slow: {i}").as_bytes())
                .unwrap();
            s
        })
        .collect()
}

/// A normal client's `GET /v2/`. The timeout only keeps a broken server from hanging the
/// test; it is far above what serving one request takes.
async fn normal_client_gets_base(url: &str) -> StatusCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    match c.get(format!("{url}/v2/")).send().await {
        Ok(r) => r.status(),
        Err(e) => panic!("the normal client was not served: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_past_the_descriptor_limit_do_not_lock_out_a_normal_client() {
    let dir = tempfile::tempdir().unwrap();
    // Default settings: the connection limit comes from the descriptor limit, and the
    // header timeout (30 s) is longer than the client's patience below needs to be, so what
    // gets the normal client in is eviction, not the slow clients timing out.
    let reg = spawn_child(dir.path(), serde_json::json!({}));
    let slow = open_slow_clients(&reg.addr(), SLOW_CLIENTS);
    assert_eq!(normal_client_gets_base(&reg.url).await, StatusCode::OK);
    // A second one too: the first was not a lucky slot.
    assert_eq!(normal_client_gets_base(&reg.url).await, StatusCode::OK);
    drop(slow);
    let log = reg.log_text();
    assert!(
        !log.contains("Too many open files"),
        "the connection limit keeps accept from running out of descriptors:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_backs_off_closes_idle_clients_and_logs_little() {
    let dir = tempfile::tempdir().unwrap();
    // A connection limit above the descriptor limit: accept itself fails with EMFILE.
    let reg = spawn_child(dir.path(), serde_json::json!({ "max_connections": 1000 }));
    let slow = open_slow_clients(&reg.addr(), SLOW_CLIENTS);
    assert_eq!(normal_client_gets_base(&reg.url).await, StatusCode::OK);
    drop(slow);
    let log = reg.log_text();
    let emfile_lines = log
        .lines()
        .filter(|l| l.contains("Too many open files"))
        .count();
    assert!(
        emfile_lines >= 1,
        "the descriptor limit was reached (else this test checks nothing):\n{log}"
    );
    assert!(
        emfile_lines <= 5,
        "{emfile_lines} log lines about EMFILE: the accept loop spins\n{log}"
    );
}

/// Reads until the server closes the connection; returns what it sent.
fn read_until_closed(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_overstaying_the_header_and_idle_timeouts_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let reg = spawn_child(
        dir.path(),
        serde_json::json!({ "header_read_timeout_secs": 1, "idle_timeout_secs": 2 }),
    );
    let addr = reg.addr();

    // Half a request head, then silence: closed, with no response.
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").unwrap();
    let got = read_until_closed(&mut slow).expect("the server closes the connection");
    assert!(
        !got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // A request served, then an idle keep-alive connection: closed after the response.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let got = read_until_closed(&mut idle).expect("the server closes the idle connection");
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // An upload whose body stalls: the request fails and the connection closes.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    let d = kiln_oci::Digest::sha256_of(&[7u8; 100]);
    stalled
        .write_all(
            format!(
                "POST /v2/a/blobs/uploads/?digest={d} HTTP/1.1\r\nHost: {addr}\r\n\
                 Content-Length: 100\r\n\r\n0123456789"
            )
            .as_bytes(),
        )
        .unwrap();
    let got = read_until_closed(&mut stalled).expect("the server gives up on the body");
    assert!(
        !got.starts_with(b"HTTP/1.1 201"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        staged_uploads(&dir.path().join("root")),
        0,
        "the stalled upload's staged data is discarded"
    );
    // The registry still serves.
    assert_eq!(normal_client_gets_base(&reg.url).await, StatusCode::OK);
}
