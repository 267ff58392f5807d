//! A real S3-compatible object store for tests: a Garage cluster on 127.0.0.1 ports.
//!
//! [`GarageCluster::start`] writes one `garage.toml` per node (its own metadata and data
//! dirs, RPC and S3 ports, one shared `rpc_secret`, `replication_factor = 3` when there are
//! three nodes or more), starts `garage server` for each, connects the nodes to the first one
//! (`garage node connect`), gives each a role in zone `dc1` (`garage layout assign`), applies
//! layout version 1 and creates one access key (`garage key create`). Buckets come from
//! [`GarageCluster::create_bucket`], which lets that key read, write and own them.
//!
//! The binary is `$KILN_GARAGE_BIN` when set, else `garage` on `PATH` (`.ci/install` builds
//! it with `cargo install --locked garage`). Dropping the cluster kills every node and removes
//! its directory.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The S3 region every test cluster answers to (`s3_api.s3_region`).
pub const GARAGE_REGION: &str = "garage";

/// How long the cluster may take to come up (nodes answering, layout applied, quorum reached).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// How many times [`GarageCluster::start`] builds a whole new cluster (new ports, new files)
/// when one does not come up: a port taken between choosing and binding, or a peer connection
/// that Garage's reconnect backoff leaves down, should not fail a test.
const START_ATTEMPTS: usize = 3;

/// How long one attempt waits for a node that is not connected before asking again with
/// `garage node connect` (Garage's own reconnect backs off to tens of seconds).
const RECONNECT_EVERY: Duration = Duration::from_secs(4);

/// One node of a [`GarageCluster`]: its config file, ports and (while it runs) its process.
#[derive(Debug)]
struct Node {
    config: PathBuf,
    log: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    child: Option<Child>,
}

/// A running Garage cluster of real `garage server` processes on 127.0.0.1; [`Drop`] stops
/// them all and removes their files.
#[derive(Debug)]
pub struct GarageCluster {
    binary: PathBuf,
    dir: PathBuf,
    nodes: Vec<Node>,
    /// Each node's full id (`<hex>@127.0.0.1:<rpc port>`), for reconnecting.
    ids: Vec<String>,
    key_id: String,
    secret: String,
}

/// The garage binary: `$KILN_GARAGE_BIN` when set, else `garage` on `PATH`.
pub fn garage_binary() -> Result<PathBuf, String> {
    binary_from(std::env::var_os("KILN_GARAGE_BIN"))
}

fn binary_from(var: Option<std::ffi::OsString>) -> Result<PathBuf, String> {
    if let Some(path) = var {
        let path = PathBuf::from(path);
        return match crate::find_program(&path.to_string_lossy()) {
            Some(found) => Ok(found),
            None => Err(format!(
                "KILN_GARAGE_BIN={} is not an executable file",
                path.display()
            )),
        };
    }
    crate::find_program("garage").ok_or_else(|| {
        format!(
            "garage (the S3-compatible object store the s3 tests run against) is not on PATH \
             and KILN_GARAGE_BIN is not set: {}",
            crate::INSTALL_HINT
        )
    })
}

