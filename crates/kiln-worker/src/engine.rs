//! The [`Engine`] behind `kiln build`: how each kind of vertex runs.
//!
//! A filesystem result is a chain of layers ([`Rootfs`]). It becomes a local snapshot only
//! when a step must run on top of it, and its layer blobs are fetched only then too, so a
//! cached step costs one record lookup and nothing else.

use kiln_fs::{FileLock, LockMode};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use kiln_exec::{
    CacheMountRequest, CacheMounts, CancelToken, ExecSpec, Executor, MountKind, MountSpec, Network,
    OutputLine, OutputSink, OutputStream, Personality, Secret,
};
use kiln_graph::graph::{self as g, CopyOp, CopySource, ExecOp, MkdirOp, Op, Vertex, VertexId};
use kiln_oci::compression::Compression;
use kiln_oci::{Descriptor, Digest};
use kiln_solver::{
    BoxFuture, CacheKey, CacheSource, Engine, EngineError, ExecContext, Hit, InputKey,
};
use kiln_store::{
    ActiveSnapshot, ApplyOptions, ExportOptions, LayerRecord, Lease, SnapshotId, Store,
};
use serde::{Deserialize, Serialize};

use crate::context::ContextIndex;
pub use crate::error::WorkerError;
use crate::fileop::{self, CopyOptions, Owner};
use crate::image::Layer;
pub use crate::provider::{BaseImage, BlobSource, ImageProvider};

/// A filesystem result: a chain of layers, and the local snapshot holding it once made.
pub struct Rootfs {
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// The config, for image sources.
    pub image: Option<kiln_oci::ImageConfig>,
    snapshot: Mutex<Option<SnapshotId>>,
    source: Option<Arc<dyn BlobSource>>,
}

impl Rootfs {
    /// A chain that may still need its blobs fetched from `source`.
    pub fn new(
        layers: Vec<Layer>,
        snapshot: Option<SnapshotId>,
        source: Option<Arc<dyn BlobSource>>,
    ) -> Self {
        Rootfs {
            layers,
            image: None,
            snapshot: Mutex::new(snapshot),
            source,
        }
    }

    /// Where blobs that are not local come from.
    pub fn source(&self) -> Option<&Arc<dyn BlobSource>> {
        self.source.as_ref()
    }

    /// The local snapshot, if one is known.
    pub fn snapshot(&self) -> Option<SnapshotId> {
        *self.snapshot.lock().expect("rootfs snapshot lock")
    }
}

/// A vertex's result.
#[derive(Clone)]
pub enum Value {
    /// A root filesystem.
    Fs(Arc<Rootfs>),
    /// A local directory (build context), hashed.
    Context(Arc<ContextIndex>),
}

impl Value {
    fn rootfs(&self) -> Result<&Arc<Rootfs>, WorkerError> {
        match self {
            Value::Fs(r) => Ok(r),
            Value::Context(_) => Err(WorkerError::Internal(
                "a local context was used as a root filesystem".into(),
            )),
        }
    }
}

/// One vertex as the solver sees it.
pub struct Step {
    /// Its id in the build graph.
    pub id: VertexId,
    /// The vertex.
    pub vertex: Vertex,
    /// The platform it builds for (its stage's; `None` for a shared source): a RUN step for
    /// a 32-bit platform runs with a 32-bit personality.
    pub platform: Option<kiln_oci::Platform>,
    /// For each input: is it keyed by the content the step reads from it?
    input_content: Vec<ContentInput>,
}

/// How an input of a step enters the step's cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ContentInput {
    /// By the input's own cache key.
    Key,
    /// By the digest of the local-context files the step selects.
    Local,
    /// By the digest of the downloaded file (`ADD <url>` without `--checksum`): the URL is
    /// fetched again on every build, and the same bytes keep the steps after it cached.
    Download,
}

/// Turns a build graph into solver steps, each with its platform from `step_platforms` (by
/// vertex index, as [`crate::platform_graph::JoinedGraph::step_platforms`]); returns the
/// graph and, per vertex, its node id (equal to the vertex index).
pub fn solver_graph(
    bg: &g::BuildGraph,
    step_platforms: &[Option<kiln_oci::Platform>],
) -> Result<kiln_solver::Graph<Step>, kiln_solver::SolveError> {
    let mut graph = kiln_solver::Graph::new();
    for (i, v) in bg.vertices.iter().enumerate() {
        let input_content = v
            .inputs
            .iter()
            .map(|id| match &bg.vertex(*id).op {
                Op::Local(_) => ContentInput::Local,
                // With --checksum the download's key is the checksum: no request is needed
                // to find the steps after it in the cache.
                Op::Http(h) if h.checksum.is_none() => ContentInput::Download,
                _ => ContentInput::Key,
            })
            .collect();
        let inputs = v.inputs.iter().map(|id| id.index()).collect();
        graph.add(
            Step {
                id: VertexId(i as u32),
                vertex: v.clone(),
                platform: step_platforms.get(i).cloned().flatten(),
                input_content,
            },
            inputs,
        )?;
    }
    Ok(graph)
}

/// Settings of one build.
#[derive(Clone, Default)]
pub struct WorkerConfig {
    /// Local directories by name (`context`, `dockerfile`, named contexts).
    pub locals: BTreeMap<String, PathBuf>,
    /// Secrets by id.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// SSH agents by `--ssh` id (`RUN --mount=type=ssh,id=`); kept alive for the build.
    pub ssh: BTreeMap<String, Arc<crate::ssh::SshAgent>>,
    /// Clamp layer mtimes and image timestamps (`SOURCE_DATE_EPOCH`).
    pub source_date_epoch: Option<i64>,
    /// Layer compression.
    pub compression: Option<Compression>,
}

/// What a cache record holds for a filesystem result.
#[derive(Serialize, Deserialize)]
struct CachedRootfs {
    layers: Vec<Layer>,
}

/// Imported remote caches consulted after the local store.
pub trait RemoteCache: Send + Sync {
    /// The layers recorded for `key`, if any and if their blobs still exist, and where the
    /// blobs come from. May block on the network: call it from a blocking thread.
    fn lookup(&self, key: &CacheKey) -> Option<(Vec<Layer>, Arc<dyn BlobSource>)>;
    /// The layers recorded for `key`, without checking that the blobs still exist.
    fn layers(&self, key: &CacheKey) -> Option<Vec<Layer>>;
    /// The layers `key` added on top of a chain whose diff ids are `below`, if its record's
    /// chain starts with exactly those and the blobs of the layers above still exist, and
    /// where they come from. Asked once a step's inputs are known, so that a lost blob
    /// lower in the record costs only the rerun of the step that made it. May block on
    /// the network.
    fn top_layers(
        &self,
        _key: &CacheKey,
        _below: &[Digest],
    ) -> Option<(Vec<Layer>, Arc<dyn BlobSource>)> {
        None
    }
}

