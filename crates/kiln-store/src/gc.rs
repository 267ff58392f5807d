//! `kiln prune`'s engine: drop cache records by age or size, then delete every snapshot and
//! blob nothing references.
//!
//! Roots: active and view snapshots, everything a live lease names, everything a cache
//! record names, and every blob reachable from an image ref's manifest (digests found in
//! the manifest/index JSON, recursively). A snapshot keeps its ancestors; a kept snapshot
//! keeps the blobs of the layers exported from it. Anything created within `grace` is kept
//! too, which covers a build that has made a blob or snapshot but not yet leased it.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, SystemTime};

use kiln_oci::Digest;
use redb::ReadableTable;

use crate::db::{self, decode, encode, te};
use crate::error::Result;
use crate::store::{lease_protections, pid_alive, CacheRecord, SnapshotId, SnapshotState, Store};

/// What [`Store::prune`] may delete.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Drop cache records not used for this long.
    pub older_than: Option<Duration>,
    /// Then drop least recently used cache records until their total declared size is at
    /// most this.
    pub keep_bytes: Option<u64>,
    /// Never delete a snapshot or blob younger than this.
    pub grace: Duration,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            older_than: None,
            keep_bytes: None,
            grace: Duration::from_secs(600),
        }
    }
}

/// What [`Store::prune`] deleted.
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    /// Cache records dropped.
    pub cache_records: u64,
    /// Snapshots deleted.
    pub snapshots: Vec<SnapshotId>,
    /// Blobs deleted.
    pub blobs: Vec<Digest>,
    /// Bytes of blobs freed.
    pub blob_bytes: u64,
    /// Trees of killed builds' leftovers deleted from the trash (reclaiming them at the
    /// start of a build only moves them there).
    pub trash: usize,
}

fn digests_in(v: &serde_json::Value, out: &mut Vec<Digest>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                if k == "digest" {
                    if let Some(d) = x.as_str().and_then(|s| s.parse().ok()) {
                        out.push(d);
                    }
                }
                digests_in(x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| digests_in(x, out)),
        _ => {}
    }
}

