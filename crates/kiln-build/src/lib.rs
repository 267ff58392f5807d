//! One kiln build as a library call: what the build needs, the session that runs it, and the
//! plug points where backends live — cache backends ([`cache::CacheBackend`]: registry, local,
//! inline) and exporters. The `kiln` binary turns flags into these and renders what happens.

pub mod cache;