struct Inner {
    store: Arc<Store>,
    executor: Arc<dyn Executor>,
    cache_mounts: CacheMounts,
    images: Arc<dyn ImageProvider>,
    /// Imported caches; they may arrive after the build started (see [`Worker::add_imports`]).
    remotes: RwLock<Vec<Arc<dyn RemoteCache>>>,
    /// Contents for empty cache mounts, by id, from imported caches.
    seeds: RwLock<MountSeeds>,
    config: WorkerConfig,
    lease: Lease,
    contexts: Mutex<HashMap<String, Arc<ContextIndex>>>,
    context_filter: ContextFilterFactory,
    /// Every key this build hit or computed, with its layers (what a cache export writes).
    seen: Mutex<HashMap<CacheKey, Vec<Layer>>>,
}

/// Contents for empty cache mounts, by mount id: a layer and where to fetch its blob.
pub type MountSeeds = BTreeMap<String, (Layer, Arc<dyn BlobSource>)>;

/// Makes the [`ContextFilter`] for a list of `.dockerignore`-style patterns.
pub type ContextFilterFactory = Arc<dyn Fn(&[String]) -> ContextFilter + Send + Sync>;

/// Is this relative path (a directory when the flag is set) left out of the context?
pub type ExcludePredicate = Box<dyn Fn(&str, bool) -> bool + Send + Sync>;

