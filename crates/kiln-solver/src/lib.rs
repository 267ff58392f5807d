//! The solver: a cache key per vertex, computed bottom-up without running anything; lookup
//! through the engine (local store, then imported remote caches); and a scheduler that runs
//! every vertex whose inputs are ready at once, deduplicating identical vertices.
//!
//! The solver knows nodes, keys and results only. What a node *does* — running a container,
//! copying files, pulling an image — is the [`Engine`]'s business. See `docs/solver.md`.

mod key;
mod scheduler;

pub use key::{CacheKey, KeyBuilder};
pub use scheduler::{
    BoxFuture, CacheSource, Engine, EngineError, Event, EventSink, ExecContext, Graph, Hit,
    InputKey, Node, NodeId, SolveError, Solver, SolverOptions,
};
