//! kiln's own executor: `clone(2)` into new namespaces, mounts, `pivot_root`, then a tiny init
//! (pid 1) that forks the step's process, confines it and waits for it.
//!
//! The calling process is multi-threaded, so after `clone` the child may only make
//! async-signal-safe calls: no allocation, no locks, no glibc wrappers that consult
//! per-thread state (credentials are changed with raw syscalls). Everything the child needs —
//! C strings, the mount list, the seccomp BPF — is built before cloning; the child only walks it.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use crate::cgroup::{PidsHierarchy, RunCgroup};
use crate::network::NetworkPool;
use crate::output::{cloexec_pipe, supervise};
#[cfg(test)]
use crate::prepare::prepare;
use crate::prepare::{run_prepared, Prepared, ScratchDir};
use crate::security::{assume_step_credentials, StepCredentials};
use crate::spec::{
    wipe, CancelToken, ExecError, ExecSpec, Executor, ExitStatus, MountKind, Network, OutputSink,
};

/// Docker's default masked paths: hidden behind `/dev/null` (files) or an empty read-only
/// tmpfs (directories).
pub(crate) const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
];

/// Docker's default read-only paths.
pub(crate) const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Host devices bind-mounted into the container's `/dev`.
pub(crate) const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// `/dev` symlinks: (link name, target).
pub(crate) const DEV_SYMLINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Runs steps with kiln's own namespace code (the default backend).
///
/// Clones share one pool of prepared isolated networks; the pool's namespaces and their
/// slirp4netns processes go away with the last clone (and with the kiln process, however it
/// ends).
#[derive(Debug, Default, Clone)]
pub struct NamespaceExecutor {
    networks: Arc<NetworkPool>,
    pids: Option<(u64, PidsHierarchy)>,
}

impl NamespaceExecutor {
    /// A new executor with no process-count limit.
    pub fn new() -> Self {
        NamespaceExecutor::default()
    }

    /// Limits every run to `limit` processes and threads (cgroup `pids.max`; `None`: no
    /// limit, the default, as in BuildKit). Fails when no cgroup hierarchy here offers the
    /// pids controller.
    pub fn with_pids_limit(self, limit: Option<u64>) -> Result<Self, ExecError> {
        self.with_run_cgroups(limit, None)
    }

    /// Gives every run a cgroup of its own under `parent` (`--cgroup-parent`, relative to
    /// the root of the hierarchy with the pids controller; `None`: kiln's own `kiln`
    /// cgroup there) with `limit` processes and threads at most. With neither a limit nor a
    /// parent, runs stay in kiln's cgroup, as before.
    pub fn with_run_cgroups(
        mut self,
        limit: Option<u64>,
        parent: Option<&str>,
    ) -> Result<Self, ExecError> {
        self.pids = match (limit, parent) {
            (Some(0), _) => {
                return Err(ExecError::InvalidSpec(
                    "the pids limit must be at least 1".into(),
                ))
            }
            (Some(n), _) => Some((n, PidsHierarchy::detect(parent)?)),
            (None, Some(_)) => Some((u64::MAX, PidsHierarchy::detect(parent)?)),
            (None, None) => None,
        };
        Ok(self)
    }

    /// Starts preparing an isolated network in the background, so the build's first `RUN`
    /// finds one ready. Errors are left for that `RUN` to report.
    pub fn prewarm_network(&self) {
        let pool = self.networks.clone();
        let _ = std::thread::Builder::new()
            .name("kiln-netns-prewarm".into())
            .spawn(move || pool.prewarm());
    }
}

/// One setup action done by the container's init before `pivot_root` (host paths).
enum Op {
    Mount {
        src: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
        what: &'static str,
    },
    Remount {
        target: CString,
        flags: libc::c_ulong,
    },
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    WriteFile {
        path: CString,
        data: Vec<u8>,
        mode: libc::mode_t,
        uid: u32,
        gid: u32,
    },
    Mask {
        path: CString,
        devnull: CString,
    },
    ReadonlyPath {
        path: CString,
    },
    BindDevice {
        src: CString,
        target: CString,
    },
    Sysfs {
        target: CString,
        flags: libc::c_ulong,
    },
    /// A fresh procfs; where the runtime masks /proc (an unprivileged container: the kernel
    /// refuses a new procfs in a user namespace then) the container's /proc is bound instead.
    Proc {
        target: CString,
    },
}

impl Op {
    fn describe(&self) -> (&'static str, String) {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Op::Mount { target, what, .. } => (what, s(target)),
            Op::Remount { target, .. } => ("remounting read-only", s(target)),
            Op::Mkdir { path, .. } => ("mkdir", s(path)),
            Op::Symlink { link, .. } => ("symlink", s(link)),
            // Never name the file's content; the path is fine.
            Op::WriteFile { path, .. } => ("writing file", s(path)),
            Op::Mask { path, .. } => ("masking", s(path)),
            Op::ReadonlyPath { path } => ("making read-only", s(path)),
            Op::BindDevice { target, .. } => ("binding device", s(target)),
            Op::Sysfs { target, .. } => ("mounting sysfs", s(target)),
            Op::Proc { target } => ("mounting /proc", s(target)),
        }
    }
}

