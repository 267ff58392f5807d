//! Durable files for kiln's state and outputs: [`write_atomic`] replaces a file so that a
//! reader sees the old content or the new, never a mix, and [`FileLock`] is an advisory
//! `flock(2)` lock (shared or exclusive, blocking or not) released when it is dropped.
//!
//! # The fsync rule
//!
//! [`write_atomic`] writes a temporary file in the target's own directory (so the rename
//! never crosses filesystems), then, with [`Durability::Fsync`]:
//!
//! 1. fsyncs the temporary file, so the data is on disk before any name points at it;
//! 2. renames it over the target (atomic on POSIX filesystems);
//! 3. fsyncs the directory, so the rename itself survives a power loss. The new content is
//!    already visible at this point, so a directory that cannot be synced is not reported
//!    as a failed write.
//!
//! [`Durability::NoSync`] skips steps 1 and 3: readers still never see a partial file, but
//! after a power loss the target may hold the old content (or, on some filesystems, be
//! empty). Use it only for what kiln can rebuild (indexes, caches) or where the user asked
//! for speed over durability.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether [`write_atomic`] makes the new content durable before returning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file before the rename and its directory after it (see the crate docs).
    Fsync,
    /// Only atomic for readers; a crash may lose the new content.
    NoSync,
}

/// The step of [`write_atomic`] that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStep {
    /// Creating the temporary file beside the target.
    Create,
    /// Writing the bytes into the temporary file.
    Write,
    /// fsyncing the temporary file.
    Sync,
    /// Renaming the temporary file onto the target.
    Rename,
}

impl WriteStep {
    /// What kiln was doing, as a phrase for an error message ("writing", "syncing", ...).
    pub fn action(self) -> &'static str {
        match self {
            WriteStep::Create => "creating a temporary file beside",
            WriteStep::Write => "writing",
            WriteStep::Sync => "syncing",
            WriteStep::Rename => "renaming into place",
        }
    }
}

/// Why [`write_atomic`] failed: the step and the OS error. The target is untouched and the
/// temporary file is removed.
#[derive(Debug)]
pub struct WriteError {
    /// The step that failed.
    pub step: WriteStep,
    /// The OS error.
    pub source: io::Error,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.step.action(), self.source)
    }
}

impl std::error::Error for WriteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<WriteError> for io::Error {
    fn from(e: WriteError) -> Self {
        io::Error::new(e.source.kind(), e)
    }
}

/// Distinguishes temporary files of one process (threads may write the same target).
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// The temporary path beside `path`: `.NAME.tmp-PID-SEQ` in the same directory.
fn temp_beside(path: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    path.with_file_name(name)
}

/// The directory `path` lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Replaces `path` with `bytes` so that readers see the old content or the new, never part
/// of it (see the crate docs for what `durability` adds). The directory must exist; a new
/// file gets the usual `0666 & !umask` mode.
pub fn write_atomic(path: &Path, bytes: &[u8], durability: Durability) -> Result<(), WriteError> {
    // A process killed mid-write leaves its temporary behind, and a later process may get the
    // same pid (and so the same names): a name that is taken is skipped, never written into.
    let mut attempts = 0;
    let (tmp, mut f) = loop {
        let tmp = temp_beside(path);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 1000 => {
                attempts += 1;
            }
            Err(source) => {
                return Err(WriteError {
                    step: WriteStep::Create,
                    source,
                })
            }
        }
    };
    let fail = |step, source| {
        let _ = fs::remove_file(&tmp);
        WriteError { step, source }
    };
    f.write_all(bytes).map_err(|e| fail(WriteStep::Write, e))?;
    if durability == Durability::Fsync {
        f.sync_all().map_err(|e| fail(WriteStep::Sync, e))?;
    }
    drop(f);
    fs::rename(&tmp, path).map_err(|e| fail(WriteStep::Rename, e))?;
    if durability == Durability::Fsync {
        // The rename is done and visible; see the crate docs for why this is best effort.
        if let Ok(dir) = File::open(parent_dir(path)) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// The kind of [`FileLock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders at once (`LOCK_SH`); excludes exclusive holders.
    Shared,
    /// One holder (`LOCK_EX`); excludes every other holder.
    Exclusive,
}

impl LockMode {
    fn op(self) -> libc::c_int {
        match self {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        }
    }
}

/// An advisory `flock(2)` lock on an open file, held until this value is dropped (or the
/// process dies). flock locks belong to the open file description: they exclude other
/// opens of the file in this process as well as other processes, and a `try_clone` of a
/// locked file shares the lock.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    mode: LockMode,
}

/// `flock(fd, op)`, retried on EINTR.
fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: a plain syscall on a descriptor that `file` keeps open for the call.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Opens `path` for locking: created if missing, never truncated.
fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

impl FileLock {
    /// Locks `file`, waiting for as long as another holder excludes this `mode`.
    pub fn lock(file: File, mode: LockMode) -> io::Result<FileLock> {
        flock(&file, mode.op())?;
        Ok(FileLock { file, mode })
    }

