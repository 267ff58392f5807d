//! `RUN --mount=type=ssh`: a socket of the run's own that forwards every connection to the
//! build's SSH agent.
//!
//! The step never sees the agent's own socket: kiln listens on a fresh socket owned by the
//! mount's `uid`/`gid` with its `mode`, binds that socket onto the mount target, and copies
//! bytes both ways to the agent. The agent then always talks to kiln's own user (OpenSSH's
//! agent refuses peers of another uid), a step running as any `USER` can reach it when the
//! mount's owner and mode allow, and the forwarding stops when the run ends. Only the agent
//! protocol crosses: key material stays in the agent.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::prepare::ScratchDir;
use crate::spec::ExecError;

/// One run's forwarding socket; stops listening and removes the socket on drop.
pub(crate) struct AgentProxy {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    // Declared last: the directory goes once the listener thread has ended.
    _dir: ScratchDir,
}

impl AgentProxy {
    /// Listens on a new socket (owner `uid:gid`, permissions `mode`) that forwards each
    /// connection to the agent at `agent`.
    pub(crate) fn start(agent: &Path, uid: u32, gid: u32, mode: u32) -> Result<Self, ExecError> {
        let meta = std::fs::metadata(agent).map_err(|e| ExecError::Prepare {
            what: "ssh agent socket",
            path: agent.to_owned(),
            source: e,
        })?;
        {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ExecError::InvalidSpec(format!(
                    "ssh agent {} is not a socket",
                    agent.display()
                )));
            }
        }
        let dir = ScratchDir::new(&std::env::temp_dir())?;
        let socket = dir.path.join("agent.sock");
        let prep = |what, e| ExecError::Prepare {
            what,
            path: socket.clone(),
            source: e,
        };
        let listener =
            UnixListener::bind(&socket).map_err(|e| prep("listening on the ssh socket", e))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode & 0o777))
            .map_err(|e| prep("setting the ssh socket's mode", e))?;
        let dir_mode = std::fs::Permissions::from_mode(0o711);
        std::fs::set_permissions(&dir.path, dir_mode)
            .map_err(|e| prep("opening the ssh socket's directory", e))?;
        if let Err(e) = std::os::unix::fs::chown(&socket, Some(uid), Some(gid)) {
            // A rootless build may not own that id (EPERM) or may run in a user namespace
            // without it (EINVAL): the socket then stays kiln's, which is the container's root.
            if !matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) {
                return Err(prep("setting the ssh socket's owner", e));
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let agent = agent.to_owned();
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-ssh-proxy".into())
            .spawn(move || accept_loop(listener, agent, stop2))
            .map_err(|e| ExecError::Spawn {
                what: "starting the ssh agent forwarder",
                source: e,
            })?;
        Ok(AgentProxy {
            socket,
            stop,
            thread: Some(thread),
            _dir: dir,
        })
    }

    /// The forwarding socket on the host: what the backends bind onto the mount target.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for AgentProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept; the loop sees the flag and ends.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: UnixListener, agent: PathBuf, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(client) = conn else { continue };
        let Ok(upstream) = UnixStream::connect(&agent) else {
            // The agent is gone: the client sees the connection close.
            continue;
        };
        let _ = std::thread::Builder::new()
            .name("kiln-ssh-conn".into())
            .spawn(move || forward(client, upstream));
    }
}

/// Copies bytes both ways until both directions have ended.
fn forward(client: UnixStream, upstream: UnixStream) {
    let (Ok(client_r), Ok(upstream_w)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let up = std::thread::Builder::new()
        .name("kiln-ssh-conn".into())
        .spawn(move || copy(client_r, upstream_w));
    copy(upstream, client);
    if let Ok(t) = up {
        let _ = t.join();
    }
}

fn copy(mut from: UnixStream, mut to: UnixStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    // Agent replies can hold signatures, never keys; the buffer is cleared anyway.
    crate::spec::wipe(&mut buf);
    let _ = to.shutdown(std::net::Shutdown::Write);
    let _ = from.shutdown(std::net::Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_bytes_both_ways_and_removes_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let agent_path = dir.path().join("agent");
        let agent = UnixListener::bind(&agent_path).unwrap();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = agent.accept().unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            b.reverse();
            s.write_all(&b).unwrap();
        });
        let proxy = AgentProxy::start(&agent_path, 0, 0, 0o600).unwrap();
        let sock = proxy.socket().to_owned();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"olleh");
        echo.join().unwrap();
        drop(proxy);
        assert!(!sock.exists(), "the forwarding socket outlived the run");
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "x").unwrap();
        let e = AgentProxy::start(&f, 0, 0, 0o600).err().unwrap();
        assert!(e.to_string().contains("is not a socket"), "{e}");
    }
}