/// Named steps of the child, reported by index.
const STEPS: &[&str] = &[
    "duplicating stdio",                    // 0
    "making mounts private",                // 1
    "pivot_root",                           // 2
    "unmounting the old root",              // 3
    "sethostname",                          // 4
    "bringing up lo",                       // 5
    "chdir to the working dir",             // 6
    "forking the step's process",           // 7
    "setrlimit",                            // 8
    "dropping bounding caps",               // 9
    "capset",                               // 10
    "setting no_new_privs",                 // 11
    "installing seccomp filter",            // 12
    "setgroups",                            // 13
    "setgid",                               // 14
    "setuid",                               // 15
    "execve",                               // 16
    "chdir to the new root",                // 17
    "joining the step's network namespace", // 18
    "waiting to enter the pids cgroup",     // 19
    "setting the personality",              // 20
];

const REPORT_OP: u32 = 1;
const REPORT_STEP: u32 = 2;
const REPORT_EXIT: u32 = 3;
const REPORT_SIGNAL: u32 = 4;

struct Plan {
    ops: Vec<Op>,
    root: CString,
    hostname: CString,
    lo_up: bool,
    /// The isolated network to join (`setns`), or -1.
    netns_fd: RawFd,
    /// A pipe (read, write) the init waits on until kiln has moved it into its pids cgroup.
    cgroup_gate: Option<(RawFd, RawFd)>,
    cwd: CString,
    exe: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// The step's user, groups, capabilities and seccomp programs.
    creds: StepCredentials,
    /// kiln runs in a user namespace of its own (rootless, or root in an unprivileged
    /// container): a runtime's seccomp profile may refuse sethostname (podman's does without
    /// CAP_SYS_ADMIN), and the step then keeps the container's hostname.
    hostname_optional: bool,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    /// `personality(2)` of the step's process (`PER_LINUX32`), or `None` to keep kiln's.
    persona: Option<libc::c_ulong>,
    /// Highest fd to close when `close_range` is missing.
    max_fd: i32,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // Secret file contents and env strings were copied here for the child.
        for op in &mut self.ops {
            if let Op::WriteFile { data, .. } = op {
                wipe(data);
            }
        }
        for e in self._envp.drain(..) {
            wipe(&mut e.into_bytes());
        }
    }
}

fn cstr(s: &str) -> Result<CString, ExecError> {
    CString::new(s).map_err(|_| ExecError::InvalidSpec(format!("NUL byte in {s:?}")))
}

fn cpath(p: &Path) -> Result<CString, ExecError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| ExecError::InvalidSpec(format!("NUL byte in path {}", p.display())))
}

