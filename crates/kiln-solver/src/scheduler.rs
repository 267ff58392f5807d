//! The scheduler. Each node has two lazily started, shared futures: its key and its output.
//!
//! Invariants (see `docs/solver.md`):
//! - A key never needs a node to run, except where the engine asks for the *content* of an
//!   input (local context files): then that input's output is computed first.
//! - A node's output is looked up by key before any of its inputs is asked for its output, so
//!   a hit never runs (or downloads) anything below it.
//! - Within one solve, two nodes with the same key share one computation.
//! - A miss takes the engine's per-key lock, then looks up again, so two processes sharing a
//!   state dir compute a step once.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{try_join_all, FutureExt, Shared};
use kiln_oci::Digest;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::key::{CacheKey, KeyBuilder};

/// A boxed, sendable future, as engines return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An engine's error: any error, kept with its chain of causes.
pub type EngineError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Index of a node in its [`Graph`].
pub type NodeId = usize;

/// One vertex: an operation and the nodes whose results it consumes, in order.
pub struct Node<Op> {
    pub op: Op,
    pub inputs: Vec<NodeId>,
}

/// A build graph. Inputs always precede the nodes that use them, so it has no cycles.
pub struct Graph<Op> {
    nodes: Vec<Node<Op>>,
}

impl<Op> Default for Graph<Op> {
    fn default() -> Self {
        Graph { nodes: Vec::new() }
    }
}

impl<Op> Graph<Op> {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node whose inputs are already in the graph.
    pub fn add(&mut self, op: Op, inputs: Vec<NodeId>) -> Result<NodeId, SolveError> {
        let id = self.nodes.len();
        if let Some(&bad) = inputs.iter().find(|&&i| i >= id) {
            return Err(SolveError::BadGraph {
                node: id,
                input: bad,
            });
        }
        self.nodes.push(Node { op, inputs });
        Ok(id)
    }

    /// The node with this id.
    pub fn node(&self, id: NodeId) -> &Node<Op> {
        &self.nodes[id]
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// How an input contributes to its consumer's cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKey {
    /// The input's cache key (the default).
    Key,
    /// The digest of the content the consumer reads from the input's output, computed by
    /// [`Engine::content_digest`] (e.g. the files a `COPY` selects from the build context).
    Content,
}

/// Where a cache hit came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheSource {
    /// This machine's state dir.
    Local,
    /// An imported cache, named as the user gave it (e.g. a registry ref).
    Remote(String),
}

impl fmt::Display for CacheSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheSource::Local => f.write_str("local"),
            CacheSource::Remote(r) => write!(f, "{r}"),
        }
    }
}

/// A cache hit: the stored result and where it came from.
pub struct Hit<O> {
    pub output: O,
    pub source: CacheSource,
}

/// What the scheduler reports while it runs. Engines add [`Event::Log`] lines.
#[derive(Debug, Clone)]
pub enum Event {
    /// A node's result was found in a cache; it will not run.
    Cached {
        node: NodeId,
        key: CacheKey,
        source: CacheSource,
    },
    /// A node started running.
    Started { node: NodeId, key: CacheKey },
    /// A line of a running node's output (`stream` 1 = stdout, 2 = stderr).
    Log {
        node: NodeId,
        stream: u8,
        line: Vec<u8>,
    },
    /// A node finished running.
    Completed {
        node: NodeId,
        key: CacheKey,
        duration: Duration,
    },
    /// A node failed; the message has its causes.
    Failed { node: NodeId, message: String },
}

/// Receives [`Event`]s. Called from many tasks at once; must not block for long.
pub trait EventSink: Send + Sync {
    fn event(&self, event: Event);
}

impl<F: Fn(Event) + Send + Sync> EventSink for F {
    fn event(&self, event: Event) {
        self(event)
    }
}

/// What a running node gets besides its op and inputs.
#[derive(Clone)]
pub struct ExecContext {
    pub node: NodeId,
    pub key: CacheKey,
    pub events: Arc<dyn EventSink>,
    /// Cancelled when the build is; long operations should stop promptly.
    pub cancel: CancellationToken,
}

impl ExecContext {
    /// Reports one line of output of this node.
    pub fn log(&self, stream: u8, line: Vec<u8>) {
        self.events.event(Event::Log {
            node: self.node,
            stream,
            line,
        });
    }
}

