//! The chroot executor: RUN in a `chroot(2)` of the step's rootfs, with no new namespace and
//! no mount. It is the fallback for environments where kiln can create neither namespaces
//! nor a user namespace (Debian's dockerd with its default seccomp profile, Kubernetes pods
//! with `RuntimeDefault` seccomp): the step shares kiln's network, pid, ipc and uts
//! namespaces, and runs as root of kiln's own container, with Docker's capability set minus
//! `CAP_SYS_CHROOT` (which would let it leave the chroot) and Docker's seccomp filter.
//!
//! What a root build mounts is put into the tree instead, and taken out again before the
//! layer is made (the layer is the tree's difference from its parent, found by the copy
//! snapshotter's comparison): whatever sits at a mount point is moved aside for the run and
//! moved back after; `/etc/hosts` and `/etc/resolv.conf` are written from the host's, secrets
//! are written as files, a cache directory is moved in (one step at a time per cache) and
//! back out, a bind source is copied in, a tmpfs is an empty directory, `/dev` holds the
//! usual device nodes when kiln may create them (`CAP_MKNOD`), `/proc` and `/sys` are empty.
//! `docs/rootless.md` lists which isolation checks of a root build still hold.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use crate::output::{cloexec_pipe, supervise};
use crate::prepare::{run_prepared, Prepared};
use crate::security::{assume_step_credentials, StepCredentials};
use crate::spec::{
    CancelToken, ExecError, ExecSpec, Executor, ExitStatus, MountKind, Network, OutputSink,
};

/// `CAP_SYS_CHROOT` (linux/capability.h): a step holding it could chroot again and walk out.
const CAP_SYS_CHROOT: u32 = 18;

/// Runs each step in a chroot of its rootfs, sharing kiln's namespaces (see the module docs).
#[derive(Debug, Default)]
pub struct ChrootExecutor {
    _private: (),
}

impl ChrootExecutor {
    /// A chroot executor.
    pub fn new() -> Self {
        ChrootExecutor { _private: () }
    }
}

/// Caches in use by a running step: a cache directory is moved into one step's tree at a
/// time, so steps sharing a cache take turns.
static CACHES_IN_USE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static CACHE_FREED: Condvar = Condvar::new();

/// The caches one run holds; released on drop.
struct CacheClaim(Vec<PathBuf>);

