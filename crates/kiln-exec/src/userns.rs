//! Rootless kiln: an ordinary user's kiln re-executes itself in a new user and mount
//! namespace in which it is uid 0, so every later step (overlay mounts, layer unpacking with
//! `chown`, the per-RUN namespaces of [`crate::NamespaceExecutor`]) works as it does for root.
//!
//! The map is made by the setuid helpers `newuidmap`/`newgidmap` (Debian's `uidmap`) from the
//! user's ranges in `/etc/subuid` and `/etc/subgid`: uid 0 inside is the user, uids
//! 1..=count inside are the subordinate range. Files a root build would make root-owned are
//! root-owned inside, so layers (and with `SOURCE_DATE_EPOCH` image digests) are the same as
//! a root build's. Without subordinate ids only the user itself is mapped (single-uid mode):
//! files owned by any other uid or gid cannot be represented.
//!
//! The handshake: the parent starts `/proc/self/exe` with the same arguments and
//! [`CHILD_ENV`] naming two pipe fds; the child calls [`enter_as_child`] first thing in
//! `main` (while it still has one thread), which unshares, tells the parent, and waits until
//! the parent has written the maps. The parent then only waits and passes on the exit status.

use std::ffi::OsString;
use std::fmt;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variable that marks kiln's re-executed child: `READY_FD,GO_FD`.
pub const CHILD_ENV: &str = "_KILN_USERNS_SYNC";

/// The environment variable the child keeps for its own children and for `kiln debug env`:
/// the mode it runs in (`rootless-userns` or `rootless-single-uid`).
pub const MODE_ENV: &str = "KILN_ROOTLESS_MODE";

/// A range of subordinate ids from `/etc/subuid` or `/etc/subgid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// The first id on the host.
    pub start: u32,
    /// How many ids.
    pub count: u32,
}

/// How the user namespace maps ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMapping {
    /// The user's own uid (0 inside).
    pub uid: u32,
    /// The user's own gid (0 inside).
    pub gid: u32,
    /// The subordinate uids (1.. inside), `None` in single-uid mode.
    pub subuid: Option<IdRange>,
    /// The subordinate gids (1.. inside), `None` in single-uid mode.
    pub subgid: Option<IdRange>,
    /// Root without CAP_SYS_ADMIN (an unprivileged container): ids 0..n are mapped onto
    /// themselves, written by kiln itself (it holds CAP_SETUID/CAP_SETGID), no subids needed.
    pub own_ids: Option<u32>,
}

impl IdMapping {
    /// True when only the user itself is mapped.
    pub fn single_uid(&self) -> bool {
        self.own_ids.is_none() && (self.subuid.is_none() || self.subgid.is_none())
    }

    /// The mode name for this mapping, as `kiln debug env` prints it.
    pub fn mode_name(&self) -> &'static str {
        if self.single_uid() {
            "rootless-single-uid"
        } else {
            "rootless-userns"
        }
    }
}

/// Why entering the user namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    /// A system call or helper program failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `newuidmap` or `newgidmap` refused the map.
    #[error("{tool} failed: {detail}; check the user's line in {file} (e.g. `{user}:100000:65536`) and that {tool} is setuid root (Debian package uidmap)")]
    IdMap {
        /// `newuidmap` or `newgidmap`.
        tool: &'static str,
        /// Its arguments, exit status and what it printed.
        detail: String,
        /// `/etc/subuid` or `/etc/subgid`.
        file: &'static str,
        /// The user's name.
        user: String,
    },
    /// The child found itself unmapped after the parent said the maps were written.
    #[error("the user namespace has no mapping for kiln (euid {0} inside)")]
    NotMapped(u32),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UsernsError {
    let what = what.into();
    move |source| UsernsError::Io { what, source }
}

/// Finds `user`'s (or `uid`'s) first range in a subuid/subgid file's content. Lines are
/// `name-or-id:start:count`; comments and malformed lines are skipped, as shadow-utils does.
pub fn parse_subid(content: &str, user: &str, uid: u32) -> Option<IdRange> {
    let uid_s = uid.to_string();
    content.lines().find_map(|line| {
        let line = line.trim();
        if line.starts_with('#') {
            return None;
        }
        let mut f = line.split(':');
        let (who, start, count) = (f.next()?, f.next()?, f.next()?);
        if who != user && who != uid_s {
            return None;
        }
        let range = IdRange {
            start: start.trim().parse().ok()?,
            count: count.trim().parse().ok()?,
        };
        (range.count > 0).then_some(range)
    })
}

/// The name of `uid` in `/etc/passwd` (the subid files name users), or the number.
pub fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id: u32 = f.nth(1)?.parse().ok()?;
            (id == uid).then(|| name.to_owned())
        })
        .unwrap_or_else(|| uid.to_string())
}

