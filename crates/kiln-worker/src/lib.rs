//! kiln's build engine: the [`kiln_solver::Engine`] that runs build-graph vertices — image
//! sources, local contexts, `RUN` in containers, `COPY`/`ADD`, `WORKDIR` — on the content
//! store, snapshotter and executor, and the exporters that turn a result into an image.

pub mod context;
pub mod fileop;
pub mod image;