impl CacheClaim {
    fn acquire(mut paths: Vec<PathBuf>) -> CacheClaim {
        paths.sort();
        paths.dedup();
        let mut busy = CACHES_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        while paths.iter().any(|p| busy.contains(p)) {
            busy = CACHE_FREED.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        busy.extend(paths.iter().cloned());
        CacheClaim(paths)
    }
}

impl Drop for CacheClaim {
    fn drop(&mut self) {
        let mut busy = CACHES_IN_USE.lock().unwrap_or_else(|e| e.into_inner());
        busy.retain(|p| !self.0.contains(p));
        CACHE_FREED.notify_all();
    }
}

/// What was put at one mount point, and how to take it out.
enum Content {
    /// Files or directories kiln made: deleted after the run.
    Made,
    /// A cache directory moved in: moved back to `source` after the run.
    CacheMoved { source: PathBuf },
    /// A cache directory copied in (another filesystem): copied back to `source`.
    CacheCopied { source: PathBuf },
}

struct Placed {
    target: PathBuf,
    /// Where what was at `target` waits during the run.
    aside: Option<PathBuf>,
    content: Content,
}

/// A directory whose entries a placement changed, and the times to give it back.
struct TouchedParent {
    path: PathBuf,
    atime: (i64, i64),
    mtime: (i64, i64),
    /// Its mtime once every placement was made: a different one later is the step's change.
    after: (i64, i64),
}

/// The mount points of one run, filled; [`Placements::undo`] restores the tree.
struct Placements {
    aside_dir: PathBuf,
    placed: Vec<Placed>,
    /// Each touched parent directory: its times before, and its mtime once filled.
    parents: Vec<TouchedParent>,
    next: u64,
    /// Set once [`Placements::undo`] ran.
    undone: bool,
}

static NEXT_ASIDE: AtomicU64 = AtomicU64::new(0);

fn io_prep<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ExecError + 'a {
    move |source| ExecError::Prepare {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn mtime_of(m: &fs::Metadata) -> (i64, i64) {
    (m.mtime(), m.mtime_nsec())
}

fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: a valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Copies a file, symlink or directory tree with modes, owners and mtimes.
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let m = fs::symlink_metadata(from)?;
    let ft = m.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
    } else if ft.is_dir() {
        fs::create_dir(to)?;
        for e in fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    } else if ft.is_file() {
        fs::copy(from, to)?;
    } else {
        // Sockets, fifos and devices are not carried into a step's copy.
        return Ok(());
    }
    std::os::unix::fs::lchown(to, Some(m.uid()), Some(m.gid()))?;
    if !ft.is_symlink() {
        fs::set_permissions(to, fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    set_times(to, (m.atime(), m.atime_nsec()), mtime_of(&m))
}

/// The character devices a step finds in `/dev`: name, major, minor.
const DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

impl Placements {
    fn new(root: &Path) -> Result<Placements, ExecError> {
        // Beside the rootfs when both are on one filesystem (renames cannot cross mounts);
        // inside it otherwise (an overlay rootfs is its own mount).
        let n = NEXT_ASIDE.fetch_add(1, Ordering::Relaxed);
        let name = format!(".kiln-chroot-aside-{}-{n}", std::process::id());
        let beside =
            root.parent()
                .filter(|parent| match (fs::metadata(root), fs::metadata(parent)) {
                    (Ok(a), Ok(b)) => a.dev() == b.dev(),
                    _ => false,
                });
        let aside_dir = match beside {
            Some(parent) => parent.join(format!(
                "{}{name}",
                root.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            )),
            None => root.join(name),
        };
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&aside_dir)
            .map_err(io_prep("creating a dir for what mounts cover", &aside_dir))?;
        Ok(Placements {
            aside_dir,
            placed: Vec::new(),
            parents: Vec::new(),
            next: 0,
            undone: false,
        })
    }

    /// Moves whatever is at `target` aside; returns where it went.
    fn clear(&mut self, target: &Path) -> Result<Option<PathBuf>, ExecError> {
        if let Some(parent) = target.parent() {
            if !self.parents.iter().any(|p| p.path == parent) {
                let m = fs::symlink_metadata(parent).map_err(io_prep("reading", parent))?;
                self.parents.push(TouchedParent {
                    path: parent.to_path_buf(),
                    atime: (m.atime(), m.atime_nsec()),
                    mtime: mtime_of(&m),
                    after: (0, 0),
                });
            }
        }
        match fs::symlink_metadata(target) {
            Ok(_) => {
                self.next += 1;
                let aside = self.aside_dir.join(self.next.to_string());
                fs::rename(target, &aside)
                    .map_err(io_prep("moving a mount point aside", target))?;
                Ok(Some(aside))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_prep("checking mount point", target)(e)),
        }
    }

    fn put(&mut self, target: &Path, content: Content, aside: Option<PathBuf>) {
        self.placed.push(Placed {
            target: target.to_path_buf(),
            aside,
            content,
        });
    }

    fn file(
        &mut self,
        target: &Path,
        data: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), ExecError> {
        let aside = self.clear(target)?;
        self.put(target, Content::Made, aside);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(target)
            .map_err(io_prep("writing a file for the step", target))?;
        use std::io::Write;
        f.write_all(data)
            .map_err(io_prep("writing a file for the step", target))?;
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
            .map_err(io_prep("setting the owner of", target))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_prep("setting the mode of", target))?;
        Ok(())
    }

    fn dir(&mut self, target: &Path, mode: u32) -> Result<(), ExecError> {
        let aside = self.clear(target)?;
        self.put(target, Content::Made, aside);
        fs::create_dir(target).map_err(io_prep("creating a directory for the step", target))?;
        fs::set_permissions(target, fs::Permissions::from_mode(mode))
            .map_err(io_prep("setting the mode of", target))
    }

    fn copy(&mut self, target: &Path, source: &Path) -> Result<(), ExecError> {
        let aside = self.clear(target)?;
        self.put(target, Content::Made, aside);
        copy_tree(source, target).map_err(io_prep(
            "copying a bind mount's source for the step",
            source,
        ))
    }