/// What executes nodes and stores their results. The solver decides *whether* and *when*;
/// the engine decides *how*.
pub trait Engine: Send + Sync + 'static {
    /// The operation of a node.
    type Op: Send + Sync + 'static;
    /// A node's result (cheap to clone: a handle, not the data).
    type Output: Clone + Send + Sync + 'static;

    /// Canonical bytes of what `op` does, excluding its inputs.
    fn definition(&self, op: &Self::Op) -> Vec<u8>;

    /// How input number `index` of `op` contributes to the key.
    fn input_key(&self, _op: &Self::Op, _index: usize) -> InputKey {
        InputKey::Key
    }

    /// Whether results of `op` are looked up and recorded at all (a local context is not).
    fn cacheable(&self, _op: &Self::Op) -> bool {
        true
    }

    /// Digest of what `op` reads from its input number `index`, whose output is `input`.
    fn content_digest<'a>(
        &'a self,
        _op: &'a Self::Op,
        _index: usize,
        _input: &'a Self::Output,
    ) -> BoxFuture<'a, Result<Digest, EngineError>> {
        Box::pin(async { Err("this engine does not key inputs by content".into()) })
    }

    /// Looks `key` up in the caches.
    fn lookup<'a>(
        &'a self,
        key: &'a CacheKey,
        op: &'a Self::Op,
    ) -> BoxFuture<'a, Result<Option<Hit<Self::Output>>, EngineError>>;

    /// Looks `key` up again once the inputs' outputs are known, just before the node would
    /// run. An engine whose stored results are built on their inputs (a layer on a parent
    /// chain) can accept a record whose own part is intact even when the record's copy of
    /// the inputs is not (a lost blob below it that the rerun input reproduced): the hit
    /// is the actual inputs plus the record's own part. Default: no second chance.
    fn lookup_on_inputs<'a>(
        &'a self,
        _key: &'a CacheKey,
        _op: &'a Self::Op,
        _inputs: &'a [Self::Output],
    ) -> BoxFuture<'a, Result<Option<Hit<Self::Output>>, EngineError>> {
        Box::pin(async { Ok(None) })
    }

    /// Takes a lock on `key` shared by every process using the same state; dropped when done.
    fn lock<'a>(
        &'a self,
        _key: &'a CacheKey,
    ) -> BoxFuture<'a, Result<Box<dyn Send + Sync>, EngineError>> {
        Box::pin(async { Ok(Box::new(()) as Box<dyn Send + Sync>) })
    }

    /// Runs `op` on its inputs' outputs.
    fn execute<'a>(
        &'a self,
        ctx: ExecContext,
        op: &'a Self::Op,
        inputs: Vec<Self::Output>,
    ) -> BoxFuture<'a, Result<Self::Output, EngineError>>;

    /// Stores a freshly computed result under `key`.
    fn record<'a>(
        &'a self,
        key: &'a CacheKey,
        op: &'a Self::Op,
        output: &'a Self::Output,
    ) -> BoxFuture<'a, Result<(), EngineError>>;

    /// A short human name of `op` for errors, e.g. `[app 3/7] RUN make`.
    fn describe(&self, op: &Self::Op) -> String;
}

/// Why a solve failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SolveError {
    /// A step failed.
    #[error("{step}: {message}")]
    Step {
        node: NodeId,
        step: String,
        message: String,
    },
    /// The build was cancelled.
    #[error("build cancelled")]
    Cancelled,
    /// A node names an input that is not before it in the graph.
    #[error("graph node {node} names input {input}, which does not precede it")]
    BadGraph { node: NodeId, input: NodeId },
}

/// Settings of one solve.
#[derive(Debug, Clone, Default)]
pub struct SolverOptions {
    /// At most this many nodes execute at once; `None` = unbounded, like BuildKit.
    pub max_parallelism: Option<usize>,
    /// Nodes that must run even when a cache has their result (`--no-cache`, filters).
    pub no_cache: HashSet<NodeId>,
}

type SharedKey = Shared<BoxFuture<'static, Result<CacheKey, SolveError>>>;
type SharedOutput<O> = Shared<BoxFuture<'static, Result<O, SolveError>>>;

struct Inner<E: Engine> {
    engine: Arc<E>,
    graph: Graph<E::Op>,
    options: SolverOptions,
    permits: Option<Semaphore>,
    events: Arc<dyn EventSink>,
    cancel: CancellationToken,
    keys: Mutex<HashMap<NodeId, SharedKey>>,
    outputs: Mutex<HashMap<NodeId, SharedOutput<E::Output>>>,
    by_key: Mutex<HashMap<CacheKey, SharedOutput<E::Output>>>,
}

