//! kiln's build engine: the [`kiln_solver::Engine`] that runs build-graph vertices — image
//! sources, local contexts, `RUN` in containers, `COPY`/`ADD`, `WORKDIR` — on the content
//! store, snapshotter and executor, and the base-image providers it resolves `FROM` with.

pub mod build;
pub mod context;
pub mod engine;
pub mod error;
pub mod fileop;
pub mod image;
pub mod images;
pub mod platform_graph;
pub mod provider;
pub mod registry;
pub mod remote;
pub mod sources;
pub mod ssh;