    fn cache(&mut self, target: &Path, source: &Path) -> Result<(), ExecError> {
        let aside = self.clear(target)?;
        match fs::rename(source, target) {
            Ok(()) => {
                self.put(
                    target,
                    Content::CacheMoved {
                        source: source.to_path_buf(),
                    },
                    aside,
                );
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                self.put(
                    target,
                    Content::CacheCopied {
                        source: source.to_path_buf(),
                    },
                    aside,
                );
                copy_tree(source, target).map_err(io_prep("copying a cache mount in", source))
            }
            Err(e) => {
                self.put(target, Content::Made, aside);
                Err(io_prep("moving a cache mount in", source)(e))
            }
        }
    }

    /// `/dev` as a fresh directory with the usual nodes, when `mknod` is allowed.
    fn dev(&mut self, target: &Path) -> Result<(), ExecError> {
        self.dir(target, 0o755)?;
        for (name, major, minor) in DEVICES {
            let p = target.join(name);
            let c = CString::new(p.as_os_str().as_bytes())
                .map_err(|e| ExecError::InvalidSpec(e.to_string()))?;
            // SAFETY: a valid C string; mknod creates a node or fails.
            let r = unsafe {
                libc::mknod(
                    c.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(*major, *minor),
                )
            };
            if r != 0 {
                // Without CAP_MKNOD (podman's default set, user namespaces) there are no
                // nodes: a step writing to /dev/null makes a file that goes with /dev.
                break;
            }
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o666));
        }
        for (name, mode) in [("shm", 0o1777), ("pts", 0o755)] {
            let p = target.join(name);
            fs::create_dir(&p).map_err(io_prep("creating", &p))?;
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(mode));
        }
        for (name, to) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            let _ = std::os::unix::fs::symlink(to, target.join(name));
        }
        Ok(())
    }

    /// Remembers the parents' mtimes as the filling left them.
    fn seal(&mut self) {
        for p in &mut self.parents {
            p.after = fs::symlink_metadata(&p.path).map_or((0, 0), |m| mtime_of(&m));
        }
    }

    /// Takes every placed thing out and puts back what was there; best effort, first error.
    fn undo(&mut self) -> io::Result<()> {
        self.undone = true;
        let mut first: Option<io::Error> = None;
        let untouched: Vec<bool> = self
            .parents
            .iter()
            .map(|p| fs::symlink_metadata(&p.path).is_ok_and(|m| mtime_of(&m) == p.after))
            .collect();
        for p in self.placed.drain(..).rev() {
            let res = match &p.content {
                Content::Made => remove_any(&p.target),
                Content::CacheMoved { source } => match fs::rename(&p.target, source) {
                    Ok(()) => Ok(()),
                    // The step removed or replaced the cache dir: keep an empty cache.
                    Err(_) => remove_any(&p.target).and_then(|()| fs::create_dir_all(source)),
                },
                Content::CacheCopied { source } => remove_any(source)
                    .and_then(|()| match fs::symlink_metadata(&p.target) {
                        Ok(_) => copy_tree(&p.target, source),
                        Err(_) => fs::create_dir_all(source),
                    })
                    .and_then(|()| remove_any(&p.target)),
            };
            let res = res.and_then(|()| match &p.aside {
                Some(a) => fs::rename(a, &p.target),
                None => Ok(()),
            });
            if let Err(e) = res {
                first.get_or_insert(e);
            }
        }
        for (p, untouched) in self.parents.iter().zip(untouched) {
            if untouched {
                if let Err(e) = set_times(&p.path, p.atime, p.mtime) {
                    first.get_or_insert(e);
                }
            }
        }
        self.parents.clear();
        if let Err(e) = fs::remove_dir(&self.aside_dir) {
            if e.kind() != io::ErrorKind::NotFound {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Placements {
    fn drop(&mut self) {
        if !self.undone {
            let _ = self.undo();
        }
    }
}

/// Fills the mount points `prepare` made (or found) in the rootfs.
fn fill(spec: &ExecSpec, prep: &Prepared) -> Result<Placements, ExecError> {
    let mut pl = Placements::new(&prep.root)?;
    pl.dir(&prep.proc_dir, 0o555)?;
    pl.dir(&prep.sys_dir, 0o555)?;
    pl.dev(&prep.dev_dir)?;
    for hf in &prep.host_files {
        pl.file(&hf.target, &hf.content, 0o644, 0, 0)?;
    }
    for (m, target) in spec.mounts.iter().zip(&prep.mount_targets) {
        match &m.kind {
            MountKind::Bind { source, .. } => pl.copy(target, source)?,
            MountKind::Cache { source } => pl.cache(target, source)?,
            MountKind::Tmpfs { .. } => pl.dir(target, 0o1777)?,
            MountKind::Secret {
                data,
                mode,
                uid,
                gid,
            } => pl.file(target, data.expose(), *mode, *uid, *gid)?,
            MountKind::Ssh { .. } => {
                return Err(ExecError::Unsupported(
                    "RUN --mount=type=ssh with chroot isolation",
                ))
            }
        }
    }
    pl.seal();
    Ok(pl)
}

/// Everything the forked child needs, made before the fork (the child must not allocate).
struct ChildPlan {
    root: CString,
    cwd: CString,
    exe: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// The step's user, groups, capabilities and seccomp programs.
    creds: StepCredentials,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    /// `personality(2)` of the step's process (`PER_LINUX32`), or `None` to keep kiln's.
    persona: Option<libc::c_ulong>,
    max_fd: i32,
}

/// Setup steps the child reports by index when one fails.
const CHILD_STEPS: &[&str] = &[
    "chroot",
    "chdir to the working dir",
    "setrlimit",
    "dropping capabilities",
    "capset",
    "no_new_privs",
    "installing seccomp filter",
    "setgroups",
    "setgid",
    "setuid",
    "exec",
    "starting a process group",
    "forking the step",
    "setting the personality",
];

/// The report the group's keeper writes when the step ended: this, then the wait status.
const EXIT_REPORT: i32 = 1000;

fn cstring(s: impl AsRef<[u8]>) -> Result<CString, ExecError> {
    CString::new(s.as_ref()).map_err(|_| ExecError::InvalidSpec("a NUL byte in a path".into()))
}

fn plan_child(spec: &ExecSpec, prep: &Prepared) -> Result<ChildPlan, ExecError> {
    let argv: Vec<CString> = spec.args.iter().map(cstring).collect::<Result<_, _>>()?;
    let envp: Vec<CString> = prep.env.iter().map(cstring).collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<_> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<_> = envp.iter().map(|c| c.as_ptr()).collect();
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
        rlimits.push((
            res,
            libc::rlimit {
                rlim_cur: rl.soft.min(hard),
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
    let sandbox = !spec.privileged;
    Ok(ChildPlan {
        root: cstring(prep.root.as_os_str().as_bytes())?,
        cwd: cstring(&spec.cwd)?,
        exe: cstring(&prep.exe)?,
        _argv: argv,
        argv_ptrs,
        _envp: envp,
        envp_ptrs,
        creds: StepCredentials::new(&prep.user, sandbox, 1u64 << CAP_SYS_CHROOT)?,
        rlimits,
        persona: spec.personality.persona(),
        max_fd: nofile.rlim_cur.min(1 << 20) as i32,
    })
}

#[expect(
    unsafe_op_in_unsafe_fn,
    reason = "forked-child code: raw syscalls over memory prepared before the fork"
)]
unsafe fn child(plan: &ChildPlan, stdio: [i32; 3], rep: i32) -> ! {
    let fail = |step: i32| -> ! {
        let msg = [step, *libc::__errno_location()];
        libc::write(rep, msg.as_ptr().cast(), 8);
        libc::_exit(127)
    };
    // Its own process group: cancelling kills the step and everything it started.
    if libc::setpgid(0, 0) != 0 {
        fail(11);
    }
    for sig in 1..libc::SIGRTMIN() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    for (i, fd) in stdio.iter().enumerate() {
        libc::dup2(*fd, i as i32);
    }
    // Keep the report pipe (close-on-exec) as fd 3; close everything else kiln holds.
    if rep != 3 && libc::dup3(rep, 3, libc::O_CLOEXEC) < 0 {
        fail(10);
    }
    libc::fcntl(3, libc::F_SETFD, libc::FD_CLOEXEC);
    let rep = 3;
    let fail = |step: i32| -> ! {
        let msg = [step, *libc::__errno_location()];
        libc::write(rep, msg.as_ptr().cast(), 8);
        libc::_exit(127)
    };
    if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) != 0 {
        for fd in 4..plan.max_fd.max(4) {
            libc::close(fd);
        }
    }
    if libc::chroot(plan.root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
        fail(0);
    }
    if libc::chdir(plan.cwd.as_ptr()) != 0 {
        fail(1);
    }
    // This process stays behind as the group's keeper: when the step ends it reports the
    // status and kills the whole group, so nothing the step started outlives it (there is
    // no pid namespace to do that) and the output pipes close at once.
    let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0);
    if pid < 0 {
        fail(12);
    }
    if pid == 0 {
        step(plan, rep);
    }
    libc::close(0);
    libc::close(1);
    libc::close(2);
    loop {
        let mut st = 0;
        let r = libc::waitpid(pid as libc::pid_t, &mut st, 0);
        if r == pid as libc::pid_t {
            let msg = [EXIT_REPORT, st];
            libc::write(rep, msg.as_ptr().cast(), 8);
            libc::kill(0, libc::SIGKILL);
            libc::_exit(0);
        }
        if r < 0 && *libc::__errno_location() != libc::EINTR {
            libc::_exit(3);
        }
    }
}

/// The step's process, forked by the group's keeper: confine it, then exec.
#[expect(
    unsafe_op_in_unsafe_fn,
    reason = "forked-child code: raw syscalls over memory prepared before the fork"
)]
unsafe fn step(plan: &ChildPlan, rep: i32) -> ! {
    let fail = |step: i32| -> ! {
        let msg = [step, *libc::__errno_location()];
        libc::write(rep, msg.as_ptr().cast(), 8);
        libc::_exit(127)
    };
    if let Some(persona) = plan.persona {
        if libc::personality(persona) == -1 {
            fail(13);
        }
    }
    for (res, lim) in &plan.rlimits {
        if libc::setrlimit(*res, lim) != 0 {
            fail(2);
        }
    }
    if let Err(call) = assume_step_credentials(&plan.creds) {
        fail(3 + call as i32);
    }
    libc::execve(
        plan.exe.as_ptr(),
        plan.argv_ptrs.as_ptr(),
        plan.envp_ptrs.as_ptr(),
    );
    fail(10)
}

