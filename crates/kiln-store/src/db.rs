//! The metadata DB: one redb file, `<root>/db/meta.redb`, shared by every kiln process.
//!
//! redb holds an exclusive `flock` on its file for as long as a `Database` is open, so two
//! processes cannot both keep it open. Each process therefore opens it only while it has
//! work: a blocking `flock` on `db/lock` orders processes (fair, no busy polling), a mutex
//! orders threads, and the DB stays open for a burst of transactions until the process has
//! been idle for `HOLD_IDLE` or has held it for `HOLD_MAX`, then is closed so the next
//! process gets its turn. Opening and closing cost about three fsyncs (redb marks the file
//! as needing recovery while open), so holding across a burst saves most of the cost of
//! the short transactions the solver makes; measured in `bench/store` (docs/store.md). A
//! DB per process was rejected: every build must see every other build's cache records.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redb::{Database, ReadTransaction, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::sys;

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
/// A process keeps the DB open across a burst of transactions until it has been idle this
/// long...
const HOLD_IDLE: Duration = Duration::from_millis(5);
/// ...or has held it this long, whichever comes first.
const HOLD_MAX: Duration = Duration::from_millis(50);

/// The shared metadata DB (see the module docs for the locking scheme).
#[derive(Debug)]
pub(crate) struct Db {
    path: PathBuf,
    lock_path: PathBuf,
    held: std::sync::Arc<Mutex<Option<Held>>>,
    closer_started: std::sync::atomic::AtomicBool,
}

/// The open DB and the cross-process lock, while this process holds them.
struct Held {
    db: Database,
    _lock: File,
    opened: Instant,
    last_used: Instant,
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
            held: std::sync::Arc::new(Mutex::new(None)),
            closer_started: std::sync::atomic::AtomicBool::new(false),
        };
        db.write(|tx| {
            tx.open_table(META).map_err(te)?;
            tx.open_table(SNAPSHOTS).map_err(te)?;
            tx.open_table(CHAINS).map_err(te)?;
            tx.open_table(LAYERS).map_err(te)?;
            tx.open_table(BLOB_LAYERS).map_err(te)?;
            tx.open_table(SNAPSHOT_DIFFS).map_err(te)?;
            tx.open_table(CACHE).map_err(te)?;
            tx.open_table(REFS).map_err(te)?;
            tx.open_table(LEASES).map_err(te)?;
            tx.open_table(LEASE_SNAPSHOTS).map_err(te)?;
            tx.open_table(LEASE_BLOBS).map_err(te)?;
            Ok(())
        })?;
        Ok(db)
    }

    fn open_held(&self) -> Result<Held> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(|e| StoreError::io("opening DB lock", &self.lock_path, e))?;
        sys::flock(&lock, libc::LOCK_EX)
            .map_err(|e| StoreError::io("locking DB", &self.lock_path, e))?;
        let start = Instant::now();
        let mut delay = Duration::from_millis(1);
        loop {
            match Database::create(&self.path) {
                Ok(db) => {
                    return Ok(Held {
                        db,
                        _lock: lock,
                        opened: Instant::now(),
                        last_used: Instant::now(),
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
        // Give the DB back at once after an error or once this process has held it for
        // its share; otherwise keep it for the burst of transactions that usually follows.
        if out.is_err() || h.opened.elapsed() >= HOLD_MAX {
            *held = None;
        }
        out
    }

    /// One thread per DB closes it when this process stops using it for `HOLD_IDLE`, so
    /// other processes wait at most about `HOLD_MAX` for their turn.
    fn start_closer(&self) {
        if self
            .closer_started
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let held = std::sync::Arc::downgrade(&self.held);
        std::thread::spawn(move || loop {
            std::thread::sleep(HOLD_IDLE);
            let Some(held) = held.upgrade() else { return };
            let mut g = held.lock().unwrap_or_else(|p| p.into_inner());
            let idle = g.as_ref().is_some_and(|h| {
                h.last_used.elapsed() >= HOLD_IDLE || h.opened.elapsed() >= HOLD_MAX
            });
            if idle {
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
