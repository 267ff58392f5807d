//! The consistency check behind `kiln debug fsck`: blobs against their names, DB records
//! against blobs and snapshot dirs, and leftovers of killed processes.

use std::fmt;
use std::fs;
use std::path::PathBuf;

use kiln_oci::Digest;
use redb::ReadableTable;

use crate::content::verify_blob;
use crate::db::{self, decode, te};
use crate::error::Result;
use crate::store::{pid_alive, CacheRecord, LeaseRecord, SnapshotId, SnapshotState, Store};

/// One inconsistency found by [`Store::fsck`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsckProblem {
    /// A blob's bytes do not hash to its name.
    CorruptBlob {
        digest: Digest,
        actual: Digest,
        size: u64,
    },
    /// A file in the blob dirs whose name is not a digest.
    StrayFile(PathBuf),
    /// An ingest file no live process is writing (left by a crash).
    StaleIngest(PathBuf),
    /// A layer record names a blob that is not in the content store.
    MissingLayerBlob {
        diff_id: String,
        compression: String,
        digest: Digest,
    },
    /// A snapshot record whose directory is gone.
    MissingSnapshotDir(SnapshotId),
    /// A snapshot directory no record knows.
    UnknownSnapshotDir(PathBuf),
    /// An active or view snapshot whose process has died.
    StaleActiveSnapshot { id: SnapshotId, pid: u32 },
    /// A snapshot whose parent record is gone.
    MissingParent { id: SnapshotId, parent: SnapshotId },
    /// A chain id pointing at a missing snapshot.
    DanglingChain {
        chain_id: String,
        snapshot: SnapshotId,
    },
    /// A lease whose process has died.
    DeadLease { id: String, pid: u32 },
    /// A cache record that refers to a missing snapshot or blob.
    DanglingCacheRecord { key: String, missing: String },
    /// A DB record that cannot be decoded.
    BadRecord(String),
}

impl FsckProblem {
    /// Whether this is something a killed process left behind (a lease, an active snapshot,
    /// a partial ingest, a half-removed snapshot dir) rather than damage: nothing points at
    /// it, and [`Store::reclaim_leftovers`] (which every build runs first) removes it.
    pub fn is_leftover(&self) -> bool {
        matches!(
            self,
            FsckProblem::StaleIngest(_)
                | FsckProblem::StaleActiveSnapshot { .. }
                | FsckProblem::UnknownSnapshotDir(_)
                | FsckProblem::DeadLease { .. }
        )
    }
}

impl fmt::Display for FsckProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FsckProblem::*;
        match self {
            CorruptBlob {
                digest,
                actual,
                size,
            } => write!(
                f,
                "blob {digest} is corrupt: its {size} bytes hash to {actual}"
            ),
            StrayFile(p) => write!(f, "stray file in the blob store: {}", p.display()),
            StaleIngest(p) => write!(f, "leftover partial download/commit: {}", p.display()),
            MissingLayerBlob {
                diff_id,
                compression,
                digest,
            } => {
                write!(
                    f,
                    "layer {diff_id} ({compression}) points at missing blob {digest}"
                )
            }
            MissingSnapshotDir(id) => write!(f, "snapshot {id} has a record but no directory"),
            UnknownSnapshotDir(p) => write!(f, "snapshot directory {} has no record", p.display()),
            StaleActiveSnapshot { id, pid } => write!(
                f,
                "snapshot {id} is still active but its process {pid} is gone"
            ),
            MissingParent { id, parent } => {
                write!(f, "snapshot {id} sits on missing snapshot {parent}")
            }
            DanglingChain { chain_id, snapshot } => {
                write!(f, "chain {chain_id} points at missing snapshot {snapshot}")
            }
            DeadLease { id, pid } => {
                write!(f, "lease {id} belongs to process {pid}, which is gone")
            }
            DanglingCacheRecord { key, missing } => {
                write!(f, "cache record {key} refers to missing {missing}")
            }
            BadRecord(m) => write!(f, "unreadable DB record: {m}"),
        }
    }
}

/// The outcome of [`Store::fsck`].
#[derive(Debug, Clone, Default)]
pub struct FsckReport {
    /// Every problem found (before repair).
    pub problems: Vec<FsckProblem>,
    /// How many of them `repair` fixed.
    pub repaired: usize,
    /// Blobs whose digest was verified.
    pub blobs_checked: u64,
    /// Snapshot records checked.
    pub snapshots_checked: u64,
}

impl FsckReport {
    /// Whether the store is consistent.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Problems that are damage, not leftovers of killed processes.
    pub fn damage(&self) -> impl Iterator<Item = &FsckProblem> {
        self.problems.iter().filter(|p| !p.is_leftover())
    }
}

