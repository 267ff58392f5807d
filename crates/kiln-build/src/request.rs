//! Everything one build needs, gathered before it starts: [`BuildRequest`].

use std::path::PathBuf;

use kiln_dockerfile::Dockerfile;
use kiln_graph::options::{CacheExportSpec, CacheImportSpec, OutputSpec};
use kiln_graph::BuildOptions;

use crate::session::CancelHandle;

/// One build: the frontend options, the Dockerfile, where results and caches go, and where
/// kiln keeps its state. Built by the caller (the `kiln` binary from its flags), run by
/// [`crate::run`].
pub struct BuildRequest {
    /// Frontend and run settings (target, build args, platforms, contexts, secrets, ...).
    pub options: BuildOptions,
    /// The parsed Dockerfile.
    pub dockerfile: Dockerfile,
    /// The Dockerfile's text, for errors shown with their source line.
    pub dockerfile_source: String,
    /// How the Dockerfile is named in messages (its path as given).
    pub dockerfile_label: String,
    /// The main context's `.dockerignore` patterns, in file order.
    pub dockerignore: Vec<String>,
    /// Every `--output`, in order.
    pub outputs: Vec<OutputSpec>,
    /// Every cache to read before the steps run (`--import-cache`/`--cache-from`).
    pub cache_imports: Vec<CacheImportSpec>,
    /// Every cache to write after the build (`--export-cache`/`--cache-to`).
    pub cache_exports: Vec<CacheExportSpec>,
    /// Where to write the build's metadata JSON (`--metadata-file`).
    pub metadata_file: Option<PathBuf>,
    /// Where to write the timeline report page (`--report`).
    pub report: Option<PathBuf>,
    /// Where to write the Chrome trace-event JSON (`--trace`).
    pub trace: Option<PathBuf>,
    /// kiln's state directory (content store, snapshots, cache DB, history).
    pub state_root: PathBuf,
    /// The command line, as recorded in the build's history.
    pub command_line: Vec<String>,
    /// Cancels the build; keep a clone (from [`CancelHandle::clone`]) to cancel it from
    /// another thread (a signal handler).
    pub cancel: CancelHandle,
}

impl BuildRequest {
    /// A request for `options`, taking its outputs, cache specs and metadata file out of
    /// them; the Dockerfile, its source and label, and the state root are given. Reports,
    /// trace and command line start empty.
    pub fn new(
        mut options: BuildOptions,
        dockerfile: Dockerfile,
        dockerfile_source: String,
        dockerfile_label: String,
        dockerignore: Vec<String>,
        state_root: PathBuf,
    ) -> Self {
        BuildRequest {
            outputs: std::mem::take(&mut options.outputs),
            cache_imports: std::mem::take(&mut options.cache_imports),
            cache_exports: std::mem::take(&mut options.cache_exports),
            metadata_file: options.metadata_file.take(),
            options,
            dockerfile,
            dockerfile_source,
            dockerfile_label,
            dockerignore,
            report: None,
            trace: None,
            state_root,
            command_line: Vec::new(),
            cancel: CancelHandle::default(),
        }
    }
}