impl GarageCluster {
    /// Starts `nodes` Garage nodes (3 for replication factor 3; fewer nodes get a factor equal
    /// to their count) on free 127.0.0.1 ports, joins them into one cluster with an applied
    /// layout, and creates the access key [`GarageCluster::key`] returns. Fails with what went
    /// wrong and the last lines of the failing node's log.
    ///
    /// A cluster that does not come up within [`START_TIMEOUT`] is stopped and a new one
    /// (fresh ports and files) is tried, up to [`START_ATTEMPTS`] times; the error then holds
    /// every attempt's reason.
    pub fn start(nodes: usize) -> Result<GarageCluster, String> {
        if nodes == 0 {
            return Err("a Garage cluster needs at least one node".into());
        }
        let binary = garage_binary()?;
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::start_once(&binary, nodes) {
                Ok(cluster) => return Ok(cluster),
                Err(e) => {
                    // Said at once: a later attempt that succeeds hides it from the test's error.
                    eprintln!("Garage cluster: attempt {attempt} of {START_ATTEMPTS} failed: {e}");
                    failures.push(format!("attempt {attempt} of {START_ATTEMPTS}: {e}"));
                }
            }
        }
        Err(failures.join("\n\n"))
    }

    fn start_once(binary: &Path, nodes: usize) -> Result<GarageCluster, String> {
        let dir = unique_dir()?;
        let mut cluster = GarageCluster {
            binary: binary.to_path_buf(),
            dir,
            nodes: Vec::with_capacity(nodes),
            ids: Vec::with_capacity(nodes),
            key_id: String::new(),
            secret: String::new(),
        };
        // On any error below, dropping `cluster` stops what was started.
        let rpc_secret = random_hex(32)?;
        let replication = nodes.min(3);
        let ports = free_ports(2 * nodes)?;
        for i in 0..nodes {
            let node_dir = cluster.dir.join(format!("node{i}"));
            for sub in ["meta", "data"] {
                std::fs::create_dir_all(node_dir.join(sub))
                    .map_err(|e| format!("creating {}: {e}", node_dir.join(sub).display()))?;
            }
            let (rpc_port, s3_port) = (ports[2 * i], ports[2 * i + 1]);
            let config = node_dir.join("garage.toml");
            let text = node_config(&node_dir, replication, rpc_port, s3_port, &rpc_secret);
            std::fs::write(&config, text)
                .map_err(|e| format!("writing {}: {e}", config.display()))?;
            cluster.nodes.push(Node {
                config,
                log: node_dir.join("garage.log"),
                rpc_port,
                s3_port,
                child: None,
            });
        }
        for i in 0..nodes {
            cluster.spawn_node(i)?;
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let mut ids = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let out = cluster.retry(i, &["node", "id", "-q"], deadline)?;
            let full = out
                .lines()
                .map(str::trim)
                .find(|l| l.contains('@'))
                .ok_or_else(|| format!("`garage node id -q` on node {i} printed no id: {out}"))?
                .to_string();
            ids.push(full);
        }
        for full in ids.iter().skip(1) {
            cluster.retry(0, &["node", "connect", full], deadline)?;
        }
        cluster.ids = ids.clone();
        for full in &ids {
            let id = full.split('@').next().unwrap_or(full);
            cluster.retry(
                0,
                &["layout", "assign", "-z", "dc1", "-c", "1G", id],
                deadline,
            )?;
        }
        cluster.retry(0, &["layout", "apply", "--version", "1"], deadline)?;
        // Every node must see every other before a request through it reaches its quorum.
        cluster.wait_connected(deadline)?;
        // The key table needs a write quorum: retrying covers nodes still learning the layout.
        let out = cluster.retry(0, &["key", "create", "kiln-test"], deadline)?;
        let (key_id, secret) = parse_key(&out)
            .ok_or_else(|| format!("`garage key create` printed no key id and secret: {out}"))?;
        cluster.key_id = key_id;
        cluster.secret = secret;
        Ok(cluster)
    }

    /// The S3 endpoint of node 0, e.g. `http://127.0.0.1:39211` (path-style requests).
    pub fn endpoint(&self) -> String {
        self.endpoint_of(0)
    }

    /// The S3 endpoint of node `i`: every node serves the whole cluster's buckets.
    pub fn endpoint_of(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// The S3 region the cluster answers to ([`GARAGE_REGION`]).
    pub fn region(&self) -> &str {
        GARAGE_REGION
    }

    /// The access key created at start: (key id, secret key). It owns every bucket made by
    /// [`GarageCluster::create_bucket`].
    pub fn key(&self) -> (String, String) {
        (self.key_id.clone(), self.secret.clone())
    }

    /// How many nodes the cluster has (running or stopped).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Creates bucket `name` and lets the cluster's key read, write and own it.
    pub fn create_bucket(&self, name: &str) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let admin = self.admin_node()?;
        self.retry(admin, &["bucket", "create", name], deadline)?;
        self.retry(
            admin,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                name,
                "--key",
                "kiln-test",
            ],
            deadline,
        )?;
        Ok(())
    }

    /// Stops node `i` (SIGKILL, as a crashed machine) and waits for its process to end; its
    /// files stay, so [`GarageCluster::restart_node`] brings it back with its data. Stopping
    /// a stopped node does nothing.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again after [`GarageCluster::stop_node`], on the same ports and files.
    pub fn restart_node(&mut self, i: usize) -> Result<(), String> {
        if self.nodes[i].child.is_none() {
            self.spawn_node(i)?;
            let deadline = Instant::now() + START_TIMEOUT;
            self.retry(i, &["node", "id", "-q"], deadline)?;
            self.wait_connected(deadline)?;
        }
        Ok(())
    }

    /// Waits until every running node's `garage status` shows every running node connected
    /// (a connected node's row ends in its version; one not yet reached, in `N/A` or `?`).
    /// While one is missing, every [`RECONNECT_EVERY`] the waiting node is told again to
    /// connect to every other running node; a node whose process ended fails at once.
    fn wait_connected(&self, deadline: Instant) -> Result<(), String> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].child.is_some())
            .collect();
        for &i in &running {
            let mut last_connect = Instant::now();
            loop {
                let status = self.cli(i, &["status"]);
                let connected = status.as_deref().map(connected_rows).unwrap_or(0);
                if connected >= running.len() {
                    break;
                }
                if let Some(dead) = running.iter().find(|&&n| !self.alive(n)) {
                    return Err(format!(
                        "node {dead} exited while the cluster was connecting; {}",
                        self.log_tail(*dead)
                    ));
                }
                if Instant::now() > deadline {
                    let mut tails = String::new();
                    for &n in &running {
                        let _ = write!(tails, "\n{}", self.log_tail(n));
                    }
                    return Err(format!(
                        "node {i} sees {connected} of {} nodes connected: {}{tails}",
                        running.len(),
                        status.unwrap_or_else(|e| e),
                    ));
                }
                if last_connect.elapsed() >= RECONNECT_EVERY {
                    eprintln!(
                        "Garage cluster: node {i} sees {connected} of {} nodes; connecting again",
                        running.len()
                    );
                    for &n in running.iter().filter(|&&n| n != i) {
                        if let Some(full) = self.ids.get(n) {
                            let _ = self.cli(i, &["node", "connect", full]);
                        }
                    }
                    last_connect = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        Ok(())
    }

    /// Whether node `i` has a process that has not exited.
    fn alive(&self, i: usize) -> bool {
        self.nodes[i].child.as_ref().is_some_and(|child| {
            let pid = child.id() as libc::pid_t;
            // SAFETY: kill with signal 0 only checks that the process exists (a child that
            // exited stays a zombie until waited for, so its state is checked too).
            let exists = unsafe { libc::kill(pid, 0) == 0 };
            exists && !is_zombie(pid)
        })
    }

    /// Whether node `i`'s process is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The log file node `i` writes (stdout and stderr of `garage server`).
    pub fn log_path(&self, i: usize) -> &Path {
        &self.nodes[i].log
    }

    /// Runs the garage CLI against node `i` (`garage -c NODE_CONFIG ARGS...`) and returns its
    /// stdout, or an error with its stderr.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.nodes[i].config)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {}: {e}", self.binary.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`garage {}` on node {i} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        }
    }

    fn admin_node(&self) -> Result<usize, String> {
        self.nodes
            .iter()
            .position(|n| n.child.is_some())
            .ok_or_else(|| "every Garage node is stopped".to_string())
    }

    fn spawn_node(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| format!("opening {}: {e}", node.log.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("opening {}: {e}", node.log.display()))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {} server: {e}", self.binary.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Runs a CLI command on node `i` until it succeeds or `deadline` passes (nodes take a
    /// moment to listen, to learn about each other and to reach quorum).
    fn retry(&self, i: usize, args: &[&str], deadline: Instant) -> Result<String, String> {
        loop {
            let err = match self.cli(i, args) {
                Ok(out) => return Ok(out),
                Err(err) => err,
            };
            if self.nodes[i].child.is_some() && !self.alive(i) {
                // A node that exited will not answer: say so with its log, without waiting.
                return Err(format!("{err}\nnode {i} exited; {}", self.log_tail(i)));
            }
            if Instant::now() > deadline {
                return Err(format!("{err}\n{}", self.log_tail(i)));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!(
            "last lines of {} (rpc port {}):\n{tail}",
            self.nodes[i].log.display(),
            self.nodes[i].rpc_port
        )
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn node_config(
    node_dir: &Path,
    replication: usize,
    rpc_port: u16,
    s3_port: u16,
    rpc_secret: &str,
) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "metadata_dir = \"{}\"",
        node_dir.join("meta").display()
    );
    let _ = writeln!(text, "data_dir = \"{}\"", node_dir.join("data").display());
    let _ = writeln!(text, "db_engine = \"lmdb\"");
    // The map is sparse, but keep it small: tests store little.
    let _ = writeln!(text, "lmdb_map_size = \"1G\"");
    let _ = writeln!(text, "replication_factor = {replication}");
    let _ = writeln!(text, "consistency_mode = \"consistent\"");
    let _ = writeln!(text, "rpc_bind_addr = \"127.0.0.1:{rpc_port}\"");
    let _ = writeln!(text, "rpc_public_addr = \"127.0.0.1:{rpc_port}\"");
    let _ = writeln!(text, "rpc_secret = \"{rpc_secret}\"");
    let _ = writeln!(text);
    let _ = writeln!(text, "[s3_api]");
    let _ = writeln!(text, "s3_region = \"{GARAGE_REGION}\"");
    let _ = writeln!(text, "api_bind_addr = \"127.0.0.1:{s3_port}\"");
    let _ = writeln!(text, "root_domain = \".s3.garage.localhost\"");
    text
}

/// How many rows of `garage status`'s healthy nodes show a connected node: an address on
/// 127.0.0.1 and a version at the end (not `N/A` or `?`).
fn connected_rows(status: &str) -> usize {
    let healthy = status.split("==== FAILED NODES").next().unwrap_or_default();
    healthy
        .lines()
        .filter(|l| l.contains("127.0.0.1:"))
        .filter(|l| {
            l.split_whitespace()
                .last()
                .is_some_and(|t| t != "N/A" && t != "?")
        })
        .count()
}

/// The key id (`GK` + hex) and the 64-hex-digit secret in `garage key create`'s output.
fn parse_key(out: &str) -> Option<(String, String)> {
    let tokens: Vec<&str> = out
        .split(|c: char| c.is_whitespace() || c == ':')
        .filter(|t| !t.is_empty())
        .collect();
    let id = tokens.iter().find(|t| {
        t.len() > 2 && t.starts_with("GK") && t[2..].chars().all(|c| c.is_ascii_hexdigit())
    })?;
    let secret = tokens
        .iter()
        .find(|t| t.len() == 64 && t.chars().all(|c| c.is_ascii_hexdigit()))?;
    Some((id.to_string(), secret.to_string()))
}

/// `n` distinct free ports on 127.0.0.1: every listener is held until all are chosen, so the
/// kernel cannot hand out one port twice, and ports handed out earlier in this process are
/// skipped (a node stopped by a test may still own its ports).
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
        let port = listener
            .local_addr()
            .map(|a| a.port())
            .map_err(|e| format!("finding a free port: {e}"))?;
        if !given.contains(&port) {
            ports.push(port);
            given.push(port);
        }
        held.push(listener);
    }
    Ok(ports)
}

/// Whether process `pid` has exited and waits to be reaped (state `Z` in `/proc/PID/stat`).
fn is_zombie(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = stat.rsplit_once(')')?.1;
            after.split_whitespace().next().map(|state| state == "Z")
        })
        .unwrap_or(true)
}