impl Store {
    /// Checks the whole store; with `repair`, deletes what is corrupt or left over and drops
    /// records that point at nothing. Safe to run while builds run: live ingests, active
    /// snapshots of live processes and live leases are left alone.
    pub fn fsck(&self, repair: bool) -> Result<FsckReport> {
        let mut r = FsckReport::default();
        self.leftovers(repair, &mut r)?;
        let mut fixed = 0usize;
        // Blobs.
        let mut blobs = std::collections::HashSet::new();
        for b in self.content().list()? {
            match b {
                Ok(info) => {
                    r.blobs_checked += 1;
                    let path = self.content().blob_path(&info.digest);
                    match verify_blob(&path, &info.digest) {
                        Ok(None) => {
                            blobs.insert(info.digest.clone());
                        }
                        Ok(Some((actual, size))) => {
                            r.problems.push(FsckProblem::CorruptBlob {
                                digest: info.digest.clone(),
                                actual,
                                size,
                            });
                            if repair && self.content().delete(&info.digest)? {
                                fixed += 1;
                            }
                        }
                        // Deleted under us by GC: not a problem.
                        Err(_) => {}
                    }
                }
                Err(path) => {
                    r.problems.push(FsckProblem::StrayFile(path.clone()));
                    if repair && fs::remove_file(&path).is_ok() {
                        fixed += 1;
                    }
                }
            }
        }
        // Layer records.
        let layers: Vec<(String, String, Digest)> = self.db().read(|tx| {
            let t = tx.open_table(db::LAYERS).map_err(te)?;
            let mut v = Vec::new();
            for row in t.iter().map_err(te)? {
                let (k, val) = row.map_err(te)?;
                let lb: serde_json::Value = decode("layers", k.value(), val.value())?;
                if let Some(m) = lb.get("blobs").and_then(|b| b.as_object()) {
                    for (c, rec) in m {
                        if let Some(d) = rec
                            .get("digest")
                            .and_then(|d| d.as_str())
                            .and_then(|d| d.parse().ok())
                        {
                            v.push((k.value().to_owned(), c.clone(), d));
                        }
                    }
                }
            }
            Ok(v)
        })?;
        for (diff, comp, d) in layers {
            if !blobs.contains(&d) && !self.content().has(&d) {
                r.problems.push(FsckProblem::MissingLayerBlob {
                    diff_id: diff.clone(),
                    compression: comp.clone(),
                    digest: d.clone(),
                });
                if repair {
                    self.db().write(|tx| {
                        let mut t = tx.open_table(db::LAYERS).map_err(te)?;
                        let cur = t
                            .get(diff.as_str())
                            .map_err(te)?
                            .map(|g| g.value().to_vec());
                        if let Some(bytes) = cur {
                            let mut lb: serde_json::Value = decode("layers", &diff, &bytes)?;
                            if let Some(m) = lb.get_mut("blobs").and_then(|b| b.as_object_mut()) {
                                m.remove(&comp);
                            }
                            t.insert(diff.as_str(), db::encode(&lb)?.as_slice())
                                .map_err(te)?;
                        }
                        tx.open_table(db::BLOB_LAYERS)
                            .map_err(te)?
                            .remove(d.to_string().as_str())
                            .map_err(te)?;
                        Ok(())
                    })?;
                    fixed += 1;
                }
            }
        }
        // Snapshots.
        let snaps = self.snapshots()?;
        let ids: std::collections::HashSet<u64> = snaps.iter().map(|s| s.id.0).collect();
        for s in &snaps {
            r.snapshots_checked += 1;
            let dir = self.snapshot_dir(s.id);
            if is_stale_active(s) {
                // A leftover of a killed process, reported above.
                continue;
            }
            if !dir.join("fs").is_dir() && !(s.state == SnapshotState::View) {
                r.problems.push(FsckProblem::MissingSnapshotDir(s.id));
            }
            if let Some(p) = s.parent {
                if !ids.contains(&p.0) {
                    r.problems.push(FsckProblem::MissingParent {
                        id: s.id,
                        parent: p,
                    });
                }
            }
        }
        // Chains, leases, cache records.
        let (chains, cache) = self.db().read(|tx| {
            let mut chains = Vec::new();
            for row in tx.open_table(db::CHAINS).map_err(te)?.iter().map_err(te)? {
                let (k, v) = row.map_err(te)?;
                chains.push((k.value().to_owned(), v.value()));
            }
            let mut cache = Vec::new();
            for row in tx.open_table(db::CACHE).map_err(te)?.iter().map_err(te)? {
                let (k, v) = row.map_err(te)?;
                match decode::<CacheRecord>("cache", &String::from_utf8_lossy(k.value()), v.value())
                {
                    Ok(c) => cache.push((k.value().to_vec(), Some(c))),
                    Err(_) => cache.push((k.value().to_vec(), None)),
                }
            }
            Ok((chains, cache))
        })?;
        for (cid, sid) in chains {
            if !ids.contains(&sid) {
                r.problems.push(FsckProblem::DanglingChain {
                    chain_id: cid.clone(),
                    snapshot: SnapshotId(sid),
                });
                if repair {
                    self.db().write(|tx| {
                        tx.open_table(db::CHAINS)
                            .map_err(te)?
                            .remove(cid.as_str())
                            .map_err(te)?;
                        Ok(())
                    })?;
                    fixed += 1;
                }
            }
        }
        for (key, rec) in cache {
            let shown = String::from_utf8_lossy(&key).into_owned();
            let missing = match &rec {
                None => {
                    r.problems
                        .push(FsckProblem::BadRecord(format!("cache/{shown}")));
                    Some(String::new())
                }
                Some(c) => c
                    .snapshots
                    .iter()
                    .find(|s| !ids.contains(&s.0))
                    .map(|s| format!("snapshot {s}"))
                    .or_else(|| {
                        c.blobs
                            .iter()
                            .find(|b| !self.content().has(b))
                            .map(|b| format!("blob {b}"))
                    }),
            };
            if let Some(m) = missing {
                if rec.is_some() {
                    r.problems.push(FsckProblem::DanglingCacheRecord {
                        key: shown,
                        missing: m,
                    });
                }
                if repair {
                    self.db().write(|tx| {
                        tx.open_table(db::CACHE)
                            .map_err(te)?
                            .remove(key.as_slice())
                            .map_err(te)?;
                        Ok(())
                    })?;
                    fixed += 1;
                }
            }
        }
        r.repaired += fixed;
        Ok(r)
    }

