//! One kiln build as a library call. A caller (the `kiln` binary) fills a [`BuildRequest`]
//! and hands it to [`run`] with an [`EventSink`]; the session plans the build, reads the
//! imported caches, solves the steps, exports the outputs and caches, and records the build
//! in history, reporting every step and every warning as a [`BuildEvent`]. The session never
//! prints: rendering events is the caller's job.
//!
//! The plug points where backends live: cache backends ([`cache::CacheBackend`]: registry,
//! local, inline) and exporters ([`export::Exporter`]: image, registry, OCI and Docker
//! tarballs, a directory, a rootfs tar). [`spec::parse_attrs`] is the one parse of the
//! `type=KIND,key=value,...` values of `--output`, `--export-cache` and `--import-cache`.

#![warn(missing_docs)]

pub mod attest;
pub mod cache;
pub mod events;
pub mod export;
pub mod request;
pub mod session;
pub mod spec;

pub use events::{BuildEvent, EventSink, StepName, StepOutcome};
pub use request::{BuildRequest, ExportFlagError, ExportFlags, Exports};
pub use session::{
    run, BuildFailure, BuildOutcome, CancelHandle, CancelOutcome, Interruption, SessionError,
};
pub use spec::{parse_attrs, SpecError};
