//! The SSH agents a build's `RUN --mount=type=ssh` steps reach (`--ssh`).
//!
//! `--ssh ID` forwards the agent of `$SSH_AUTH_SOCK`, `--ssh ID=SOCKET` that agent, and
//! `--ssh ID=KEY[,KEY...]` an agent of the build's own: kiln starts OpenSSH's `ssh-agent` on a
//! private socket, hands it the keys through `ssh-add`'s stdin, and stops it when the build
//! ends. kiln holds a key's bytes only while checking it has no passphrase and passing it on
//! (then wipes them); the agent holds the keys, and a step only ever talks to the agent through
//! the forwarding socket kiln-exec binds into it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_graph::options::SshSpec;

/// Why an `--ssh` agent could not be set up; names the id and says what to do.
#[derive(Debug, thiserror::Error)]
#[error("--ssh {id}: {message}")]
pub struct SshError {
    /// The `--ssh` id.
    pub id: String,
    /// What went wrong.
    pub message: String,
}

/// An agent one `--ssh` id reaches; an agent kiln started stops when the last handle drops.
#[derive(Debug)]
pub struct SshAgent {
    socket: PathBuf,
    own: Option<OwnAgent>,
}

#[derive(Debug)]
struct OwnAgent {
    /// ssh-agent's command: `cat` on a pipe only kiln holds (see [`start_own_agent`]).
    child: Child,
    /// The write end of that pipe.
    lifeline: Option<std::process::ChildStdin>,
    /// The agent process itself.
    agent_pid: libc::pid_t,
    dir: PathBuf,
}

impl SshAgent {
    /// The agent's socket on the host.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True when kiln started this agent to hold key files.
    pub fn is_own(&self) -> bool {
        self.own.is_some()
    }
}

impl Drop for SshAgent {
    fn drop(&mut self) {
        if let Some(own) = &mut self.own {
            if own.agent_pid > 0 {
                // SAFETY: signals the agent this build started; it removes its socket and exits.
                unsafe { libc::kill(own.agent_pid, libc::SIGTERM) };
            }
            drop(own.lifeline.take());
            let _ = own.child.kill();
            let _ = own.child.wait();
            let _ = std::fs::remove_dir_all(&own.dir);
        }
    }
}

