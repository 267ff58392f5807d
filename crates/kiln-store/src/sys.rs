//! Thin, safe wrappers over the Linux syscalls the store needs and std does not offer
//! (openat2, *at calls on directory fds, xattrs, flock, mount).

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(crate) fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in name"))
}

pub(crate) fn cpath(p: &Path) -> io::Result<CString> {
    cstr(p.as_os_str().as_bytes())
}

/// fsyncs a directory so a rename inside it is durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// How [`openat2`] may resolve a path.
#[derive(Clone, Copy)]
pub(crate) enum Resolve {
    /// Every component must stay beneath the dirfd (symlinks followed only if they do);
    /// absolute symlinks and `..` escapes fail with EXDEV. Magic links are refused.
    Beneath,
    /// No symlink may be followed at all.
    NoSymlinks,
}

/// `openat2(2)` relative to `dir`.
pub(crate) fn openat2(
    dir: BorrowedFd<'_>,
    path: &[u8],
    flags: libc::c_int,
    resolve: Resolve,
) -> io::Result<OwnedFd> {
    let p = cstr(if path.is_empty() { b"." } else { path })?;
    let res = match resolve {
        Resolve::Beneath => libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
        Resolve::NoSymlinks => libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
    };
    // SAFETY: open_how is plain integers; all zeroes is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = 0;
    how.resolve = res;
    loop {
        // SAFETY: valid C string and a properly sized open_how.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                p.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r >= 0 {
            // SAFETY: the kernel returned a new fd we own.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
        }
        let e = io::Error::last_os_error();
        // EAGAIN: a concurrent rename raced the lookup; the kernel asks to retry.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
}

/// Opens a directory (O_RDONLY) for use as a dirfd.
pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    // SAFETY: valid C string.
    let fd = cvt(unsafe {
        libc::open(
            p.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `Ok(None)` when absent.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
    // SAFETY: stat is plain integers; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(st))
}

/// `fstat` on an fd.
pub(crate) fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: stat is plain integers; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub(crate) fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }).map(|_| ())
}

pub(crate) fn mknod_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32, dev: u64) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            dev as libc::dev_t,
        )
    })
    .map(|_| ())
}

pub(crate) fn symlink_at(target: &[u8], dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let t = cstr(target)?;
    // SAFETY: valid C strings.
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(|_| ())
}

pub(crate) fn link_at(
    odir: BorrowedFd<'_>,
    oname: &CStr,
    ndir: BorrowedFd<'_>,
    nname: &CStr,
) -> io::Result<()> {
    // SAFETY: valid C strings; flags 0 never follows a symlink target.
    cvt(unsafe {
        libc::linkat(
            odir.as_raw_fd(),
            oname.as_ptr(),
            ndir.as_raw_fd(),
            nname.as_ptr(),
            0,
        )
    })
    .map(|_| ())
}

pub(crate) fn unlink_at(dir: BorrowedFd<'_>, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(|_| ())
}