fn random_hex(bytes: usize) -> Result<String, String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(buf.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

fn unique_dir() -> Result<PathBuf, String> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "kiln-garage-{}-{call}-{}",
        std::process::id(),
        random_hex(4)?
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_key_create_output() {
        let out =
            "==== ACCESS KEY INFORMATION ====\nKey ID:              GK3515373e4c851ebaad366558\n\
                   Key name:            kiln-test\nSecret key:          \
                   7d37d093435a41f2aab8f13c19ba067d9776c90215f56614adad6ece597dbb34\n";
        let (id, secret) = parse_key(out).expect("parsed");
        assert_eq!(id, "GK3515373e4c851ebaad366558");
        assert_eq!(
            secret,
            "7d37d093435a41f2aab8f13c19ba067d9776c90215f56614adad6ece597dbb34"
        );
        assert!(parse_key("Key name: x\n").is_none());
    }

    #[test]
    fn counts_connected_nodes_in_status() {
        let status = "==== HEALTHY NODES ====\n\
            ID                Hostname  Address         Tags  Zone  Capacity   DataAvail  ResyncQueue  Version\n\
            92eaf32d74df8aee  vm        127.0.0.1:4911  []    dc1   953.7 MiB  20.6 GiB   0            cargo:2.5.0\n\
            9e6080d6850d81f6  ?         127.0.0.1:4901  []    dc1   953.7 MiB  ?          N/A          \n";
        assert_eq!(connected_rows(status), 1);
        let failed = format!("{status}==== FAILED NODES ====\nx  127.0.0.1:1  cargo:2.5.0\n");
        assert_eq!(connected_rows(&failed), 1);
    }

    #[test]
    fn free_ports_are_distinct_within_and_across_calls() {
        let mut all = free_ports(40).unwrap();
        all.extend(free_ports(40).unwrap());
        let mut unique = all.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), all.len(), "{all:?}");
    }

    #[test]
    fn an_exited_child_is_a_zombie_until_reaped_and_a_running_one_is_not() {
        let mut running = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(!is_zombie(running.id() as libc::pid_t));
        let mut done = Command::new("true").spawn().unwrap();
        let pid = done.id() as libc::pid_t;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_zombie(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(is_zombie(pid));
        done.wait().unwrap();
        running.kill().unwrap();
        running.wait().unwrap();
    }

    #[test]
    fn a_missing_binary_is_named() {
        let err = binary_from(Some("/nonexistent/garage".into())).unwrap_err();
        assert!(err.contains("KILN_GARAGE_BIN=/nonexistent/garage"), "{err}");
    }

    #[test]
    fn config_names_ports_and_replication() {
        let text = node_config(Path::new("/n"), 3, 4001, 4002, "ab");
        assert!(text.contains("replication_factor = 3"));
        assert!(text.contains("rpc_bind_addr = \"127.0.0.1:4001\""));
        assert!(text.contains("api_bind_addr = \"127.0.0.1:4002\""));
        assert!(text.contains("metadata_dir = \"/n/meta\""));
    }
}
