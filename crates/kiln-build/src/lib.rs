//! One kiln build as a library call: the [`export::Exporter`]s a build's result is written
//! through (image, registry, OCI and Docker tarballs, a directory, a rootfs tar), and the
//! parse of the `type=KIND,key=value,...` flag values that select them ([`spec`]).

pub mod export;
pub mod spec;