/// Escapes a path for an overlay `lowerdir=`/`upperdir=` option.
pub(crate) fn overlay_escape(p: &Path) -> String {
    let mut out = String::new();
    for c in p.to_string_lossy().chars() {
        if matches!(c, ',' | ':' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn build_plan(
    spec: &ExecSpec,
    prep: &Prepared,
    scratch: &Path,
    netns_fd: RawFd,
) -> Result<Plan, ExecError> {
    let sandbox = !spec.privileged;
    let root = &prep.root;
    let mut ops = Vec::new();
    let p = |path: &Path| cpath(path);
    let sub = |base: &Path, rel: &str| cpath(&base.join(rel));
    let mount = |src: Option<CString>,
                 target: CString,
                 fstype: Option<&str>,
                 flags,
                 data: Option<String>,
                 what| {
        Ok::<Op, ExecError>(Op::Mount {
            src,
            target,
            fstype: fstype.map(cstr).transpose()?,
            flags,
            data: data.as_deref().map(cstr).transpose()?,
            what,
        })
    };
    // The run's private tmpfs: host files' copies, secrets, rw-bind overlay dirs.
    ops.push(mount(
        Some(cstr("tmpfs")?),
        p(scratch)?,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755".into()),
        "mounting the scratch tmpfs",
    )?);
    // The rootfs becomes its own mount so pivot_root can move onto it.
    ops.push(mount(
        Some(p(root)?),
        p(root)?,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
        "bind-mounting the rootfs onto itself",
    )?);
    // No device cgroup here: CAP_MKNOD (in Docker's set) could create a node for the host's
    // disk. nodev on every writable mount makes such nodes unopenable; the devices kiln
    // binds into /dev are separate mounts that keep the host's flags.
    ops.push(Op::Remount {
        target: p(root)?,
        flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NODEV,
    });

    ops.push(Op::Proc {
        target: p(&prep.proc_dir)?,
    });

    let dev = &prep.dev_dir;
    ops.push(mount(
        Some(cstr("tmpfs")?),
        p(dev)?,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_STRICTATIME,
        Some("mode=755,size=65536k".into()),
        "mounting /dev",
    )?);
    for d in DEVICES {
        ops.push(Op::BindDevice {
            src: cstr(&format!("/dev/{d}"))?,
            target: sub(dev, d)?,
        });
    }
    for d in ["pts", "shm", "mqueue"] {
        ops.push(Op::Mkdir {
            path: sub(dev, d)?,
            mode: 0o755,
        });
    }
    ops.push(mount(
        Some(cstr("devpts")?),
        sub(dev, "pts")?,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620".into()),
        "mounting /dev/pts",
    )?);
    ops.push(mount(
        Some(cstr("shm")?),
        sub(dev, "shm")?,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(format!("mode=1777,size={}", shm_size_option(spec.shm_size))),
        "mounting /dev/shm",
    )?);
    ops.push(mount(
        Some(cstr("mqueue")?),
        sub(dev, "mqueue")?,
        Some("mqueue"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
        "mounting /dev/mqueue",
    )?);
    for (name, target) in DEV_SYMLINKS {
        ops.push(Op::Symlink {
            target: cstr(target)?,
            link: sub(dev, name)?,
        });
    }
    let sys_flags = libc::MS_NOSUID
        | libc::MS_NODEV
        | libc::MS_NOEXEC
        | if sandbox { libc::MS_RDONLY } else { 0 };
    ops.push(Op::Sysfs {
        target: p(&prep.sys_dir)?,
        flags: sys_flags,
    });

    if sandbox {
        let devnull = cstr("/dev/null")?;
        for m in MASKED_PATHS {
            let host = container_to_host(prep, m);
            ops.push(Op::Mask {
                path: p(&host)?,
                devnull: devnull.clone(),
            });
        }
        for r in READONLY_PATHS {
            ops.push(Op::ReadonlyPath {
                path: p(&container_to_host(prep, r))?,
            });
        }
    }

    for hf in &prep.host_files {
        // A private copy: the step may edit it, the host's file stays untouched.
        let copy = scratch.join(hf.name);
        ops.push(Op::WriteFile {
            path: p(&copy)?,
            data: hf.content.clone(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        });
        ops.push(mount(
            Some(p(&copy)?),
            p(&hf.target)?,
            None,
            libc::MS_BIND,
            None,
            "binding host file",
        )?);
    }

    for (i, (m, target)) in spec.mounts.iter().zip(&prep.mount_targets).enumerate() {
        let t = p(target)?;
        match &m.kind {
            MountKind::Bind {
                source,
                readwrite: false,
            } => {
                ops.push(mount(
                    Some(p(source)?),
                    t.clone(),
                    None,
                    libc::MS_BIND | libc::MS_REC,
                    None,
                    "bind mount",
                )?);
                ops.push(Op::Remount {
                    target: t,
                    flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NODEV,
                });
            }
            MountKind::Bind {
                source,
                readwrite: true,
            } if source.is_dir() => {
                // Writes land in a throwaway upper dir on the scratch tmpfs, never in source.
                let upper = scratch.join(format!("bind{i}-upper"));
                let work = scratch.join(format!("bind{i}-work"));
                ops.push(Op::Mkdir {
                    path: p(&upper)?,
                    mode: 0o755,
                });
                ops.push(Op::Mkdir {
                    path: p(&work)?,
                    mode: 0o755,
                });
                let data = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    overlay_escape(source),
                    overlay_escape(&upper),
                    overlay_escape(&work)
                );
                ops.push(mount(
                    Some(cstr("overlay")?),
                    t,
                    Some("overlay"),
                    libc::MS_NODEV,
                    Some(data),
                    "overlay for rw bind mount",
                )?);
            }
            MountKind::Bind {
                source,
                readwrite: true,
            } => {
                let content = std::fs::read(source).map_err(|e| ExecError::Prepare {
                    what: "reading bind mount source",
                    path: source.clone(),
                    source: e,
                })?;
                let meta = std::fs::metadata(source).map_err(|e| ExecError::Prepare {
                    what: "reading bind mount source",
                    path: source.clone(),
                    source: e,
                })?;
                use std::os::unix::fs::MetadataExt;
                let copy = scratch.join(format!("bind{i}-file"));
                ops.push(Op::WriteFile {
                    path: p(&copy)?,
                    data: content,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                });
                ops.push(mount(
                    Some(p(&copy)?),
                    t,
                    None,
                    libc::MS_BIND,
                    None,
                    "bind mount",
                )?);
            }
            MountKind::Cache { source } => {
                let t_nodev = t.clone();
                ops.push(mount(
                    Some(p(source)?),
                    t,
                    None,
                    libc::MS_BIND | libc::MS_REC,
                    None,
                    "cache mount",
                )?);
                ops.push(Op::Remount {
                    target: t_nodev.clone(),
                    flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NODEV,
                });
            }
            MountKind::Tmpfs { size } => {
                let data = match size {
                    Some(s) => format!("mode=1777,size={s}"),
                    None => "mode=1777".to_string(),
                };
                ops.push(mount(
                    Some(cstr("tmpfs")?),
                    t,
                    Some("tmpfs"),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    Some(data),
                    "tmpfs mount",
                )?);
            }
            MountKind::Secret {
                data,
                mode,
                uid,
                gid,
            } => {
                let file = scratch.join(format!("secret{i}"));
                ops.push(Op::WriteFile {
                    path: p(&file)?,
                    data: data.expose().to_vec(),
                    mode: *mode & 0o7777,
                    uid: *uid,
                    gid: *gid,
                });
                ops.push(mount(
                    Some(p(&file)?),
                    t.clone(),
                    None,
                    libc::MS_BIND,
                    None,
                    "secret mount",
                )?);
                ops.push(Op::Remount {
                    target: t,
                    flags: libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                });
            }
            MountKind::Ssh { .. } => {
                ops.push(mount(
                    Some(p(prep.ssh_socket(i)?)?),
                    t.clone(),
                    None,
                    libc::MS_BIND,
                    None,
                    "ssh agent socket mount",
                )?);
                ops.push(Op::Remount {
                    target: t,
                    flags: libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                });
            }
        }
    }

    let argv: Vec<CString> = spec
        .args
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = prep.env.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());

    let mut rlimits = Vec::new();
    for rl in &spec.rlimits {
        let res = rl.resource.raw();
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        if unsafe { libc::getrlimit(res, &mut cur) } != 0 {
            continue;
        }
        let hard = rl.hard.min(cur.rlim_max);
        let soft = rl.soft.min(hard);
        rlimits.push((
            res,
            libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            },
        ));
    }
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) };

    Ok(Plan {
        ops,
        root: p(root)?,
        hostname: cstr(&spec.hostname)?,
        lo_up: spec.network == Network::None,
        netns_fd,
        cgroup_gate: None,
        cwd: cstr(&spec.cwd)?,
        exe: cstr(&prep.exe)?,
        _argv: argv,
        argv_ptrs,
        _envp: envp,
        envp_ptrs,
        hostname_optional: crate::userns::in_nested_user_namespace(),
        creds: StepCredentials::new(&prep.user, sandbox, 0)?,
        rlimits,
        persona: spec.personality.persona(),
        max_fd: nofile.rlim_cur.min(1 << 20) as i32,
    })
}