/// Decides which context paths are sent, from `.dockerignore`-style patterns.
pub struct ContextFilter {
    /// Is this relative path left out?
    pub excluded: ExcludePredicate,
    /// Could an exception pattern re-include something below this excluded directory?
    pub may_reinclude: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

/// kiln's engine. Cheap to clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

impl Worker {
    /// A worker on `store`, running containers with `executor`. Imported caches come later,
    /// through [`Worker::add_imports`].
    pub fn new(
        store: Arc<Store>,
        executor: Arc<dyn Executor>,
        images: Arc<dyn ImageProvider>,
        config: WorkerConfig,
        context_filter: ContextFilterFactory,
    ) -> Result<Self, WorkerError> {
        let lease = store.lease()?;
        let cache_mounts = CacheMounts::new(store.root().join("cache-mounts"));
        Ok(Worker {
            inner: Arc::new(Inner {
                store,
                executor,
                cache_mounts,
                images,
                remotes: RwLock::default(),
                seeds: RwLock::default(),
                config,
                lease,
                contexts: Mutex::default(),
                context_filter,
                seen: Mutex::default(),
            }),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// Makes sure `fs` exists as a local snapshot (fetching and unpacking what is missing).
    pub fn materialize(&self, fs: &Rootfs) -> Result<Option<SnapshotId>, WorkerError> {
        self.inner.materialize(fs)
    }

    /// The hashed local context `name` (with these excludes), if this build read it.
    pub fn context_index(&self, name: &str, exclude: &[String]) -> Option<Arc<ContextIndex>> {
        let memo_key = context_memo_key(name, exclude);
        self.inner
            .contexts
            .lock()
            .expect("context memo")
            .get(&memo_key)
            .cloned()
    }

    /// The host directory of cache mount `id` (shared access), for exporting its contents.
    pub fn cache_mount_dir(&self, id: &str) -> Result<kiln_exec::CacheMount, WorkerError> {
        let req = CacheMountRequest::new(id.to_owned());
        self.inner
            .cache_mounts
            .acquire(&req)
            .map_err(|e| WorkerError::Unsupported(e.to_string()))
    }

    /// The layers recorded for `key`: from this build, the local store, or an imported cache.
    /// Never blocks on the network.
    pub fn record_of(&self, key: &CacheKey) -> Option<Vec<Layer>> {
        if let Some(l) = self.inner.seen.lock().expect("seen records").get(key) {
            return Some(l.clone());
        }
        if let Ok(Some(rec)) = self.inner.store.cache_get(key.to_string().as_bytes()) {
            if let Ok(c) = serde_json::from_slice::<CachedRootfs>(&rec.value) {
                return Some(c.layers);
            }
        }
        self.inner.remotes().iter().find_map(|r| r.layers(key))
    }

    /// Adds imported caches and cache-mount seeds once they are read, so reading them can
    /// overlap with planning and context hashing. Call before the first step is looked up.
    pub fn add_imports(&self, remotes: Vec<Arc<dyn RemoteCache>>, seeds: MountSeeds) {
        self.inner
            .remotes
            .write()
            .expect("remote caches")
            .extend(remotes);
        let mut mine = self.inner.seeds.write().expect("mount seeds");
        for (id, seed) in seeds {
            mine.entry(id).or_insert(seed);
        }
    }

    /// Hashes every local context the graph reads (with the stat cache), ahead of the solve.
    /// Errors are left for the step that reads the context to report.
    pub fn prewarm_contexts(&self, graph: &kiln_graph::BuildGraph) {
        for v in &graph.vertices {
            if let Op::Local(l) = &v.op {
                let _ = self.inner.context(&l.name, &l.exclude);
            }
        }
    }

    /// The layers of `fs` as a build with `SOURCE_DATE_EPOCH=epoch` makes them, whatever
    /// the cache that supplied them held (BuildKit's `rewrite-timestamp`): each layer a step
    /// made gets the epoch as its creation time, and, where its snapshot is here, is exported
    /// again with mtimes clamped to the epoch (once per snapshot and epoch; remembered).
    /// Base-image layers (no creation time) are never touched, and nothing is downloaded.
    pub fn layers_for_epoch(&self, fs: &Rootfs, epoch: i64) -> Result<Vec<Layer>, WorkerError> {
        let store = &self.inner.store;
        let mut layers = fs.layers.clone();
        // The snapshot of each layer, top down, when the chain is here one layer per snapshot.
        let mut snaps: Vec<Option<SnapshotId>> = vec![None; layers.len()];
        if let Some(top) = fs.snapshot() {
            let mut chain = Vec::new();
            let mut cur = Some(top);
            while let Some(id) = cur {
                let rec = store.snapshot(id)?;
                chain.push(id);
                cur = rec.parent;
            }
            if chain.len() == layers.len() {
                for (slot, id) in snaps.iter_mut().rev().zip(chain) {
                    *slot = Some(id);
                }
            }
        }
        let created = crate::image::created_timestamp(Some(epoch.max(0) as u64));
        let opts = ExportOptions {
            diff: kiln_store::DiffOptions {
                source_date_epoch: Some(epoch),
            },
        };
        for (layer, snap) in layers.iter_mut().zip(snaps) {
            if layer.created.is_none() {
                continue;
            }
            layer.created = Some(created.clone());
            let Some(id) = snap else { continue };
            let compression = match layer.blob.media_type.as_str() {
                t if t.ends_with("zstd") => Compression::Zstd,
                t if t.ends_with("gzip") => Compression::Gzip,
                _ => Compression::Uncompressed,
            };
            let rec = store.export_layer(id, compression, &opts)?;
            self.inner.lease.protect_blob(&rec.digest)?;
            layer.diff_id = rec.diff_id;
            layer.blob = Descriptor::new(rec.media_type, rec.digest, rec.size);
        }
        Ok(layers)
    }

    /// `layers` (of `fs`) with every blob in `compression`, for `force-compression=true`:
    /// the blobs are fetched, then each one stored with another compression is recompressed
    /// (once per layer and compression; the build's lease keeps the new blob).
    pub fn recompress_layers(
        &self,
        fs: &Rootfs,
        layers: &[Layer],
        compression: Compression,
    ) -> Result<Vec<Layer>, WorkerError> {
        self.fetch_blobs(fs)?;
        layers
            .iter()
            .map(|l| {
                let rec = kiln_store::LayerRecord {
                    diff_id: l.diff_id.clone(),
                    digest: l.blob.digest.clone(),
                    size: l.blob.size,
                    media_type: l.blob.media_type.clone(),
                };
                let new = self.inner.store.recompress_layer(&rec, compression)?;
                self.inner.lease.protect_blob(&new.digest)?;
                let mut l = l.clone();
                l.blob = Descriptor::new(new.media_type, new.digest, new.size);
                Ok(l)
            })
            .collect()
    }

    /// Makes sure every blob of `fs` is in the local content store and is the layer its diff
    /// id names (an image written from them pairs the two in its config), so a cache record
    /// with a wrong diff id fails the export instead of making an image no runtime can pull.
    pub fn fetch_blobs(&self, fs: &Rootfs) -> Result<(), WorkerError> {
        for l in &fs.layers {
            self.inner.ensure_blob(&l.blob, fs.source.as_deref())?;
            self.inner.store.verify_layer(&l.blob.digest, &l.diff_id)?;
        }
        Ok(())
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError {
    let path = path.to_owned();
    move |source| WorkerError::Io { what, path, source }
}

impl Inner {
    /// A cache hit on `fs`, remembered with its layers for the cache export.
    fn hit(&self, key: &CacheKey, fs: Rootfs, source: CacheSource) -> Hit<Value> {
        self.seen
            .lock()
            .expect("seen records")
            .insert(key.clone(), fs.layers.clone());
        Hit {
            output: Value::Fs(Arc::new(fs)),
            source,
        }
    }

    fn remotes(&self) -> Vec<Arc<dyn RemoteCache>> {
        self.remotes.read().expect("remote caches").clone()
    }

    fn ensure_blob(
        &self,
        blob: &Descriptor,
        source: Option<&dyn BlobSource>,
    ) -> Result<(), WorkerError> {
        if self.store.content().has(&blob.digest) {
            return Ok(());
        }
        match source {
            Some(s) => s.fetch(blob, &self.store),
            None => Err(WorkerError::Internal(format!(
                "layer blob {} is not in the local store and has no source",
                blob.digest
            ))),
        }
    }

    fn materialize(&self, fs: &Rootfs) -> Result<Option<SnapshotId>, WorkerError> {
        if fs.layers.is_empty() {
            return Ok(None);
        }
        let mut slot = fs.snapshot.lock().expect("rootfs snapshot lock");
        if let Some(id) = *slot {
            if self.store.snapshot(id).is_ok() {
                self.lease.protect_snapshot(id)?;
                return Ok(Some(id));
            }
        }
        // Blobs the unpack below will need download side by side while it unpacks, in order.
        let prefetch = self.prefetch(fs);
        // The layers unpack one after another (each into its own snapshot) and are made
        // durable together at the end: one syncfs and one DB commit for the whole chain.
        let mut chain =
            self.store
                .unpack_chain(None, ApplyOptions::default(), Some(&self.lease))?;
        for layer in &fs.layers {
            if let Some(p) = &prefetch {
                p.wait(&layer.blob.digest);
            }
            // A chain unpacked before is found by chain id without touching the blob.
            self.store.register_layer(&LayerRecord {
                diff_id: layer.diff_id.clone(),
                digest: layer.blob.digest.clone(),
                size: layer.blob.size,
                media_type: layer.blob.media_type.clone(),
            })?;
            // The diff id comes from an image config or a cache record: the unpack checks
            // the blob's bytes against it.
            match chain.add(&layer.blob.digest, Some(&layer.diff_id)) {
                Ok(()) => {}
                Err(e @ kiln_store::StoreError::DiffIdMismatch { .. }) => return Err(e.into()),
                Err(_) if !self.store.content().has(&layer.blob.digest) => {
                    self.ensure_blob(&layer.blob, fs.source.as_deref())?;
                    chain.add(&layer.blob.digest, Some(&layer.diff_id))?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let top = chain.finish()?;
        *slot = top;
        Ok(top)
    }

    /// Starts downloading, several at once, the blobs `fs`'s unpack will read: those of the
    /// layers above the deepest chain already unpacked here that are not in the content
    /// store. `None` when there are fewer than two (the unpack fetches a single one itself).
    fn prefetch(&self, fs: &Rootfs) -> Option<Prefetch> {
        let source = fs.source.clone()?;
        let mut chain: Option<Digest> = None;
        let mut first_missing = 0;
        for (i, layer) in fs.layers.iter().enumerate() {
            let c = kiln_store::chain_id(chain.as_ref(), &layer.diff_id);
            if matches!(self.store.chain_snapshot(&c), Ok(Some(_))) {
                first_missing = i + 1;
            }
            chain = Some(c);
        }
        // A chain may hold one blob twice (two steps that made the same bytes): it is
        // fetched once.
        let mut seen = std::collections::HashSet::new();
        let need: Vec<Descriptor> = fs.layers[first_missing..]
            .iter()
            .map(|l| l.blob.clone())
            .filter(|b| !self.store.content().has(&b.digest) && seen.insert(b.digest.clone()))
            .collect();
        (need.len() > 1).then(|| Prefetch::start(need, source, self.store.clone()))
    }

    fn context(&self, name: &str, exclude: &[String]) -> Result<Arc<ContextIndex>, WorkerError> {
        let memo_key = context_memo_key(name, exclude);
        if let Some(c) = self.contexts.lock().expect("context memo").get(&memo_key) {
            return Ok(c.clone());
        }
        let dir = self
            .config
            .locals
            .get(name)
            .ok_or_else(|| WorkerError::MissingLocal(name.to_owned()))?;
        let filter = (self.context_filter)(exclude);
        let stat_cache = self.store.root().join("context-cache").join(format!(
            "{}.json",
            Digest::sha256_of(format!("{}\0{memo_key}", dir.display()).as_bytes()).hex()
        ));
        let idx = Arc::new(ContextIndex::scan(
            dir,
            &*filter.excluded,
            &*filter.may_reinclude,
            Some(&stat_cache),
        )?);
        self.contexts
            .lock()
            .expect("context memo")
            .insert(memo_key, idx.clone());
        Ok(idx)
    }

    /// Commits `active` and exports its layer; on failure the snapshot is dropped.
    fn commit_layer(&self, active: &ActiveSnapshot, base: &[Layer]) -> Result<Rootfs, WorkerError> {
        let id = self.store.commit(active)?;
        let opts = ExportOptions {
            diff: kiln_store::DiffOptions {
                source_date_epoch: self.config.source_date_epoch,
            },
        };
        let rec = self.store.export_layer(
            id,
            self.config.compression.unwrap_or(Compression::Gzip),
            &opts,
        )?;
        self.lease.protect_blob(&rec.digest)?;
        let mut layers = base.to_vec();
        let created =
            crate::image::created_timestamp(self.config.source_date_epoch.map(|s| s.max(0) as u64));
        layers.push(Layer {
            diff_id: rec.diff_id,
            blob: Descriptor::new(rec.media_type, rec.digest, rec.size),
            created: Some(created),
        });
        Ok(Rootfs::new(layers, Some(id), None))
    }

    /// Ends a step that wrote into `active`: drops its read-only `views`, then commits the
    /// snapshot as a new layer on `base_layers`, or removes it if the step failed.
    fn finish_step(
        &self,
        active: &ActiveSnapshot,
        base_layers: &[Layer],
        views: Vec<ActiveSnapshot>,
        result: Result<(), WorkerError>,
    ) -> Result<Value, WorkerError> {
        for v in views {
            let _ = self.store.remove(v.id);
        }
        match result {
            Ok(()) => Ok(Value::Fs(Arc::new(self.commit_layer(active, base_layers)?))),
            Err(e) => {
                let _ = self.store.remove(active.id);
                Err(e)
            }
        }
    }

    fn prepare_on(
        &self,
        base: Option<&Arc<Rootfs>>,
    ) -> Result<(ActiveSnapshot, Vec<Layer>), WorkerError> {
        let (parent, layers) = match base {
            Some(fs) => (self.materialize(fs)?, fs.layers.clone()),
            None => (None, Vec::new()),
        };
        Ok((self.store.prepare(parent, Some(&self.lease))?, layers))
    }

    fn run_step(
        &self,
        ctx: &ExecContext,
        step: &Step,
        inputs: &[Value],
    ) -> Result<Value, WorkerError> {
        match &step.vertex.op {
            Op::Image(src) => {
                let base = self.images.resolve(&src.reference, &src.platform)?;
                let mut fs = Rootfs::new(base.layers, None, base.source);
                fs.image = Some(base.config);
                Ok(Value::Fs(Arc::new(fs)))
            }
            Op::Local(src) => Ok(Value::Context(self.context(&src.name, &src.exclude)?)),
            Op::Exec(op) => self.exec(ctx, op, step.platform.as_ref(), inputs),
            Op::Copy(op) => self.copy(op, inputs),
            Op::Mkdir(op) => self.mkdir(op, inputs),
            Op::Merge(_) => merge(inputs),
            Op::Http(h) => {
                let log = |line: String| ctx.log(2, line.into_bytes());
                let dir = crate::sources::download(self.store.root(), h, &ctx.cancel, &log)?;
                let none = |_: &str, _: bool| false;
                // The directory never changes once stored: a stat cache beside it saves
                // hashing the file again on every build.
                let stat_cache = dir.with_extension("stat.json");
                let index = ContextIndex::scan(&dir, &none, &|_: &str| false, Some(&stat_cache))?;
                Ok(Value::Context(Arc::new(index)))
            }
            Op::OciLayout(l) => {
                // The frontend resolved the tag to a manifest digest at plan time (the op's
                // key); the same image is read again here by that digest.
                let base = crate::sources::resolve_layout(&l.path, &l.reference, &l.platform)?;
                let mut fs = Rootfs::new(base.layers, None, base.source);
                fs.image = Some(base.config);
                Ok(Value::Fs(Arc::new(fs)))
            }
        }
    }

    fn input_fs<'a>(
        &self,
        inputs: &'a [Value],
        index: Option<u32>,
    ) -> Result<Option<&'a Arc<Rootfs>>, WorkerError> {
        index
            .map(|i| {
                inputs
                    .get(i as usize)
                    .ok_or_else(|| WorkerError::Internal(format!("missing input {i}")))?
                    .rootfs()
            })
            .transpose()
    }

    fn exec(
        &self,
        ctx: &ExecContext,
        op: &ExecOp,
        platform: Option<&kiln_oci::Platform>,
        inputs: &[Value],
    ) -> Result<Value, WorkerError> {
        let (active, base_layers) = self.prepare_on(self.input_fs(inputs, op.rootfs)?)?;
        let mut views = Vec::new();
        let result = (|| {
            let mut spec = ExecSpec::new(active.rootfs.clone(), op.args.clone());
            spec.env = op
                .env
                .iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (kv.clone(), String::new()),
                })
                .collect();
            spec.cwd = if op.cwd.is_empty() {
                "/".into()
            } else {
                op.cwd.clone()
            };
            spec.user = (!op.user.is_empty()).then(|| op.user.clone());
            spec.hostname = "kiln".into();
            spec.network = match op.network {
                g::NetworkMode::None => Network::None,
                g::NetworkMode::Default => Network::Isolated,
                g::NetworkMode::Host => Network::Host,
            };
            spec.privileged = op.security == g::SecurityMode::Insecure;
            spec.personality =
                platform.map_or(Personality::Default, Personality::for_platform_here);
            apply_run_settings(&mut spec, op)?;
            let mut cache_guards = Vec::new();
            for m in &op.mounts {
                let kind = match &m.kind {
                    g::MountKind::Bind {
                        input,
                        source,
                        readonly,
                    } => {
                        let host = match inputs.get(*input as usize) {
                            Some(Value::Context(c)) => {
                                fileop::resolve_in_root(c.root(), source, true)?
                            }
                            Some(Value::Fs(fs)) => {
                                let snap = self.materialize(fs)?;
                                let view = match snap {
                                    Some(s) => self.store.view(s, Some(&self.lease))?,
                                    None => self.store.prepare(None, Some(&self.lease))?,
                                };
                                let host = fileop::resolve_in_root(&view.rootfs, source, true)?;
                                views.push(view);
                                host
                            }
                            None => {
                                return Err(WorkerError::Internal(format!(
                                    "mount input {input} missing"
                                )))
                            }
                        };
                        MountKind::Bind {
                            source: host,
                            readwrite: !readonly,
                        }
                    }
                    g::MountKind::Cache {
                        id,
                        sharing,
                        uid,
                        gid,
                        mode,
                        ..
                    } => {
                        let mut req = CacheMountRequest::new(id.clone());
                        req.sharing = match sharing {
                            g::CacheSharing::Shared => kiln_exec::CacheSharing::Shared,
                            g::CacheSharing::Private => kiln_exec::CacheSharing::Private,
                            g::CacheSharing::Locked => kiln_exec::CacheSharing::Locked,
                        };
                        req.uid = *uid;
                        req.gid = *gid;
                        req.mode = *mode;
                        let guard = self
                            .cache_mounts
                            .acquire(&req)
                            .map_err(|e| WorkerError::Unsupported(e.to_string()))?;
                        self.restore_cache_mount(ctx, id, guard.path())?;
                        let kind = MountKind::Cache {
                            source: guard.path().to_owned(),
                        };
                        cache_guards.push(guard);
                        kind
                    }
                    g::MountKind::Tmpfs { size } => MountKind::Tmpfs {
                        size: (*size > 0).then_some(*size),
                    },
                    g::MountKind::Secret {
                        id,
                        env,
                        required,
                        uid,
                        gid,
                        mode,
                    } => {
                        let Some(data) = self.config.secrets.get(id) else {
                            if *required {
                                return Err(WorkerError::MissingSecret(id.clone()));
                            }
                            continue;
                        };
                        if let Some(var) = env {
                            spec.secret_env
                                .push((var.clone(), Secret::new(data.clone())));
                            if m.target.is_empty() {
                                continue;
                            }
                        }
                        MountKind::Secret {
                            data: Secret::new(data.clone()),
                            mode: *mode,
                            uid: *uid,
                            gid: *gid,
                        }
                    }
                    g::MountKind::Ssh {
                        id,
                        required,
                        uid,
                        gid,
                        mode,
                    } => {
                        let Some(agent) = self.config.ssh.get(id) else {
                            if *required {
                                return Err(WorkerError::MissingSsh(id.clone()));
                            }
                            // BuildKit skips an optional agent nobody gave.
                            continue;
                        };
                        // As BuildKit: the first agent is the step's SSH_AUTH_SOCK unless
                        // the step sets its own.
                        if !spec.env.iter().any(|(k, _)| k == "SSH_AUTH_SOCK") {
                            spec.env.push(("SSH_AUTH_SOCK".into(), m.target.clone()));
                        }
                        MountKind::Ssh {
                            socket: agent.socket().to_owned(),
                            uid: *uid,
                            gid: *gid,
                            mode: *mode,
                        }
                    }
                };
                spec.mounts.push(MountSpec {
                    target: m.target.clone(),
                    kind,
                });
            }
            let mut sink = LogSink { ctx };
            let cancel = CancelToken::new();
            let watch = ctx.cancel.clone();
            let c2 = cancel.clone();
            // Dropped when the step ends, which wakes the watcher at once: joining it adds
            // no wait to the step (a plain sleep loop cost up to one poll period per RUN).
            let (step_done, done_rx) = std::sync::mpsc::channel::<()>();
            let watcher = std::thread::spawn(move || {
                // Polls the build's cancellation; exits when the step finishes.
                let period = std::time::Duration::from_millis(50);
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    done_rx.recv_timeout(period)
                {
                    if watch.is_cancelled() {
                        c2.cancel();
                        break;
                    }
                }
            });
            let status = self.executor.run(&spec, &mut sink, &cancel);
            cancel.cancel();
            drop(step_done);
            let _ = watcher.join();
            drop(cache_guards);
            let status = status?;
            if !status.success() {
                return Err(WorkerError::ProcessFailed {
                    command: op.args.join(" "),
                    status,
                });
            }
            Ok(())
        })();
        self.finish_step(&active, &base_layers, views, result)
    }

    /// Fills an empty cache mount from an imported cache (`cache-mounts=true`), so a step
    /// that must rerun starts with the package cache it had on the runner that exported it.
    fn restore_cache_mount(
        &self,
        ctx: &ExecContext,
        id: &str,
        dir: &Path,
    ) -> Result<(), WorkerError> {
        let seed = self.seeds.read().expect("mount seeds").get(id).cloned();
        let Some((layer, source)) = seed else {
            return Ok(());
        };
        let empty = fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Ok(());
        }
        self.ensure_blob(&layer.blob, Some(source.as_ref()))?;
        let blob = self.store.content().open_blob(&layer.blob.digest)?;
        let (_, reader) = kiln_oci::compression::decompressing_reader(std::io::BufReader::new(
            blob,
        ))
        .map_err(|e| WorkerError::Io {
            what: "reading cache mount blob",
            path: dir.to_owned(),
            source: e,
        })?;
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        // `unpack` refuses entries that would land outside `dir` (`..`, absolute paths, links).
        archive.unpack(dir).map_err(|e| WorkerError::Io {
            what: "restoring cache mount",
            path: dir.to_owned(),
            source: e,
        })?;
        ctx.log(
            2,
            format!(
                "kiln: cache mount {id} restored from {} ({} bytes)",
                source.name(),
                layer.blob.size
            )
            .into_bytes(),
        );
        Ok(())
    }

    fn owner_for(
        &self,
        root: &Path,
        chown: Option<&g::Chown>,
        default: Owner,
    ) -> Result<Owner, WorkerError> {
        Ok(match chown {
            Some(c) => {
                let (u, g) = fileop::resolve_owner(root, &c.user, c.group.as_deref())?;
                Owner::Ids(u, g)
            }
            None => default,
        })
    }

    fn copy(&self, op: &CopyOp, inputs: &[Value]) -> Result<Value, WorkerError> {
        // --link copies onto an empty snapshot: the layer does not depend on the base.
        let dest_fs = self.input_fs(inputs, op.dest_base)?;
        let (active, base_layers) = if op.link {
            (
                self.store.prepare(None, Some(&self.lease))?,
                dest_fs.map(|f| f.layers.clone()).unwrap_or_default(),
            )
        } else {
            self.prepare_on(dest_fs)?
        };
        let mut views = Vec::new();
        let result = (|| {
            let chmod = op.chmod.as_deref().map(fileop::parse_chmod).transpose()?;
            match &op.source {
                CopySource::Inline { files } => {
                    let owner =
                        self.owner_for(&active.rootfs, op.chown.as_ref(), Owner::Ids(0, 0))?;
                    for f in files {
                        fileop::write_inline(
                            &active.rootfs,
                            &f.name,
                            &f.content,
                            &op.dest,
                            op.dest_is_dir,
                            owner,
                            chmod,
                        )?;
                    }
                }
                CopySource::Input { input } => {
                    let (src_root, default_owner, source_name, only): (
                        PathBuf,
                        Owner,
                        String,
                        Option<Arc<ContextIndex>>,
                    ) = match inputs.get(*input as usize) {
                        Some(Value::Context(c)) => (
                            c.root().to_owned(),
                            Owner::Ids(0, 0),
                            "build context".into(),
                            Some(c.clone()),
                        ),
                        Some(Value::Fs(fs)) => {
                            let view = match self.materialize(fs)? {
                                Some(s) => self.store.view(s, Some(&self.lease))?,
                                None => self.store.prepare(None, Some(&self.lease))?,
                            };
                            let root = view.rootfs.clone();
                            views.push(view);
                            (root, Owner::Preserve, "source stage or image".into(), None)
                        }
                        None => {
                            return Err(WorkerError::Internal(format!(
                                "copy input {input} missing"
                            )))
                        }
                    };
                    let owner = self.owner_for(&active.rootfs, op.chown.as_ref(), default_owner)?;
                    let opts = CopyOptions {
                        dest_is_dir: op.dest_is_dir,
                        parents: op.parents,
                        exclude: op.exclude.clone(),
                        owner,
                        chmod,
                        source_name,
                        extract_archives: op.auto_extract,
                    };
                    let include = |rel: &str| only.as_ref().is_none_or(|c| c.get(rel).is_some());
                    fileop::copy_filtered(
                        &src_root,
                        &op.srcs,
                        &active.rootfs,
                        &op.dest,
                        &opts,
                        &include,
                    )?;
                }
            }
            Ok(())
        })();
        self.finish_step(&active, &base_layers, views, result)
    }

    fn mkdir(&self, op: &MkdirOp, inputs: &[Value]) -> Result<Value, WorkerError> {
        let (active, base_layers) = self.prepare_on(self.input_fs(inputs, op.rootfs)?)?;
        let result = (|| {
            let owner = self.owner_for(&active.rootfs, op.owner.as_ref(), Owner::Ids(0, 0))?;
            fileop::mkdir_all(&active.rootfs, &op.path, op.mode, owner)?;
            Ok::<_, WorkerError>(())
        })();
        self.finish_step(&active, &base_layers, Vec::new(), result)
    }
}

/// Layer blobs downloading in the background, at most [`Prefetch::WORKERS`] at a time, in
/// chain order; [`Prefetch::wait`] blocks until one has arrived. Dropping it stops the
/// downloads not yet started.
struct Prefetch {
    state: Arc<(Mutex<PrefetchState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct PrefetchState {
    queue: std::collections::VecDeque<Descriptor>,
    pending: std::collections::HashSet<Digest>,
    stop: bool,
}

impl Prefetch {
    const WORKERS: usize = 6;

    fn start(blobs: Vec<Descriptor>, source: Arc<dyn BlobSource>, store: Arc<Store>) -> Self {
        let state = Arc::new((
            Mutex::new(PrefetchState {
                pending: blobs.iter().map(|b| b.digest.clone()).collect(),
                queue: blobs.into(),
                ..PrefetchState::default()
            }),
            std::sync::Condvar::new(),
        ));
        let workers = Self::WORKERS.min(state.0.lock().expect("prefetch").queue.len());
        for _ in 0..workers {
            let (state, source, store) = (state.clone(), source.clone(), store.clone());
            std::thread::spawn(move || loop {
                let next = {
                    let mut st = state.0.lock().expect("prefetch");
                    if st.stop {
                        None
                    } else {
                        st.queue.pop_front()
                    }
                };
                let Some(blob) = next else { return };
                // An error is left to the unpack's own fetch of the blob.
                let _ = source.fetch(&blob, &store);
                state
                    .0
                    .lock()
                    .expect("prefetch")
                    .pending
                    .remove(&blob.digest);
                state.1.notify_all();
            });
        }
        Prefetch { state }
    }

    /// Waits for `digest` if it is one of the blobs being fetched. A failed download is left
    /// to the unpack, which fetches the blob itself and reports the error in full.
    fn wait(&self, digest: &Digest) {
        let mut st = self.state.0.lock().expect("prefetch");
        while st.pending.contains(digest) {
            st = self.state.1.wait(st).expect("prefetch");
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.state.0.lock().expect("prefetch").stop = true;
    }
}

/// Stacks the inputs' layer chains, the first input's at the bottom. Nothing runs and
/// nothing is unpacked: the chain becomes a snapshot only when a step runs on it.
fn merge(inputs: &[Value]) -> Result<Value, WorkerError> {
    let mut layers = Vec::new();
    let mut sources: Vec<Arc<dyn BlobSource>> = Vec::new();
    for input in inputs {
        let fs = input.rootfs()?;
        layers.extend(fs.layers.iter().cloned());
        if let Some(s) = fs.source() {
            if !sources.iter().any(|k| Arc::ptr_eq(k, s)) {
                sources.push(s.clone());
            }
        }
    }
    let source = match sources.len() {
        0 | 1 => sources.pop(),
        _ => Some(Arc::new(BlobSources(sources)) as Arc<dyn BlobSource>),
    };
    Ok(Value::Fs(Arc::new(Rootfs::new(layers, None, source))))
}

/// Several places a merged chain's blobs come from, asked in turn.
struct BlobSources(Vec<Arc<dyn BlobSource>>);

impl BlobSource for BlobSources {
    fn fetch(&self, blob: &Descriptor, store: &Store) -> Result<(), WorkerError> {
        let mut last = None;
        for s in self.0.iter().filter(|s| s.has(blob)) {
            match s.fetch(blob, store) {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            WorkerError::Internal(format!(
                "layer blob {} is in none of {}",
                blob.digest,
                self.name()
            ))
        }))
    }

    fn name(&self) -> String {
        let names: Vec<String> = self.0.iter().map(|s| s.name()).collect();
        names.join(", ")
    }

    fn has(&self, blob: &Descriptor) -> bool {
        self.0.iter().any(|s| s.has(blob))
    }

    fn repository(&self) -> Option<kiln_oci::Reference> {
        // A push mounts from one repository only; with several, blobs are fetched first.
        let first = self.0.first()?.repository()?;
        self.0
            .iter()
            .all(|s| s.repository().as_ref() == Some(&first))
            .then_some(first)
    }
}

struct LogSink<'a> {
    ctx: &'a ExecContext,
}

impl OutputSink for LogSink<'_> {
    fn line(&mut self, line: OutputLine<'_>) {
        let stream = match line.stream {
            OutputStream::Stdout => 1,
            OutputStream::Stderr => 2,
        };
        self.ctx.log(stream, line.bytes.to_vec());
    }
}

/// The key contexts are remembered under for one build: name and exclude patterns.
fn context_memo_key(name: &str, exclude: &[String]) -> String {
    format!("{name}\0{}", exclude.join("\0"))
}

fn boxed(e: WorkerError) -> EngineError {
    Box::new(e)
}

/// Which context paths a step reads through input `index`, for its content key.
fn selection(op: &Op, index: usize) -> Box<dyn Fn(&str) -> bool + Send + Sync> {
    match op {
        Op::Copy(c) if matches!(c.source, CopySource::Input { input } if input as usize == index) =>
        {
            let srcs = fileop::PathSelector::new(&c.srcs);
            let exclude = fileop::PathSelector::new(&c.exclude);
            Box::new(move |p: &str| srcs.selects(p) && !exclude.selects(p))
        }
        Op::Exec(e) => {
            let roots: Vec<String> = e
                .mounts
                .iter()
                .filter_map(|m| match &m.kind {
                    g::MountKind::Bind { input, source, .. } if *input as usize == index => {
                        Some(source.clone())
                    }
                    g::MountKind::Cache {
                        input: Some(input),
                        source,
                        ..
                    } if *input as usize == index => Some(source.clone()),
                    _ => None,
                })
                .collect();
            let roots = fileop::PathSelector::new(&roots);
            Box::new(move |p: &str| roots.selects(p))
        }
        _ => Box::new(|_: &str| true),
    }
}

impl Engine for Worker {
    type Op = Step;
    type Output = Value;

    fn definition(&self, step: &Step) -> Vec<u8> {
        match &step.vertex.op {
            // A download with `--checksum` is its content: a mirror or a moved URL serving
            // the same bytes keeps the cache, as BuildKit keys it.
            Op::Http(h) if h.checksum.is_some() => serde_json::to_vec(&serde_json::json!({
                "op": "http",
                "checksum": h.checksum,
                "filename": h.filename,
            }))
            .unwrap_or_default(),
            _ => step.vertex.canonical_op(),
        }
    }

    fn input_key(&self, step: &Step, index: usize) -> InputKey {
        match step.input_content.get(index) {
            Some(ContentInput::Local | ContentInput::Download) => InputKey::Content,
            _ => InputKey::Key,
        }
    }

    fn cacheable(&self, step: &Step) -> bool {
        // Sources are cheap to resolve and are keyed by what they resolved to.
        !matches!(
            step.vertex.op,
            Op::Local(_) | Op::Image(_) | Op::OciLayout(_)
        )
    }

    fn content_digest<'a>(
        &'a self,
        step: &'a Step,
        index: usize,
        input: &'a Value,
    ) -> BoxFuture<'a, Result<Digest, EngineError>> {
        Box::pin(async move {
            match input {
                Value::Context(c) => {
                    // A download is keyed like context files: content, name and mode. As
                    // Docker documents, its mtime (the server's Last-Modified) is not part of it.
                    // A COPY is keyed by what it reads, symlinked source folders followed.
                    if let Op::Copy(cp) = &step.vertex.op {
                        if matches!(cp.source, CopySource::Input { input } if input as usize == index)
                        {
                            return Ok(c.digest_of(c.copy_reads(&cp.srcs, &cp.exclude)));
                        }
                    }
                    let sel = selection(&step.vertex.op, index);
                    Ok(c.digest_of(|p| sel(p)))
                }
                Value::Fs(_) => Err(boxed(WorkerError::Internal(
                    "content key asked of a filesystem input".into(),
                ))),
            }
        })
    }

    fn lookup<'a>(
        &'a self,
        key: &'a CacheKey,
        _step: &'a Step,
    ) -> BoxFuture<'a, Result<Option<Hit<Value>>, EngineError>> {
        let inner = self.inner.clone();
        let key = key.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                if let Some(rec) = inner
                    .store
                    .cache_get(key.to_string().as_bytes())
                    .map_err(|e| boxed(e.into()))?
                {
                    if let Ok(cached) = serde_json::from_slice::<CachedRootfs>(&rec.value) {
                        let snap = rec
                            .snapshots
                            .first()
                            .copied()
                            .filter(|s| inner.store.snapshot(*s).is_ok());
                        // The blobs are checked (one stat per layer of the chain) only
                        // when the snapshot is gone.
                        let usable = snap.is_some()
                            || cached
                                .layers
                                .iter()
                                .all(|l| inner.store.content().has(&l.blob.digest));
                        if usable {
                            let fs = Rootfs::new(cached.layers, snap, None);
                            return Ok(Some(inner.hit(&key, fs, CacheSource::Local)));
                        }
                    }
                }
                for remote in &inner.remotes() {
                    if let Some((layers, source)) = remote.lookup(&key) {
                        let name = source.name();
                        let fs = Rootfs::new(layers, None, Some(source));
                        return Ok(Some(inner.hit(&key, fs, CacheSource::Remote(name))));
                    }
                }
                Ok(None)
            })
            .await
            .map_err(|e| boxed(WorkerError::Internal(e.to_string())))?
        })
    }

    fn lookup_on_inputs<'a>(
        &'a self,
        key: &'a CacheKey,
        step: &'a Step,
        inputs: &'a [Value],
    ) -> BoxFuture<'a, Result<Option<Hit<Value>>, EngineError>> {
        // Steps that add layers on a parent chain: their record is the parent's layers and
        // their own. The parent here is what this build has (maybe rerun, maybe from another
        // cache); the record's own layers are reused on it when its lower diff ids match.
        let Some(base) = step.vertex.op.layer_base() else {
            return Box::pin(async { Ok(None) });
        };
        let base = match base.map(|i| inputs.get(i as usize)) {
            None => None,
            Some(Some(Value::Fs(fs))) => Some(fs.clone()),
            Some(_) => return Box::pin(async { Ok(None) }),
        };
        let inner = self.inner.clone();
        let key = key.clone();
        Box::pin(async move {
            if inner.remotes().is_empty() {
                return Ok(None);
            }
            tokio::task::spawn_blocking(move || {
                let below_layers = base.as_ref().map(|f| f.layers.clone()).unwrap_or_default();
                let below: Vec<Digest> = below_layers.iter().map(|l| l.diff_id.clone()).collect();
                for remote in &inner.remotes() {
                    let Some((top, source)) = remote.top_layers(&key, &below) else {
                        continue;
                    };
                    let mut layers = below_layers;
                    layers.extend(top.iter().cloned());
                    let name = source.name();
                    let below_source = base.as_ref().and_then(|f| f.source().cloned());
                    let blobs: Arc<dyn BlobSource> =
                        Arc::new(RebasedSource::new(source, &top, below_source));
                    let fs = Rootfs::new(layers, None, Some(blobs));
                    return Ok(Some(inner.hit(&key, fs, CacheSource::Remote(name))));
                }
                Ok(None)
            })
            .await
            .map_err(|e| boxed(WorkerError::Internal(e.to_string())))?
        })
    }

    fn lock<'a>(
        &'a self,
        key: &'a CacheKey,
    ) -> BoxFuture<'a, Result<Box<dyn Send + Sync>, EngineError>> {
        let dir = self.inner.store.root().join("locks");
        let name = key.digest().hex().to_owned();
        Box::pin(async move {
            fs::create_dir_all(&dir)
                .map_err(io_err("creating", &dir))
                .map_err(boxed)?;
            let path = dir.join(name);
            let f = fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_err("opening lock", &path))
                .map_err(boxed)?;
            // Polled, not a blocking flock on a thread: a cancelled build drops this future
            // and exits at once, instead of waiting (unkillable) for the other process's step.
            loop {
                let probe = f
                    .try_clone()
                    .and_then(|dup| FileLock::try_lock(dup, LockMode::Exclusive));
                match probe {
                    Ok(Some(lock)) => return Ok(Box::new(lock) as Box<dyn Send + Sync>),
                    Ok(None) => {}
                    Err(e) => return Err(boxed(io_err("locking", &path)(e))),
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
    }

    fn execute<'a>(
        &'a self,
        ctx: ExecContext,
        step: &'a Step,
        inputs: Vec<Value>,
    ) -> BoxFuture<'a, Result<Value, EngineError>> {
        let inner = self.inner.clone();
        let node = step.id.index();
        Box::pin(async move {
            // The step runs on a blocking thread; it needs its op by value there.
            let vertex = step.vertex.clone();
            let step = Step {
                id: VertexId(node as u32),
                vertex,
                platform: step.platform.clone(),
                input_content: step.input_content.clone(),
            };
            tokio::task::spawn_blocking(move || inner.run_step(&ctx, &step, &inputs).map_err(boxed))
                .await
                .map_err(|e| boxed(WorkerError::Internal(e.to_string())))?
        })
    }

    fn record<'a>(
        &'a self,
        key: &'a CacheKey,
        _step: &'a Step,
        output: &'a Value,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        let inner = self.inner.clone();
        let key = key.clone();
        let output = output.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let Value::Fs(fs) = output else { return Ok(()) };
                inner
                    .seen
                    .lock()
                    .expect("seen records")
                    .insert(key.clone(), fs.layers.clone());
                let value = serde_json::to_vec(&CachedRootfs {
                    layers: fs.layers.clone(),
                })
                .map_err(|e| boxed(WorkerError::Internal(e.to_string())))?;
                let snaps: Vec<SnapshotId> = fs.snapshot().into_iter().collect();
                let blobs: Vec<Digest> = fs.layers.iter().map(|l| l.blob.digest.clone()).collect();
                let size = fs.layers.last().map(|l| l.blob.size).unwrap_or(0);
                inner
                    .store
                    .cache_put(key.to_string().as_bytes(), &value, &snaps, &blobs, size)
                    .map_err(|e| boxed(e.into()))
            })
            .await
            .map_err(|e| boxed(WorkerError::Internal(e.to_string())))?
        })
    }

    fn describe(&self, step: &Step) -> String {
        step.vertex.meta.description.clone()
    }
}