/// The mapping for the calling user: its uid and gid with its subordinate ranges, if any.
pub fn mapping_for_current_user() -> IdMapping {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let name = user_name(uid);
    let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
    let subuid = parse_subid(&read("/etc/subuid"), &name, uid);
    let subgid = parse_subid(&read("/etc/subgid"), &name, uid);
    let own_ids = (uid == 0 && gid == 0)
        .then(|| own_id_count("/proc/self/uid_map").min(own_id_count("/proc/self/gid_map")))
        .filter(|n| *n > 0);
    IdMapping {
        uid,
        gid,
        subuid,
        subgid,
        own_ids,
    }
}

/// How many ids from 0 up this namespace maps without a gap (a rootless container's map is
/// often `0 1000 1` then `1 100000 65536`). At most 2^32-2: the identity map of every id
/// would look like the initial namespace's, and id 2^32-1 is invalid anyway.
fn own_id_count(map: &str) -> u32 {
    let text = std::fs::read_to_string(map).unwrap_or_default();
    let mut extents: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            (f.len() == 3).then(|| (f[0], f[2]))
        })
        .collect();
    extents.sort_unstable();
    let mut next = 0u64;
    for (start, count) in extents {
        if start != next {
            break;
        }
        next += count;
    }
    next.min(u64::from(u32::MAX) - 1) as u32
}

/// True when this process holds CAP_SYS_ADMIN (effective): root on a host does; root in an
/// unprivileged container does not, and builds in a user namespace instead.
pub fn has_cap_sys_admin() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        // CAP_SYS_ADMIN is capability 21 (linux/capability.h).
        .is_some_and(|caps| caps & (1 << 21) != 0)
}

/// Finds a program in `PATH` (then `/usr/bin`, `/usr/sbin`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// True when this process runs in a user namespace other than the initial one.
pub fn in_nested_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(m) => {
            let f: Vec<&str> = m.split_whitespace().collect();
            f != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

/// The mode this process was re-executed in, when it is kiln's rootless child.
pub fn current_rootless_mode() -> Option<String> {
    std::env::var(MODE_ENV).ok().filter(|m| !m.is_empty())
}

impl fmt::Display for IdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.start, self.count)
    }
}