impl Store {
    /// Drops cache records per `opts`, then deletes unreferenced snapshots and blobs.
    pub fn prune(&self, opts: &PruneOptions) -> Result<PruneReport> {
        let mut report = PruneReport::default();
        let now = db::now_secs();
        report.cache_records = self.db().write(|tx| {
            let mut t = tx.open_table(db::CACHE).map_err(te)?;
            let mut recs: Vec<(Vec<u8>, CacheRecord)> = Vec::new();
            for row in t.iter().map_err(te)? {
                let (k, v) = row.map_err(te)?;
                let r: CacheRecord =
                    decode("cache", &String::from_utf8_lossy(k.value()), v.value())?;
                recs.push((k.value().to_vec(), r));
            }
            recs.sort_by_key(|(_, r)| r.last_used);
            let mut drop = Vec::new();
            let mut total: u64 = recs.iter().map(|(_, r)| r.size).sum();
            for (k, r) in &recs {
                let old = opts
                    .older_than
                    .is_some_and(|age| now.saturating_sub(r.last_used) >= age.as_secs());
                let over = opts.keep_bytes.is_some_and(|keep| total > keep);
                if old || over {
                    total -= r.size;
                    drop.push(k.clone());
                }
            }
            for k in &drop {
                t.remove(k.as_slice()).map_err(te)?;
            }
            Ok(drop.len() as u64)
        })?;

        // Roots.
        let snaps = self.snapshots()?;
        let young = |created: u64| now.saturating_sub(created) < opts.grace.as_secs();
        let mut keep_snaps: HashSet<u64> = snaps
            .iter()
            .filter(|s| s.state != SnapshotState::Committed || young(s.created))
            .map(|s| s.id.0)
            .collect();
        let mut keep_blobs: HashSet<Digest> = HashSet::new();
        let (leases, cache, refs, snapshot_diffs) = self.db().read(|tx| {
            let leases = lease_protections(tx, |pid| pid == std::process::id() || pid_alive(pid))?;
            let mut cache = Vec::new();
            for row in tx.open_table(db::CACHE).map_err(te)?.iter().map_err(te)? {
                let (k, v) = row.map_err(te)?;
                cache.push(decode::<CacheRecord>(
                    "cache",
                    &String::from_utf8_lossy(k.value()),
                    v.value(),
                )?);
            }
            let mut refs = Vec::new();
            for row in tx.open_table(db::REFS).map_err(te)?.iter().map_err(te)? {
                let (_, v) = row.map_err(te)?;
                if let Ok(d) = v.value().parse::<Digest>() {
                    refs.push(d);
                }
            }
            let mut sd = Vec::new();
            for row in tx
                .open_table(db::SNAPSHOT_DIFFS)
                .map_err(te)?
                .iter()
                .map_err(te)?
            {
                let (k, v) = row.map_err(te)?;
                sd.push((k.value().to_owned(), v.value().to_owned()));
            }
            Ok((leases, cache, refs, sd))
        })?;
        let (lease_snaps, lease_blobs) = leases;
        keep_snaps.extend(lease_snaps);
        keep_blobs.extend(lease_blobs.iter().filter_map(|b| b.parse().ok()));
        for c in &cache {
            keep_snaps.extend(c.snapshots.iter().map(|s| s.0));
            keep_blobs.extend(c.blobs.iter().cloned());
        }
        // Blobs reachable from image refs.
        let mut stack = refs;
        while let Some(d) = stack.pop() {
            if !keep_blobs.insert(d.clone()) {
                continue;
            }
            if self.content().size(&d)?.is_some_and(|n| n < (4 << 20)) {
                if let Ok(bytes) = std::fs::read(self.content().blob_path(&d)) {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                        digests_in(&v, &mut stack);
                    }
                }
            }
        }
        // Ancestors of kept snapshots.
        let parent_of: std::collections::HashMap<u64, Option<u64>> = snaps
            .iter()
            .map(|s| (s.id.0, s.parent.map(|p| p.0)))
            .collect();
        let mut todo: Vec<u64> = keep_snaps.iter().copied().collect();
        while let Some(id) = todo.pop() {
            if let Some(Some(p)) = parent_of.get(&id) {
                if keep_snaps.insert(*p) {
                    todo.push(*p);
                }
            }
        }
        // Layer blobs of kept snapshots.
        let kept_diffs: BTreeSet<String> = snapshot_diffs
            .iter()
            .filter(|(k, _)| {
                k.split('/')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| keep_snaps.contains(&n))
            })
            .map(|(_, d)| d.clone())
            .collect();
        let layer_blobs: Vec<(String, Digest)> = self.db().read(|tx| {
            let mut v = Vec::new();
            for row in tx
                .open_table(db::BLOB_LAYERS)
                .map_err(te)?
                .iter()
                .map_err(te)?
            {
                let (k, d) = row.map_err(te)?;
                if let Ok(b) = k.value().parse() {
                    v.push((d.value().to_owned(), b));
                }
            }
            Ok(v)
        })?;
        for (diff, blob) in &layer_blobs {
            if kept_diffs.contains(diff) {
                keep_blobs.insert(blob.clone());
            }
        }

        // Delete snapshots, children first.
        let mut doomed: Vec<_> = snaps
            .iter()
            .filter(|s| !keep_snaps.contains(&s.id.0))
            .collect();
        doomed.sort_by_key(|s| std::cmp::Reverse(s.depth));
        for s in doomed {
            self.remove(s.id)?;
            report.snapshots.push(s.id);
        }
        // Delete blobs.
        let grace_cut = SystemTime::now() - opts.grace;
        let mut gone = Vec::new();
        for b in self.content().list()?.into_iter().flatten() {
            if keep_blobs.contains(&b.digest) {
                continue;
            }
            let p = self.content().blob_path(&b.digest);
            let recent = std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .map(|t| t > grace_cut)
                .unwrap_or(true);
            if recent {
                continue;
            }
            if self.content().delete(&b.digest)? {
                report.blob_bytes += b.size;
                gone.push(b.digest);
            }
        }
        if !gone.is_empty() {
            let gone_set: HashSet<String> = gone.iter().map(|d| d.to_string()).collect();
            self.db().write(|tx| {
                let mut bl = tx.open_table(db::BLOB_LAYERS).map_err(te)?;
                for g in &gone_set {
                    bl.remove(g.as_str()).map_err(te)?;
                }
                let mut layers = tx.open_table(db::LAYERS).map_err(te)?;
                let mut updates = Vec::new();
                for row in layers.iter().map_err(te)? {
                    let (k, v) = row.map_err(te)?;
                    let mut lb: serde_json::Value = decode("layers", k.value(), v.value())?;
                    let mut changed = false;
                    if let Some(m) = lb.get_mut("blobs").and_then(|b| b.as_object_mut()) {
                        let before = m.len();
                        m.retain(|_, r| {
                            !r.get("digest")
                                .and_then(|d| d.as_str())
                                .is_some_and(|d| gone_set.contains(d))
                        });
                        changed = m.len() != before;
                    }
                    if changed {
                        updates.push((k.value().to_owned(), lb));
                    }
                }
                for (k, lb) in updates {
                    layers
                        .insert(k.as_str(), encode(&lb)?.as_slice())
                        .map_err(te)?;
                }
                Ok(())
            })?;
        }
        report.blobs = gone;
        report.trash = self.empty_trash()?;
        Ok(report)
    }
}