/// The `size=` of `/dev/shm`: the spec's bytes, or Docker's 64 MiB.
pub(crate) fn shm_size_option(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "65536k".to_string(), |b| b.to_string())
}

fn container_to_host(prep: &Prepared, path: &str) -> std::path::PathBuf {
    // /proc and /sys were resolved (and created) as mount points; masked paths live below them.
    if let Some(rest) = path.strip_prefix("/proc/") {
        prep.proc_dir.join(rest)
    } else if let Some(rest) = path.strip_prefix("/sys/") {
        prep.sys_dir.join(rest)
    } else {
        prep.root.join(path.trim_start_matches('/'))
    }
}

// ---- code that runs in the cloned child: async-signal-safe only ----

fn errno() -> i32 {
    // SAFETY: reading the thread's errno.
    unsafe { *libc::__errno_location() }
}

#[expect(
    unsafe_op_in_unsafe_fn,
    reason = "cloned-child code: every statement is a raw syscall on memory prepared before the clone"
)]
unsafe fn report(kind: u32, index: u32, err: i32, value: i32) {
    let msg: [i32; 4] = [kind as i32, index as i32, err, value];
    libc::write(3, msg.as_ptr().cast(), std::mem::size_of_val(&msg));
}

#[expect(
    unsafe_op_in_unsafe_fn,
    reason = "cloned-child code: every statement is a raw syscall on memory prepared before the clone"
)]
unsafe fn fail_step(step: u32) -> ! {
    report(REPORT_STEP, step, errno(), 0);
    libc::_exit(1)
}

fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