/// In the parent: starts kiln again (`/proc/self/exe`, same arguments) in a new user and
/// mount namespace mapped as `mapping` says, waits for it and returns its exit code (128 +
/// signal when it was killed). Blocks until the child ends.
pub fn run_in_user_namespace(mapping: &IdMapping) -> Result<i32, UsernsError> {
    let (ready_r, ready_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let fds = format!("{},{}", ready_w.as_raw_fd(), go_r.as_raw_fd());
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| OsString::from("kiln"));
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0(argv0)
        .args(args)
        .env(CHILD_ENV, &fds)
        .env(MODE_ENV, mapping.mode_name());
    let keep = [ready_w.as_raw_fd(), go_r.as_raw_fd()];
    // SAFETY: the closure only calls fcntl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for fd in keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(io_err("starting kiln in a user namespace"))?;
    drop((ready_w, go_r));
    // A terminal's Ctrl-C reaches the child too (same process group): it cancels the build
    // and exits; the parent only waits for it.
    // SAFETY: setting a signal's disposition to ignore.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let mut byte = [0u8; 1];
    let mut ready = std::fs::File::from(ready_r);
    let unshared = matches!(ready.read(&mut byte), Ok(1));
    if unshared {
        let pid = child.id();
        let written = write_maps(pid, mapping);
        if let Err(e) = written {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        std::fs::File::from(go_w)
            .write_all(b"1")
            .map_err(io_err("starting kiln in the user namespace"))?;
    } else {
        drop(go_w);
    }
    let status = child
        .wait()
        .map_err(io_err("waiting for kiln in the user namespace"))?;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn write_maps(pid: u32, m: &IdMapping) -> Result<(), UsernsError> {
    let user = user_name(m.uid);
    if let Some(n) = m.own_ids {
        for file in ["uid_map", "gid_map"] {
            let path = format!("/proc/{pid}/{file}");
            std::fs::write(&path, format!("0 0 {n}\n")).map_err(io_err(format!(
                "writing {path} (needs CAP_SETUID and CAP_SETGID)"
            )))?;
        }
        return Ok(());
    }
    match (m.subuid, m.subgid) {
        (Some(su), Some(sg)) => {
            id_map_tool("newuidmap", "/etc/subuid", pid, m.uid, su, &user)?;
            id_map_tool("newgidmap", "/etc/subgid", pid, m.gid, sg, &user)
        }
        _ => {
            // Single-uid: a process may map its own ids, once setgroups is denied.
            let w = |file: &str, data: String| {
                let path = format!("/proc/{pid}/{file}");
                std::fs::write(&path, data).map_err(io_err(format!("writing {path}")))
            };
            w("setgroups", "deny".into())?;
            w("uid_map", format!("0 {} 1\n", m.uid))?;
            w("gid_map", format!("0 {} 1\n", m.gid))
        }
    }
}

fn id_map_tool(
    tool: &'static str,
    file: &'static str,
    pid: u32,
    own: u32,
    range: IdRange,
    user: &str,
) -> Result<(), UsernsError> {
    let args = [
        pid.to_string(),
        "0".into(),
        own.to_string(),
        "1".into(),
        "1".into(),
        range.start.to_string(),
        range.count.to_string(),
    ];
    let program = find_program(tool).unwrap_or_else(|| PathBuf::from(tool));
    let out = Command::new(&program)
        .args(&args)
        .output()
        .map_err(io_err(format!(
            "running {tool} (install Debian's uidmap package)"
        )))?;
    if out.status.success() {
        return Ok(());
    }
    Err(UsernsError::IdMap {
        tool,
        detail: format!(
            "{tool} {} ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        file,
        user: user.to_owned(),
    })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), UsernsError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io_err("creating a pipe")(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// In the child: when [`CHILD_ENV`] is set, unshares the user and mount namespaces, waits
/// for the parent's maps, and makes every mount private. Returns `Ok(false)` when this
/// process is not kiln's rootless child. Must run while the process has a single thread.
pub fn enter_as_child() -> Result<bool, UsernsError> {
    let Some(fds) = std::env::var_os(CHILD_ENV) else {
        return Ok(false);
    };
    std::env::remove_var(CHILD_ENV);
    let fds = fds.to_string_lossy().into_owned();
    let parse = |s: Option<&str>| s.and_then(|v| v.parse::<i32>().ok()).filter(|fd| *fd > 2);
    let mut it = fds.split(',');
    let (Some(ready_fd), Some(go_fd)) = (parse(it.next()), parse(it.next())) else {
        return Err(io_err(format!("reading {CHILD_ENV}={fds}"))(
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        ));
    };
    // SAFETY: the parent passed these two fds to us and nothing else owns them.
    let (ready, go) = unsafe { (OwnedFd::from_raw_fd(ready_fd), OwnedFd::from_raw_fd(go_fd)) };
    for fd in [&ready, &go] {
        // SAFETY: marking our own fd close-on-exec.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // The parent stays behind only to wait for us; end with it.
    // SAFETY: prctl with plain integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // SAFETY: unshare takes flags only; the process is single-threaded (the caller's contract).
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) } != 0 {
        return Err(io_err(
            "creating a user namespace (see `kiln debug env` for what this machine allows)",
        )(std::io::Error::last_os_error()));
    }
    std::fs::File::from(ready)
        .write_all(b"1")
        .map_err(io_err("telling the parent kiln the namespace exists"))?;
    let mut byte = [0u8; 1];
    let mut go = std::fs::File::from(go);
    if !matches!(go.read(&mut byte), Ok(1)) {
        return Err(io_err("waiting for the uid/gid maps")(
            std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
        ));
    }
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(UsernsError::NotMapped(euid));
    }
    // Our mounts (overlay snapshots, RUN containers) must never propagate to the host's
    // namespace, and the host's later mounts need not reach us.
    // SAFETY: mount with null source/type changes propagation only.
    if unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(io_err("making mounts private in the user namespace")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(true)
}

/// The state dir of a rootless kiln: `$XDG_DATA_HOME/kiln`, else `~/.local/share/kiln`.
pub fn rootless_state_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Some(Path::new(&x).join("kiln"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| Path::new(&h).join(".local/share/kiln"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subid_lines_match_by_name_or_uid_and_skip_comments_and_bad_lines() {
        let f = "# comment\nalice:100000:65536\nbob:x:1\n1001:300000:1000\nbob:200000:0\n";
        assert_eq!(
            parse_subid(f, "alice", 1000),
            Some(IdRange {
                start: 100000,
                count: 65536
            })
        );
        assert_eq!(
            parse_subid(f, "carol", 1001),
            Some(IdRange {
                start: 300000,
                count: 1000
            })
        );
        assert_eq!(parse_subid(f, "bob", 1002), None);
    }

    #[test]
    fn a_mapping_without_both_ranges_is_single_uid() {
        let r = IdRange {
            start: 100000,
            count: 65536,
        };
        let mut m = IdMapping {
            uid: 1000,
            gid: 1000,
            subuid: Some(r),
            subgid: Some(r),
            own_ids: None,
        };
        assert_eq!(m.mode_name(), "rootless-userns");
        m.subgid = None;
        assert!(m.single_uid());
        assert_eq!(m.mode_name(), "rootless-single-uid");
    }
}
