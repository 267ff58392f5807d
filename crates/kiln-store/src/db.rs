//! The metadata DB: one redb file, `<root>/db/meta.redb`, shared by every kiln process.
//!
//! redb holds an exclusive `flock` on its file for as long as a `Database` is open, so two
//! processes cannot both keep it open. Each process therefore opens it only while it has
//! work: a blocking `flock` on `db/lock` orders processes (fair, no busy polling), a mutex
//! orders threads. A process that wants the DB first takes a shared `flock` on `db/queue`
//! and keeps it until it has `db/lock`, so the holder can see that someone waits (its
//! exclusive non-blocking try on `db/queue` fails). While nobody waits, the holder keeps
//! the DB open across the short gaps of a build (up to `IDLE_UNCONTENDED` idle, at most
//! `HOLD_LONGEST` in all, so a kiln that predates `db/queue` still gets turns); once
//! someone waits it gives the DB back after `HOLD_IDLE` idle or `HOLD_MAX` held, as before.
//! Opening and closing cost about three fsyncs (redb marks the file as needing recovery
//! while open), so holding saves most of the cost of the short transactions the solver
//! makes; measured in `bench/store` (docs/store.md). A process that exits normally while
//! holding the DB closes it from an `atexit` hook, so the next one needs no recovery. A
//! DB per process was rejected: every build must see every other build's cache records.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redb::{Database, ReadTransaction, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, StoreError};
use kiln_fs::{FileLock, LockMode};

/// Counters (next snapshot id).
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Snapshot id → JSON `SnapshotRecord`.
pub(crate) const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");
/// OCI chain id → snapshot id of the unpacked chain.
pub(crate) const CHAINS: TableDefinition<&str, u64> = TableDefinition::new("chains");
/// Diff id → JSON `LayerBlobs` (one blob per compression).
pub(crate) const LAYERS: TableDefinition<&str, &[u8]> = TableDefinition::new("layers");
/// Blob digest → diff id.
pub(crate) const BLOB_LAYERS: TableDefinition<&str, &str> = TableDefinition::new("blob_layers");
/// Blob digest → diff id computed here from the blob's own bytes (by an unpack, an export or
/// a check), unlike `BLOB_LAYERS`, which also holds what image configs and caches claim.
pub(crate) const VERIFIED_LAYERS: TableDefinition<&str, &str> =
    TableDefinition::new("verified_layers");
/// "snapshot-id/epoch" → diff id of that snapshot's exported layer.
pub(crate) const SNAPSHOT_DIFFS: TableDefinition<&str, &str> =
    TableDefinition::new("snapshot_diffs");
/// Cache key → JSON `CacheRecord`.
pub(crate) const CACHE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("cache");
/// Image ref name → manifest digest.
pub(crate) const REFS: TableDefinition<&str, &str> = TableDefinition::new("refs");
/// Lease id → JSON `LeaseRecord`.
pub(crate) const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
/// (lease id, snapshot id): a snapshot the lease protects, one key each so protecting is a
/// small insert however many the lease holds.
pub(crate) const LEASE_SNAPSHOTS: TableDefinition<(&str, u64), ()> =
    TableDefinition::new("lease_snapshots");
/// (lease id, blob digest): a blob the lease protects.
pub(crate) const LEASE_BLOBS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("lease_blobs");

/// How long to wait for a DB held by another process before giving up.
const LOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// While another process waits, the holder keeps the DB across a burst of transactions
/// until it has been idle this long...
const HOLD_IDLE: Duration = Duration::from_millis(5);
/// ...or has held it this long, whichever comes first.
const HOLD_MAX: Duration = Duration::from_millis(50);
/// While nobody waits, the holder keeps the DB until it has been idle this long (longer
/// than the gap between a build's steps)...
const IDLE_UNCONTENDED: Duration = Duration::from_millis(250);
/// ...and never longer than this in one go, so a process that does not announce itself on
/// `db/queue` (an older kiln) still gets turns.
const HOLD_LONGEST: Duration = Duration::from_secs(2);

/// The shared metadata DB (see the module docs for the locking scheme).
#[derive(Debug)]
pub(crate) struct Db {
    path: PathBuf,
    lock_path: PathBuf,
    queue_path: PathBuf,
    held: Arc<Mutex<Option<Held>>>,
    closer_started: std::sync::atomic::AtomicBool,
}

/// The open DB and the cross-process lock, while this process holds them.
struct Held {
    db: Database,
    _lock: FileLock,
    /// Our own handle on `db/queue`, to try for an exclusive lock (fails while a waiter
    /// holds its shared one).
    queue: File,
    opened: Instant,
    last_used: Instant,
    /// The process that opened it.
    pid: u32,
}