/// The blobs of a chain rebuilt from a record's own top layers (from an imported cache) on
/// the layers a step's input actually has (from wherever that input got them).
pub(crate) struct RebasedSource {
    top: Arc<dyn BlobSource>,
    top_blobs: std::collections::HashSet<Digest>,
    below: Option<Arc<dyn BlobSource>>,
}

impl RebasedSource {
    /// `top` serves the blobs of `top_layers`; `below` (if any) every other blob.
    pub(crate) fn new(
        top: Arc<dyn BlobSource>,
        top_layers: &[Layer],
        below: Option<Arc<dyn BlobSource>>,
    ) -> Self {
        RebasedSource {
            top,
            top_blobs: top_layers.iter().map(|l| l.blob.digest.clone()).collect(),
            below,
        }
    }

    fn source_of(&self, blob: &Descriptor) -> Option<&Arc<dyn BlobSource>> {
        if self.top_blobs.contains(&blob.digest) {
            Some(&self.top)
        } else {
            self.below.as_ref()
        }
    }
}

impl BlobSource for RebasedSource {
    fn fetch(&self, blob: &Descriptor, store: &Store) -> Result<(), WorkerError> {
        match self.source_of(blob) {
            Some(s) => s.fetch(blob, store),
            None => Err(WorkerError::Internal(format!(
                "layer blob {} is not in the local store and has no source",
                blob.digest
            ))),
        }
    }