fn run_child(
    spec: &ExecSpec,
    prep: &Prepared,
    sink: &mut dyn OutputSink,
    cancel: &CancelToken,
) -> Result<ExitStatus, ExecError> {
    let plan = plan_child(spec, prep)?;
    let (out_r, out_w) = cloexec_pipe()?;
    let (err_r, err_w) = cloexec_pipe()?;
    let (rep_r, rep_w) = cloexec_pipe()?;
    let devnull: OwnedFd = fs::File::open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| ExecError::Spawn {
            what: "opening /dev/null",
            source: e,
        })?;
    let stdio = [devnull.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let rep_fd = rep_w.as_raw_fd();
    // A raw clone, not fork(): glibc's fork runs atfork handlers that may take locks another
    // thread held. SAFETY: the child runs only raw syscalls over `plan`, then execs or exits.
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) };
    if pid == 0 {
        // SAFETY: this is the cloned child.
        unsafe { child(&plan, stdio, rep_fd) };
    }
    if pid < 0 {
        return Err(ExecError::Spawn {
            what: "starting the step",
            source: io::Error::last_os_error(),
        });
    }
    let pid = pid as libc::pid_t;
    drop((out_w, err_w, rep_w, devnull));
    let mut kill = || {
        // SAFETY: signalling our own child and its process group.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
    };
    let sup = supervise(
        pid,
        out_r,
        err_r,
        sink,
        cancel,
        &prep.secret_values,
        &mut kill,
    );
    // Whatever the step left running in its process group goes with it (no pid namespace
    // does this here).
    // SAFETY: signalling the step's process group; ESRCH when it is empty.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let sup = match sup {
        Ok(s) => s,
        Err(e) => {
            let mut st = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            return Err(e);
        }
    };
    let mut report = Vec::new();
    {
        use std::io::Read;
        let _ = fs::File::from(rep_r).read_to_end(&mut report);
    }
    let mut status = None;
    for msg in report.chunks_exact(8) {
        let kind = i32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let value = i32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]);
        if kind == EXIT_REPORT {
            status = Some(value);
            continue;
        }
        let path = match kind {
            0 => prep.root.display().to_string(),
            1 => spec.cwd.clone(),
            10 => prep.exe.clone(),
            _ => String::new(),
        };
        return Err(ExecError::Setup {
            step: CHILD_STEPS.get(kind as usize).copied().unwrap_or("setup"),
            path,
            source: io::Error::from_raw_os_error(value),
        });
    }
    if sup.cancelled {
        return Err(ExecError::Cancelled);
    }
    let st = status.ok_or_else(|| ExecError::Spawn {
        what: "the step's keeper ended without reporting the step's status",
        source: io::Error::other(format!("wait status {:#x}", sup.wait_status)),
    })?;
    if libc::WIFEXITED(st) {
        Ok(ExitStatus::Code(libc::WEXITSTATUS(st)))
    } else if libc::WIFSIGNALED(st) {
        Ok(ExitStatus::Signal(libc::WTERMSIG(st)))
    } else {
        Err(ExecError::Spawn {
            what: "waiting for the step",
            source: io::Error::other(format!("wait status {st:#x}")),
        })
    }
}