impl Held {
    /// Whether another process (or another `Db` on this dir) waits for the DB.
    fn others_waiting(&self) -> bool {
        let probe = self
            .queue
            .try_clone()
            .and_then(|q| FileLock::try_lock(q, LockMode::Exclusive));
        match probe {
            // Taken and, on drop, released at once: nobody waits.
            Ok(Some(_)) => false,
            // A waiter holds its shared lock. Any error: give the DB back, the safe side.
            Ok(None) | Err(_) => true,
        }
    }

    /// Whether to close now. `after_use`: called right after a transaction (not idle).
    fn should_close(&self, after_use: bool) -> bool {
        let held_for = self.opened.elapsed();
        let idle = if after_use {
            Duration::ZERO
        } else {
            self.last_used.elapsed()
        };
        if held_for >= HOLD_LONGEST || idle >= IDLE_UNCONTENDED {
            return true;
        }
        (idle >= HOLD_IDLE || held_for >= HOLD_MAX) && self.others_waiting()
    }
}

/// Every `Db` of this process, for the exit hook.
static OPEN_DBS: Mutex<Vec<Weak<Mutex<Option<Held>>>>> = Mutex::new(Vec::new());

/// Closes every DB this process holds (an `atexit` hook: a normal exit, or
/// `std::process::exit`, then leaves the file clean, not needing recovery). Skips a DB that
/// another thread is using at that instant rather than wait at exit; redb repairs that
/// file on the next open.
extern "C" fn close_all_at_exit() {
    let Ok(list) = OPEN_DBS.try_lock() else {
        return;
    };
    let me = std::process::id();
    for held in list.iter().filter_map(Weak::upgrade) {
        if let Ok(mut g) = held.try_lock() {
            // A forked child that calls `exit` must not close (and mark clean) the file its
            // parent still has open.
            if g.as_ref().is_some_and(|h| h.pid == me) {
                *g = None;
            }
        }
    }
}

fn register_for_exit(held: &Arc<Mutex<Option<Held>>>) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        // SAFETY: registers a plain function; it only takes locks without blocking.
        unsafe { libc::atexit(close_all_at_exit) };
    });
    let mut list = OPEN_DBS.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|w| w.strong_count() > 0);
    list.push(Arc::downgrade(held));
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("opened", &self.opened)
            .finish()
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        self.release();
    }
}

pub(crate) fn db_err(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db {
        path: path.to_owned(),
        message: e.into().to_string(),
    }
}

/// Shorthand used inside transactions, where the path is the DB's.
pub(crate) fn te(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db {
        path: PathBuf::from("db/meta.redb"),
        message: e.into().to_string(),
    }
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Db {
        path: PathBuf::from("db/meta.redb"),
        message: format!("encoding record: {e}"),
    })
}

pub(crate) fn decode<T: DeserializeOwned>(table: &'static str, key: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::BadRecord {
        table,
        key: key.to_owned(),
        message: e.to_string(),
    })
}

impl Db {
    /// Opens (creating) the DB under `dir` and makes sure every table exists.
    pub(crate) fn open(dir: &Path) -> Result<Db> {
        fs::create_dir_all(dir).map_err(|e| StoreError::io("creating", dir, e))?;
        let db = Db {
            path: dir.join("meta.redb"),
            lock_path: dir.join("lock"),
            queue_path: dir.join("queue"),
            held: Arc::new(Mutex::new(None)),
            closer_started: std::sync::atomic::AtomicBool::new(false),
        };
        register_for_exit(&db.held);
        db.write(|tx| {
            tx.open_table(META).map_err(te)?;
            tx.open_table(SNAPSHOTS).map_err(te)?;
            tx.open_table(CHAINS).map_err(te)?;
            tx.open_table(LAYERS).map_err(te)?;
            tx.open_table(BLOB_LAYERS).map_err(te)?;
            tx.open_table(SNAPSHOT_DIFFS).map_err(te)?;
            tx.open_table(VERIFIED_LAYERS).map_err(te)?;
            tx.open_table(CACHE).map_err(te)?;
            tx.open_table(REFS).map_err(te)?;
            tx.open_table(LEASES).map_err(te)?;
            tx.open_table(LEASE_SNAPSHOTS).map_err(te)?;
            tx.open_table(LEASE_BLOBS).map_err(te)?;
            Ok(())
        })?;
        Ok(db)
    }

