//! What this environment lets kiln do, probed once: user namespaces, subordinate ids and the
//! helpers that map them, mounts (overlay, proc) with and without a user namespace, chroot,
//! fuse, cgroups. [`EnvironmentProbe::modes`] turns the facts into the modes kiln can run
//! in, strongest first, each usable or with what to change; `kiln debug env` prints both.
//!
//! Each namespace check runs in a forked child (the namespaces die with it), so the probe
//! must be called while the process has a single thread (before any runtime starts).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::userns::{self, IdRange};

/// The outcome of one check: `Ok` or the reason it failed.
pub type Check = Result<(), String>;

/// Everything the probe found.
#[derive(Debug, Clone)]
pub struct EnvironmentProbe {
    /// Effective uid of kiln.
    pub euid: u32,
    /// The user's name (the subid files are keyed by it).
    pub user: String,
    /// `uname -r`.
    pub kernel: String,
    /// True when the kernel is at least 5.11 (overlayfs in a user namespace).
    pub kernel_overlay_userns: bool,
    /// True when kiln already runs in a user namespace other than the initial one (a
    /// rootless container, or kiln's own rootless re-exec).
    pub nested_userns: bool,
    /// The mode kiln's rootless re-exec chose, when this process is that child.
    pub rootless_child: Option<String>,
    /// `user.max_user_namespaces`.
    pub max_user_namespaces: Option<u64>,
    /// `kernel.unprivileged_userns_clone` (Debian/Ubuntu kernels only).
    pub unprivileged_userns_clone: Option<u64>,
    /// `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu 23.10+).
    pub apparmor_restrict_userns: Option<u64>,
    /// New mount, pid, uts and ipc namespaces as kiln is now (root's RUN containers).
    pub namespaces: Check,
    /// A fresh /proc mounted in a new pid namespace, as kiln is now.
    pub proc_mount: Check,
    /// overlayfs mounted as kiln is now (root's snapshotter).
    pub overlay: Check,
    /// A new user namespace mapping the user to 0.
    pub userns: Check,
    /// A fresh /proc in a new pid namespace inside a new user namespace.
    pub proc_in_userns: Check,
    /// overlayfs (`userxattr`) inside a new user namespace.
    pub overlay_in_userns: Check,
    /// `chroot(2)` as kiln is now.
    pub chroot: Check,
    /// The user's range in /etc/subuid.
    pub subuid: Option<IdRange>,
    /// The user's range in /etc/subgid.
    pub subgid: Option<IdRange>,
    /// `newuidmap`, usable (setuid root or with file capabilities).
    pub newuidmap: Result<PathBuf, String>,
    /// `newgidmap`, usable.
    pub newgidmap: Result<PathBuf, String>,
    /// `fuse-overlayfs` and an openable `/dev/fuse`.
    pub fuse_overlayfs: Check,
    /// kiln's own cgroup is writable (for `pids.max`).
    pub cgroup: Check,
}

/// One mode kiln can run builds in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeVerdict {
    /// `root`, `rootless-userns`, `rootless-single-uid`, `chroot`.
    pub name: &'static str,
    /// What it isolates or cannot do, one line.
    pub summary: &'static str,
    /// Empty when usable; else what is missing and what to change, one item each.
    pub missing: Vec<String>,
    /// What is weaker here than the mode's best, and how to get it back.
    pub notes: Vec<String>,
}

impl ModeVerdict {
    /// True when nothing is missing.
    pub fn usable(&self) -> bool {
        self.missing.is_empty()
    }
}

fn sysctl(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let ma: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mi: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (ma, mi) >= (major, minor)
}

/// A helper is usable when it is setuid root or carries file capabilities.
fn id_map_helper(name: &str) -> Result<PathBuf, String> {
    let Some(p) = userns::find_program(name) else {
        return Err(format!(
            "{name} not found: install Debian's uidmap package (apt-get install uidmap)"
        ));
    };
    let md = std::fs::metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let setuid_root = md.uid() == 0 && md.mode() & 0o4000 != 0;
    let has_caps = CString::new(p.as_os_str().as_bytes())
        .ok()
        .map(|c| {
            // SAFETY: a size query with a null buffer.
            unsafe {
                libc::getxattr(
                    c.as_ptr(),
                    c"security.capability".as_ptr(),
                    std::ptr::null_mut(),
                    0,
                )
            }
        })
        .is_some_and(|n| n > 0);
    if setuid_root || has_caps {
        Ok(p)
    } else {
        Err(format!(
            "{} is neither setuid root nor has file capabilities: chmod u+s {} (as root)",
            p.display(),
            p.display()
        ))
    }
}