#[expect(
    unsafe_op_in_unsafe_fn,
    reason = "cloned-child code: every statement is a raw syscall on memory prepared before the clone"
)]
unsafe fn run_op(op: &Op) -> Result<(), i32> {
    let check = |r: libc::c_int| if r == 0 { Ok(()) } else { Err(errno()) };
    match op {
        Op::Mount {
            src,
            target,
            fstype,
            flags,
            data,
            ..
        } => check(libc::mount(
            opt_ptr(src),
            target.as_ptr(),
            opt_ptr(fstype),
            *flags,
            opt_ptr(data).cast(),
        )),
        Op::Remount { target, flags } => remount_keeping_locked(target, *flags),
        Op::Mkdir { path, mode } => {
            if libc::mkdir(path.as_ptr(), *mode) == 0 || errno() == libc::EEXIST {
                Ok(())
            } else {
                Err(errno())
            }
        }
        Op::Symlink { target, link } => check(libc::symlink(target.as_ptr(), link.as_ptr())),
        Op::WriteFile {
            path,
            data,
            mode,
            uid,
            gid,
        } => {
            let fd = libc::open(
                path.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                0o600,
            );
            if fd < 0 {
                return Err(errno());
            }
            let mut off = 0;
            while off < data.len() {
                let n = libc::write(fd, data[off..].as_ptr().cast(), data.len() - off);
                if n < 0 {
                    if errno() == libc::EINTR {
                        continue;
                    }
                    let e = errno();
                    libc::close(fd);
                    return Err(e);
                }
                off += n as usize;
            }
            let r = if libc::fchown(fd, *uid, *gid) != 0 || libc::fchmod(fd, *mode) != 0 {
                Err(errno())
            } else {
                Ok(())
            };
            libc::close(fd);
            r
        }
        Op::Mask { path, devnull } => {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::stat(path.as_ptr(), &mut st) != 0 {
                return if errno() == libc::ENOENT {
                    Ok(())
                } else {
                    Err(errno())
                };
            }
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    path.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_RDONLY,
                    std::ptr::null(),
                ))
            } else {
                check(libc::mount(
                    devnull.as_ptr(),
                    path.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))
            }
        }
        Op::ReadonlyPath { path } => {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::stat(path.as_ptr(), &mut st) != 0 {
                return if errno() == libc::ENOENT {
                    Ok(())
                } else {
                    Err(errno())
                };
            }
            check(libc::mount(
                path.as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            remount_keeping_locked(
                path,
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
            )
        }
        Op::BindDevice { src, target } => {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::stat(src.as_ptr(), &mut st) != 0 {
                // The host lacks it (e.g. no /dev/tty): leave it out, as a minimal /dev may.
                return Ok(());
            }
            let fd = libc::open(
                target.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                0o666,
            );
            if fd < 0 {
                return Err(errno());
            }
            libc::close(fd);
            check(libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))
        }
        Op::Proc { target } => {
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            if libc::mount(
                c"proc".as_ptr(),
                target.as_ptr(),
                c"proc".as_ptr(),
                flags,
                std::ptr::null(),
            ) == 0
            {
                return Ok(());
            }
            if errno() != libc::EPERM {
                return Err(errno());
            }
            // The step then sees the processes of kiln's container (its own pid namespace
            // still limits what it can signal); the runtime's masks come along (MS_REC).
            check(libc::mount(
                c"/proc".as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))
        }
        Op::Sysfs { target, flags } => {
            if libc::mount(
                c"sysfs".as_ptr(),
                target.as_ptr(),
                c"sysfs".as_ptr(),
                *flags,
                std::ptr::null(),
            ) == 0
            {
                return Ok(());
            }
            // Without rights over the network namespace a new sysfs is refused: bind the host's.
            check(libc::mount(
                c"/sys".as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            if *flags & libc::MS_RDONLY != 0 {
                remount_keeping_locked(target, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY)?;
            }
            Ok(())
        }
    }
}

/// A bind remount with `flags`. In a user namespace the flags a mount had when it came from
/// a more privileged namespace (nosuid, nodev, noexec, ro, atime) are locked: a remount that
/// would clear one fails with EPERM, so it is retried with those flags kept.
/// Async-signal-safe (plain syscalls).
#[expect(
    unsafe_op_in_unsafe_fn,
    reason = "cloned-child code: every statement is a raw syscall on memory prepared before the clone"
)]
unsafe fn remount_keeping_locked(target: &CString, flags: libc::c_ulong) -> Result<(), i32> {
    let remount = |f: libc::c_ulong| {
        if libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            f,
            std::ptr::null(),
        ) == 0
        {
            Ok(())
        } else {
            Err(errno())
        }
    };
    match remount(flags) {
        Err(libc::EPERM) => {}
        other => return other,
    }
    // glibc's statvfs is one statfs(2) here: kernels since 2.6.36 report the mount flags
    // (ST_VALID), so it never falls back to reading /proc/mounts.
    let mut st: libc::statvfs = std::mem::zeroed();
    if libc::statvfs(target.as_ptr(), &mut st) != 0 {
        return Err(libc::EPERM);
    }
    let has = |f: libc::c_ulong| st.f_flag & f != 0;
    let mut keep = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if has(st_flag) {
            keep |= ms_flag;
        }
    }
    remount(flags | keep)
}

/// Sets `lo` up in the calling thread's network namespace; returns the errno on failure.
/// Async-signal-safe (plain syscalls), so a cloned child may call it.
#[expect(
    unsafe_op_in_unsafe_fn,
    reason = "cloned-child code: every statement is a raw syscall on memory prepared before the clone"
)]
pub(crate) unsafe fn bring_up_lo() -> Result<(), i32> {
    let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
    if s < 0 {
        return Err(errno());
    }
    let mut ifr: libc::ifreq = std::mem::zeroed();
    ifr.ifr_name[0] = b'l' as libc::c_char;
    ifr.ifr_name[1] = b'o' as libc::c_char;
    if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
        let e = errno();
        libc::close(s);
        return Err(e);
    }
    ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    let r = libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr);
    let e = errno();
    libc::close(s);
    if r != 0 {
        return Err(e);
    }
    Ok(())
}