/// Solves nodes of one graph with one engine. Cheap to clone; clones share all state.
pub struct Solver<E: Engine> {
    inner: Arc<Inner<E>>,
}

impl<E: Engine> Clone for Solver<E> {
    fn clone(&self) -> Self {
        Solver {
            inner: self.inner.clone(),
        }
    }
}

impl<E: Engine> Solver<E> {
    /// A solver for `graph`; events go to `events`.
    pub fn new(
        engine: Arc<E>,
        graph: Graph<E::Op>,
        options: SolverOptions,
        events: Arc<dyn EventSink>,
    ) -> Self {
        let permits = options.max_parallelism.map(|n| Semaphore::new(n.max(1)));
        Solver {
            inner: Arc::new(Inner {
                engine,
                graph,
                options,
                permits,
                events,
                cancel: CancellationToken::new(),
                keys: Mutex::default(),
                outputs: Mutex::default(),
                by_key: Mutex::default(),
            }),
        }
    }

    /// The graph being solved.
    pub fn graph(&self) -> &Graph<E::Op> {
        &self.inner.graph
    }

    /// The cache key of `node`, computing its inputs' keys (and only the content they need).
    pub async fn key(&self, node: NodeId) -> Result<CacheKey, SolveError> {
        key_of(&self.inner, node).await
    }

    /// The result of `node`: from a cache, or by running it and whatever it needs. When it
    /// fails (a step failed, or the build was cancelled) the rest of the solve is cancelled
    /// and dropped: steps still running are told to stop, and nothing keeps the engine (and
    /// what it holds, such as a store lease) alive after the last handle to the solver.
    pub async fn solve(&self, node: NodeId) -> Result<E::Output, SolveError> {
        let mut result = output_of(&self.inner, node).await;
        // Cancelled while only cache hits were left to find: still cancelled, never a success.
        if result.is_ok() && self.inner.cancel.is_cancelled() {
            result = Err(SolveError::Cancelled);
        }
        if result.is_err() {
            self.abandon();
        }
        result
    }

    /// Cancels the solve: running steps are told to stop and pending ones never start.
    pub fn cancel(&self) {
        self.inner.cancel.cancel();
    }

    /// The token that [`Solver::cancel`] cancels.
    pub fn cancel_token(&self) -> CancellationToken {
        self.inner.cancel.clone()
    }

    /// Cancels and forgets every started computation. A pending one holds the solver's
    /// state, which holds it in turn: left in the maps after its consumer gave up on it (a
    /// sibling failed first), it would never run again nor be dropped.
    fn abandon(&self) {
        self.inner.cancel.cancel();
        let outputs = std::mem::take(
            &mut *self
                .inner
                .outputs
                .lock()
                .expect("solver output map poisoned"),
        );
        let by_key =
            std::mem::take(&mut *self.inner.by_key.lock().expect("solver key index poisoned"));
        let keys = std::mem::take(&mut *self.inner.keys.lock().expect("solver key map poisoned"));
        drop((outputs, by_key, keys));
    }
}

fn step_error<E: Engine>(inner: &Inner<E>, node: NodeId, err: EngineError) -> SolveError {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    let step = inner.engine.describe(&inner.graph.node(node).op);
    inner.events.event(Event::Failed {
        node,
        message: message.clone(),
    });
    SolveError::Step {
        node,
        step,
        message,
    }
}

fn key_of<E: Engine>(inner: &Arc<Inner<E>>, node: NodeId) -> SharedKey {
    let mut keys = inner.keys.lock().expect("solver key map poisoned");
    if let Some(k) = keys.get(&node) {
        return k.clone();
    }
    let inner2 = inner.clone();
    let fut: BoxFuture<'static, Result<CacheKey, SolveError>> = Box::pin(async move {
        let inner = inner2;
        let n = inner.graph.node(node);
        let parts = n.inputs.iter().enumerate().map(|(index, &input)| {
            let inner = inner.clone();
            async move {
                let engine = &inner.engine;
                let op = &inner.graph.node(node).op;
                match engine.input_key(op, index) {
                    InputKey::Key => Ok(Part::Key(key_of(&inner, input).await?)),
                    InputKey::Content => {
                        let out = output_of(&inner, input).await?;
                        let d = engine
                            .content_digest(op, index, &out)
                            .await
                            .map_err(|e| step_error(&inner, node, e))?;
                        Ok::<_, SolveError>(Part::Content(d))
                    }
                }
            }
        });
        let parts = try_join_all(parts).await?;
        let mut b = KeyBuilder::new(&inner.engine.definition(&n.op));
        for p in &parts {
            match p {
                Part::Key(k) => b.input_key(k),
                Part::Content(d) => b.input_content(d),
            };
        }
        Ok(b.finish())
    });
    let shared = fut.shared();
    keys.insert(node, shared.clone());
    shared
}

