//! Runs one process in a container on a prepared rootfs: namespaces, mounts, capabilities,
//! seccomp, users, `RUN --mount` types; a runc backend for differential testing.
//!
//! Two [`Executor`]s share one [`ExecSpec`]: [`NamespaceExecutor`] (kiln's own, the default)
//! and [`RuncExecutor`] (drives `runc` with a generated OCI runtime spec). Cache mounts come
//! from [`CacheMounts`]. The design and setup order are in `docs/exec.md`.

mod cache;
mod namespace;
mod output;
mod prepare;
mod rootfs;
mod runc;
mod security;
mod spec;
mod user;

pub use cache::{CacheMount, CacheMountError, CacheMountRequest, CacheMounts, CacheSharing};
pub use namespace::NamespaceExecutor;
pub use runc::RuncExecutor;
pub use spec::{
    CancelToken, CollectedOutput, ExecError, ExecSpec, Executor, ExitStatus, MountKind, MountSpec,
    Network, OutputLine, OutputSink, OutputStream, Rlimit, RlimitResource, Secret, Security,
    DEFAULT_PATH,
};
