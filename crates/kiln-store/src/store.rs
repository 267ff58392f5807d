//! [`Store`]: the one handle the solver holds. It ties the content store, the metadata DB and
//! the snapshotter together and keeps their records consistent.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{self, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_oci::compression::{decompressing_reader, CompressOptions, Compression, Compressor};
use kiln_oci::{Algorithm, Digest, DigestWriter};
use redb::{ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};

use crate::apply::{apply_tar, ApplyOptions, ApplyTarget};
use crate::content::ContentStore;
use crate::db::{self, decode, encode, te, Db};
use crate::diff::{tree_changes, upper_changes, write_changes, DiffOptions};
use crate::error::{Result, StoreError};
use crate::snapshot::{
    detect, ApplyLayout, CopySnapshotter, DiffSource, Mount, OverlaySnapshotter, SnapshotUsage,
    Snapshotter, SnapshotterKind,
};
use crate::tarfmt::TarWriter;

/// A snapshot's number; also its directory name under `<root>/snapshots/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SnapshotId(pub u64);

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The life stage of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotState {
    /// Writable and mounted, owned by process `pid`.
    Active,
    /// A read-only mount of a committed snapshot.
    View,
    /// Immutable; usable as a parent and exportable as a layer.
    Committed,
}

/// What the DB knows about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Its id.
    pub id: SnapshotId,
    /// The snapshot it sits on.
    pub parent: Option<SnapshotId>,
    /// Life stage.
    pub state: SnapshotState,
    /// OCI chain id of its content, when it is known to equal a chain of layers.
    pub chain_id: Option<Digest>,
    /// Creating process (matters while Active or View).
    pub pid: u32,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// How many ancestors it has.
    pub depth: u32,
}

/// A writable (or view) snapshot and where its rootfs is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveSnapshot {
    /// The snapshot's id (kept after commit).
    pub id: SnapshotId,
    /// The mounted rootfs to run a container on or to write into.
    pub rootfs: PathBuf,
}

/// One compressed form of a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Digest of the blob in the content store.
    pub digest: Digest,
    /// Blob size in bytes.
    pub size: u64,
    /// OCI media type of the blob.
    pub media_type: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LayerBlobs {
    /// Compression name → blob.
    blobs: BTreeMap<String, LayerRecord>,
}

/// [`Store::cache_get`] rewrites a record's last-use time only when it is at least this many
/// seconds old.
pub(crate) const CACHE_TOUCH_SECS: u64 = 60;

/// A cache-key record: bytes the solver defines, plus what GC and prune need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The solver's serialized result. Stored as a base64 string; records written before
    /// (a JSON array of numbers) are still read.
    #[serde(with = "value_bytes")]
    pub value: Vec<u8>,
    /// Snapshots the result refers to (kept alive while the record exists).
    pub snapshots: Vec<SnapshotId>,
    /// Blobs the result refers to (kept alive while the record exists).
    pub blobs: Vec<Digest>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Last lookup time, seconds since the epoch.
    pub last_used: u64,
    /// Bytes the result accounts for (for prune ordering).
    pub size: u64,
}

/// Serde for [`CacheRecord::value`]: written as one base64 string (about 1.3 bytes per
/// byte, where serde's default array of numbers took 3–4); read from either form, so state
/// dirs written by an older kiln keep working.
mod value_bytes {
    use base64::Engine as _;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(ValueVisitor)
    }

    struct ValueVisitor;

    impl<'de> Visitor<'de> for ValueVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a base64 string or an array of bytes")
        }

        fn visit_str<E: Error>(self, s: &str) -> Result<Vec<u8>, E> {
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| E::custom(format!("cache record value is not base64: {e}")))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LeaseRecord {
    pub(crate) pid: u32,
    pub(crate) created: u64,
    pub(crate) snapshots: BTreeSet<u64>,
    pub(crate) blobs: BTreeSet<String>,
}

/// Options for [`Store::export_layer`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportOptions {
    /// Bytes-changing options of the diff (mtime clamping).
    pub diff: DiffOptions,
}

/// Options for [`Store::open_with`].
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Force a snapshotter instead of probing for overlayfs.
    pub snapshotter: Option<SnapshotterKind>,
    /// Compression settings for exported layers.
    pub compress: Option<CompressOptions>,
    /// How many lower dirs one overlay mount may stack before the chain is flattened
    /// (default and maximum: overlayfs's 500). Lowered in tests to exercise flattening.
    pub max_overlay_layers: Option<usize>,
}

/// Totals for `kiln du` and `kiln prune`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Committed blobs.
    pub blobs: u64,
    /// Their bytes.
    pub blob_bytes: u64,
    /// Snapshots of every state.
    pub snapshots: u64,
    /// Snapshots currently Active or View.
    pub active_snapshots: u64,
    /// Bytes on disk of all snapshot dirs.
    pub snapshot_bytes: u64,
    /// Cache records.
    pub cache_records: u64,
    /// Sum of the cache records' declared sizes.
    pub cache_bytes: u64,
    /// Live leases.
    pub leases: u64,
}

struct Inner {
    root: PathBuf,
    content: ContentStore,
    db: Db,
    snapshotter: Box<dyn Snapshotter>,
    note: String,
    compress: CompressOptions,
    max_lowers: usize,
    /// Committed snapshot id → its parent, as read from the DB (see `chain_dirs`).
    parents: std::sync::Mutex<HashMap<u64, Option<u64>>>,
}

/// kiln's local state: blobs, snapshots and records under one root. Cheap to clone; share
/// it between threads. Several processes may open the same root at once.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.root)
            .field("snapshotter", &self.inner.note)
            .finish()
    }
}

/// OCI chain id: the diff id for a base layer, else sha256("<parent chain> <diff id>").
pub fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => diff_id.clone(),
        Some(p) => Digest::sha256_of(format!("{p} {diff_id}").as_bytes()),
    }
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

fn snapshot_key(id: SnapshotId) -> u64 {
    id.0
}