fn cgroup_writable() -> Check {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 hierarchy (cgroup v1 only)")?;
    let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: access on a valid C string.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "{} is not writable: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ))
    }
}

fn fuse_overlayfs() -> Check {
    let bin = userns::find_program("fuse-overlayfs")
        .ok_or("fuse-overlayfs not found (apt-get install fuse-overlayfs)")?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("{} found, but /dev/fuse: {e}", bin.display()))?;
    Ok(())
}

/// What to change so that user namespaces can be created, from the sysctls seen; `contained`
/// is true for root in a container (its runtime's seccomp profile is then the likely cause).
fn userns_fix(
    max_user_namespaces: Option<u64>,
    unprivileged_userns_clone: Option<u64>,
    apparmor_restrict_userns: Option<u64>,
    contained: bool,
) -> String {
    if max_user_namespaces == Some(0) {
        "user namespaces are disabled: sysctl -w user.max_user_namespaces=28633".into()
    } else if unprivileged_userns_clone == Some(0) {
        "unprivileged user namespaces are off: sysctl -w kernel.unprivileged_userns_clone=1".into()
    } else if apparmor_restrict_userns == Some(1) {
        "AppArmor restricts unprivileged user namespaces: sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or give kiln an AppArmor profile with `userns,`".into()
    } else if contained {
        "the container's seccomp profile or runtime refuses unshare(CLONE_NEWUSER): podman/docker run --security-opt seccomp=unconfined (or a profile allowing unshare and clone with CLONE_NEWUSER); Kubernetes: securityContext.seccompProfile.type: Unconfined".into()
    } else {
        "the kernel refuses new user namespaces for this user".into()
    }
}

/// How RUN steps are isolated: `kiln build --isolation`, or the `KILN_ISOLATION` variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// The strongest that works here: namespaces (as root, or in a user namespace), else a
    /// chroot, announced with a warning.
    Auto,
    /// New mount, pid, uts and ipc namespaces per step (in a user namespace without
    /// `CAP_SYS_ADMIN`); fails where none can be made.
    Namespaces,
    /// A chroot of the step's tree, sharing kiln's namespaces and privileges.
    Chroot,
}

impl Isolation {
    /// The environment variable that picks the isolation when the flag is not given.
    pub const ENV: &'static str = "KILN_ISOLATION";

    /// The flag value naming this isolation.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Auto => "auto",
            Isolation::Namespaces => "namespaces",
            Isolation::Chroot => "chroot",
        }
    }

    /// The isolation `KILN_ISOLATION` names (`Auto` when unset or empty).
    pub fn from_env() -> Result<Isolation, String> {
        match std::env::var(Self::ENV) {
            Ok(v) if !v.is_empty() => v.parse().map_err(|e: String| format!("{}: {e}", Self::ENV)),
            _ => Ok(Isolation::Auto),
        }
    }
}

impl std::str::FromStr for Isolation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            // docker build's `--isolation default` (the daemon's choice) is kiln's auto.
            "auto" | "default" => Ok(Isolation::Auto),
            "namespaces" => Ok(Isolation::Namespaces),
            "chroot" => Ok(Isolation::Chroot),
            other => Err(format!(
                "unknown isolation {other:?}: use auto, namespaces or chroot"
            )),
        }
    }
}

/// The isolation one run of kiln uses, decided once before any thread starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationChoice {
    /// `Namespaces` or `Chroot`, never `Auto`.
    pub isolation: Isolation,
    /// True when kiln must first re-execute itself in a user namespace
    /// ([`crate::userns::run_in_user_namespace`]).
    pub user_namespace: bool,
    /// Why, in a few words (for warnings and `kiln debug env`).
    pub reason: String,
}