    /// Removes what killed processes left behind — their leases, active snapshots, partial
    /// ingests and half-removed snapshot dirs — and returns how many. Reads no blob, so it is
    /// cheap enough for every build to run first; safe while other builds run (only what
    /// belongs to dead processes, or to nobody, is touched).
    pub fn reclaim_leftovers(&self) -> Result<usize> {
        let mut r = FsckReport::default();
        self.leftovers(true, &mut r)?;
        Ok(r.repaired)
    }

    /// Finds (and with `repair` removes) leftovers of killed processes.
    fn leftovers(&self, repair: bool, r: &mut FsckReport) -> Result<()> {
        let mut fixed = 0usize;
        for p in self.content().stale_ingests()? {
            r.problems.push(FsckProblem::StaleIngest(p.clone()));
            if repair && fs::remove_file(&p).is_ok() {
                fixed += 1;
            }
        }
        let snaps = self.snapshots()?;
        for s in snaps.iter().filter(|s| is_stale_active(s)) {
            r.problems.push(FsckProblem::StaleActiveSnapshot {
                id: s.id,
                pid: s.pid,
            });
            if repair {
                // Moved aside, not deleted: deleting a big tree here would slow every file
                // the build creates next (see `trash.rs`).
                self.discard_snapshot_dir(&self.snapshot_dir(s.id))?;
                self.db().write(|tx| {
                    tx.open_table(db::SNAPSHOTS)
                        .map_err(te)?
                        .remove(s.id.0)
                        .map_err(te)?;
                    Ok(())
                })?;
                fixed += 1;
            }
        }
        let ids: std::collections::HashSet<u64> = snaps.iter().map(|s| s.id.0).collect();
        let snapdir = self.root().join("snapshots");
        if let Ok(rd) = fs::read_dir(&snapdir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let unknown = match name.parse::<u64>() {
                    Ok(n) => !ids.contains(&n),
                    Err(_) => name
                        .strip_prefix("probe-")
                        .and_then(|p| p.parse::<u32>().ok())
                        .is_some_and(|pid| !pid_alive(pid)),
                };
                if unknown {
                    // A snapshot being created right now has its record first, so an
                    // unrecorded dir is always a leftover.
                    r.problems.push(FsckProblem::UnknownSnapshotDir(e.path()));
                    if repair && self.discard_snapshot_dir(&e.path()).is_ok() {
                        fixed += 1;
                    }
                }
            }
        }
        let leases = self.db().read(|tx| {
            let mut leases = Vec::new();
            for row in tx.open_table(db::LEASES).map_err(te)?.iter().map_err(te)? {
                let (k, v) = row.map_err(te)?;
                let l: LeaseRecord = decode("leases", k.value(), v.value())?;
                leases.push((k.value().to_owned(), l.pid));
            }
            Ok(leases)
        })?;
        for (id, pid) in leases {
            if pid != std::process::id() && !pid_alive(pid) {
                r.problems.push(FsckProblem::DeadLease {
                    id: id.clone(),
                    pid,
                });
                if repair {
                    self.db()
                        .write(|tx| crate::store::remove_lease(tx, id.as_str()))?;
                    fixed += 1;
                }
            }
        }
        r.repaired += fixed;
        Ok(())
    }
}

/// An active or view snapshot whose process has died.
fn is_stale_active(s: &crate::SnapshotRecord) -> bool {
    s.state != SnapshotState::Committed && s.pid != std::process::id() && !pid_alive(s.pid)
}