/// The container's pid 1. Never returns.
#[expect(
    unsafe_op_in_unsafe_fn,
    reason = "cloned-child code: every statement is a raw syscall on memory prepared before the clone"
)]
unsafe fn container_init(plan: &Plan, stdio: [RawFd; 3], report_fd: RawFd) -> ! {
    // Die with the thread that started us (the run() call blocks it until we are gone).
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    // Our copy of the gate's write end is closed so that kiln's failing reads as EOF below.
    if let Some((_, gate_w)) = plan.cgroup_gate {
        libc::close(gate_w);
    }
    // A session of our own: a terminal's Ctrl-C (SIGINT to kiln's foreground process group)
    // must not reach the step's processes; kiln cancels the build and kills them itself, so a
    // step never fails half-way on a signal meant for kiln.
    libc::setsid();
    // Move our fds to 0..=3 (stdio, report), 4 (the cgroup gate) and 5 (the network to
    // join), everything else closed: another thread's pipes must not be held open by us.
    // Failures are reported on fd 3 only once it is ours.
    let gate_r = plan.cgroup_gate.map_or(-1, |(r, _)| r);
    let mut high = [-1; 6];
    for (i, fd) in [
        stdio[0],
        stdio[1],
        stdio[2],
        report_fd,
        gate_r,
        plan.netns_fd,
    ]
    .into_iter()
    .enumerate()
    {
        if fd < 0 {
            continue;
        }
        high[i] = libc::fcntl(fd, libc::F_DUPFD, 10);
        if high[i] < 0 {
            libc::_exit(2);
        }
    }
    for (i, fd) in high.iter().enumerate() {
        if *fd >= 0 && libc::dup2(*fd, i as i32) < 0 {
            libc::_exit(2);
        }
    }
    libc::fcntl(3, libc::F_SETFD, libc::FD_CLOEXEC);
    if gate_r >= 0 {
        // Fork nothing before kiln has put us in the run's pids cgroup: children inherit it.
        let mut byte = 0u8;
        if libc::read(4, (&mut byte as *mut u8).cast(), 1) != 1 {
            fail_step(19);
        }
    }
    // Join the isolated network before mounting anything: sysfs shows the mounter's network.
    if plan.netns_fd >= 0 && libc::setns(5, libc::CLONE_NEWNET) != 0 {
        fail_step(18);
    }
    if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) != 0 {
        for fd in 4..plan.max_fd.max(4) {
            libc::close(fd);
        }
    }

    if libc::mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) != 0
    {
        fail_step(1);
    }
    for (i, op) in plan.ops.iter().enumerate() {
        if let Err(e) = run_op(op) {
            report(REPORT_OP, i as u32, e, 0);
            libc::_exit(1);
        }
    }
    // pivot_root(".", ".") stacks the old root on top of the new one; unmounting "." then
    // drops it, with no put_old directory needed inside the rootfs.
    if libc::chdir(plan.root.as_ptr()) != 0 {
        fail_step(17);
    }
    if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0 {
        fail_step(2);
    }
    if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0 {
        fail_step(3);
    }
    libc::chdir(c"/".as_ptr());
    if libc::sethostname(plan.hostname.as_ptr(), plan.hostname.as_bytes().len()) != 0
        && !(plan.hostname_optional && errno() == libc::EPERM)
    {
        fail_step(4);
    }
    if plan.lo_up {
        if let Err(e) = bring_up_lo() {
            report(REPORT_STEP, 5, e, 0);
            libc::_exit(1);
        }
    }
    if libc::chdir(plan.cwd.as_ptr()) != 0 {
        fail_step(6);
    }

    // A raw clone, not fork(): glibc's fork runs atfork handlers and takes locks that another
    // thread of the original process may have held when we were cloned.
    let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0);
    if pid < 0 {
        fail_step(7);
    }
    if pid == 0 {
        step_process(plan);
    }
    libc::close(0);
    libc::close(1);
    libc::close(2);
    // Reap everything (orphans are re-parented to us) until the step's process is gone; when
    // we exit the kernel kills whatever is left in the pid namespace.
    loop {
        let mut st = 0;
        let r = libc::waitpid(-1, &mut st, 0);
        if r == pid as libc::pid_t {
            if libc::WIFEXITED(st) {
                report(REPORT_EXIT, 0, 0, libc::WEXITSTATUS(st));
            } else if libc::WIFSIGNALED(st) {
                report(REPORT_SIGNAL, 0, 0, libc::WTERMSIG(st));
            }
            libc::_exit(0);
        }
        if r < 0 && errno() != libc::EINTR {
            libc::_exit(3);
        }
    }
}