/// Picks the isolation for `requested`: with `CAP_SYS_ADMIN` namespaces directly; else a user
/// namespace when one can be made; else (for `Auto` and `Chroot`) a chroot when kiln may
/// chroot. The error says what is missing and what to change.
pub fn choose_isolation(requested: Isolation) -> Result<IsolationChoice, String> {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let privileged = euid == 0 && userns::has_cap_sys_admin();
    let fix = || {
        userns_fix(
            sysctl("/proc/sys/user/max_user_namespaces"),
            sysctl("/proc/sys/kernel/unprivileged_userns_clone"),
            sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
            euid == 0 || userns::in_nested_user_namespace(),
        )
    };
    let chroot_ok = || {
        if euid != 0 {
            return Err(format!("kiln runs as uid {euid}: chroot needs root"));
        }
        trial(false, Trial::Chroot)
    };
    let namespaces = |reason: &str, user_namespace: bool| IsolationChoice {
        isolation: Isolation::Namespaces,
        user_namespace,
        reason: reason.to_owned(),
    };
    match requested {
        Isolation::Chroot => match chroot_ok() {
            Ok(()) => Ok(IsolationChoice {
                isolation: Isolation::Chroot,
                user_namespace: false,
                reason: "asked for (--isolation chroot)".into(),
            }),
            Err(e) => Err(format!("--isolation chroot: {e}")),
        },
        _ if privileged => Ok(namespaces("root with CAP_SYS_ADMIN", false)),
        Isolation::Namespaces => match trial(true, Trial::Namespaces) {
            Ok(()) => Ok(namespaces("in a user namespace (no CAP_SYS_ADMIN)", true)),
            Err(e) => Err(format!(
                "--isolation namespaces: no user namespace can be made ({e}): {}",
                fix()
            )),
        },
        Isolation::Auto => match trial(true, Trial::Namespaces) {
            Ok(()) => Ok(namespaces("in a user namespace (no CAP_SYS_ADMIN)", true)),
            Err(userns_err) => match chroot_ok() {
                Ok(()) => Ok(IsolationChoice {
                    isolation: Isolation::Chroot,
                    user_namespace: false,
                    reason: format!("no namespace can be made here ({userns_err})"),
                }),
                Err(chroot_err) => Err(format!(
                    "no isolation works here: no user namespace can be made ({userns_err}): {}; \
                     and no chroot ({chroot_err})",
                    fix()
                )),
            },
        },
    }
}

/// What the forked child tries, in order; the first failing step is reported.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trial {
    Namespaces,
    Proc,
    Overlay,
    Chroot,
}

/// Paths and strings a trial needs, made before forking (the child must not allocate).
struct TrialPlan {
    userns: bool,
    trial: Trial,
    uid_map: CString,
    gid_map: CString,
    target: CString,
    overlay_data: CString,
}

const STEP_NAMES: &[&str] = &[
    "fork",
    "unshare(CLONE_NEWUSER)",
    "writing /proc/self/setgroups",
    "writing /proc/self/uid_map",
    "writing /proc/self/gid_map",
    "unshare(CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWUTS|CLONE_NEWIPC)",
    "making mounts private",
    "mounting tmpfs",
    "forking into the new pid namespace",
    "mounting proc",
    "mounting overlay",
    "chroot",
];

/// Runs one trial in a forked child and reports the step that failed with its errno.
fn trial(userns: bool, trial: Trial) -> Check {
    let dir = tempfile_dir().map_err(|e| format!("making a probe dir: {e}"))?;
    let result = trial_in(&dir, userns, trial);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let d = base.join(format!("kiln-probe-{}-{i}", std::process::id()));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free probe dir name"))
}