/// Refuses what a chroot cannot give, before anything is touched.
fn check_supported(spec: &ExecSpec) -> Result<(), ExecError> {
    match spec.network {
        Network::Host => {}
        Network::Isolated => {
            return Err(ExecError::Network(
                "chroot isolation cannot make the step's own network namespace (the default \
                 RUN network): the step would share kiln's network. Build with \
                 `--network host --allow network.host`, or let kiln create user namespaces \
                 (`kiln debug env` says what to change)"
                    .into(),
            ))
        }
        Network::None => {
            return Err(ExecError::Network(
                "RUN --network=none needs a network namespace of its own, which chroot \
                 isolation cannot make: remove --network=none from the step, or let kiln \
                 create user namespaces (`kiln debug env` says what to change)"
                    .into(),
            ))
        }
    }
    if spec
        .mounts
        .iter()
        .any(|m| matches!(m.kind, MountKind::Ssh { .. }))
    {
        return Err(ExecError::Unsupported(
            "RUN --mount=type=ssh with chroot isolation",
        ));
    }
    Ok(())
}

impl Executor for ChrootExecutor {
    fn run(
        &self,
        spec: &ExecSpec,
        sink: &mut dyn OutputSink,
        cancel: &CancelToken,
    ) -> Result<ExitStatus, ExecError> {
        check_supported(spec)?;
        let caches: Vec<PathBuf> = spec
            .mounts
            .iter()
            .filter_map(|m| match &m.kind {
                MountKind::Cache { source } => Some(source.clone()),
                _ => None,
            })
            .collect();
        let _claim = CacheClaim::acquire(caches);
        run_prepared(spec, cancel, |prep| {
            let mut placed = fill(spec, prep)?;
            let result = run_child(spec, prep, sink, cancel);
            let undone = placed.undo().map_err(|e| ExecError::Prepare {
                what: "taking mount contents back out of the rootfs",
                path: prep.root.clone(),
                source: e,
            });
            let status = result?;
            undone?;
            Ok(status)
        })
    }
}