/// The step's process, forked by init: confine it, then exec.
#[expect(
    unsafe_op_in_unsafe_fn,
    reason = "cloned-child code: every statement is a raw syscall on memory prepared before the clone"
)]
unsafe fn step_process(plan: &Plan) -> ! {
    // Rust ignores SIGPIPE in its programs; the step must get default dispositions.
    for sig in 1..libc::SIGRTMIN() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    libc::prctl(libc::PR_SET_PDEATHSIG, 0);

    if let Some(persona) = plan.persona {
        if libc::personality(persona) == -1 {
            fail_step(20);
        }
    }
    for (res, lim) in &plan.rlimits {
        if libc::setrlimit(*res, lim) != 0 {
            fail_step(8);
        }
    }
    if let Err(call) = assume_step_credentials(&plan.creds) {
        fail_step(9 + call);
    }
    libc::execve(
        plan.exe.as_ptr(),
        plan.argv_ptrs.as_ptr(),
        plan.envp_ptrs.as_ptr(),
    );
    report(REPORT_STEP, 16, errno(), 0);
    libc::_exit(127)
}

// ---- parent side ----

fn open_devnull() -> Result<OwnedFd, ExecError> {
    std::fs::File::open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| ExecError::Spawn {
            what: "opening /dev/null",
            source: e,
        })
}

impl Executor for NamespaceExecutor {
    fn run(
        &self,
        spec: &ExecSpec,
        sink: &mut dyn OutputSink,
        cancel: &CancelToken,
    ) -> Result<ExitStatus, ExecError> {
        run_prepared(spec, cancel, |prep| {
            let scratch = ScratchDir::new(&std::env::temp_dir())?;
            let network = match spec.network {
                Network::Isolated => Some(self.networks.acquire()?),
                Network::Host | Network::None => None,
            };
            let netns_fd = network.as_ref().map_or(-1, |n| n.netns_fd());
            let mut plan = build_plan(spec, prep, &scratch.path, netns_fd)?;
            let cgroup = match &self.pids {
                Some((limit, hierarchy)) => Some(hierarchy.create_run(*limit)?),
                None => None,
            };
            let result = run_plan(&mut plan, prep, sink, cancel, cgroup.as_ref());
            if let Some(net) = network {
                // A step with every capability may have reconfigured the namespace.
                self.networks.release(net, !spec.privileged);
            }
            result
        })
    }
}