fn trial_in(dir: &Path, userns: bool, which: Trial) -> Check {
    for d in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir_all(dir.join(d)).map_err(|e| e.to_string())?;
    }
    let c = |s: String| CString::new(s).map_err(|e| e.to_string());
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let esc = |p: &Path| crate::namespace::overlay_escape(p);
    let plan = TrialPlan {
        userns,
        trial: which,
        uid_map: c(format!("0 {uid} 1\n"))?,
        gid_map: c(format!("0 {gid} 1\n"))?,
        target: c(dir.join("merged").to_string_lossy().into_owned())?,
        overlay_data: c(format!(
            "lowerdir={},upperdir={},workdir={}{}",
            esc(&dir.join("lower")),
            esc(&dir.join("upper")),
            esc(&dir.join("work")),
            if userns || userns::in_nested_user_namespace() {
                ",userxattr"
            } else {
                ""
            }
        ))?,
    };
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: both fds are new and ours.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child runs only raw syscalls over data prepared above, then _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the forked child.
        unsafe { trial_child(&plan, w.as_raw_fd()) };
    }
    drop(w);
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    let mut st = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    let mut buf = Vec::new();
    use std::io::Read;
    let _ = std::fs::File::from(r).read_to_end(&mut buf);
    if buf.len() >= 8 {
        let step = i32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
        return Err(format!(
            "{}: {}",
            STEP_NAMES.get(step).copied().unwrap_or("probe"),
            std::io::Error::from_raw_os_error(errno)
        ));
    }
    if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0 {
        Ok(())
    } else {
        Err(format!("probe child ended with wait status {st:#x}"))
    }
}

#[expect(
    unsafe_op_in_unsafe_fn,
    reason = "forked-child code: raw syscalls over memory prepared before the fork"
)]
unsafe fn trial_child(plan: &TrialPlan, fd: i32) -> ! {
    let fail = |step: i32| -> ! {
        let e = *libc::__errno_location();
        let msg = [step, e];
        libc::write(fd, msg.as_ptr().cast(), 8);
        libc::_exit(1)
    };
    let write_file = |path: &std::ffi::CStr, data: &std::ffi::CStr| -> bool {
        let f = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if f < 0 {
            return false;
        }
        let n = data.to_bytes().len();
        let ok = libc::write(f, data.as_ptr().cast(), n) == n as isize;
        libc::close(f);
        ok
    };
    if plan.userns {
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            fail(1);
        }
        if !write_file(c"/proc/self/setgroups", c"deny") {
            fail(2);
        }
        if !write_file(c"/proc/self/uid_map", &plan.uid_map) {
            fail(3);
        }
        if !write_file(c"/proc/self/gid_map", &plan.gid_map) {
            fail(4);
        }
    }
    if plan.trial == Trial::Chroot {
        if libc::chroot(plan.target.as_ptr()) != 0 {
            fail(11);
        }
        libc::_exit(0);
    }
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if libc::unshare(flags) != 0 {
        fail(5);
    }
    if libc::mount(
        std::ptr::null(),
        c"/".as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) != 0
    {
        fail(6);
    }
    match plan.trial {
        Trial::Namespaces => {
            if libc::mount(
                c"tmpfs".as_ptr(),
                plan.target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            ) != 0
            {
                fail(7);
            }
        }
        Trial::Proc => {
            // The first child after unshare(CLONE_NEWPID) is pid 1 of the new namespace.
            let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0);
            if pid < 0 {
                fail(8);
            }
            if pid == 0 {
                if libc::mount(
                    c"proc".as_ptr(),
                    plan.target.as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) != 0
                {
                    fail(9);
                }
                libc::_exit(0);
            }
            let mut st = 0;
            libc::waitpid(pid as libc::pid_t, &mut st, 0);
            libc::_exit(if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                1
            });
        }
        Trial::Overlay => {
            if libc::mount(
                c"overlay".as_ptr(),
                plan.target.as_ptr(),
                c"overlay".as_ptr(),
                0,
                plan.overlay_data.as_ptr().cast(),
            ) != 0
            {
                fail(10);
            }
        }
        Trial::Chroot => {}
    }
    libc::_exit(0)
}