    fn open_file(&self, path: &Path) -> Result<File> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io("opening DB lock", path, e))
    }

    fn open_held(&self) -> Result<Held> {
        // Announce ourselves as waiting (shared lock on the queue) until we hold the DB.
        let waiting = FileLock::lock(self.open_file(&self.queue_path)?, LockMode::Shared)
            .map_err(|e| StoreError::io("queueing for DB", &self.queue_path, e))?;
        let lock = FileLock::lock(self.open_file(&self.lock_path)?, LockMode::Exclusive)
            .map_err(|e| StoreError::io("locking DB", &self.lock_path, e))?;
        drop(waiting);
        let queue = self.open_file(&self.queue_path)?;
        let start = Instant::now();
        let mut delay = Duration::from_millis(1);
        loop {
            match Database::create(&self.path) {
                Ok(db) => {
                    return Ok(Held {
                        db,
                        _lock: lock,
                        queue,
                        opened: Instant::now(),
                        last_used: Instant::now(),
                        pid: std::process::id(),
                    })
                }
                // Only a process that ignores `db/lock` (an older kiln) can get here.
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if start.elapsed() < LOCK_TIMEOUT => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(100));
                }
                Err(e) => return Err(db_err(&self.path, e)),
            }
        }
    }

    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T>) -> Result<T> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.is_none() {
            *held = Some(self.open_held()?);
            self.start_closer();
        }
        let h = held
            .as_mut()
            .ok_or_else(|| db_err(&self.path, redb::Error::DatabaseAlreadyOpen))?;
        let out = f(&h.db);
        h.last_used = Instant::now();
        // Give the DB back at once after an error, or once this process has held it for
        // its share while someone waits; otherwise keep it for the transactions that follow.
        if out.is_err() || h.should_close(true) {
            *held = None;
        }
        out
    }

    /// One thread per DB closes it when this process has been idle long enough (see the
    /// module docs), so other processes wait at most about `HOLD_MAX` for their turn.
    fn start_closer(&self) {
        if self
            .closer_started
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let held = Arc::downgrade(&self.held);
        std::thread::spawn(move || loop {
            std::thread::sleep(HOLD_IDLE);
            let Some(held) = held.upgrade() else { return };
            let mut g = held.lock().unwrap_or_else(|p| p.into_inner());
            if g.as_ref().is_some_and(|h| h.should_close(false)) {
                *g = None;
            }
        });
    }

    /// Closes the DB if this process holds it open (also done on drop).
    pub(crate) fn release(&self) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Runs `f` in a write transaction and commits it if `f` succeeds.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&WriteTransaction) -> Result<T>) -> Result<T> {
        self.with_db(|db| {
            let tx = db.begin_write().map_err(|e| db_err(&self.path, e))?;
            let v = f(&tx)?;
            tx.commit().map_err(|e| db_err(&self.path, e))?;
            Ok(v)
        })
    }

    /// Runs `f` in a read transaction.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&ReadTransaction) -> Result<T>) -> Result<T> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(|e| db_err(&self.path, e))?;
            f(&tx)
        })
    }
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTable;

    const COUNTER: TableDefinition<&str, u64> = TableDefinition::new("test_counter");

    fn bump(db: &Db) -> u64 {
        db.write(|tx| {
            let mut t = tx.open_table(COUNTER).map_err(te)?;
            let n = t.get("n").map_err(te)?.map(|g| g.value()).unwrap_or(0) + 1;
            t.insert("n", n).map_err(te)?;
            Ok(n)
        })
        .unwrap()
    }

    #[test]
    fn holder_sees_a_waiter_on_the_queue_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        bump(&db);
        let waiter = OpenOptions::new()
            .write(true)
            .open(dir.path().join("queue"))
            .unwrap();
        {
            let mut g = db.held.lock().unwrap();
            let h = g.get_or_insert_with(|| db.open_held().unwrap());
            assert!(!h.others_waiting());
            let queued = FileLock::lock(waiter.try_clone().unwrap(), LockMode::Shared).unwrap();
            assert!(h.others_waiting());
            drop(queued);
            assert!(!h.others_waiting());
        }
    }

    #[test]
    fn two_handles_on_one_dir_take_turns_and_see_each_others_writes() {
        let dir = tempfile::tempdir().unwrap();
        let a = Db::open(dir.path()).unwrap();
        let b = Db::open(dir.path()).unwrap();
        std::thread::scope(|s| {
            let ta = s.spawn(|| (0..50).map(|_| bump(&a)).max());
            let tb = s.spawn(|| (0..50).map(|_| bump(&b)).max());
            let ma = ta.join().unwrap().unwrap();
            let mb = tb.join().unwrap().unwrap();
            assert_eq!(ma.max(mb), 100, "a write was lost");
        });
    }
}