impl Store {
    /// Opens (creating) the store at `root`, probing for overlayfs.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        Store::open_with(root, StoreOptions::default())
    }

    /// Opens the store with explicit options.
    pub fn open_with(root: impl Into<PathBuf>, opts: StoreOptions) -> Result<Store> {
        let root = root.into();
        let snaps = root.join("snapshots");
        fs::create_dir_all(&snaps).map_err(|e| StoreError::io("creating", &snaps, e))?;
        let content = ContentStore::open(root.join("content"))?;
        let db = Db::open(&root.join("db"))?;
        let (snapshotter, note): (Box<dyn Snapshotter>, String) = match opts.snapshotter {
            Some(SnapshotterKind::Overlay) => (
                Box::new(OverlaySnapshotter::new(snaps)),
                "overlayfs (requested)".into(),
            ),
            Some(SnapshotterKind::Copy) => (Box::new(CopySnapshotter), "copy (requested)".into()),
            None => detect(&snaps),
        };
        Ok(Store {
            inner: Arc::new(Inner {
                root,
                content,
                db,
                snapshotter,
                note,
                compress: opts.compress.unwrap_or_default(),
                max_lowers: opts
                    .max_overlay_layers
                    .unwrap_or(usize::MAX)
                    .clamp(3, crate::snapshot::overlay_max_lowers()),
                parents: Default::default(),
            }),
        })
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The content store (blobs by digest).
    pub fn content(&self) -> &ContentStore {
        &self.inner.content
    }

    /// Which snapshotter is in use.
    pub fn snapshotter_kind(&self) -> SnapshotterKind {
        self.inner.snapshotter.kind()
    }

    /// A sentence saying which snapshotter was chosen and why.
    pub fn snapshotter_note(&self) -> &str {
        &self.inner.note
    }

    pub(crate) fn db(&self) -> &Db {
        &self.inner.db
    }

    pub(crate) fn snapshotter(&self) -> &dyn Snapshotter {
        self.inner.snapshotter.as_ref()
    }

    pub(crate) fn snapshot_dir(&self, id: SnapshotId) -> PathBuf {
        self.inner.root.join("snapshots").join(id.0.to_string())
    }

    // ---- snapshots ----

    /// The record of snapshot `id`.
    pub fn snapshot(&self, id: SnapshotId) -> Result<SnapshotRecord> {
        self.db().read(|tx| read_snapshot(tx, id))
    }

    /// Every snapshot record, by id.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.db().read(|tx| {
            let t = tx.open_table(db::SNAPSHOTS).map_err(te)?;
            let mut v = Vec::new();
            for row in t.iter().map_err(te)? {
                let (k, val) = row.map_err(te)?;
                v.push(decode("snapshots", &k.value().to_string(), val.value())?);
            }
            Ok(v)
        })
    }

    /// The `fs/` dirs of `id` and its ancestors, nearest first.
    ///
    /// One read transaction: `id`'s record is always read (so a removed snapshot is an
    /// error), its ancestors' parents come from `Inner::parents` where known. That memory
    /// is safe because a committed snapshot's parent never changes, ids are never reused,
    /// and a snapshot cannot be removed while a child exists (`remove` refuses, prune goes
    /// children first), so the ancestors of a recorded snapshot are recorded too.
    fn chain_dirs(&self, id: Option<SnapshotId>) -> Result<Vec<PathBuf>> {
        let Some(id) = id else { return Ok(Vec::new()) };
        let ids = self.db().read(|tx| {
            let t = tx.open_table(db::SNAPSHOTS).map_err(te)?;
            let read = |c: SnapshotId| -> Result<SnapshotRecord> {
                let v = t
                    .get(snapshot_key(c))
                    .map_err(te)?
                    .ok_or(StoreError::SnapshotNotFound(c.0))?;
                decode("snapshots", &c.to_string(), v.value())
            };
            let mut parents = self.inner.parents.lock().unwrap_or_else(|p| p.into_inner());
            let mut out = Vec::new();
            let top = read(id)?;
            if top.state == SnapshotState::Committed {
                parents.insert(id.0, top.parent.map(|p| p.0));
            }
            out.push(id.0);
            let mut cur = top.parent;
            while let Some(c) = cur {
                out.push(c.0);
                cur = match parents.get(&c.0) {
                    Some(p) => p.map(SnapshotId),
                    None => {
                        let r = read(c)?;
                        if r.state == SnapshotState::Committed {
                            parents.insert(c.0, r.parent.map(|p| p.0));
                        }
                        r.parent
                    }
                };
            }
            Ok(out)
        })?;
        Ok(ids
            .into_iter()
            .map(|i| self.snapshot_dir(SnapshotId(i)).join("fs"))
            .collect())
    }

    fn allocate(&self, parent: Option<SnapshotId>, state: SnapshotState) -> Result<SnapshotRecord> {
        self.allocate_on(parent, state, false)
    }

    /// [`Store::allocate`]; with `pending_parent` the parent may also be an active snapshot
    /// (one this process unpacked into a [`ChainUnpack`] and commits with it).
    fn allocate_on(
        &self,
        parent: Option<SnapshotId>,
        state: SnapshotState,
        pending_parent: bool,
    ) -> Result<SnapshotRecord> {
        self.db().write(|tx| {
            let depth = match parent {
                Some(p) => {
                    let pr = read_snapshot(tx, p)?;
                    let usable = pr.state == SnapshotState::Committed
                        || (pending_parent && pr.state == SnapshotState::Active);
                    if !usable {
                        return Err(StoreError::SnapshotState {
                            id: p.0,
                            message: "is not committed, so it cannot be a parent".into(),
                        });
                    }
                    pr.depth + 1
                }
                None => 0,
            };
            let mut meta = tx.open_table(db::META).map_err(te)?;
            let next = meta
                .get("next_snapshot")
                .map_err(te)?
                .map(|g| g.value())
                .unwrap_or(1);
            meta.insert("next_snapshot", next + 1).map_err(te)?;
            let rec = SnapshotRecord {
                id: SnapshotId(next),
                parent,
                state,
                chain_id: None,
                pid: std::process::id(),
                created: db::now_secs(),
                depth,
            };
            write_snapshot(tx, &rec)?;
            Ok(rec)
        })
    }

    fn forget(&self, id: SnapshotId) {
        let _ = self.snapshotter().remove(&self.snapshot_dir(id));
        let _ = self.db().write(|tx| {
            tx.open_table(db::SNAPSHOTS)
                .map_err(te)?
                .remove(snapshot_key(id))
                .map_err(te)?;
            Ok(())
        });
    }

    /// Creates a writable snapshot on `parent` (a committed snapshot, or `None` for an empty
    /// rootfs) and mounts it. Commit it with [`Store::commit`] or drop it with
    /// [`Store::remove`]. Chains deeper than overlayfs can stack are flattened first.
    pub fn prepare(
        &self,
        parent: Option<SnapshotId>,
        lease: Option<&Lease>,
    ) -> Result<ActiveSnapshot> {
        let rec = self.allocate(parent, SnapshotState::Active)?;
        let res = (|| {
            let lowers = self.lowers_for_mount(parent)?;
            self.snapshotter()
                .prepare(&self.snapshot_dir(rec.id), &lowers)
        })();
        match res {
            Ok(rootfs) => {
                if let Some(l) = lease {
                    l.protect_snapshot(rec.id)?;
                }
                Ok(ActiveSnapshot { id: rec.id, rootfs })
            }
            Err(e) => {
                self.forget(rec.id);
                Err(e)
            }
        }
    }

    /// Lower dirs for a mount on `parent`; when the chain is deeper than overlayfs allows,
    /// the oldest part is replaced by one flattened copy (made once and kept beside the
    /// snapshot that tops it, under `flat/`).
    fn lowers_for_mount(&self, parent: Option<SnapshotId>) -> Result<Vec<PathBuf>> {
        let mut lowers = self.chain_dirs(parent)?;
        let max = self.inner.max_lowers - 1;
        if self.snapshotter_kind() != SnapshotterKind::Overlay || lowers.len() <= max {
            return Ok(lowers);
        }
        let keep = max - 1;
        let tail: Vec<PathBuf> = lowers.split_off(keep);
        // `tail[0]` is the fs dir of the newest flattened snapshot; its sibling `flat/` holds
        // the merged tree of it and everything below.
        let flat = tail[0].with_file_name("flat");
        if !flat.exists() {
            let tmp = tail[0].with_file_name(format!("flat.tmp-{}", std::process::id()));
            let _ = fs::remove_dir_all(&tmp);
            crate::flatten::merge_layers(&tail, &tmp)
                .map_err(|e| StoreError::io("flattening snapshot chain", &tmp, e))?;
            fs::rename(&tmp, &flat)
                .or_else(|e| {
                    if flat.exists() {
                        let _ = fs::remove_dir_all(&tmp);
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| StoreError::io("flattening snapshot chain", &flat, e))?;
        }
        lowers.push(flat);
        Ok(lowers)
    }

    /// Makes a read-only mount of committed snapshot `of`. Remove it with [`Store::remove`].
    pub fn view(&self, of: SnapshotId, lease: Option<&Lease>) -> Result<ActiveSnapshot> {
        let rec = self.allocate(Some(of), SnapshotState::View)?;
        let res = (|| {
            let lowers = self.lowers_for_mount(Some(of))?;
            self.snapshotter().view(&self.snapshot_dir(rec.id), &lowers)
        })();
        match res {
            Ok(rootfs) => {
                if let Some(l) = lease {
                    l.protect_snapshot(rec.id)?;
                }
                Ok(ActiveSnapshot { id: rec.id, rootfs })
            }
            Err(e) => {
                self.forget(rec.id);
                Err(e)
            }
        }
    }

    /// Unmounts an active snapshot and makes it immutable; its id stays the same.
    pub fn commit(&self, active: &ActiveSnapshot) -> Result<SnapshotId> {
        let id = active.id;
        let rec = self.snapshot(id)?;
        if rec.state != SnapshotState::Active {
            return Err(StoreError::SnapshotState {
                id: id.0,
                message: "is not active".into(),
            });
        }
        let dir = self.snapshot_dir(id);
        self.snapshotter().commit(&dir)?;
        match self.snapshotter().diff_source(&dir, &[]) {
            // The upper dir holds all the snapshot wrote (its writable mount was volatile).
            DiffSource::Upper(upper) => sync_upper(&upper, &dir)?,
            DiffSource::Trees { .. } => sync_fs(&dir)?,
        }
        self.db().write(|tx| {
            let mut r = read_snapshot(tx, id)?;
            r.state = SnapshotState::Committed;
            write_snapshot(tx, &r)
        })?;
        Ok(id)
    }

    /// Unmounts and deletes a snapshot. Refused while other snapshots sit on it.
    pub fn remove(&self, id: SnapshotId) -> Result<()> {
        let children: Vec<u64> = self
            .snapshots()?
            .into_iter()
            .filter(|s| s.parent == Some(id) && s.state != SnapshotState::View)
            .map(|s| s.id.0)
            .collect();
        if !children.is_empty() {
            return Err(StoreError::SnapshotState {
                id: id.0,
                message: format!("has child snapshots {children:?}; remove them first"),
            });
        }
        self.snapshotter().remove(&self.snapshot_dir(id))?;
        self.db().write(|tx| {
            tx.open_table(db::SNAPSHOTS)
                .map_err(te)?
                .remove(snapshot_key(id))
                .map_err(te)?;
            let mut chains = tx.open_table(db::CHAINS).map_err(te)?;
            let stale: Vec<String> = chains
                .iter()
                .map_err(te)?
                .filter_map(|r| r.ok())
                .filter(|(_, v)| v.value() == id.0)
                .map(|(k, _)| k.value().to_owned())
                .collect();
            for k in stale {
                chains.remove(k.as_str()).map_err(te)?;
            }
            Ok(())
        })
    }

    /// The mounts that make up snapshot `id`'s rootfs (for a runtime that mounts itself).
    pub fn mounts(&self, id: SnapshotId) -> Result<Vec<Mount>> {
        let rec = self.snapshot(id)?;
        let writable = rec.state == SnapshotState::Active;
        let lowers = self.chain_dirs(rec.parent)?;
        Ok(self
            .snapshotter()
            .mounts(&self.snapshot_dir(id), &lowers, writable))
    }

    /// Disk usage of snapshot `id`'s own content.
    pub fn snapshot_usage(&self, id: SnapshotId) -> Result<SnapshotUsage> {
        self.snapshotter().usage(&self.snapshot_dir(id))
    }

    // ---- layers ----

    /// The layer of committed snapshot `id` (its changes against its parent) as a blob with
    /// `compression`. Made once per (snapshot, mtime clamp) and compression, then remembered.
    pub fn export_layer(
        &self,
        id: SnapshotId,
        compression: Compression,
        opts: &ExportOptions,
    ) -> Result<LayerRecord> {
        let rec = self.snapshot(id)?;
        if rec.state != SnapshotState::Committed {
            return Err(StoreError::SnapshotState {
                id: id.0,
                message: "must be committed to export a layer".into(),
            });
        }
        let key = format!(
            "{}/{}",
            id.0,
            opts.diff
                .source_date_epoch
                .map_or("-".to_owned(), |e| e.to_string())
        );
        let cached = self.db().read(|tx| {
            let sd = tx.open_table(db::SNAPSHOT_DIFFS).map_err(te)?;
            let Some(diff) = sd.get(key.as_str()).map_err(te)? else {
                return Ok(None);
            };
            let diff = diff.value().to_owned();
            read_layer(tx, &diff).map(|l| l.blobs.get(compression.name()).cloned())
        })?;
        if let Some(l) = cached {
            if self.content().has(&l.digest) {
                return Ok(l);
            }
        }
        let dir = self.snapshot_dir(id);
        let parents = self.chain_dirs(rec.parent)?;
        let src = self.snapshotter().diff_source(&dir, &parents);
        let (root, changes) = match &src {
            DiffSource::Upper(u) => (u.clone(), upper_changes(u)),
            DiffSource::Trees { old, new } => (new.clone(), tree_changes(old.as_deref(), new)),
        };
        let changes = changes.map_err(|e| StoreError::io("reading snapshot changes", &root, e))?;
        let blob = self.content().writer()?;
        let comp = Compressor::new(blob, compression, &self.inner.compress)
            .map_err(|e| StoreError::io("starting compression", &root, e))?;
        let mut tar = TarWriter::new(DigestWriter::new(comp, Algorithm::Sha256));
        write_changes(&root, &changes, &mut tar, &opts.diff)
            .map_err(|e| StoreError::io("writing layer from", &root, e))?;
        let hashed = tar
            .finish()
            .map_err(|e| StoreError::io("writing layer", &root, e))?;
        let (comp, diff_id, _) = hashed.finish();
        let blob = comp
            .finish()
            .map_err(|e| StoreError::io("compressing layer", &root, e))?;
        let info = blob.commit_computed()?;
        let layer = LayerRecord {
            diff_id: diff_id.clone(),
            digest: info.digest,
            size: info.size,
            media_type: compression.oci_layer_media_type().to_owned(),
        };
        let parent_chain = match rec.parent {
            Some(p) => self.snapshot(p)?.chain_id.map(Some),
            None => Some(None),
        };
        self.db().write(|tx| {
            tx.open_table(db::SNAPSHOT_DIFFS)
                .map_err(te)?
                .insert(key.as_str(), diff_id.to_string().as_str())
                .map_err(te)?;
            let rec = remember_layer(tx, &layer, compression)?;
            record_verified(tx, &layer.digest, &diff_id)?;
            // A layer exported without clamping reproduces the snapshot exactly, so the
            // snapshot can stand for its chain id in later unpacks.
            if opts.diff.source_date_epoch.is_none() {
                if let Some(pc) = &parent_chain {
                    let cid = chain_id(pc.as_ref(), &diff_id);
                    let mut chains = tx.open_table(db::CHAINS).map_err(te)?;
                    if chains.get(cid.to_string().as_str()).map_err(te)?.is_none() {
                        chains.insert(cid.to_string().as_str(), id.0).map_err(te)?;
                    }
                    let mut s = read_snapshot(tx, id)?;
                    s.chain_id = Some(cid);
                    write_snapshot(tx, &s)?;
                }
            }
            Ok(rec)
        })
    }

    /// [`Store::export_layer`] for several snapshots at once, in parallel; results in order.
    pub fn export_layers(
        &self,
        ids: &[SnapshotId],
        compression: Compression,
        opts: &ExportOptions,
    ) -> Result<Vec<LayerRecord>> {
        let results: Vec<Result<LayerRecord>> = std::thread::scope(|s| {
            let handles: Vec<_> = ids
                .iter()
                .map(|&id| s.spawn(move || self.export_layer(id, compression, opts)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(StoreError::SnapshotState {
                            id: 0,
                            message: "export thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// The recorded blob of layer `diff_id` in `compression`, if one was made or pulled.
    pub fn layer_blob(
        &self,
        diff_id: &Digest,
        compression: Compression,
    ) -> Result<Option<LayerRecord>> {
        let l = self.db().read(|tx| read_layer(tx, &diff_id.to_string()))?;
        Ok(l.blobs.get(compression.name()).cloned())
    }

    /// Layer `layer` (whose blob is in the content store) as a blob with `compression`: the
    /// one recorded for that compression if there is one, else its bytes decompressed and
    /// compressed again (`force-compression=true`). The new blob is checked to be the same
    /// layer (its diff id) before it is recorded.
    pub fn recompress_layer(
        &self,
        layer: &LayerRecord,
        compression: Compression,
    ) -> Result<LayerRecord> {
        if media_type_compression(&layer.media_type) == compression {
            return Ok(layer.clone());
        }
        if let Some(rec) = self.layer_blob(&layer.diff_id, compression)? {
            if self.content().has(&rec.digest) {
                return Ok(rec);
            }
        }
        let src_path = self.content().blob_path(&layer.digest);
        let src = self.content().open_blob(&layer.digest)?;
        let (_, mut plain) = decompressing_reader(BufReader::with_capacity(1 << 20, src))
            .map_err(|e| StoreError::io("reading layer", &src_path, e))?;
        let blob = self.content().writer()?;
        let comp = Compressor::new(blob, compression, &self.inner.compress)
            .map_err(|e| StoreError::io("starting compression", &src_path, e))?;
        let mut hashed = DigestWriter::new(comp, Algorithm::Sha256);
        io::copy(&mut plain, &mut hashed)
            .map_err(|e| StoreError::io("recompressing layer", &src_path, e))?;
        let (comp, diff_id, _) = hashed.finish();
        if diff_id != layer.diff_id {
            return Err(StoreError::DiffIdMismatch {
                blob: layer.digest.clone(),
                claimed: layer.diff_id.clone(),
                actual: diff_id,
            });
        }
        let blob = comp
            .finish()
            .map_err(|e| StoreError::io("compressing layer", &src_path, e))?;
        let info = blob.commit_computed()?;
        let rec = LayerRecord {
            diff_id: diff_id.clone(),
            digest: info.digest,
            size: info.size,
            media_type: compression.oci_layer_media_type().to_owned(),
        };
        self.db().write(|tx| {
            let rec = remember_layer(tx, &rec, compression)?;
            record_verified(tx, &rec.digest, &diff_id)?;
            Ok(rec)
        })
    }

    /// Records that blob `layer.digest` is layer `layer.diff_id` (e.g. from an image config),
    /// so unpacking it can be skipped when the chain is already present.
    pub fn register_layer(&self, layer: &LayerRecord) -> Result<()> {
        let c = media_type_compression(&layer.media_type);
        self.db()
            .write(|tx| remember_layer(tx, layer, c).map(|_| ()))
    }

    /// The committed snapshot holding the chain `chain` (an OCI chain id), if one was
    /// unpacked or built here.
    pub fn chain_snapshot(&self, chain: &Digest) -> Result<Option<SnapshotId>> {
        self.db().read(|tx| {
            let chains = tx.open_table(db::CHAINS).map_err(te)?;
            let Some(sid) = chains
                .get(chain.to_string().as_str())
                .map_err(te)?
                .map(|g| g.value())
            else {
                return Ok(None);
            };
            match read_snapshot(tx, SnapshotId(sid)) {
                Ok(r) if r.state == SnapshotState::Committed => Ok(Some(r.id)),
                _ => Ok(None),
            }
        })
    }

    /// Unpacks the layer blob `blob` (tar, tar+gzip or tar+zstd, detected by magic) on top
    /// of `parent` into a new committed snapshot. Cached by OCI chain id: a chain already
    /// unpacked (by any process) is returned without reading the blob.
    pub fn unpack_layer(
        &self,
        parent: Option<SnapshotId>,
        blob: &Digest,
        opts: &ApplyOptions,
        lease: Option<&Lease>,
    ) -> Result<SnapshotId> {
        self.unpack_layer_expecting(parent, blob, None, opts, lease)
    }

    /// [`Store::unpack_layer`] of a blob said to be the layer `expected` (a diff id from an
    /// image config or a cache record): when the unpacked bytes hash to another diff id, the
    /// snapshot is dropped, nothing is recorded, and [`StoreError::DiffIdMismatch`] returned.
    pub fn unpack_layer_expecting(
        &self,
        parent: Option<SnapshotId>,
        blob: &Digest,
        expected: Option<&Digest>,
        opts: &ApplyOptions,
        lease: Option<&Lease>,
    ) -> Result<SnapshotId> {
        let parent_chain = self.committed_chain(parent)?;
        // Refused before the claim can pick a snapshot by chain id.
        self.check_claim(blob, expected)?;
        if let Some(pc) = &parent_chain {
            let known = self.known_chain(parent, pc.as_ref(), blob)?;
            if let Some(id) = known {
                if let Some(l) = lease {
                    l.protect_snapshot(id)?;
                }
                return Ok(id);
            }
        }
        let file = self.content().open_blob(blob)?;
        let rec = self.allocate(parent, SnapshotState::Active)?;
        let dir = self.snapshot_dir(rec.id);
        let (kind, stats, size) = self.apply_checked(rec.id, parent, file, blob, expected, opts)?;
        if let Err(e) = sync_fs(&dir) {
            self.forget(rec.id);
            return Err(e);
        }
        let layer = LayerRecord {
            diff_id: stats.diff_id.clone(),
            digest: blob.clone(),
            size,
            media_type: kind.oci_layer_media_type().to_owned(),
        };
        let winner = self.db().write(|tx| {
            // Unpacked bytes are the truth about a blob: they replace any claim made for it.
            remember_layer(tx, &layer, kind)?;
            record_verified(tx, blob, &stats.diff_id)?;
            let mut r = read_snapshot(tx, rec.id)?;
            r.state = SnapshotState::Committed;
            if let Some(pc) = &parent_chain {
                let cid = chain_id(pc.as_ref(), &stats.diff_id);
                let mut chains = tx.open_table(db::CHAINS).map_err(te)?;
                let existing = chains
                    .get(cid.to_string().as_str())
                    .map_err(te)?
                    .map(|g| g.value());
                if let Some(other) = existing {
                    if other != rec.id.0 {
                        if let Ok(o) = read_snapshot(tx, SnapshotId(other)) {
                            if o.state == SnapshotState::Committed && o.parent == parent {
                                // Another process unpacked the same chain first.
                                return Ok(Some(o.id));
                            }
                        }
                    }
                }
                chains
                    .insert(cid.to_string().as_str(), rec.id.0)
                    .map_err(te)?;
                r.chain_id = Some(cid);
            }
            write_snapshot(tx, &r)?;
            Ok(None)
        })?;
        let id = match winner {
            Some(other) => {
                self.forget(rec.id);
                other
            }
            None => rec.id,
        };
        if let Some(l) = lease {
            l.protect_snapshot(id)?;
        }
        Ok(id)
    }

    /// The committed snapshot of blob `blob`'s layer on `parent` (chain id `parent_chain`),
    /// if the blob was unpacked before.
    fn known_chain(
        &self,
        parent: Option<SnapshotId>,
        parent_chain: Option<&Digest>,
        blob: &Digest,
    ) -> Result<Option<SnapshotId>> {
        let pc = parent_chain;
        self.db().read(|tx| {
            let bl = tx.open_table(db::BLOB_LAYERS).map_err(te)?;
            let Some(diff) = bl.get(blob.to_string().as_str()).map_err(te)? else {
                return Ok(None);
            };
            let diff: Digest = decode_digest(diff.value())?;
            let cid = chain_id(pc, &diff);
            let chains = tx.open_table(db::CHAINS).map_err(te)?;
            let Some(sid) = chains
                .get(cid.to_string().as_str())
                .map_err(te)?
                .map(|g| g.value())
            else {
                return Ok(None);
            };
            match read_snapshot(tx, SnapshotId(sid)) {
                Ok(r) if r.state == SnapshotState::Committed && r.parent == parent => {
                    Ok(Some(r.id))
                }
                _ => Ok(None),
            }
        })
    }

    /// Unpacks blob `blob` (open as `file`) into the snapshot dir `dir` of a snapshot
    /// allocated on `parent`, and readies it for commit; nothing is synced or recorded.
    /// The chain a layer unpacked on `parent` extends: `Some(None)` on no parent,
    /// `Some(Some(id))` on a parent with a chain id, `None` on a parent without one (a build
    /// snapshot). Fails when `parent` is not committed.
    fn committed_chain(&self, parent: Option<SnapshotId>) -> Result<Option<Option<Digest>>> {
        let Some(p) = parent else {
            return Ok(Some(None));
        };
        let pr = self.snapshot(p)?;
        if pr.state != SnapshotState::Committed {
            return Err(StoreError::SnapshotState {
                id: p.0,
                message: "is not committed".into(),
            });
        }
        Ok(pr.chain_id.map(Some))
    }

    /// Refuses a claim that `blob` is the layer `expected` when this store has seen the
    /// blob's bytes be another layer.
    fn check_claim(&self, blob: &Digest, expected: Option<&Digest>) -> Result<()> {
        if let Some(want) = expected {
            if let Some(actual) = self.verified_diff_id(blob)?.filter(|a| a != want) {
                return Err(StoreError::DiffIdMismatch {
                    blob: blob.clone(),
                    claimed: want.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Unpacks `blob` (open as `file`) into the new active snapshot `id` (on `parent`) and
    /// checks the unpacked bytes against the claim `expected`; returns the blob's
    /// compression, what was unpacked and the blob's size. On any error snapshot `id` is
    /// forgotten; on a mismatch what the bytes are is recorded (the claim that named them is
    /// not kept).
    fn apply_checked(
        &self,
        id: SnapshotId,
        parent: Option<SnapshotId>,
        file: fs::File,
        blob: &Digest,
        expected: Option<&Digest>,
        opts: &ApplyOptions,
    ) -> Result<(Compression, crate::apply::ApplyStats, u64)> {
        let dir = self.snapshot_dir(id);
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let (kind, stats) = match self.apply_blob(&dir, parent, file, blob, opts) {
            Ok(v) => v,
            Err(e) => {
                self.forget(id);
                return Err(e);
            }
        };
        if let Some(want) = expected.filter(|w| **w != stats.diff_id) {
            self.forget(id);
            let _ = self
                .db()
                .write(|tx| record_verified(tx, blob, &stats.diff_id));
            return Err(StoreError::DiffIdMismatch {
                blob: blob.clone(),
                claimed: want.clone(),
                actual: stats.diff_id,
            });
        }
        Ok((kind, stats, size))
    }

    fn apply_blob(
        &self,
        dir: &Path,
        parent: Option<SnapshotId>,
        file: fs::File,
        blob: &Digest,
        opts: &ApplyOptions,
    ) -> Result<(Compression, crate::apply::ApplyStats)> {
        let lowers = self.chain_dirs(parent)?;
        let (root, target) = match self.snapshotter().apply_layout() {
            ApplyLayout::OverlayUpper => {
                let fsd = dir.join("fs");
                fs::create_dir_all(&fsd).map_err(|e| StoreError::io("creating", &fsd, e))?;
                (fsd, ApplyTarget::OverlayUpper { lowers })
            }
            ApplyLayout::Merged => (
                self.snapshotter().prepare(dir, &lowers)?,
                ApplyTarget::Merged,
            ),
        };
        let (kind, reader) = decompress_in_thread(file).map_err(|e| StoreError::BadArchive {
            layer: blob.to_string(),
            reason: format!("reading compression header: {e}"),
        })?;
        let stats = apply_tar(&root, reader, &target, opts, Some(blob))?;
        self.snapshotter().commit(dir)?;
        Ok((kind, stats))
    }

    /// Starts unpacking a chain of layers on `parent` (committed, or `None`): each
    /// [`ChainUnpack::add`] unpacks one more layer into its own snapshot, and
    /// [`ChainUnpack::finish`] makes them all durable with one `syncfs` and commits them in
    /// one DB transaction, instead of a `syncfs` and two commits per layer. Dropped before
    /// `finish` (an error, a cancelled build), the unpacked snapshots are removed; a
    /// process killed meanwhile leaves active snapshots of a dead pid, which
    /// [`Store::reclaim_leftovers`] removes.
    pub fn unpack_chain<'s>(
        &'s self,
        parent: Option<SnapshotId>,
        opts: ApplyOptions,
        lease: Option<&'s Lease>,
    ) -> Result<ChainUnpack<'s>> {
        let base_chain = self.committed_chain(parent)?;
        Ok(ChainUnpack {
            store: self,
            base: parent,
            base_chain,
            pending: Vec::new(),
            opts,
            lease,
        })
    }

    /// The diff id of blob `blob` as computed here from its bytes, if it ever was.
    pub fn verified_diff_id(&self, blob: &Digest) -> Result<Option<Digest>> {
        self.db().read(|tx| {
            let t = tx.open_table(db::VERIFIED_LAYERS).map_err(te)?;
            let v = t.get(blob.to_string().as_str()).map_err(te)?;
            v.map(|d| decode_digest(d.value())).transpose()
        })
    }

    /// Checks that the local blob `blob` is the layer `claimed`: from what an unpack or an
    /// export here computed, else by hashing its uncompressed bytes (remembered after).
    /// [`StoreError::DiffIdMismatch`] when it is not.
    pub fn verify_layer(&self, blob: &Digest, claimed: &Digest) -> Result<()> {
        let actual = match self.verified_diff_id(blob)? {
            Some(d) => d,
            None => {
                let file = self.content().open_blob(blob)?;
                let (_, mut reader) = decompressing_reader(BufReader::with_capacity(1 << 20, file))
                    .map_err(|e| StoreError::BadArchive {
                        layer: blob.to_string(),
                        reason: format!("reading compression header: {e}"),
                    })?;
                let mut hashed = DigestWriter::new(io::sink(), Algorithm::Sha256);
                io::copy(&mut reader, &mut hashed).map_err(|e| StoreError::BadArchive {
                    layer: blob.to_string(),
                    reason: e.to_string(),
                })?;
                let (_, d, _) = hashed.finish();
                self.db().write(|tx| record_verified(tx, blob, &d))?;
                d
            }
        };
        if actual != *claimed {
            return Err(StoreError::DiffIdMismatch {
                blob: blob.clone(),
                claimed: claimed.clone(),
                actual,
            });
        }
        Ok(())
    }

    /// Unpacks an uncompressed or compressed tar stream (e.g. a build context archive) into
    /// the writable snapshot `active` with the same safety checks as layers (always merged:
    /// whiteouts delete through the mount).
    pub fn extract_into(
        &self,
        active: &ActiveSnapshot,
        input: impl io::Read,
        opts: &ApplyOptions,
    ) -> Result<crate::apply::ApplyStats> {
        let (_, reader) =
            decompressing_reader(BufReader::new(input)).map_err(|e| StoreError::BadArchive {
                layer: "(archive)".into(),
                reason: e.to_string(),
            })?;
        apply_tar(&active.rootfs, reader, &ApplyTarget::Merged, opts, None)
    }

    // ---- cache records ----

    /// Looks up a cache record and marks it used.
    ///
    /// The last-use time is rewritten only when it is at least a minute old, so a
    /// build's many lookups of fresh records are read transactions (prune's ages are far
    /// coarser than that).
    pub fn cache_get(&self, key: &[u8]) -> Result<Option<CacheRecord>> {
        let now = db::now_secs();
        let rec = self.db().read(|tx| {
            let t = tx.open_table(db::CACHE).map_err(te)?;
            let out = match t.get(key).map_err(te)? {
                Some(v) => Some(decode::<CacheRecord>(
                    "cache",
                    &String::from_utf8_lossy(key),
                    v.value(),
                )?),
                None => None,
            };
            Ok(out)
        })?;
        match rec {
            Some(r) if now.saturating_sub(r.last_used) < CACHE_TOUCH_SECS => Ok(Some(r)),
            None => Ok(None),
            Some(_) => self.db().write(|tx| {
                let mut t = tx.open_table(db::CACHE).map_err(te)?;
                let rec: Option<CacheRecord> = match t.get(key).map_err(te)? {
                    Some(v) => Some(decode("cache", &String::from_utf8_lossy(key), v.value())?),
                    None => None,
                };
                let Some(mut rec) = rec else { return Ok(None) };
                rec.last_used = now;
                t.insert(key, encode(&rec)?.as_slice()).map_err(te)?;
                Ok(Some(rec))
            }),
        }
    }

    /// Stores (or replaces) a cache record. `snapshots` and `blobs` stay alive while it exists.
    pub fn cache_put(
        &self,
        key: &[u8],
        value: &[u8],
        snapshots: &[SnapshotId],
        blobs: &[Digest],
        size: u64,
    ) -> Result<()> {
        let now = db::now_secs();
        let rec = CacheRecord {
            value: value.to_vec(),
            snapshots: snapshots.to_vec(),
            blobs: blobs.to_vec(),
            created: now,
            last_used: now,
            size,
        };
        self.db().write(|tx| {
            tx.open_table(db::CACHE)
                .map_err(te)?
                .insert(key, encode(&rec)?.as_slice())
                .map_err(te)?;
            Ok(())
        })
    }

    /// Deletes a cache record; returns whether it existed.
    pub fn cache_remove(&self, key: &[u8]) -> Result<bool> {
        self.db().write(|tx| {
            Ok(tx
                .open_table(db::CACHE)
                .map_err(te)?
                .remove(key)
                .map_err(te)?
                .is_some())
        })
    }

    // ---- refs ----

    /// Points image ref `name` at manifest `digest`.
    pub fn set_ref(&self, name: &str, digest: &Digest) -> Result<()> {
        self.db().write(|tx| {
            tx.open_table(db::REFS)
                .map_err(te)?
                .insert(name, digest.to_string().as_str())
                .map_err(te)?;
            Ok(())
        })
    }

    /// The manifest digest of image ref `name`.
    pub fn get_ref(&self, name: &str) -> Result<Option<Digest>> {
        self.db().read(|tx| {
            let t = tx.open_table(db::REFS).map_err(te)?;
            match t.get(name).map_err(te)? {
                Some(v) => Ok(Some(decode_digest(v.value())?)),
                None => Ok(None),
            }
        })
    }

    /// Deletes image ref `name`.
    pub fn remove_ref(&self, name: &str) -> Result<bool> {
        self.db().write(|tx| {
            Ok(tx
                .open_table(db::REFS)
                .map_err(te)?
                .remove(name)
                .map_err(te)?
                .is_some())
        })
    }

    /// Every image ref and its manifest digest.
    pub fn refs(&self) -> Result<Vec<(String, Digest)>> {
        self.db().read(|tx| {
            let t = tx.open_table(db::REFS).map_err(te)?;
            let mut v = Vec::new();
            for row in t.iter().map_err(te)? {
                let (k, d) = row.map_err(te)?;
                v.push((k.value().to_owned(), decode_digest(d.value())?));
            }
            Ok(v)
        })
    }

    // ---- leases ----

    /// Starts a lease: snapshots and blobs added to it are never collected until it is
    /// dropped (or its process has died).
    pub fn lease(&self) -> Result<Lease> {
        let id = format!(
            "{}-{}",
            std::process::id(),
            LEASE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let rec = LeaseRecord {
            pid: std::process::id(),
            created: db::now_secs(),
            ..Default::default()
        };
        self.db().write(|tx| {
            tx.open_table(db::LEASES)
                .map_err(te)?
                .insert(id.as_str(), encode(&rec)?.as_slice())
                .map_err(te)?;
            Ok(())
        })?;
        Ok(Lease {
            store: self.clone(),
            id,
            snapshots: Default::default(),
            blobs: Default::default(),
        })
    }

    // ---- usage ----

    /// Totals for `kiln du`.
    pub fn usage(&self) -> Result<Usage> {
        let mut u = Usage::default();
        for b in self.content().list()?.into_iter().flatten() {
            u.blobs += 1;
            u.blob_bytes += b.size;
        }
        for s in self.snapshots()? {
            u.snapshots += 1;
            if s.state != SnapshotState::Committed {
                u.active_snapshots += 1;
            }
            u.snapshot_bytes += self.snapshot_usage(s.id).map(|x| x.bytes).unwrap_or(0);
        }
        self.db().read(|tx| {
            let c = tx.open_table(db::CACHE).map_err(te)?;
            for row in c.iter().map_err(te)? {
                let (k, v) = row.map_err(te)?;
                let r: CacheRecord =
                    decode("cache", &String::from_utf8_lossy(k.value()), v.value())?;
                u.cache_records += 1;
                u.cache_bytes += r.size;
            }
            u.leases = tx.open_table(db::LEASES).map_err(te)?.len().map_err(te)?;
            Ok(())
        })?;
        Ok(u)
    }
}

static LEASE_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Keeps snapshots and blobs from being collected while a build uses them. Released on drop.
#[derive(Debug)]
pub struct Lease {
    store: Store,
    id: String,
    /// Snapshots and blobs already recorded for this lease (this process's memory of its
    /// own keys: only this lease's owner writes them, only its drop or a dead-process
    /// reclaim deletes them).
    snapshots: std::sync::Mutex<HashSet<u64>>,
    blobs: std::sync::Mutex<HashSet<String>>,
}

impl Lease {
    /// The lease's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Protects snapshot `id` for the lease's life. Each protection is its own small DB
    /// key, written once per lease (later calls for the same snapshot return at once).
    pub fn protect_snapshot(&self, id: SnapshotId) -> Result<()> {
        if self.recorded_snapshots().contains(&id.0) {
            return Ok(());
        }
        self.store.db().write(|tx| {
            tx.open_table(db::LEASE_SNAPSHOTS)
                .map_err(te)?
                .insert((self.id.as_str(), id.0), ())
                .map_err(te)?;
            Ok(())
        })?;
        self.recorded_snapshots().insert(id.0);
        Ok(())
    }

    /// Protects blob `digest` for the lease's life (written once per lease, as snapshots).
    pub fn protect_blob(&self, digest: &Digest) -> Result<()> {
        let d = digest.to_string();
        if self.recorded_blobs().contains(&d) {
            return Ok(());
        }
        self.store.db().write(|tx| {
            tx.open_table(db::LEASE_BLOBS)
                .map_err(te)?
                .insert((self.id.as_str(), d.as_str()), ())
                .map_err(te)?;
            Ok(())
        })?;
        self.recorded_blobs().insert(d);
        Ok(())
    }

    fn recorded_snapshots(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recorded_blobs(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.blobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self
            .store
            .db()
            .write(|tx| remove_lease(tx, self.id.as_str()));
    }
}

/// Deletes lease `id` and every protection it holds, in the caller's transaction.
pub(crate) fn remove_lease(tx: &redb::WriteTransaction, id: &str) -> Result<()> {
    tx.open_table(db::LEASES)
        .map_err(te)?
        .remove(id)
        .map_err(te)?;
    let mut snaps = tx.open_table(db::LEASE_SNAPSHOTS).map_err(te)?;
    let doomed: Vec<u64> = snaps
        .range((id, 0)..=(id, u64::MAX))
        .map_err(te)?
        .map(|r| r.map(|(k, _)| k.value().1))
        .collect::<std::result::Result<_, _>>()
        .map_err(te)?;
    for s in doomed {
        snaps.remove((id, s)).map_err(te)?;
    }
    let mut blobs = tx.open_table(db::LEASE_BLOBS).map_err(te)?;
    let doomed: Vec<String> = blobs
        .range((id, "")..)
        .map_err(te)?
        .map(|r| r.map(|(k, _)| (k.value().0.to_owned(), k.value().1.to_owned())))
        .take_while(|r| r.as_ref().map_or(true, |(l, _)| l == id))
        .map(|r| r.map(|(_, b)| b))
        .collect::<std::result::Result<_, _>>()
        .map_err(te)?;
    for b in doomed {
        blobs.remove((id, b.as_str())).map_err(te)?;
    }
    Ok(())
}

/// What the live leases protect: every lease's own sets (records written by an older kiln)
/// and its per-item keys. `live(pid)` says whether a lease's process still runs.
pub(crate) fn lease_protections(
    tx: &redb::ReadTransaction,
    live: impl Fn(u32) -> bool,
) -> Result<(HashSet<u64>, HashSet<String>)> {
    let mut live_ids = HashSet::new();
    let mut snaps = HashSet::new();
    let mut blobs = HashSet::new();
    for row in tx.open_table(db::LEASES).map_err(te)?.iter().map_err(te)? {
        let (k, v) = row.map_err(te)?;
        let l: LeaseRecord = decode("leases", k.value(), v.value())?;
        if live(l.pid) {
            live_ids.insert(k.value().to_owned());
            snaps.extend(l.snapshots);
            blobs.extend(l.blobs);
        }
    }
    for row in tx
        .open_table(db::LEASE_SNAPSHOTS)
        .map_err(te)?
        .iter()
        .map_err(te)?
    {
        let (k, _) = row.map_err(te)?;
        let (lease, id) = k.value();
        if live_ids.contains(lease) {
            snaps.insert(id);
        }
    }
    for row in tx
        .open_table(db::LEASE_BLOBS)
        .map_err(te)?
        .iter()
        .map_err(te)?
    {
        let (k, _) = row.map_err(te)?;
        let (lease, d) = k.value();
        if live_ids.contains(lease) {
            blobs.insert(d.to_owned());
        }
    }
    Ok((snaps, blobs))
}

pub(crate) fn read_snapshot(tx: &impl SnapshotTable, id: SnapshotId) -> Result<SnapshotRecord> {
    tx.get_snapshot(id)
}

/// Reading a snapshot record from either transaction kind.
pub(crate) trait SnapshotTable {
    fn get_snapshot(&self, id: SnapshotId) -> Result<SnapshotRecord>;
}

impl SnapshotTable for redb::ReadTransaction {
    fn get_snapshot(&self, id: SnapshotId) -> Result<SnapshotRecord> {
        let t = self.open_table(db::SNAPSHOTS).map_err(te)?;
        let v = t
            .get(snapshot_key(id))
            .map_err(te)?
            .ok_or(StoreError::SnapshotNotFound(id.0))?;
        let out = decode("snapshots", &id.to_string(), v.value());
        out
    }
}

impl SnapshotTable for redb::WriteTransaction {
    fn get_snapshot(&self, id: SnapshotId) -> Result<SnapshotRecord> {
        let t = self.open_table(db::SNAPSHOTS).map_err(te)?;
        let v = t
            .get(snapshot_key(id))
            .map_err(te)?
            .ok_or(StoreError::SnapshotNotFound(id.0))?;
        let out = decode("snapshots", &id.to_string(), v.value());
        out
    }
}

fn write_snapshot(tx: &redb::WriteTransaction, rec: &SnapshotRecord) -> Result<()> {
    tx.open_table(db::SNAPSHOTS)
        .map_err(te)?
        .insert(snapshot_key(rec.id), encode(rec)?.as_slice())
        .map_err(te)?;
    Ok(())
}

trait LayerTable {
    fn layer(&self, diff: &str) -> Result<LayerBlobs>;
}

impl LayerTable for redb::ReadTransaction {
    fn layer(&self, diff: &str) -> Result<LayerBlobs> {
        let t = self.open_table(db::LAYERS).map_err(te)?;
        let out = match t.get(diff).map_err(te)? {
            Some(v) => decode("layers", diff, v.value()),
            None => Ok(LayerBlobs::default()),
        };
        out
    }
}

impl LayerTable for redb::WriteTransaction {
    fn layer(&self, diff: &str) -> Result<LayerBlobs> {
        let t = self.open_table(db::LAYERS).map_err(te)?;
        let out = match t.get(diff).map_err(te)? {
            Some(v) => decode("layers", diff, v.value()),
            None => Ok(LayerBlobs::default()),
        };
        out
    }
}

fn read_layer(tx: &impl LayerTable, diff: &str) -> Result<LayerBlobs> {
    tx.layer(diff)
}

/// Records a blob for a layer unless one for that compression exists; returns the record in
/// force (the first one wins, so each layer is compressed once per compression).
fn remember_layer(
    tx: &redb::WriteTransaction,
    layer: &LayerRecord,
    c: Compression,
) -> Result<LayerRecord> {
    let diff = layer.diff_id.to_string();
    let mut lb = read_layer(tx, &diff)?;
    let rec = lb
        .blobs
        .entry(c.name().to_owned())
        .or_insert_with(|| layer.clone())
        .clone();
    tx.open_table(db::LAYERS)
        .map_err(te)?
        .insert(diff.as_str(), encode(&lb)?.as_slice())
        .map_err(te)?;
    let mut bl = tx.open_table(db::BLOB_LAYERS).map_err(te)?;
    bl.insert(layer.digest.to_string().as_str(), diff.as_str())
        .map_err(te)?;
    Ok(rec)
}

/// Records that blob `blob`'s bytes were seen to be layer `diff_id`.
fn record_verified(tx: &redb::WriteTransaction, blob: &Digest, diff_id: &Digest) -> Result<()> {
    tx.open_table(db::VERIFIED_LAYERS)
        .map_err(te)?
        .insert(blob.to_string().as_str(), diff_id.to_string().as_str())
        .map_err(te)?;
    Ok(())
}

fn media_type_compression(mt: &str) -> Compression {
    if mt.ends_with("gzip") {
        Compression::Gzip
    } else if mt.ends_with("zstd") {
        Compression::Zstd
    } else {
        Compression::Uncompressed
    }
}

pub(crate) fn decode_digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e: kiln_oci::DigestError| StoreError::BadRecord {
            table: "digest",
            key: s.to_owned(),
            message: e.to_string(),
        })
}

/// A chain of layers being unpacked by [`Store::unpack_chain`]: each layer in its own
/// snapshot, all made durable and committed together by [`ChainUnpack::finish`].
pub struct ChainUnpack<'s> {
    store: &'s Store,
    /// The committed snapshot the chain starts on (moves up while layers are found unpacked).
    base: Option<SnapshotId>,
    /// `base`'s chain id (`Some(None)`: the empty chain; `None`: `base` has none).
    base_chain: Option<Option<Digest>>,
    pending: Vec<PendingLayer>,
    opts: ApplyOptions,
    lease: Option<&'s Lease>,
}

/// A layer unpacked into an active snapshot, waiting for [`ChainUnpack::finish`].
struct PendingLayer {
    id: SnapshotId,
    layer: LayerRecord,
    kind: Compression,
}

impl ChainUnpack<'_> {
    /// The snapshot the next layer goes on.
    fn top(&self) -> Option<SnapshotId> {
        self.pending.last().map(|p| p.id).or(self.base)
    }

    /// Unpacks the layer blob `blob` (said to be the layer `expected`, checked against the
    /// unpacked bytes as [`Store::unpack_layer_expecting`] does) on top of the layers added
    /// before. A layer this store unpacked before on the same committed chain is reused
    /// without reading the blob. On an error nothing of this layer is left; the layers added
    /// before stay pending, so the call may be retried (e.g. once the blob is downloaded).
    pub fn add(&mut self, blob: &Digest, expected: Option<&Digest>) -> Result<()> {
        let store = self.store;
        store.check_claim(blob, expected)?;
        if self.pending.is_empty() {
            if let Some(pc) = &self.base_chain {
                if let Some(id) = store.known_chain(self.base, pc.as_ref(), blob)? {
                    if let Some(l) = self.lease {
                        l.protect_snapshot(id)?;
                    }
                    let chain = store.snapshot(id)?.chain_id;
                    self.base = Some(id);
                    self.base_chain = chain.map(Some);
                    return Ok(());
                }
            }
        }
        let file = store.content().open_blob(blob)?;
        let parent = self.top();
        let rec = store.allocate_on(parent, SnapshotState::Active, true)?;
        let (kind, stats, size) =
            store.apply_checked(rec.id, parent, file, blob, expected, &self.opts)?;
        self.pending.push(PendingLayer {
            id: rec.id,
            layer: LayerRecord {
                diff_id: stats.diff_id,
                digest: blob.clone(),
                size,
                media_type: kind.oci_layer_media_type().to_owned(),
            },
            kind,
        });
        Ok(())
    }

    /// Makes the unpacked layers durable (one `syncfs`) and commits them (one DB
    /// transaction), registering each chain id; returns the top snapshot (`None` for an
    /// empty chain on no parent). A chain another process committed first is used instead
    /// of this one's copy, which is removed.
    pub fn finish(mut self) -> Result<Option<SnapshotId>> {
        let store = self.store;
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return Ok(self.base);
        }
        let forget_all = |ps: &[PendingLayer]| {
            for p in ps.iter().rev() {
                store.forget(p.id);
            }
        };
        // Invariant 4: the snapshots' files are on disk before any record says committed.
        if let Err(e) = sync_fs(&store.snapshot_dir(pending[0].id)) {
            forget_all(&pending);
            return Err(e);
        }
        let base = self.base;
        let base_chain = self.base_chain.clone();
        let res = store.db().write(|tx| {
            let mut parent = base;
            let mut parent_chain = base_chain.clone();
            let mut kept = Vec::with_capacity(pending.len());
            for p in &pending {
                remember_layer(tx, &p.layer, p.kind)?;
                record_verified(tx, &p.layer.digest, &p.layer.diff_id)?;
                let mut r = read_snapshot(tx, p.id)?;
                // The layer below may have been replaced by another process's copy of it.
                r.parent = parent;
                r.state = SnapshotState::Committed;
                let mut winner = None;
                if let Some(pc) = &parent_chain {
                    let cid = chain_id(pc.as_ref(), &p.layer.diff_id);
                    let mut chains = tx.open_table(db::CHAINS).map_err(te)?;
                    let existing = chains
                        .get(cid.to_string().as_str())
                        .map_err(te)?
                        .map(|g| g.value());
                    if let Some(other) = existing.filter(|o| *o != p.id.0) {
                        if let Ok(o) = read_snapshot(tx, SnapshotId(other)) {
                            if o.state == SnapshotState::Committed && o.parent == parent {
                                winner = Some(o.id);
                            }
                        }
                    }
                    if winner.is_none() {
                        chains
                            .insert(cid.to_string().as_str(), p.id.0)
                            .map_err(te)?;
                        r.chain_id = Some(cid.clone());
                    }
                    parent_chain = Some(Some(cid));
                }
                match winner {
                    Some(o) => parent = Some(o),
                    None => {
                        write_snapshot(tx, &r)?;
                        parent = Some(p.id);
                    }
                }
                kept.push((p.id, parent, winner.is_none()));
            }
            Ok(kept)
        });
        let kept = match res {
            Ok(k) => k,
            Err(e) => {
                forget_all(&pending);
                return Err(e);
            }
        };
        // Another process's copies won: this one's are removed, children first.
        for (id, _, ours) in kept.iter().rev() {
            if !ours {
                store.forget(*id);
            }
        }
        let top = kept.last().and_then(|(_, used, _)| *used);
        if let Some(l) = self.lease {
            for (_, used, _) in &kept {
                if let Some(id) = used {
                    l.protect_snapshot(*id)?;
                }
            }
        }
        Ok(top)
    }
}

impl Drop for ChainUnpack<'_> {
    fn drop(&mut self) {
        for p in self.pending.drain(..).rev() {
            self.store.forget(p.id);
        }
    }
}

/// Flushes the filesystem holding `dir` so a snapshot is on disk before its record says so.
fn sync_fs(dir: &Path) -> Result<()> {
    let f = fs::File::open(dir).map_err(|e| StoreError::io("opening for sync", dir, e))?;
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::syncfs(f.as_raw_fd()) } < 0 {
        return Err(StoreError::io("syncing", dir, io::Error::last_os_error()));
    }
    Ok(())
}

/// Entries up to which a committed upper dir is fsynced one by one; a larger one (a `COPY`
/// of thousands of files) is flushed with one `syncfs`, cheaper than as many fsyncs.
const FSYNC_EACH_MAX: usize = 256;

/// Makes a committed overlay snapshot durable before its record says committed: its few
/// files and directories fsynced one by one (files first, then directories deepest first,
/// then the snapshot dir), or the whole filesystem with `syncfs` past [`FSYNC_EACH_MAX`]
/// entries. A step that wrote a handful of files no longer waits for every other process's
/// dirty data on the disk, as a `syncfs` (or a non-volatile overlay's unmount) does.
/// Symlinks, whiteouts and other special files are directory entries: their directory's
/// fsync makes them durable.
fn sync_upper(upper: &Path, dir: &Path) -> Result<()> {
    let mut files = Vec::new();
    let mut dirs = vec![upper.to_owned()];
    let mut next = 0;
    while next < dirs.len() {
        let d = dirs[next].clone();
        next += 1;
        for entry in fs::read_dir(&d).map_err(|e| StoreError::io("listing for sync", &d, e))? {
            let entry = entry.map_err(|e| StoreError::io("listing for sync", &d, e))?;
            let ft = entry
                .file_type()
                .map_err(|e| StoreError::io("listing for sync", entry.path(), e))?;
            if ft.is_dir() {
                dirs.push(entry.path());
            } else if ft.is_file() {
                files.push(entry.path());
            }
            if files.len() + dirs.len() > FSYNC_EACH_MAX {
                return sync_fs(dir);
            }
        }
    }
    let fsync = |p: &Path| -> Result<()> {
        fs::File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::io("syncing", p, e))
    };
    for f in &files {
        fsync(f)?;
    }
    // Breadth-first order reversed: every directory after all below it.
    for d in dirs.iter().rev() {
        fsync(d)?;
    }
    fsync(dir)
}

/// Reads chunks a decompressing thread sends, so decompression and extraction use two
/// cores the way `gzip -d | tar -x` does.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0), // sender finished: end of stream
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Detects the blob's compression and decompresses it on a helper thread.
fn decompress_in_thread(file: fs::File) -> io::Result<(Compression, ChannelReader)> {
    let (kind_tx, kind_rx) = std::sync::mpsc::sync_channel::<io::Result<Compression>>(1);
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(8);
    std::thread::spawn(move || {
        let (kind, mut r) = match decompressing_reader(BufReader::with_capacity(1 << 20, file)) {
            Ok(v) => v,
            Err(e) => {
                let _ = kind_tx.send(Err(e));
                return;
            }
        };
        if kind_tx.send(Ok(kind)).is_err() {
            return;
        }
        loop {
            let mut chunk = vec![0u8; 1 << 20];
            let mut filled = 0;
            // Fill whole chunks so the channel carries few, large messages.
            while filled < chunk.len() {
                match r.read(&mut chunk[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
            if filled == 0 {
                return;
            }
            chunk.truncate(filled);
            // The extractor stopped (error or done): stop decompressing.
            if tx.send(Ok(chunk)).is_err() {
                return;
            }
        }
    });
    let kind = kind_rx
        .recv()
        .map_err(|_| io::Error::other("decompression thread stopped"))??;
    Ok((
        kind,
        ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_store(dir: &Path) -> Store {
        Store::open_with(
            dir,
            StoreOptions {
                snapshotter: Some(SnapshotterKind::Copy),
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn cache_record_value_is_written_as_base64_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = copy_store(dir.path());
        let value = br#"{"layers":[{"diff_id":"sha256:00"}]}"#;
        store.cache_put(b"k", value, &[], &[], 7).unwrap();
        let raw = store
            .db()
            .read(|tx| {
                let t = tx.open_table(db::CACHE).map_err(te)?;
                let v = t.get(b"k".as_slice()).map_err(te)?.unwrap();
                Ok(v.value().to_vec())
            })
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert!(
            json["value"].is_string(),
            "value stored as {}",
            json["value"]
        );
        assert!(raw.len() < value.len() * 2 + 200, "{} bytes", raw.len());
        assert_eq!(store.cache_get(b"k").unwrap().unwrap().value, value);
    }

    #[test]
    fn cache_record_written_by_an_older_kiln_as_a_number_array_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = copy_store(dir.path());
        // The form serde gave `Vec<u8>` before: an array of numbers.
        let old = br#"{"value":[123,34,97,34,125],"snapshots":[3],"blobs":[],"created":1,"last_used":1,"size":9}"#;
        store
            .db()
            .write(|tx| {
                tx.open_table(db::CACHE)
                    .map_err(te)?
                    .insert(b"old".as_slice(), old.as_slice())
                    .map_err(te)?;
                Ok(())
            })
            .unwrap();
        let rec = store.cache_get(b"old").unwrap().unwrap();
        assert_eq!(rec.value, br#"{"a"}"#);
        assert_eq!(rec.snapshots, vec![SnapshotId(3)]);
        // The lookup refreshed its last-use time, rewriting it in the new form.
        assert!(rec.last_used > 1);
        let again = store.cache_get(b"old").unwrap().unwrap();
        assert_eq!(again, rec);
        assert_eq!(store.usage().unwrap().cache_bytes, 9);
    }

    #[test]
    fn lease_protections_are_separate_keys_removed_with_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store = copy_store(dir.path());
        let lease = store.lease().unwrap();
        let other = store.lease().unwrap();
        let blob = Digest::sha256_of(b"blob");
        for _ in 0..3 {
            lease.protect_snapshot(SnapshotId(5)).unwrap();
            lease.protect_blob(&blob).unwrap();
        }
        other.protect_snapshot(SnapshotId(6)).unwrap();
        let live = |store: &Store| {
            store
                .db()
                .read(|tx| lease_protections(tx, |_| true))
                .unwrap()
        };
        let (snaps, blobs) = live(&store);
        assert_eq!(snaps, HashSet::from([5, 6]));
        assert_eq!(blobs, HashSet::from([blob.to_string()]));
        drop(lease);
        let (snaps, blobs) = live(&store);
        assert_eq!(snaps, HashSet::from([6]));
        assert!(blobs.is_empty());
        let count = |store: &Store| {
            store
                .db()
                .read(|tx| {
                    Ok(tx
                        .open_table(db::LEASE_SNAPSHOTS)
                        .map_err(te)?
                        .len()
                        .map_err(te)?
                        + tx.open_table(db::LEASE_BLOBS)
                            .map_err(te)?
                            .len()
                            .map_err(te)?)
                })
                .unwrap()
        };
        assert_eq!(count(&store), 1);
        drop(other);
        assert_eq!(count(&store), 0);
    }

    #[test]
    fn lease_record_with_embedded_sets_from_an_older_kiln_still_protects() {
        let dir = tempfile::tempdir().unwrap();
        let store = copy_store(dir.path());
        let rec = LeaseRecord {
            pid: std::process::id(),
            created: 1,
            snapshots: BTreeSet::from([9]),
            blobs: BTreeSet::from(["sha256:ab".to_owned()]),
        };
        store
            .db()
            .write(|tx| {
                tx.open_table(db::LEASES)
                    .map_err(te)?
                    .insert("old-1", encode(&rec)?.as_slice())
                    .map_err(te)?;
                Ok(())
            })
            .unwrap();
        let (snaps, blobs) = store
            .db()
            .read(|tx| lease_protections(tx, |_| true))
            .unwrap();
        assert!(snaps.contains(&9) && blobs.contains("sha256:ab"));
        let (snaps, _) = store
            .db()
            .read(|tx| lease_protections(tx, |_| false))
            .unwrap();
        assert!(snaps.is_empty(), "a dead lease protects nothing");
    }

    /// A committed snapshot holding `/a.txt` with `body`, on `parent`.
    fn snapshot_with(store: &Store, parent: Option<SnapshotId>, body: &str) -> SnapshotId {
        let a = store.prepare(parent, None).unwrap();
        let f = a.rootfs.join("a.txt");
        fs::write(&f, body).unwrap();
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
            .unwrap();
        store.commit(&a).unwrap()
    }

    #[test]
    fn two_snapshots_with_the_same_bytes_share_one_whole_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = copy_store(dir.path());
        let opts = ExportOptions {
            diff: crate::DiffOptions {
                source_date_epoch: Some(2_000_000),
            },
        };
        let a = snapshot_with(&store, None, "same\n");
        let b = snapshot_with(&store, None, "same\n");
        let la = store.export_layer(a, Compression::Gzip, &opts).unwrap();
        let lb = store.export_layer(b, Compression::Gzip, &opts).unwrap();
        assert_eq!(la, lb);
        // Committing the same content again is success, and leaves the blob whole.
        let bytes = fs::read(store.content().blob_path(&la.digest)).unwrap();
        assert_eq!(bytes.len() as u64, la.size);
        store.content().put_bytes(&bytes).unwrap();
        assert_eq!(Digest::sha256_of(&bytes), la.digest);
        assert_eq!(
            fs::read(store.content().blob_path(&la.digest)).unwrap(),
            bytes
        );
        // One blob twice in a chain: two snapshots, two chain ids.
        let first = store.unpack_layer(None, &la.digest, &ApplyOptions::default(), None);
        let first = first.unwrap();
        let second = store
            .unpack_layer(Some(first), &la.digest, &ApplyOptions::default(), None)
            .unwrap();
        assert_ne!(first, second);
        assert_ne!(
            store.snapshot(first).unwrap().chain_id,
            store.snapshot(second).unwrap().chain_id
        );
        let report = store.fsck(false).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }

    #[test]
    fn a_blob_claimed_as_another_layer_is_refused_at_unpack_and_at_verify() {
        let dir = tempfile::tempdir().unwrap();
        let store = copy_store(dir.path());
        let id = snapshot_with(&store, None, "real\n");
        let layer = store
            .export_layer(id, Compression::Gzip, &ExportOptions::default())
            .unwrap();
        let wrong = Digest::sha256_of(b"another layer");
        store.verify_layer(&layer.digest, &layer.diff_id).unwrap();
        let err = store.verify_layer(&layer.digest, &wrong).unwrap_err();
        assert!(
            matches!(&err, StoreError::DiffIdMismatch { claimed, actual, .. }
                if *claimed == wrong && *actual == layer.diff_id),
            "{err}"
        );
        let err = store
            .unpack_layer_expecting(
                None,
                &layer.digest,
                Some(&wrong),
                &ApplyOptions::default(),
                None,
            )
            .unwrap_err();
        assert!(err.to_string().contains(&wrong.to_string()), "{err}");
        // A blob this store never saw the bytes of is hashed the first time it is checked.
        let other = copy_store(&dir.path().join("other"));
        let bytes = fs::read(store.content().blob_path(&layer.digest)).unwrap();
        other.content().put_bytes(&bytes).unwrap();
        assert_eq!(other.verified_diff_id(&layer.digest).unwrap(), None);
        assert!(other.verify_layer(&layer.digest, &wrong).is_err());
        assert_eq!(
            other.verified_diff_id(&layer.digest).unwrap(),
            Some(layer.diff_id.clone())
        );
        let before = other.snapshots().unwrap().len();
        assert!(other
            .unpack_layer_expecting(
                None,
                &layer.digest,
                Some(&wrong),
                &ApplyOptions::default(),
                None
            )
            .is_err());
        assert_eq!(other.snapshots().unwrap().len(), before, "nothing kept");
        other
            .unpack_layer_expecting(
                None,
                &layer.digest,
                Some(&layer.diff_id),
                &ApplyOptions::default(),
                None,
            )
            .unwrap();
    }

    #[test]
    fn chain_dirs_fails_for_a_removed_snapshot_and_lists_ancestors_nearest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = copy_store(dir.path());
        let mut parent = None;
        let mut ids = Vec::new();
        for _ in 0..4 {
            let a = store.prepare(parent, None).unwrap();
            let id = store.commit(&a).unwrap();
            ids.push(id);
            parent = Some(id);
        }
        let want: Vec<PathBuf> = ids
            .iter()
            .rev()
            .map(|i| store.snapshot_dir(*i).join("fs"))
            .collect();
        assert_eq!(store.chain_dirs(parent).unwrap(), want);
        // Twice: the second walk uses the remembered parents and must agree.
        assert_eq!(store.chain_dirs(parent).unwrap(), want);
        store.remove(ids[3]).unwrap();
        assert!(matches!(
            store.chain_dirs(Some(ids[3])),
            Err(StoreError::SnapshotNotFound(_))
        ));
        assert_eq!(store.chain_dirs(Some(ids[2])).unwrap(), want[1..].to_vec());
    }
}