impl EnvironmentProbe {
    /// Probes this environment. Call while the process is single-threaded.
    pub fn run() -> EnvironmentProbe {
        // SAFETY: geteuid/getuid cannot fail.
        let (euid, uid) = unsafe { (libc::geteuid(), libc::getuid()) };
        let user = userns::user_name(uid);
        let kernel = kernel_release();
        let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
        EnvironmentProbe {
            euid,
            kernel_overlay_userns: kernel_at_least(&kernel, 5, 11),
            kernel,
            nested_userns: userns::in_nested_user_namespace(),
            rootless_child: userns::current_rootless_mode(),
            max_user_namespaces: sysctl("/proc/sys/user/max_user_namespaces"),
            unprivileged_userns_clone: sysctl("/proc/sys/kernel/unprivileged_userns_clone"),
            apparmor_restrict_userns: sysctl(
                "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            ),
            namespaces: trial(false, Trial::Namespaces),
            proc_mount: trial(false, Trial::Proc),
            overlay: trial(false, Trial::Overlay),
            userns: trial(true, Trial::Namespaces),
            proc_in_userns: trial(true, Trial::Proc),
            overlay_in_userns: trial(true, Trial::Overlay),
            chroot: trial(false, Trial::Chroot),
            subuid: userns::parse_subid(&read("/etc/subuid"), &user, uid),
            subgid: userns::parse_subid(&read("/etc/subgid"), &user, uid),
            user,
            newuidmap: id_map_helper("newuidmap"),
            newgidmap: id_map_helper("newgidmap"),
            fuse_overlayfs: fuse_overlayfs(),
            cgroup: cgroup_writable(),
        }
    }

    /// What to change so that user namespaces can be created, from the sysctls seen.
    fn userns_fix(&self) -> String {
        userns_fix(
            self.max_user_namespaces,
            self.unprivileged_userns_clone,
            self.apparmor_restrict_userns,
            self.nested_userns || self.euid == 0,
        )
    }

    /// The modes kiln can run builds in, strongest first.
    pub fn modes(&self) -> Vec<ModeVerdict> {
        let mut out = Vec::new();
        // root: RUN in fresh namespaces, overlay snapshots (or copy), full uid range.
        let mut m = Vec::new();
        if self.euid != 0 {
            m.push(format!(
                "kiln runs as uid {} (run as root, or use a rootless mode)",
                self.euid
            ));
        } else {
            if let Err(e) = &self.namespaces {
                m.push(format!("new namespaces: {e} (needs CAP_SYS_ADMIN: podman/docker run --cap-add SYS_ADMIN, or a rootless mode)"));
            } else if let Err(e) = &self.proc_mount {
                m.push(format!("a fresh /proc: {e} (the runtime masks /proc: podman run --security-opt unmask=ALL; Kubernetes: procMount: Unmasked)"));
            }
        }
        out.push(ModeVerdict {
            name: "root",
            summary: "RUN in new mount/pid/uts/ipc namespaces, every uid and gid, overlayfs",
            missing: m,
            notes: Vec::new(),
        });

        let userns_missing = |m: &mut Vec<String>| {
            if let Err(e) = &self.userns {
                m.push(format!("user namespace: {e}; {}", self.userns_fix()));
            }
        };
        let mut m = Vec::new();
        userns_missing(&mut m);
        // Root (in a container without CAP_SYS_ADMIN) maps its own ids: no subids needed.
        if self.euid != 0 && self.subuid.is_none() {
            m.push(format!(
                "no range for {} in /etc/subuid: add `{}:100000:65536` (usermod --add-subuids 100000-165535 {})",
                self.user, self.user, self.user
            ));
        }
        if self.euid != 0 && self.subgid.is_none() {
            m.push(format!(
                "no range for {} in /etc/subgid: add `{}:100000:65536` (usermod --add-subgids 100000-165535 {})",
                self.user, self.user, self.user
            ));
        }
        for h in [&self.newuidmap, &self.newgidmap] {
            if let (Err(e), true) = (h, self.euid != 0) {
                m.push(e.clone());
            }
        }
        out.push(ModeVerdict {
            name: "rootless-userns",
            summary:
                "a user namespace mapped from /etc/subuid and /etc/subgid (root: its own ids): same layers as root",
            missing: m,
            notes: self.userns_notes(),
        });

        let mut m = Vec::new();
        userns_missing(&mut m);
        out.push(ModeVerdict {
            name: "rootless-single-uid",
            summary:
                "a user namespace mapping only the user: files of other uids/gids cannot be made",
            missing: m,
            notes: self.userns_notes(),
        });

        // Where no namespace can be made at all: RUN in a chroot (`ChrootExecutor`).
        let mut m = Vec::new();
        if self.euid != 0 {
            m.push(format!(
                "kiln runs as uid {}: chroot needs root (CAP_SYS_CHROOT)",
                self.euid
            ));
        } else if let Err(e) = &self.chroot {
            m.push(format!(
                "chroot: {e} (needs CAP_SYS_CHROOT, in podman's and docker's default set)"
            ));
        }
        out.push(ModeVerdict {
            name: "chroot",
            summary: "RUN in a chroot, sharing the container's namespaces and privileges",
            missing: m,
            notes: vec![
                "chosen only with --isolation chroot or when no namespace can be made, and announced at every build".into(),
                "RUN steps share the container's network, processes, IPC and hostname; build with --network host --allow network.host".into(),
                "no /proc in steps; /dev nodes only with CAP_MKNOD; RUN --mount=type=ssh is refused".into(),
            ],
        });
        out
    }

    /// Notes for the user-namespace modes: what is weaker in this environment.
    fn userns_notes(&self) -> Vec<String> {
        match &self.proc_in_userns {
            Ok(()) => Vec::new(),
            Err(e) => vec![format!(
                "no fresh /proc ({e}): RUN steps get the container's /proc and see its processes; \
                 for a private /proc: podman run --security-opt unmask=/proc/*, Kubernetes: procMount: Unmasked"
            )],
        }
    }

    /// The strongest usable mode, if any.
    pub fn best_mode(&self) -> Option<ModeVerdict> {
        self.modes().into_iter().find(ModeVerdict::usable)
    }

    /// The snapshotter kiln would use, and why.
    pub fn snapshotter(&self) -> String {
        let rootless = self.euid != 0 || self.rootless_child.is_some() || self.namespaces.is_err();
        let overlay = if rootless && self.rootless_child.is_none() {
            &self.overlay_in_userns
        } else {
            &self.overlay
        };
        match overlay {
            Ok(()) if rootless => "overlayfs in the user namespace (userxattr)".into(),
            Ok(()) => "overlayfs".into(),
            Err(e) if rootless && !self.kernel_overlay_userns => format!(
                "copy (overlayfs in a user namespace needs kernel 5.11+, this is {}: {e})",
                self.kernel
            ),
            Err(e) => format!("copy (overlayfs: {e})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_compare_by_major_then_minor() {
        assert!(kernel_at_least("6.18.44-fc-v1300", 5, 11));
        assert!(kernel_at_least("5.11.0", 5, 11));
        assert!(!kernel_at_least("5.10.209-amd64", 5, 11));
        assert!(!kernel_at_least("", 5, 11));
    }

    #[test]
    fn a_mode_that_cannot_be_used_says_what_to_change() {
        let p = EnvironmentProbe {
            euid: 1000,
            kernel: "6.1.0".into(),
            kernel_overlay_userns: true,
            nested_userns: false,
            rootless_child: None,
            max_user_namespaces: Some(100),
            unprivileged_userns_clone: None,
            apparmor_restrict_userns: None,
            namespaces: Err("x".into()),
            proc_mount: Err("x".into()),
            overlay: Err("x".into()),
            userns: Ok(()),
            proc_in_userns: Ok(()),
            overlay_in_userns: Ok(()),
            chroot: Err("chroot: EPERM".into()),
            subuid: None,
            subgid: Some(IdRange {
                start: 100000,
                count: 65536,
            }),
            user: "ci".into(),
            newuidmap: Ok("/usr/bin/newuidmap".into()),
            newgidmap: Ok("/usr/bin/newgidmap".into()),
            fuse_overlayfs: Ok(()),
            cgroup: Ok(()),
        };
        let modes = p.modes();
        let userns = modes.iter().find(|m| m.name == "rootless-userns").unwrap();
        assert!(!userns.usable());
        assert!(
            userns.missing[0].contains("add `ci:100000:65536`")
                && userns.missing[0].contains("/etc/subuid"),
            "{:?}",
            userns.missing
        );
        assert_eq!(p.best_mode().unwrap().name, "rootless-single-uid");
    }
}
