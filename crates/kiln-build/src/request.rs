//! Everything one build needs, gathered before it starts: [`BuildRequest`], and the parse of
//! the flags that say where its results and caches go ([`ExportFlags`]).

use std::path::PathBuf;

use kiln_dockerfile::Dockerfile;
use kiln_graph::options::{apply_tags_and_push, CacheExportSpec, CacheImportSpec, OutputSpec};
use kiln_graph::{BuildOptions, OptionError};

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

/// The flags that say where a build's results and caches go, in both spellings, as the
/// command line gave them (repeatable flags in command-line order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportFlags {
    /// buildx `-t/--tag`.
    pub tags: Vec<String>,
    /// buildx `--push`.
    pub push: bool,
    /// `--output` / `-o`.
    pub outputs: Vec<String>,
    /// buildctl `--export-cache`, buildx `--cache-to`: (flag as spelled, value).
    pub cache_to: Vec<(String, String)>,
    /// buildctl `--import-cache`, buildx `--cache-from`: (flag as spelled, value).
    pub cache_from: Vec<(String, String)>,
}

/// Where a build's results and caches go, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exports {
    /// Every output, in order; `-t`/`--push` folded in. Empty: build only (the cache is
    /// still filled).
    pub outputs: Vec<OutputSpec>,
    /// Caches to export to.
    pub cache_exports: Vec<CacheExportSpec>,
    /// Caches to import from.
    pub cache_imports: Vec<CacheImportSpec>,
}

impl ExportFlags {
    /// Validates the flags. Every error names the flag as spelled and the bad value.
    pub fn parse(&self) -> Result<Exports, OptionError> {
        let mut outputs = self
            .outputs
            .iter()
            .map(|o| OutputSpec::parse("--output", o))
            .collect::<Result<Vec<_>, _>>()?;
        apply_tags_and_push(&mut outputs, &self.tags, self.push)?;
        let cache_exports = self
            .cache_to
            .iter()
            .map(|(flag, c)| CacheExportSpec::parse(flag, c))
            .collect::<Result<_, _>>()?;
        let cache_imports = self
            .cache_from
            .iter()
            .map(|(flag, c)| CacheImportSpec::parse(flag, c))
            .collect::<Result<_, _>>()?;
        Ok(Exports {
            outputs,
            cache_exports,
            cache_imports,
        })
    }
}

impl BuildRequest {
    /// A request for `options` (its metadata file taken out of them) and `exports`; the
    /// Dockerfile, its source and label, and the state root are given. Reports, trace and
    /// command line start empty.
    pub fn new(
        mut options: BuildOptions,
        exports: Exports,
        dockerfile: Dockerfile,
        dockerfile_source: String,
        dockerfile_label: String,
        dockerignore: Vec<String>,
        state_root: PathBuf,
    ) -> Self {
        BuildRequest {
            outputs: exports.outputs,
            cache_imports: exports.cache_imports,
            cache_exports: exports.cache_exports,
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