fn run_plan(
    plan: &mut Plan,
    prep: &Prepared,
    sink: &mut dyn OutputSink,
    cancel: &CancelToken,
    cgroup: Option<&RunCgroup>,
) -> Result<ExitStatus, ExecError> {
    let (out_r, out_w) = cloexec_pipe()?;
    let (err_r, err_w) = cloexec_pipe()?;
    let (rep_r, rep_w) = cloexec_pipe()?;
    let gate = match cgroup {
        Some(_) => Some(cloexec_pipe()?),
        None => None,
    };
    plan.cgroup_gate = gate.as_ref().map(|(r, w)| (r.as_raw_fd(), w.as_raw_fd()));
    let plan: &Plan = plan;
    let devnull = open_devnull()?;
    let mut flags =
        libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if plan.lo_up {
        flags |= libc::CLONE_NEWNET;
    }
    let stdio = [devnull.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let rep_fd = rep_w.as_raw_fd();
    // SAFETY: the child only runs async-signal-safe code over data prepared above and
    // never returns (container_init ends in _exit or exec).
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_long,
            0,
            0,
            0,
            0,
        )
    };
    if pid == 0 {
        // SAFETY: this is the cloned child, which container_init is written for (see above).
        unsafe { container_init(plan, stdio, rep_fd) };
    }
    if pid < 0 {
        return Err(ExecError::Spawn {
            what: "cloning into new namespaces",
            source: std::io::Error::last_os_error(),
        });
    }
    let pid = pid as libc::pid_t;
    drop((out_w, err_w, rep_w, devnull));
    if let (Some(cg), Some((gate_r, gate_w))) = (cgroup, gate) {
        drop(gate_r);
        let entered = cg.add(pid).and_then(|()| {
            use std::io::Write;
            std::fs::File::from(gate_w)
                .write_all(&[1u8])
                .map_err(|e| ExecError::Spawn {
                    what: "starting the container's init",
                    source: e,
                })
        });
        if let Err(e) = entered {
            // SAFETY: pid is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut st = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            return Err(e);
        }
    }
    let mut kill = || {
        // Killing the namespace's pid 1 makes the kernel kill every process in it.
        // SAFETY: pid is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    };
    let sup = match supervise(
        pid,
        out_r,
        err_r,
        sink,
        cancel,
        &prep.secret_values,
        &mut kill,
    ) {
        Ok(sup) => sup,
        Err(e) => {
            // Never leave the container running or unreaped behind an error.
            kill();
            let mut st = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            return Err(e);
        }
    };
    let mut report_bytes = Vec::new();
    {
        use std::io::Read;
        let mut f = std::fs::File::from(rep_r);
        let _ = f.read_to_end(&mut report_bytes);
    }
    let mut status = None;
    for msg in report_bytes.chunks_exact(16) {
        let v = |i: usize| {
            i32::from_ne_bytes([msg[i * 4], msg[i * 4 + 1], msg[i * 4 + 2], msg[i * 4 + 3]])
        };
        let (kind, index, err, value) = (v(0) as u32, v(1) as usize, v(2), v(3));
        match kind {
            REPORT_OP => {
                let (step, path) = plan
                    .ops
                    .get(index)
                    .map_or(("setup", String::new()), Op::describe);
                return Err(ExecError::Setup {
                    step,
                    path,
                    source: std::io::Error::from_raw_os_error(err),
                });
            }
            REPORT_STEP => {
                let step = STEPS.get(index).copied().unwrap_or("setup");
                let path = match index {
                    6 => plan.cwd.to_string_lossy().into_owned(),
                    16 => plan.exe.to_string_lossy().into_owned(),
                    _ => String::new(),
                };
                return Err(ExecError::Setup {
                    step,
                    path,
                    source: std::io::Error::from_raw_os_error(err),
                });
            }
            REPORT_EXIT => status = Some(ExitStatus::Code(value)),
            REPORT_SIGNAL => status = Some(ExitStatus::Signal(value)),
            _ => {}
        }
    }
    if sup.cancelled {
        return Err(ExecError::Cancelled);
    }
    status.ok_or_else(|| ExecError::Spawn {
        what: "container init ended without reporting the step's status",
        source: std::io::Error::other(format!("init wait status {:#x}", sup.wait_status)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{MountSpec, Secret};

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        std::fs::write(d.path().join("bin/sh"), "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            d.path().join("bin/sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        d
    }

    fn steps(plan: &Plan) -> Vec<String> {
        plan.ops
            .iter()
            .map(|o| {
                let (what, path) = o.describe();
                format!("{what} {path}")
            })
            .collect()
    }

    #[test]
    fn plan_mounts_scratch_then_rootfs_then_proc_dev_sys_then_masks_then_user_mounts() {
        let r = rootfs();
        let mut spec = ExecSpec::new(r.path(), vec!["sh".into()]);
        spec.mounts = vec![MountSpec::secret("tok", None, Secret::new("v"))];
        let mut prep = prepare(&spec).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let plan = build_plan(&spec, &prep, scratch.path(), -1).unwrap();
        let s = steps(&plan);
        let pos = |needle: &str| {
            s.iter()
                .position(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("{needle} missing in {s:#?}"))
        };
        assert_eq!(pos("mounting the scratch tmpfs"), 0);
        assert_eq!(pos("bind-mounting the rootfs onto itself"), 1);
        assert!(pos("mounting /proc") < pos("mounting /dev"));
        assert!(pos("mounting /dev") < pos("mounting sysfs"));
        assert!(pos("mounting sysfs") < pos("masking"));
        assert!(pos("masking") < pos("making read-only"));
        assert!(pos("making read-only") < pos("secret mount"));
        assert_eq!(plan.exe.to_str().unwrap(), "/bin/sh");
        assert!(plan.creds.sandbox && plan.creds.seccomp.len() == 2);
        assert_eq!(plan.creds.cap_keep & !0xa804_25fb, 0);
        // The secret's bytes are in the plan only as file content, never in a description.
        assert!(s.iter().all(|l| !l.contains("tok-value")));
        prep.stubs.remove().unwrap();
        assert!(!r.path().join("proc").exists() && !r.path().join("run").exists());
    }

    #[test]
    fn insecure_plan_has_no_masks_seccomp_or_read_only_sys() {
        let r = rootfs();
        let mut spec = ExecSpec::new(r.path(), vec!["/bin/sh".into()]);
        spec.privileged = true;
        let mut prep = prepare(&spec).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let plan = build_plan(&spec, &prep, scratch.path(), -1).unwrap();
        let s = steps(&plan);
        assert!(s
            .iter()
            .all(|l| !l.starts_with("masking") && !l.starts_with("making read-only")));
        assert!(plan.creds.seccomp.is_empty() && !plan.creds.sandbox);
        let sys_ro = plan
            .ops
            .iter()
            .any(|o| matches!(o, Op::Sysfs { flags, .. } if flags & libc::MS_RDONLY != 0));
        assert!(!sys_ro);
        prep.stubs.remove().unwrap();
    }

    #[test]
    fn overlay_option_paths_are_escaped() {
        assert_eq!(overlay_escape(Path::new("/a,b:c\\d")), "/a\\,b\\:c\\\\d");
    }

    #[test]
    fn rlimits_are_clamped_to_the_current_hard_limit() {
        let r = rootfs();
        let mut spec = ExecSpec::new(r.path(), vec!["sh".into()]);
        spec.rlimits = vec![crate::spec::Rlimit {
            resource: crate::spec::RlimitResource::Nofile,
            soft: u64::MAX - 1,
            hard: u64::MAX - 1,
        }];
        let mut prep = prepare(&spec).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let plan = build_plan(&spec, &prep, scratch.path(), -1).unwrap();
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass and nothing else.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
        assert_eq!(plan.rlimits[0].1.rlim_max, cur.rlim_max);
        assert!(plan.rlimits[0].1.rlim_cur <= cur.rlim_max);
        prep.stubs.remove().unwrap();
    }
}