/// Sets up the agent of every `--ssh`, by id. Blocking (starts `ssh-agent` for key files).
pub fn start_agents(
    specs: &[SshSpec],
) -> Result<std::collections::BTreeMap<String, Arc<SshAgent>>, SshError> {
    let mut out = std::collections::BTreeMap::new();
    for s in specs {
        out.insert(s.id.clone(), Arc::new(start_agent(s)?));
    }
    Ok(out)
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

fn start_agent(spec: &SshSpec) -> Result<SshAgent, SshError> {
    let fail = |message: String| SshError {
        id: spec.id.clone(),
        message,
    };
    if spec.paths.is_empty() {
        let Some(sock) = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()) else {
            return Err(fail(
                "SSH_AUTH_SOCK is not set: start an agent (eval $(ssh-agent); ssh-add KEY), \
                 or give the key file: --ssh ID=KEYFILE"
                    .into(),
            ));
        };
        let sock = PathBuf::from(sock);
        if !is_socket(&sock) {
            return Err(fail(format!(
                "SSH_AUTH_SOCK={} is not a socket: is the agent running?",
                sock.display()
            )));
        }
        return Ok(SshAgent {
            socket: sock,
            own: None,
        });
    }
    if spec.paths.iter().any(|p| is_socket(p)) {
        if spec.paths.len() > 1 {
            return Err(fail(
                "an agent socket must be the only path: give either one SOCKET or key files".into(),
            ));
        }
        return Ok(SshAgent {
            socket: spec.paths[0].clone(),
            own: None,
        });
    }
    for p in &spec.paths {
        match std::fs::metadata(p) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(fail(format!(
                    "{} is neither an agent socket nor a key file",
                    p.display()
                )))
            }
            Err(e) => return Err(fail(format!("{}: {e}", p.display()))),
        }
    }
    let keys = spec
        .paths
        .iter()
        .map(|p| read_key(p).map(|k| (p.as_path(), k)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(&fail)?;
    start_own_agent(&keys).map_err(fail)
}

/// A private key file's bytes, wiped from memory when dropped.
struct KeyBytes(Vec<u8>);

impl Drop for KeyBytes {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: a valid, exclusive reference; volatile so the write is not optimised away.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Reads a private key and refuses one `ssh-add` could not load without a prompt: not a
/// private key, or protected by a passphrase (kiln has no terminal to ask on mid-build).
fn read_key(key: &Path) -> Result<KeyBytes, String> {
    let bytes = KeyBytes(std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?);
    let text = String::from_utf8_lossy(&bytes.0);
    let encrypted = if text.contains("-----BEGIN OPENSSH PRIVATE KEY-----") {
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .flat_map(|l| l.trim().chars())
            .collect();
        let raw = KeyBytes(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body.as_bytes())
                .map_err(|_| format!("{} is not a valid OpenSSH private key", key.display()))?,
        );
        openssh_cipher(&raw.0)
            .ok_or_else(|| format!("{} is not a valid OpenSSH private key", key.display()))?
            != b"none"
    } else if text.contains("PRIVATE KEY-----") {
        text.contains("ENCRYPTED")
    } else {
        return Err(format!(
            "{} is not a private key file (expected an OpenSSH or PEM private key)",
            key.display()
        ));
    };
    if encrypted {
        return Err(format!(
            "{} is protected by a passphrase; kiln cannot prompt for it during a build: \
             load it into your agent (ssh-add {}) and pass --ssh ID (the agent of \
             $SSH_AUTH_SOCK) instead",
            key.display(),
            key.display()
        ));
    }
    Ok(bytes)
}

/// The cipher name of an `openssh-key-v1` key (`none` when it has no passphrase).
fn openssh_cipher(raw: &[u8]) -> Option<&[u8]> {
    let rest = raw.strip_prefix(b"openssh-key-v1\0")?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    rest.get(4..4 + len)
}

static NEXT_AGENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn start_own_agent(keys: &[(&Path, KeyBytes)]) -> Result<SshAgent, String> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = loop {
        let n = NEXT_AGENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("kiln-ssh-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => break d,
            // Left by a killed process that had this pid: never reused.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("creating {}: {e}", d.display())),
        }
    };
    let socket = dir.join("agent.sock");
    // ssh-agent's command mode: the agent forks and watches the process that runs the
    // command, here `cat` on a pipe only kiln writes to. When kiln ends without stopping the
    // agent (killed), the pipe closes, `cat` exits, and the agent exits at its next check
    // (every 10 s) instead of holding the keys for ever. The command prints the agent's pid.
    let child = Command::new("ssh-agent")
        .arg("-a")
        .arg(&socket)
        .args(["sh", "-c", "echo \"$SSH_AGENT_PID\"; exec cat >/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!(
                "starting ssh-agent for the key files (install openssh-client): {e}"
            ));
        }
    };
    let lifeline = child.stdin.take();
    let stdout = child.stdout.take();
    // From here the agent is stopped and its directory removed on every error path.
    let mut agent = SshAgent {
        socket,
        own: Some(OwnAgent {
            child,
            lifeline,
            agent_pid: 0,
            dir,
        }),
    };
    let mut line = String::new();
    if let Some(out) = stdout {
        use std::io::BufRead;
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    let pid: libc::pid_t = line
        .trim()
        .parse()
        .map_err(|_| "ssh-agent did not start (no agent pid)".to_string())?;
    if let Some(own) = &mut agent.own {
        own.agent_pid = pid;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_socket(&agent.socket) {
        if let Some(own) = &mut agent.own {
            if let Ok(Some(st)) = own.child.try_wait() {
                return Err(format!("ssh-agent exited at start ({st})"));
            }
        }
        if Instant::now() > deadline {
            return Err("ssh-agent did not create its socket within 10s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (path, key) in keys {
        // The key goes in on stdin: ssh-add then skips OpenSSH's check that the file is
        // private to its owner (BuildKit reads key files whatever their mode, and CI often
        // writes them with the default umask).
        let mut add = Command::new("ssh-add")
            .args(["-q", "-"])
            .env("SSH_AUTH_SOCK", &agent.socket)
            .env("SSH_ASKPASS_REQUIRE", "never")
            .env_remove("DISPLAY")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running ssh-add (install openssh-client): {e}"))?;
        if let Some(mut stdin) = add.stdin.take() {
            use std::io::Write;
            // A failed write shows as ssh-add's own error below.
            let _ = stdin.write_all(&key.0);
        }
        let out = add
            .wait_with_output()
            .map_err(|e| format!("running ssh-add: {e}"))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "ssh-add could not load {}: {}",
                path.display(),
                why.lines().last().unwrap_or_default().trim()
            ));
        }
    }
    Ok(agent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(tool: &str) -> bool {
        Command::new(tool)
            .arg("-?")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }

    fn keygen(path: &Path, passphrase: &str) {
        let st = Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-C",
                "kiln-test",
                "-N",
                passphrase,
                "-f",
            ])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success());
    }

    #[test]
    fn key_files_get_an_agent_of_the_build_that_stops_with_it() {
        assert!(has("ssh-agent"), "install openssh-client (.ci/install)");
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id");
        keygen(&key, "");
        let spec = SshSpec::parse("--ssh", &format!("default={}", key.display())).unwrap();
        let agents = start_agents(&[spec]).unwrap();
        let agent = agents["default"].clone();
        assert!(agent.is_own());
        let list = Command::new("ssh-add")
            .arg("-L")
            .env("SSH_AUTH_SOCK", agent.socket())
            .output()
            .unwrap();
        let public = std::fs::read_to_string(dir.path().join("id.pub")).unwrap();
        let listed = String::from_utf8_lossy(&list.stdout);
        assert!(
            listed.contains(public.split_whitespace().nth(1).unwrap()),
            "{listed}"
        );
        let socket = agent.socket().to_owned();
        let pid = agent.own.as_ref().unwrap().agent_pid;
        assert!(alive(pid));
        drop(agents);
        drop(agent);
        assert!(!socket.exists(), "the agent's socket outlived the build");
        wait_gone(pid);
    }

    fn alive(pid: libc::pid_t) -> bool {
        // The agent is not the test's child: once it exits, something else reaps it.
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|s| !s.contains("State:\tZ"))
    }

    fn wait_gone(pid: libc::pid_t) {
        // Generous: ssh-agent checks for its watched process every 10 s.
        for _ in 0..600 {
            if !alive(pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("ssh-agent {pid} is still running");
    }

    #[test]
    fn the_agent_exits_by_itself_when_kiln_goes_without_stopping_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id");
        keygen(&key, "");
        let agents = start_agents(&[SshSpec {
            id: "default".into(),
            paths: vec![key],
        }])
        .unwrap();
        let agent = agents["default"].clone();
        drop(agents);
        let mut agent = Arc::try_unwrap(agent).unwrap();
        let mut own = agent.own.take().unwrap();
        // What a killed kiln leaves: the pipe closes, nobody signals the agent.
        drop(own.lifeline.take());
        let _ = own.child.wait();
        wait_gone(own.agent_pid);
        let _ = std::fs::remove_dir_all(&own.dir);
    }

    #[test]
    fn a_key_readable_by_others_is_loaded_as_buildkit_loads_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id");
        keygen(&key, "");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let agents = start_agents(&[SshSpec {
            id: "ci".into(),
            paths: vec![key],
        }])
        .unwrap();
        let list = Command::new("ssh-add")
            .arg("-l")
            .env("SSH_AUTH_SOCK", agents["ci"].socket())
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&list.stdout).contains("kiln-test"),
            "{list:?}"
        );
    }

    #[test]
    fn a_passphrase_protected_key_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id");
        keygen(&key, "correct horse");
        let spec = SshSpec::parse("--ssh", &format!("deploy={}", key.display())).unwrap();
        let e = start_agents(&[spec]).unwrap_err();
        let m = e.to_string();
        assert!(m.starts_with("--ssh deploy: "), "{m}");
        assert!(m.contains("protected by a passphrase"), "{m}");
        assert!(m.contains("ssh-add"), "{m}");
    }

    #[test]
    fn missing_and_wrong_paths_name_the_id_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = start_agents(&[SshSpec {
            id: "a".into(),
            paths: vec![missing.clone()],
        }])
        .unwrap_err();
        assert!(e.to_string().starts_with("--ssh a: "), "{e}");
        assert!(e.to_string().contains("nope"), "{e}");
        let not_key = dir.path().join("notes.txt");
        std::fs::write(&not_key, "hello").unwrap();
        let e = start_agents(&[SshSpec {
            id: "b".into(),
            paths: vec![not_key],
        }])
        .unwrap_err();
        assert!(e.to_string().contains("is not a private key file"), "{e}");
        let e = start_agents(&[SshSpec {
            id: "c".into(),
            paths: vec![dir.path().to_owned()],
        }])
        .unwrap_err();
        assert!(e.to_string().contains("neither"), "{e}");
    }
}
