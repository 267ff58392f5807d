//! Runs one process in a container on a prepared rootfs: namespaces, mounts, capabilities,
//! seccomp, users, `RUN --mount` types; a runc backend for differential testing.
//!
//! Three [`Executor`]s share one [`ExecSpec`]: [`NamespaceExecutor`] (kiln's own, the default),
//! [`RuncExecutor`] (drives `runc` with a generated OCI runtime spec) and [`ChrootExecutor`]
//! (a chroot without namespaces, where none can be created: `docs/rootless.md`). Cache mounts come
//! from [`CacheMounts`]. The design and setup order are in `docs/exec.md`.
//!
//! ```no_run
//! use kiln_exec::*;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let caches = CacheMounts::new("/var/lib/kiln/cache-mounts");
//! let mut req = CacheMountRequest::new("/root/.cache/go-build");
//! req.sharing = CacheSharing::Locked;
//! let cache = caches.acquire(&req)?; // held until dropped
//!
//! let mut spec = ExecSpec::new("/var/lib/kiln/snapshots/42/merged", vec![
//!     "/bin/sh".into(), "-c".into(), "go build ./...".into(),
//! ]);
//! spec.user = Some("builder".into());
//! spec.cwd = "/src".into();
//! spec.mounts.push(MountSpec {
//!     target: "/root/.cache/go-build".into(),
//!     kind: MountKind::Cache { source: cache.path().to_path_buf() },
//! });
//! spec.mounts.push(MountSpec::secret("npmrc", None, Secret::new("token")));
//!
//! // Blocking: from tokio, run this inside `tokio::task::spawn_blocking`.
//! let mut out = CollectedOutput::default();
//! let status = NamespaceExecutor::new().run(&spec, &mut out, &CancelToken::new())?;
//! assert!(status.success());
//! # Ok(()) }
//! ```

mod cache;
mod cgroup;
mod chroot;
mod namespace;
mod network;
mod output;
mod personality;
pub mod platforms;
mod prepare;
pub mod probe;
mod rootfs;
mod runc;
mod security;
mod spec;
mod ssh;
#[cfg(target_arch = "x86_64")]
mod syscalls_i386;
mod user;
pub mod userns;

pub use cache::{CacheMount, CacheMountError, CacheMountRequest, CacheMounts, CacheSharing};
pub use chroot::ChrootExecutor;
pub use namespace::NamespaceExecutor;
pub use personality::Personality;
pub use runc::RuncExecutor;
pub use spec::{
    CancelToken, CollectedOutput, ExecError, ExecSpec, Executor, ExitStatus, MountKind, MountSpec,
    Network, OutputLine, OutputSink, OutputStream, Rlimit, RlimitResource, Secret, DEFAULT_PATH,
};
