//! The default network of a step ([`crate::Network::Isolated`]): a network namespace of its
//! own whose only way out is slirp4netns, a user-mode TCP/IP stack that opens ordinary
//! sockets on the host for the connections made inside.
//!
//! Why slirp4netns and not a veth bridge with NAT: it needs no host-side interface, route,
//! sysctl or iptables rule, so nothing is left behind when kiln is killed, and it cannot
//! collide with the firewall of other jobs on the runner. `--disable-host-loopback` refuses
//! connections to the host's 127.0.0.0/8 through the gateway address 10.0.2.2, and the
//! namespace's own `127.0.0.1` is its own loopback, so services a runner keeps on loopback
//! are out of reach. DNS goes to slirp4netns's forwarder at 10.0.2.3, which asks the host's
//! resolvers (a host resolver on 127.0.0.53 would be unreachable from inside).
//!
//! Setting a namespace up (create it, start slirp4netns, wait until the tap device is
//! configured) takes tens of milliseconds, so a [`NetworkPool`] keeps namespaces between
//! runs: a step pays one `setns(2)` in its container's init. Nothing is written to the file
//! system: a namespace is held by a file descriptor, and slirp4netns is told to exit when a
//! pipe whose write end only kiln holds is closed (`--exit-fd`), which the kernel does when
//! kiln exits or is killed.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use crate::spec::ExecError;

/// The program that gives an isolated namespace its outbound access.
pub(crate) const SLIRP4NETNS: &str = "slirp4netns";

/// The address of slirp4netns's DNS forwarder inside the namespace.
pub(crate) const DNS_FORWARDER: &str = "10.0.2.3";

/// Namespaces kept ready between runs; more than this many idle ones are closed.
const MAX_IDLE: usize = 8;

/// One network namespace with slirp4netns attached. Dropping it stops slirp4netns and, once
/// the last fd is gone, the kernel frees the namespace.
pub(crate) struct IsolatedNetwork {
    netns: OwnedFd,
    slirp: Child,
    /// Closing it tells slirp4netns to exit (`--exit-fd`).
    exit_w: Option<OwnedFd>,
}

impl IsolatedNetwork {
    /// Creates a namespace with `lo` up and starts slirp4netns in it; returns once the tap
    /// device is configured (slirp4netns writes to `--ready-fd`).
    pub(crate) fn create() -> Result<Self, ExecError> {
        let netns = new_netns()?;
        prohibit_host_routes(&netns)?;
        let (ready_r, ready_w) = pipe()?;
        let (exit_r, exit_w) = pipe()?;
        let log = anonymous_file()?;
        let log_w = log
            .try_clone()
            .map_err(|e| spawn_err("duplicating a fd", e))?;
        let ns_path = format!("/proc/self/fd/{}", netns.as_raw_fd());
        let pass = [netns.as_raw_fd(), ready_w.as_raw_fd(), exit_r.as_raw_fd()];
        let mut cmd = Command::new(SLIRP4NETNS);
        cmd.args([
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--enable-sandbox",
            "--enable-seccomp",
            "--netns-type=path",
        ])
        .arg(format!("--ready-fd={}", ready_w.as_raw_fd()))
        .arg(format!("--exit-fd={}", exit_r.as_raw_fd()))
        .arg(&ns_path)
        .arg("tap0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_w))
        // Its own process group: a terminal's Ctrl-C is for kiln, which stops it itself.
        .process_group(0);
        // SAFETY: only fcntl (async-signal-safe) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for fd in pass {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let slirp = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ExecError::Network(format!(
                    "{SLIRP4NETNS} is not installed; RUN steps need it for their default \
                     network (apt-get install slirp4netns), or build with --network=none, or \
                     --network=host --allow network.host"
                ))
            } else {
                spawn_err("starting slirp4netns", e)
            }
        })?;
        drop((ready_w, exit_r));
        let mut net = IsolatedNetwork {
            netns,
            slirp,
            exit_w: Some(exit_w),
        };
        let mut byte = [0u8; 1];
        let ready = File::from(ready_r).read(&mut byte);
        if !matches!(ready, Ok(1)) {
            // slirp4netns exited (closing the ready pipe) before it was ready.
            let status = net.slirp.wait().ok();
            let mut text = String::new();
            let mut log = log;
            let _ = log.rewind();
            let _ = log.read_to_string(&mut text);
            return Err(ExecError::Network(format!(
                "slirp4netns failed to set up the step's network ({}): {}",
                status.map_or_else(|| "no status".into(), |s| s.to_string()),
                text.trim()
            )));
        }
        Ok(net)
    }

    /// The namespace's fd, for `setns(2)` in a container's init or a runtime's namespace path.
    pub(crate) fn netns_fd(&self) -> RawFd {
        self.netns.as_raw_fd()
    }

    /// False once slirp4netns has exited (the namespace has no way out any more).
    fn is_alive(&mut self) -> bool {
        matches!(self.slirp.try_wait(), Ok(None))
    }
}

impl Drop for IsolatedNetwork {
    fn drop(&mut self) {
        self.exit_w.take();
        // slirp4netns exits as soon as it sees the closed pipe; reap it.
        if self.slirp.wait().is_err() {
            let _ = self.slirp.kill();
            let _ = self.slirp.wait();
        }
    }
}

impl std::fmt::Debug for IsolatedNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsolatedNetwork")
            .field("netns_fd", &self.netns.as_raw_fd())
            .field("slirp4netns_pid", &self.slirp.id())
            .finish()
    }
}

