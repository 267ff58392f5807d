//! The public description of one container run and its outcome.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use crate::personality::Personality;

/// `PATH` given to the process when the caller's env has none (BuildKit's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One process to run in a container on a prepared rootfs.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// The prepared rootfs (usually an overlay mount whose upper dir becomes the layer).
    /// One run at a time per rootfs, and commit it after the run: to keep mount points out of
    /// the layer, kiln may remove directories from the overlay's upper dir that were copied up
    /// only for a mount point, which leaves that overlay mount's cached view stale.
    pub rootfs: PathBuf,
    /// Exec-form argv; `args[0]` is looked up in the container's `PATH` when it has no `/`.
    /// Shell form is the caller's job (`["/bin/sh", "-c", line]`).
    pub args: Vec<String>,
    /// Environment as `(name, value)`; `PATH` defaults to [`DEFAULT_PATH`].
    pub env: Vec<(String, String)>,
    /// Working directory inside the container; created (owned by the user) when missing.
    pub cwd: String,
    /// Dockerfile `USER`: `name|uid[:group|gid]`, resolved in the rootfs; `None` is root.
    pub user: Option<String>,
    /// Hostname inside the container's UTS namespace.
    pub hostname: String,
    /// The step's network: its own namespace with outbound access (the default), the host's,
    /// or none.
    pub network: Network,
    /// `RUN --mount` entries, mounted in order.
    pub mounts: Vec<MountSpec>,
    /// Secrets exposed as environment variables (`--mount=type=secret,env=NAME`).
    pub secret_env: Vec<(String, Secret)>,
    /// All capabilities, no seccomp filter, no masked or read-only kernel paths
    /// (`RUN --security=insecure`); `false` (the default) keeps Docker's sandbox.
    pub privileged: bool,
    /// Resource limits; each is clamped to the executor's own hard limit, never raised above it.
    pub rlimits: Vec<Rlimit>,
    /// Lines added to the step's `/etc/hosts` (`--add-host`): name and address, in order.
    pub extra_hosts: Vec<(String, IpAddr)>,
    /// Size of the step's `/dev/shm` tmpfs in bytes; `None` is Docker's 64 MiB.
    pub shm_size: Option<u64>,
    /// The process's execution domain: [`Personality::Linux32`] for a 32-bit target on a
    /// 64-bit machine ([`Personality::for_platform`]); the default leaves kiln's own.
    pub personality: Personality,
}

impl ExecSpec {
    /// A spec with Docker's defaults: root user, cwd `/`, an isolated network with outbound
    /// access, sandboxed, no mounts.
    pub fn new(rootfs: impl Into<PathBuf>, args: Vec<String>) -> Self {
        ExecSpec {
            rootfs: rootfs.into(),
            args,
            env: Vec::new(),
            cwd: "/".to_string(),
            user: None,
            hostname: "kiln".to_string(),
            network: Network::Isolated,
            mounts: Vec::new(),
            secret_env: Vec::new(),
            privileged: false,
            rlimits: vec![Rlimit {
                resource: RlimitResource::Nofile,
                soft: 1024,
                hard: 1_048_576,
            }],
            extra_hosts: Vec::new(),
            shm_size: None,
            personality: Personality::Default,
        }
    }
}

/// Network mode of a step (`RUN --network=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// A network namespace of the build's own whose only way out is slirp4netns (user-mode
    /// NAT, DNS forwarder at 10.0.2.3): the internet and the runner's LAN are reachable, the
    /// host's loopback is not. The default, as BuildKit's bridge/CNI network.
    Isolated,
    /// The host's network namespace: every service on the runner's loopback is reachable.
    /// kiln only uses it when the build is allowed `network.host`.
    Host,
    /// A fresh network namespace with only the loopback interface, brought up.
    None,
}

/// A resource limit applied to the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// Which limit.
    pub resource: RlimitResource,
    /// Soft limit wanted (clamped to the hard limit).
    pub soft: u64,
    /// Hard limit wanted (clamped to the executor's own hard limit).
    pub hard: u64,
}