/// Paths a set of cache claims covers (for tests).
#[cfg(test)]
fn caches_in_use() -> std::collections::HashSet<PathBuf> {
    CACHES_IN_USE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_claim_is_released_when_dropped() {
        let p = PathBuf::from("/nonexistent/kiln-cache-a");
        {
            let _c = CacheClaim::acquire(vec![p.clone(), p.clone()]);
            assert!(caches_in_use().contains(&p));
        }
        assert!(!caches_in_use().contains(&p));
    }

    #[test]
    fn placements_put_back_what_mount_points_covered() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("fs");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/hosts"), "image's own\n").unwrap();
        let cache = d.path().join("cache");
        fs::create_dir_all(&cache).unwrap();
        fs::write(cache.join("kept"), "1").unwrap();
        fs::create_dir_all(root.join("root/.npm")).unwrap();
        set_times(&root.join("etc"), (1000, 0), (2000, 0)).unwrap();

        let mut pl = Placements::new(&root).unwrap();
        pl.file(&root.join("etc/hosts"), b"host's\n", 0o644, 0, 0)
            .unwrap();
        pl.cache(&root.join("root/.npm"), &cache).unwrap();
        pl.seal();
        assert_eq!(
            fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "host's\n"
        );
        assert!(root.join("root/.npm/kept").is_file() && !cache.exists());
        // The step writes into the cache.
        fs::write(root.join("root/.npm/new"), "2").unwrap();
        pl.undo().unwrap();

        assert_eq!(
            fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "image's own\n"
        );
        assert!(cache.join("kept").is_file() && cache.join("new").is_file());
        assert!(root.join("root/.npm").is_dir());
        assert_eq!(fs::read_dir(root.join("root/.npm")).unwrap().count(), 0);
        assert_eq!(fs::metadata(root.join("etc")).unwrap().mtime(), 2000);
        let leftovers: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    }
}