/// Creates a new regular file `name` in `dir` (never following or replacing anything).
pub(crate) fn create_file_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<File> {
    // SAFETY: valid C string.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: new fd we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Opens an existing entry of `dir` without following a final symlink.
pub(crate) fn open_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: valid C string.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fchownat(.., AT_SYMLINK_NOFOLLOW)`.
pub(crate) fn lchown_at(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(|_| ())
    .or_else(unmapped_id_ok)
}

/// In a user namespace that maps only kiln's own user (rootless single-uid mode) a chown to
/// any other id fails with EINVAL: the file keeps uid/gid 0, the limit that mode documents.
fn unmapped_id_ok(e: io::Error) -> io::Result<()> {
    if e.raw_os_error() == Some(libc::EINVAL) && overlay_userxattr() {
        Ok(())
    } else {
        Err(e)
    }
}

/// `fchmodat` (follows nothing: callers use it only on entries they just created).
pub(crate) fn chmod_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe {
        libc::fchmodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            (mode & 0o7777) as libc::mode_t,
            0,
        )
    })
    .map(|_| ())
}

pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) }).map(|_| ())
}

pub(crate) fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })
        .map(|_| ())
        .or_else(unmapped_id_ok)
}

/// Sets atime and mtime (seconds + nanoseconds) of `name` in `dir`, not following symlinks.
pub(crate) fn set_times_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    sec: i64,
    nsec: i64,
) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as _,
    };
    let times = [ts, ts];
    // SAFETY: valid pointers.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(|_| ())
}

/// The path of an fd through /proc, for the xattr calls that have no *at form.
pub(crate) fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Lists the xattr names of a path (not following symlinks).
pub(crate) fn llistxattr(path: &CStr) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: buffer pointer and length match.
        let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(<[u8]>::to_vec)
                .collect());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
}

/// Reads one xattr of a path (not following symlinks); `None` when absent.
pub(crate) fn lgetxattr(path: &CStr, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let n = cstr(name)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: buffer pointer and length match.
        let r = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Sets an xattr of a path (not following symlinks).
pub(crate) fn lsetxattr(path: &CStr, name: &[u8], value: &[u8]) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: pointers and lengths match.
    cvt(unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(|_| ())
}

/// Sets an xattr on an open file or directory.
pub(crate) fn fsetxattr(fd: BorrowedFd<'_>, name: &[u8], value: &[u8]) -> io::Result<()> {
    let n = cstr(name)?;
    // SAFETY: pointers and lengths match.
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(|_| ())
}

/// Sets atime and mtime of an open file.
pub(crate) fn futimens(fd: BorrowedFd<'_>, sec: i64, nsec: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as _,
    };
    let times = [ts, ts];
    // SAFETY: valid pointer to two timespecs.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(|_| ())
}

/// `mount(2)`.
pub(crate) fn mount(
    source: &OsStr,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&[u8]>,
) -> io::Result<()> {
    let s = cstr(source.as_bytes())?;
    let t = cpath(target)?;
    let f = cstr(fstype.as_bytes())?;
    let d = data.map(cstr).transpose()?;
    // SAFETY: valid C strings or null.
    cvt(unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            flags,
            d.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    })
    .map(|_| ())
}

/// Lazily unmounts `target`; `Ok(false)` when nothing was mounted there.
pub(crate) fn unmount(target: &Path) -> io::Result<bool> {
    let t = cpath(target)?;
    // SAFETY: valid C string.
    let r = unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(false),
        _ => Err(e),
    }
}

/// Mounts an overlay with the new mount API, one `lowerdir+` parameter per layer, which
/// lifts the one-page limit on mount options (kernel 6.8+). An `extra` option with an empty
/// value is a flag (`userxattr`). Returns the error of the first step that failed.
pub(crate) fn mount_overlay_fsconfig(
    lowers: &[&Path],
    upper: Option<&Path>,
    work: Option<&Path>,
    extra: &[(&str, &str)],
    target: &Path,
) -> io::Result<()> {
    const FSCONFIG_SET_FLAG: libc::c_uint = 0;
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    let name = cstr(b"overlay")?;
    // SAFETY: valid C string.
    let fsfd = unsafe {
        libc::syscall(libc::SYS_fsopen, name.as_ptr(), 1u32 /* CLOEXEC */)
    };
    if fsfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: new fd we own.
    let fsfd = unsafe { OwnedFd::from_raw_fd(fsfd as RawFd) };
    let set = |key: &str, val: &[u8]| -> io::Result<()> {
        let k = cstr(key.as_bytes())?;
        let v = cstr(val)?;
        // SAFETY: valid C strings.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fsfd.as_raw_fd(),
                FSCONFIG_SET_STRING,
                k.as_ptr(),
                v.as_ptr(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("fsconfig {key}: {e}")));
        }
        Ok(())
    };
    set("source", b"overlay")?;
    for l in lowers {
        set("lowerdir+", l.as_os_str().as_bytes())?;
    }
    if let Some(u) = upper {
        set("upperdir", u.as_os_str().as_bytes())?;
    }
    if let Some(w) = work {
        set("workdir", w.as_os_str().as_bytes())?;
    }
    for (k, v) in extra {
        if v.is_empty() {
            let key = cstr(k.as_bytes())?;
            // SAFETY: a valid C string key, no value (FSCONFIG_SET_FLAG).
            let r = unsafe {
                libc::syscall(
                    libc::SYS_fsconfig,
                    fsfd.as_raw_fd(),
                    FSCONFIG_SET_FLAG,
                    key.as_ptr(),
                    std::ptr::null::<libc::c_char>(),
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("fsconfig {k}: {e}")));
            }
            continue;
        }
        set(k, v.as_bytes())?;
    }
    // SAFETY: plain syscalls on our fds.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fsfd.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("fsconfig create: {e}")));
    }
    // SAFETY: plain syscall.
    let mfd = unsafe { libc::syscall(libc::SYS_fsmount, fsfd.as_raw_fd(), 1u32, 0u32) };
    if mfd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("fsmount: {e}")));
    }
    // SAFETY: new fd we own.
    let mfd = unsafe { OwnedFd::from_raw_fd(mfd as RawFd) };
    let t = cpath(target)?;
    let empty = cstr(b"")?;
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mfd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("move_mount: {e}")));
    }
    Ok(())
}

/// True when this process runs in a user namespace other than the initial one (rootless
/// kiln). overlayfs mounted there needs `userxattr` and keeps its markers in `user.overlay.*`
/// instead of `trusted.overlay.*` (kernel 5.11+); checked once per process.
pub(crate) fn overlay_userxattr() -> bool {
    static NESTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NESTED.get_or_init(|| match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(m) => m.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"],
        Err(_) => false,
    })
}

/// The xattr overlayfs marks an opaque directory with in this process's namespace.
pub(crate) fn overlay_opaque_xattr() -> &'static [u8] {
    if overlay_userxattr() {
        b"user.overlay.opaque"
    } else {
        b"trusted.overlay.opaque"
    }
}

/// True for overlayfs's own xattrs (either namespace): never part of a layer's content.
pub(crate) fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// Whether the calling process is root.
pub(crate) fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `makedev`.
pub(crate) fn makedev(major: u32, minor: u32) -> u64 {
    libc::makedev(major, minor)
}

/// `major`/`minor` of a device number.
pub(crate) fn dev_parts(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}
