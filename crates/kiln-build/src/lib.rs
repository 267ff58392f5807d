//! One kiln build as a library call: what the build needs, the session that runs it, and the
//! plug points where backends live — cache backends ([`cache::CacheBackend`]: registry, local,
//! inline) and exporters ([`export::Exporter`]: image, registry, OCI and Docker tarballs, a
//! directory, a rootfs tar). [`spec`] is the one parse of the `type=KIND,key=value,...` flag
//! values that select them. The `kiln` binary turns flags into these and renders what happens.

pub mod cache;
pub mod export;
pub mod spec;