    fn name(&self) -> String {
        self.top.name()
    }

    fn has(&self, blob: &Descriptor) -> bool {
        match self.source_of(blob) {
            Some(s) => s.has(blob),
            // No remote source: the step that made it ran here, so the blob is local.
            None => true,
        }
    }

    fn repository(&self) -> Option<kiln_oci::Reference> {
        self.top.repository()
    }
}

/// `--add-host`, `--shm-size` and `--ulimit` of the op, onto its container.
///
/// `host-gateway` is the address the step reaches the host on in its network: `127.0.0.1`
/// on the host's network; in kiln's own network namespace, slirp4netns's gateway
/// `10.0.2.2` (kiln fences the host's services off from that network, so connections there
/// are refused unless the build runs with `--network host --allow network.host`); with no
/// network, nothing is reachable and it is `127.0.0.1`.
fn apply_run_settings(spec: &mut ExecSpec, op: &ExecOp) -> Result<(), WorkerError> {
    use std::net::{IpAddr, Ipv4Addr};
    let gateway = match spec.network {
        Network::Isolated => IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2)),
        Network::Host | Network::None => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    spec.extra_hosts = op
        .extra_hosts
        .iter()
        .map(|h| {
            let addr = match h.addr {
                kiln_graph::options::HostAddr::Ip(ip) => ip,
                kiln_graph::options::HostAddr::HostGateway => gateway,
            };
            (h.name.clone(), addr)
        })
        .collect();
    spec.shm_size = op.shm_size;
    for u in &op.ulimits {
        let resource = kiln_exec::RlimitResource::from_docker_name(&u.name).ok_or_else(|| {
            WorkerError::Unsupported(format!("--ulimit {}: unknown limit", u.name))
        })?;
        spec.rlimits.retain(|r| r.resource != resource);
        spec.rlimits.push(kiln_exec::Rlimit {
            resource,
            soft: u.soft,
            hard: u.hard,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Blobs from memory, slowly, counting how many are fetched at once.
    struct SlowBlobs {
        blobs: HashMap<Digest, Vec<u8>>,
        now: AtomicUsize,
        most: AtomicUsize,
    }

    impl BlobSource for SlowBlobs {
        fn fetch(&self, blob: &Descriptor, store: &Store) -> Result<(), WorkerError> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(150));
            let mut w = store.content().writer()?;
            std::io::Write::write_all(&mut w, &self.blobs[&blob.digest])
                .map_err(|e| WorkerError::Internal(e.to_string()))?;
            w.commit(&blob.digest, blob.size)?;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }

        fn name(&self) -> String {
            "memory".into()
        }
    }

    #[test]
    fn prefetch_downloads_several_blobs_at_once_and_wait_returns_when_one_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let bodies: Vec<Vec<u8>> = (0..5).map(|i| format!("blob {i}").into_bytes()).collect();
        let descs: Vec<Descriptor> = bodies
            .iter()
            .map(|b| {
                Descriptor::new(
                    "application/octet-stream".to_owned(),
                    Digest::sha256_of(b),
                    b.len() as u64,
                )
            })
            .collect();
        let source = Arc::new(SlowBlobs {
            blobs: descs
                .iter()
                .zip(&bodies)
                .map(|(d, b)| (d.digest.clone(), b.clone()))
                .collect(),
            now: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        });
        let p = Prefetch::start(descs.clone(), source.clone(), store.clone());
        for d in &descs {
            p.wait(&d.digest);
            assert!(store.content().has(&d.digest), "{} not stored", d.digest);
        }
        assert!(
            source.most.load(Ordering::SeqCst) > 1,
            "blobs were fetched one at a time"
        );
        // A digest that was never asked for does not block.
        p.wait(&Digest::sha256_of(b"other"));
    }
}