/// The limits kiln lets a step set: Docker's `--ulimit` names, each one `RLIMIT_<NAME>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RlimitResource {
    /// Core file size (`RLIMIT_CORE`).
    Core,
    /// CPU time in seconds (`RLIMIT_CPU`).
    Cpu,
    /// Data segment size (`RLIMIT_DATA`).
    Data,
    /// File size (`RLIMIT_FSIZE`).
    Fsize,
    /// File locks (`RLIMIT_LOCKS`).
    Locks,
    /// Locked memory (`RLIMIT_MEMLOCK`).
    Memlock,
    /// POSIX message queue bytes (`RLIMIT_MSGQUEUE`).
    Msgqueue,
    /// Nice ceiling (`RLIMIT_NICE`).
    Nice,
    /// Open files (`RLIMIT_NOFILE`).
    Nofile,
    /// Processes (`RLIMIT_NPROC`).
    Nproc,
    /// Resident set size (`RLIMIT_RSS`).
    Rss,
    /// Real-time priority ceiling (`RLIMIT_RTPRIO`).
    Rtprio,
    /// Real-time CPU time in microseconds (`RLIMIT_RTTIME`).
    Rttime,
    /// Queued signals (`RLIMIT_SIGPENDING`).
    Sigpending,
    /// Stack size (`RLIMIT_STACK`).
    Stack,
}

impl RlimitResource {
    /// Every limit with Docker's name for it (`--ulimit nofile=...`).
    pub const ALL: [(&'static str, RlimitResource); 15] = [
        ("core", RlimitResource::Core),
        ("cpu", RlimitResource::Cpu),
        ("data", RlimitResource::Data),
        ("fsize", RlimitResource::Fsize),
        ("locks", RlimitResource::Locks),
        ("memlock", RlimitResource::Memlock),
        ("msgqueue", RlimitResource::Msgqueue),
        ("nice", RlimitResource::Nice),
        ("nofile", RlimitResource::Nofile),
        ("nproc", RlimitResource::Nproc),
        ("rss", RlimitResource::Rss),
        ("rtprio", RlimitResource::Rtprio),
        ("rttime", RlimitResource::Rttime),
        ("sigpending", RlimitResource::Sigpending),
        ("stack", RlimitResource::Stack),
    ];

    /// The limit Docker calls `name` (`nofile`, `nproc`, ...).
    pub fn from_docker_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, r)| *r)
    }

    /// The current hard limit of this process for the resource (what a step can get at
    /// most); `None` when the kernel does not say.
    pub fn current_hard_limit(self) -> Option<u64> {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        (unsafe { libc::getrlimit(self.raw(), &mut cur) } == 0).then_some(cur.rlim_max)
    }

    pub(crate) fn raw(self) -> libc::__rlimit_resource_t {
        match self {
            RlimitResource::Core => libc::RLIMIT_CORE,
            RlimitResource::Cpu => libc::RLIMIT_CPU,
            RlimitResource::Data => libc::RLIMIT_DATA,
            RlimitResource::Fsize => libc::RLIMIT_FSIZE,
            RlimitResource::Locks => libc::RLIMIT_LOCKS,
            RlimitResource::Memlock => libc::RLIMIT_MEMLOCK,
            RlimitResource::Msgqueue => libc::RLIMIT_MSGQUEUE,
            RlimitResource::Nice => libc::RLIMIT_NICE,
            RlimitResource::Nofile => libc::RLIMIT_NOFILE,
            RlimitResource::Nproc => libc::RLIMIT_NPROC,
            RlimitResource::Rss => libc::RLIMIT_RSS,
            RlimitResource::Rtprio => libc::RLIMIT_RTPRIO,
            RlimitResource::Rttime => libc::RLIMIT_RTTIME,
            RlimitResource::Sigpending => libc::RLIMIT_SIGPENDING,
            RlimitResource::Stack => libc::RLIMIT_STACK,
        }
    }

    pub(crate) fn oci_name(self) -> String {
        let name = Self::ALL
            .iter()
            .find(|(_, r)| *r == self)
            .map_or("", |(n, _)| n);
        format!("RLIMIT_{}", name.to_ascii_uppercase())
    }
}

