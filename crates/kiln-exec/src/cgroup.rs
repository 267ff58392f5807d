//! A process-count limit per run through the cgroup `pids` controller: the container's init
//! is moved into a cgroup of its own with `pids.max` set before it forks the step, so a fork
//! bomb gets `EAGAIN` instead of filling the host's process table.
//!
//! Either hierarchy works: a cgroup v1 `pids` mount (hybrid hosts) is preferred, else a
//! cgroup v2 mount whose root offers `pids`. Runs get `<hierarchy>/kiln/<kiln pid>-<n>`; the
//! directory is removed after the run, and directories of kiln processes that no longer exist
//! (killed builds) are removed when the next executor with a limit starts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::rootfs::unescape_mountinfo;
use crate::spec::ExecError;

/// Where per-run pids cgroups are made.
#[derive(Debug, Clone)]
pub(crate) struct PidsHierarchy {
    /// `<mount>/kiln` (created on first use).
    parent: PathBuf,
    /// Whether the mount is cgroup v2 (controllers must be enabled per level).
    v2: bool,
}

fn cg_err(what: &'static str, path: &Path, source: std::io::Error) -> ExecError {
    ExecError::Prepare {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl PidsHierarchy {
    /// Finds a hierarchy with the pids controller in `/proc/self/mountinfo`; runs' cgroups
    /// go under `<mount>/<under>/kiln` (`--cgroup-parent`), else `<mount>/kiln`. `under` is
    /// a relative path without `.` or `..` parts (checked by the caller's flag parser).
    pub(crate) fn detect(under: Option<&str>) -> Result<Self, ExecError> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| cg_err("reading", Path::new("/proc/self/mountinfo"), e))?;
        let (mut v1, mut v2) = (None, None);
        for line in info.lines() {
            // `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split(' ').nth(4).unwrap_or("");
            let mut r = right.split(' ');
            let fstype = r.next().unwrap_or("");
            let superopts = r.nth(1).unwrap_or("");
            if fstype == "cgroup" && superopts.split(',').any(|o| o == "pids") {
                v1.get_or_insert_with(|| PathBuf::from(unescape_mountinfo(mount_point)));
            } else if fstype == "cgroup2" {
                let m = PathBuf::from(unescape_mountinfo(mount_point));
                let controllers =
                    std::fs::read_to_string(m.join("cgroup.controllers")).unwrap_or_default();
                if controllers.split_whitespace().any(|c| c == "pids") {
                    v2.get_or_insert(m);
                }
            }
        }
        let (mount, v2) = match (v1, v2) {
            (Some(m), _) => (m, false),
            (None, Some(m)) => (m, true),
            (None, None) => {
                return Err(ExecError::Unsupported(
                    "a pids limit on this machine (no cgroup hierarchy offers the pids \
                     controller)",
                ))
            }
        };
        if under.is_some_and(|u| u.split('/').any(|p| p.is_empty() || p == "." || p == "..")) {
            return Err(ExecError::InvalidSpec(format!(
                "the cgroup parent {under:?} must be a relative path without `.` or `..` parts"
            )));
        }
        let base = under.map_or_else(|| mount.clone(), |u| mount.join(u));
        let h = PidsHierarchy {
            parent: base.join("kiln"),
            v2,
        };
        h.ensure_parent(&mount)?;
        h.reclaim_leftovers();
        Ok(h)
    }

    /// Creates every level from `mount` down to the parent of runs' cgroups; on v2 each level
    /// hands the pids controller down to the next.
    fn ensure_parent(&self, mount: &Path) -> Result<(), ExecError> {
        if self.v2 {
            // v2 hands a controller to children only when each level enables it.
            write_file(&mount.join("cgroup.subtree_control"), "+pids")?;
        }
        let rel = self.parent.strip_prefix(mount).unwrap_or(Path::new("kiln"));
        let mut level = mount.to_path_buf();
        for part in rel.components() {
            level.push(part);
            match std::fs::create_dir(&level) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(cg_err("creating cgroup", &level, e)),
            }
            if self.v2 {
                write_file(&level.join("cgroup.subtree_control"), "+pids")?;
            }
        }
        Ok(())
    }

    /// Removes the (empty) cgroups of kiln processes that are gone.
    fn reclaim_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.parent) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            // SAFETY: signal 0 only checks that the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            if !alive {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }

    /// A new cgroup for one run with `pids.max = limit`.
    pub(crate) fn create_run(&self, limit: u64) -> Result<RunCgroup, ExecError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = self.parent.join(format!("{}-{n}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| cg_err("creating cgroup", &path, e))?;
        let cg = RunCgroup { path };
        // `u64::MAX`: a cgroup only for placement (`--cgroup-parent` without a pids limit).
        let max = if limit == u64::MAX {
            "max".to_string()
        } else {
            limit.to_string()
        };
        write_file(&cg.path.join("pids.max"), &max)?;
        Ok(cg)
    }
}

/// One run's cgroup; removed on drop (it is empty once the run's pid namespace is gone).
#[derive(Debug)]
pub(crate) struct RunCgroup {
    path: PathBuf,
}

impl RunCgroup {
    /// Moves process `pid` (and so everything it forks later) into the cgroup.
    pub(crate) fn add(&self, pid: libc::pid_t) -> Result<(), ExecError> {
        write_file(&self.path.join("cgroup.procs"), &pid.to_string())
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        // The kernel may still be tearing the last exited tasks down: retry briefly.
        for _ in 0..200 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(_) => return,
            }
        }
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), ExecError> {
    std::fs::write(path, value).map_err(|e| cg_err("writing cgroup file", path, e))
}