enum Part {
    Key(CacheKey),
    Content(Digest),
}

fn output_of<E: Engine>(inner: &Arc<Inner<E>>, node: NodeId) -> SharedOutput<E::Output> {
    let mut outputs = inner.outputs.lock().expect("solver output map poisoned");
    if let Some(o) = outputs.get(&node) {
        return o.clone();
    }
    let inner2 = inner.clone();
    let fut: BoxFuture<'static, Result<E::Output, SolveError>> = Box::pin(async move {
        let inner = inner2;
        let key = key_of(&inner, node).await?;
        let shared = {
            let mut by_key = inner.by_key.lock().expect("solver key index poisoned");
            match by_key.get(&key) {
                Some(existing) => existing.clone(),
                None => {
                    let f: BoxFuture<'static, _> =
                        Box::pin(compute(inner.clone(), node, key.clone()));
                    let f = f.shared();
                    by_key.insert(key, f.clone());
                    f
                }
            }
        };
        shared.await
    });
    let shared = fut.shared();
    outputs.insert(node, shared.clone());
    shared
}

async fn compute<E: Engine>(
    inner: Arc<Inner<E>>,
    node: NodeId,
    key: CacheKey,
) -> Result<E::Output, SolveError> {
    let engine = inner.engine.clone();
    let n = inner.graph.node(node);
    let cacheable = engine.cacheable(&n.op);
    let use_cache = cacheable && !inner.options.no_cache.contains(&node);

    let lookup = |inner: Arc<Inner<E>>| {
        let key = key.clone();
        async move {
            let op = &inner.graph.node(node).op;
            match inner.engine.lookup(&key, op).await {
                Ok(Some(hit)) => {
                    inner.events.event(Event::Cached {
                        node,
                        key,
                        source: hit.source,
                    });
                    Ok(Some(hit.output))
                }
                Ok(None) => Ok(None),
                Err(e) => Err(step_error(&inner, node, e)),
            }
        }
    };
    if use_cache {
        if let Some(out) = lookup(inner.clone()).await? {
            return Ok(out);
        }
    }

    let inputs = try_join_all(n.inputs.iter().map(|&i| output_of(&inner, i))).await?;
    if inner.cancel.is_cancelled() {
        return Err(SolveError::Cancelled);
    }
    if use_cache {
        // A second chance with the inputs in hand (see `Engine::lookup_on_inputs`).
        match engine.lookup_on_inputs(&key, &n.op, &inputs).await {
            Ok(Some(hit)) => {
                inner.events.event(Event::Cached {
                    node,
                    key,
                    source: hit.source,
                });
                return Ok(hit.output);
            }
            Ok(None) => {}
            Err(e) => return Err(step_error(&inner, node, e)),
        }
    }
    // Waiting for a slot or for another process to finish this key ends at a cancel.
    let _permit = match &inner.permits {
        Some(s) => Some(tokio::select! {
            p = s.acquire() => p.map_err(|_| SolveError::Cancelled)?,
            _ = inner.cancel.cancelled() => return Err(SolveError::Cancelled),
        }),
        None => None,
    };
    let _lock = if cacheable {
        Some(tokio::select! {
            l = engine.lock(&key) => l.map_err(|e| step_error(&inner, node, e))?,
            _ = inner.cancel.cancelled() => return Err(SolveError::Cancelled),
        })
    } else {
        None
    };
    if use_cache {
        // Another process may have computed it while we waited for the lock.
        if let Some(out) = lookup(inner.clone()).await? {
            return Ok(out);
        }
    }

    inner.events.event(Event::Started {
        node,
        key: key.clone(),
    });
    let started = Instant::now();
    let ctx = ExecContext {
        node,
        key: key.clone(),
        events: inner.events.clone(),
        cancel: inner.cancel.clone(),
    };
    let out = tokio::select! {
        r = engine.execute(ctx, &n.op, inputs) => r.map_err(|e| step_error(&inner, node, e))?,
        _ = inner.cancel.cancelled() => return Err(SolveError::Cancelled),
    };
    if cacheable {
        engine
            .record(&key, &n.op, &out)
            .await
            .map_err(|e| step_error(&inner, node, e))?;
    }
    inner.events.event(Event::Completed {
        node,
        key,
        duration: started.elapsed(),
    });
    Ok(out)
}