/// One `RUN --mount` entry.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// Absolute path inside the container.
    pub target: String,
    /// What is mounted there.
    pub kind: MountKind,
}

impl MountSpec {
    /// A secret file at `target`, or `/run/secrets/<id>` when `target` is `None`, mode 0400, root-owned.
    pub fn secret(id: &str, target: Option<&str>, data: Secret) -> Self {
        MountSpec {
            target: target.map_or_else(|| format!("/run/secrets/{id}"), str::to_string),
            kind: MountKind::Secret {
                data,
                mode: 0o400,
                uid: 0,
                gid: 0,
            },
        }
    }
}

/// The kinds of `RUN --mount`.
#[derive(Debug, Clone)]
pub enum MountKind {
    /// A host directory (a stage's or the context's snapshot). Read-only unless `readwrite`;
    /// writes to a read-write bind land on a throwaway overlay, never in `source`.
    Bind {
        /// Host directory or file.
        source: PathBuf,
        /// `rw`: writable, but the writes are discarded after the step.
        readwrite: bool,
    },
    /// A cache directory handed out by [`crate::CacheMounts`]; writes persist.
    Cache {
        /// The host path from [`crate::CacheMount::path`].
        source: PathBuf,
    },
    /// A fresh tmpfs.
    Tmpfs {
        /// Size limit in bytes (`None`: the kernel's default, half of RAM).
        size: Option<u64>,
    },
    /// Secret bytes in a file on a private tmpfs.
    Secret {
        /// The secret.
        data: Secret,
        /// File mode (default 0400).
        mode: u32,
        /// File owner.
        uid: u32,
        /// File group.
        gid: u32,
    },
    /// `type=ssh`: a socket forwarding to an SSH agent. The step gets a socket of the run's
    /// own at the target (owner `uid:gid`, permissions `mode`), never the agent's socket or
    /// its keys; the mount point is taken out of the rootfs after the run.
    Ssh {
        /// The agent's socket on the host.
        socket: PathBuf,
        /// Owner of the socket the step sees.
        uid: u32,
        /// Group of the socket the step sees.
        gid: u32,
        /// Permission bits of the socket the step sees (BuildKit's default 0600).
        mode: u32,
    },
}

/// Secret bytes. `Debug` never shows them; they are zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Overwrites bytes that may hold a secret before their memory is freed.
pub(crate) fn wipe(bytes: &mut [u8]) {
    for b in bytes.iter_mut() {
        // SAFETY: a valid, exclusive reference; volatile so the write is not optimised away.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// True for exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// The process's stdout.
    Stdout,
    /// The process's stderr.
    Stderr,
}

/// One line of process output (without its `\n`; lines over 64 KiB are split).
#[derive(Debug, Clone, Copy)]
pub struct OutputLine<'a> {
    /// The stream.
    pub stream: OutputStream,
    /// The line's bytes, with any secret value replaced by `****`.
    pub bytes: &'a [u8],
    /// When kiln read it.
    pub at: SystemTime,
    /// True when the process printed a secret value and kiln replaced it.
    pub secret_redacted: bool,
}

/// Receives the process's output line by line, in order per stream.
pub trait OutputSink {
    /// Called for each line.
    fn line(&mut self, line: OutputLine<'_>);
}

/// A sink that keeps everything in memory: handy for tests and short steps.
#[derive(Debug, Default, Clone)]
pub struct CollectedOutput {
    /// Stdout lines.
    pub stdout: Vec<Vec<u8>>,
    /// Stderr lines.
    pub stderr: Vec<Vec<u8>>,
    /// True when any line had a secret replaced.
    pub secret_redacted: bool,
}

impl CollectedOutput {
    /// Stdout as text, lines joined with `\n`.
    pub fn stdout_text(&self) -> String {
        join_lines(&self.stdout)
    }