    /// Locks `file` if no other holder excludes this `mode`; `Ok(None)` if one does.
    pub fn try_lock(file: File, mode: LockMode) -> io::Result<Option<FileLock>> {
        match flock(&file, mode.op() | libc::LOCK_NB) {
            Ok(()) => Ok(Some(FileLock { file, mode })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens (creating, never truncating) the lock file `path` and locks it, waiting.
    pub fn open(path: &Path, mode: LockMode) -> io::Result<FileLock> {
        FileLock::lock(open_lock_file(path)?, mode)
    }

    /// Opens (creating, never truncating) the lock file `path` and locks it if no other
    /// holder excludes this `mode`; `Ok(None)` if one does.
    pub fn try_open(path: &Path, mode: LockMode) -> io::Result<Option<FileLock>> {
        FileLock::try_lock(open_lock_file(path)?, mode)
    }

    /// The locked file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The mode this lock holds.
    pub fn mode(&self) -> LockMode {
        self.mode
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Explicit, as a `try_clone` of the file may outlive this value.
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("record.json");
        write_atomic(&p, b"old", Durability::Fsync).unwrap();
        write_atomic(&p, b"new content", Durability::NoSync).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new content");
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("record.json")]);
    }

    #[test]
    fn write_atomic_skips_temporaries_a_killed_process_left_behind() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        // What a killed earlier process with this pid would have left.
        let next = TEMP_SEQ.load(Ordering::Relaxed);
        for n in next..next + 20 {
            let stale = format!(".state.json.tmp-{}-{n}", std::process::id());
            fs::write(d.path().join(stale), b"partial").unwrap();
        }
        write_atomic(&p, b"whole", Durability::Fsync).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"whole");
    }

    #[test]
    fn write_atomic_reports_the_failed_step_and_keeps_the_target() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("no-such-dir/file");
        let e = write_atomic(&missing, b"x", Durability::Fsync).unwrap_err();
        assert_eq!(e.step, WriteStep::Create);
        assert_eq!(e.source.kind(), io::ErrorKind::NotFound);
        // A directory in the way of the rename: the target stays, the temp file goes.
        let target = d.path().join("dir");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"kept").unwrap();
        let e = write_atomic(&target, b"x", Durability::NoSync).unwrap_err();
        assert_eq!(e.step, WriteStep::Rename);
        assert_eq!(fs::read(target.join("inside")).unwrap(), b"kept");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_reader_never_sees_a_partial_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big");
        let a = vec![b'a'; 1 << 20];
        let b = vec![b'b'; 1 << 20];
        write_atomic(&p, &a, Durability::NoSync).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (p, stop) = (p.clone(), stop.clone());
            let (a, b) = (a.clone(), b.clone());
            std::thread::spawn(move || {
                let mut reads = 0u32;
                while !stop.load(Ordering::Relaxed) || reads == 0 {
                    let got = fs::read(&p).unwrap();
                    assert!(got == a || got == b, "saw {} mixed bytes", got.len());
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..200 {
            let next = if i % 2 == 0 { &b } else { &a };
            write_atomic(&p, next, Durability::NoSync).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }

    #[test]
    fn exclusive_lock_excludes_every_other_open_and_is_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        let held = FileLock::open(&p, LockMode::Exclusive).unwrap();
        assert_eq!(held.mode(), LockMode::Exclusive);
        assert!(FileLock::try_open(&p, LockMode::Exclusive)
            .unwrap()
            .is_none());
        assert!(FileLock::try_open(&p, LockMode::Shared).unwrap().is_none());
        drop(held);
        assert!(FileLock::try_open(&p, LockMode::Exclusive)
            .unwrap()
            .is_some());
    }

    #[test]
    fn shared_locks_coexist_and_exclude_an_exclusive_one() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        let a = FileLock::open(&p, LockMode::Shared).unwrap();
        let b = FileLock::try_open(&p, LockMode::Shared).unwrap();
        assert!(b.is_some());
        assert!(FileLock::try_open(&p, LockMode::Exclusive)
            .unwrap()
            .is_none());
        drop((a, b));
        assert!(FileLock::try_open(&p, LockMode::Exclusive)
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_blocking_lock_waits_for_the_holder_in_another_thread() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        let held = FileLock::open(&p, LockMode::Exclusive).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let started = Arc::new(Barrier::new(2));
        let waiter = {
            let (p, released, started) = (p.clone(), released.clone(), started.clone());
            std::thread::spawn(move || {
                started.wait();
                let _l = FileLock::open(&p, LockMode::Exclusive).unwrap();
                // Got the lock: the holder must have let it go first.
                released.load(Ordering::SeqCst)
            })
        };
        started.wait();
        std::thread::sleep(Duration::from_millis(100));
        released.store(true, Ordering::SeqCst);
        drop(held);
        assert!(
            waiter.join().unwrap(),
            "the waiter got the lock while it was held"
        );
    }

    #[test]
    fn a_lock_excludes_another_process() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        // flock(1) from util-linux is on every machine kiln runs its tests on.
        let probe = |p: &Path| {
            std::process::Command::new("flock")
                .args(["--nonblock", "--exclusive"])
                .arg(p)
                .arg("true")
                .status()
                .unwrap()
                .success()
        };
        let held = FileLock::open(&p, LockMode::Shared).unwrap();
        assert!(!probe(&p), "another process took a lock this one holds");
        drop(held);
        assert!(probe(&p), "the lock outlived its FileLock");
    }
}