/// Isolated networks kept between runs of one executor (one build), as BuildKit keeps a pool
/// of prepared network namespaces. A namespace serves one run at a time.
#[derive(Debug, Default)]
pub(crate) struct NetworkPool {
    idle: Mutex<Vec<IsolatedNetwork>>,
}

impl NetworkPool {
    /// An idle network, or a new one when none is idle.
    pub(crate) fn acquire(&self) -> Result<IsolatedNetwork, ExecError> {
        loop {
            let next = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match next {
                Some(mut net) => {
                    if net.is_alive() {
                        return Ok(net);
                    }
                }
                None => return IsolatedNetwork::create(),
            }
        }
    }

    /// Gives a network back after a run. `reusable` is false when the step could have changed
    /// the namespace's interfaces or routes (all capabilities, `--security=insecure`): such a
    /// namespace is closed rather than handed to the next step.
    pub(crate) fn release(&self, net: IsolatedNetwork, reusable: bool) {
        if !reusable {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(net);
        }
    }

    /// Prepares one network ahead of the first run that needs it.
    pub(crate) fn prewarm(&self) -> Result<(), ExecError> {
        let net = IsolatedNetwork::create()?;
        self.release(net, true);
        Ok(())
    }
}

/// Inside the namespace, `prohibit` routes for link-local addresses (cloud metadata endpoints
/// such as 169.254.169.254) and for each of the host's own IPv4 addresses: slirp4netns would
/// otherwise connect to them from the host, reaching services the host binds to all
/// addresses. A sandboxed step lacks `CAP_NET_ADMIN` and cannot remove them.
fn prohibit_host_routes(netns: &OwnedFd) -> Result<(), ExecError> {
    let mut batch = String::from("route add prohibit 169.254.0.0/16\n");
    for addr in host_ipv4_addresses() {
        batch.push_str(&format!("route add prohibit {addr}/32\n"));
    }
    let fd = netns.as_raw_fd();
    let mut cmd = Command::new("ip");
    cmd.args(["-4", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only setns (async-signal-safe) between fork and exec; `ip` then works on the
    // step's namespace.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        ExecError::Network(format!(
            "cannot run `ip` (iproute2) to fence the step's network off the host: {e}"
        ))
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        let _ = stdin.write_all(batch.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| spawn_err("waiting for ip", e))?;
    if !out.status.success() {
        return Err(ExecError::Network(format!(
            "ip -batch failed to add prohibit routes in the step's network: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The host's non-loopback IPv4 addresses (duplicates removed).
fn host_ipv4_addresses() -> Vec<std::net::Ipv4Addr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return out;
    }
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr; its family says which one.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(list) };
    out
}

fn spawn_err(what: &'static str, source: std::io::Error) -> ExecError {
    ExecError::Spawn { what, source }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ExecError> {
    let mut fds = [0; 2];
    // SAFETY: valid out-array of two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(spawn_err(
            "creating a pipe",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fresh fds we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A file with no name, for slirp4netns's messages (read only when it fails).
fn anonymous_file() -> Result<File, ExecError> {
    // SAFETY: a constant C string; memfd_create returns a fresh fd or -1.
    let fd = unsafe { libc::memfd_create(c"kiln-slirp4netns-log".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(spawn_err(
            "creating slirp4netns's log",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A new network namespace with `lo` up, held by an fd. Made on a short-lived thread: a
/// namespace is a per-thread attribute, and kiln's other threads must stay in the host's.
fn new_netns() -> Result<OwnedFd, ExecError> {
    let made = std::thread::Builder::new()
        .name("kiln-netns".into())
        .spawn(|| -> Result<OwnedFd, (&'static str, std::io::Error)> {
            // SAFETY: affects only this thread, which exits right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err((
                    "creating a network namespace",
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: bring_up_lo only makes syscalls on a socket it closes.
            unsafe { crate::namespace::bring_up_lo() }.map_err(|e| {
                (
                    "bringing up lo in the step's network namespace",
                    std::io::Error::from_raw_os_error(e),
                )
            })?;
            let f = File::open("/proc/thread-self/ns/net")
                .map_err(|e| ("opening the new network namespace", e))?;
            Ok(OwnedFd::from(f))
        })
        .map_err(|e| spawn_err("starting a thread", e))?;
    match made.join() {
        Ok(Ok(fd)) => Ok(fd),
        Ok(Err((what, source))) => Err(spawn_err(what, source)),
        Err(_) => Err(ExecError::Network(
            "the thread creating a network namespace panicked".into(),
        )),
    }
}

/// `resolv.conf` for an isolated step: slirp4netns's forwarder as the only nameserver, the
/// host's `search` and `options` lines kept (its nameservers may be on the host's loopback).
pub(crate) fn isolated_resolv_conf(host: &[u8]) -> Vec<u8> {
    let host = String::from_utf8_lossy(host);
    let mut out = format!("nameserver {DNS_FORWARDER}\n");
    for line in host.lines() {
        let t = line.trim_start();
        if t.starts_with("search ") || t.starts_with("domain ") || t.starts_with("options ") {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolated_resolv_conf_points_at_the_forwarder_and_keeps_search_and_options() {
        let host =
            b"# generated\nnameserver 127.0.0.53\nsearch corp.example\noptions edns0 trust-ad\n";
        let got = String::from_utf8(isolated_resolv_conf(host)).unwrap();
        assert_eq!(
            got,
            "nameserver 10.0.2.3\nsearch corp.example\noptions edns0 trust-ad\n"
        );
    }
}