    /// Stderr as text, lines joined with `\n`.
    pub fn stderr_text(&self) -> String {
        join_lines(&self.stderr)
    }
}

fn join_lines(lines: &[Vec<u8>]) -> String {
    let joined: Vec<u8> = lines.join(&b'\n');
    String::from_utf8_lossy(&joined).into_owned()
}

impl OutputSink for CollectedOutput {
    fn line(&mut self, line: OutputLine<'_>) {
        self.secret_redacted |= line.secret_redacted;
        match line.stream {
            OutputStream::Stdout => self.stdout.push(line.bytes.to_vec()),
            OutputStream::Stderr => self.stderr.push(line.bytes.to_vec()),
        }
    }
}

/// Cancels runs: every run given this token (or a clone) kills its whole process tree.
#[derive(Debug, Clone)]
pub struct CancelToken {
    inner: Arc<CancelInner>,
}

#[derive(Debug)]
struct CancelInner {
    cancelled: AtomicBool,
    /// Becomes (and stays) readable on cancel so a run's poll loop wakes at once.
    eventfd: Option<std::os::fd::OwnedFd>,
}

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd returns a fresh fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        // SAFETY: a non-negative fd is the new eventfd, owned by nothing else.
        let eventfd = (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        CancelToken {
            inner: Arc::new(CancelInner {
                cancelled: AtomicBool::new(false),
                eventfd,
            }),
        }
    }

    /// Cancels every run using this token.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        if let Some(fd) = &self.inner.eventfd {
            use std::os::fd::AsRawFd;
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    /// True once [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.inner.eventfd.as_ref().map(|f| f.as_raw_fd())
    }
}

/// Why a run failed to produce an exit status.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The spec itself is wrong (empty argv, relative target, bad env name...).
    #[error("invalid exec spec: {0}")]
    InvalidSpec(String),
    /// `USER` could not be resolved in the rootfs.
    #[error("cannot resolve USER {user:?} in {rootfs}: {reason}")]
    User {
        /// The `USER` value.
        user: String,
        /// The rootfs searched.
        rootfs: PathBuf,
        /// What was missing.
        reason: String,
    },
    /// The command was not found in the container's `PATH`.
    #[error("exec: {command:?}: executable file not found in $PATH ({path}) of rootfs {rootfs}")]
    CommandNotFound {
        /// `args[0]`.
        command: String,
        /// The `PATH` searched.
        path: String,
        /// The rootfs searched.
        rootfs: PathBuf,
    },
    /// A feature kiln does not implement.
    #[error("{0} is not supported by kiln")]
    Unsupported(&'static str),
    /// Preparing the rootfs or mounts on the host failed.
    #[error("{what} {path}: {source}")]
    Prepare {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A container setup step failed inside the new namespaces.
    #[error("container setup failed: {step} {path}: {source}")]
    Setup {
        /// The step (e.g. "mount proc").
        step: &'static str,
        /// Its path argument, if any.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Starting or supervising the container failed.
    #[error("{what}: {source}")]
    Spawn {
        /// What failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The step's isolated network could not be set up (slirp4netns missing or failing).
    #[error("network setup failed: {0}")]
    Network(String),
    /// `runc` failed before running the process.
    #[error("runc failed: {0}")]
    Runc(String),
    /// The run was cancelled; the whole process tree was killed.
    #[error("cancelled: the step's processes were killed")]
    Cancelled,
}

/// Runs one [`ExecSpec`] to completion. Blocking: from async code call it in `spawn_blocking`.
/// Implementations are safe to call from many threads at once.
pub trait Executor: Send + Sync {
    /// Runs the process, streaming its output to `sink`; returns how it ended.
    fn run(
        &self,
        spec: &ExecSpec,
        sink: &mut dyn OutputSink,
        cancel: &CancelToken,
    ) -> Result<ExitStatus, ExecError>;
}
