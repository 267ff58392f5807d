//! Everything one build needs, gathered before it starts: [`BuildRequest`], and the parse of
//! the flags that say where its results and caches go ([`ExportFlags`]).

use std::path::PathBuf;

use kiln_dockerfile::Dockerfile;
use kiln_graph::options::{CacheExportSpec, CacheImportSpec, CacheKind};
use kiln_graph::{BuildOptions, OptionError};

use crate::cache::{CacheError, CacheExport, CacheImport};
use crate::export::{exporters_from_flags, Exporter};
use crate::session::CancelHandle;
use crate::spec::SpecError;

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
    /// Every output (`--output`, `-t`/`--push`), run in order after the steps.
    pub exporters: Vec<Box<dyn Exporter>>,
    /// Every cache to read before the steps run (`--import-cache`/`--cache-from`).
    pub cache_imports: Vec<CacheImport>,
    /// Every cache to write after the build (`--export-cache`/`--cache-to`).
    pub cache_exports: Vec<CacheExport>,
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

/// A bad value of one of the [`ExportFlags`]; the text names the flag as spelled.
#[derive(Debug, thiserror::Error)]
pub enum ExportFlagError {
    /// A bad cache flag value.
    #[error(transparent)]
    Cache(#[from] OptionError),
    /// A bad `--output`, `-t/--tag` or `--push`.
    #[error(transparent)]
    Output(#[from] SpecError),
}

impl ExportFlagError {
    /// The flag as the user spelled it.
    pub fn flag(&self) -> &str {
        match self {
            ExportFlagError::Cache(e) => &e.flag,
            ExportFlagError::Output(e) => &e.flag,
        }
    }
}

/// Where a build's results and caches go, validated.
pub struct Exports {
    /// Every output, in order; `-t`/`--push` folded in. Empty: build only (the cache is
    /// still filled).
    pub exporters: Vec<Box<dyn Exporter>>,
    /// Caches to export to, as parsed from their flags.
    pub cache_exports: Vec<CacheExportSpec>,
    /// Caches to import from, as parsed from their flags.
    pub cache_imports: Vec<CacheImportSpec>,
}

impl ExportFlags {
    /// Validates the flags: the cache flags, then the outputs. Every error names the flag
    /// as spelled and the bad value.
    pub fn parse(&self) -> Result<Exports, ExportFlagError> {
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
        let exporters = exporters_from_flags(&self.outputs, &self.tags, self.push)?;
        Ok(Exports {
            exporters,
            cache_exports,
            cache_imports,
        })
    }
}

fn kind_name(kind: CacheKind) -> &'static str {
    match kind {
        CacheKind::Registry => "registry",
        CacheKind::Local => "local",
        CacheKind::Inline => "inline",
    }
}

impl Exports {
    /// Makes the backend of every cache flag, so that a typo in an export's attributes fails
    /// before the build starts. An import that cannot be made is left out, with a warning
    /// passed to `warn`, unless `ignore-error=false`.
    pub fn cache_backends(
        &self,
        warn: &dyn Fn(String),
    ) -> Result<(Vec<CacheImport>, Vec<CacheExport>), CacheError> {
        let mut imports = Vec::new();
        for spec in &self.cache_imports {
            match CacheImport::from_attrs(kind_name(spec.kind), &spec.attrs, "--import-cache") {
                Ok(i) => imports.push(i),
                Err(e) if spec.ignore_error => warn(import_failed(e)),
                Err(e) => return Err(e),
            }
        }
        let exports = self
            .cache_exports
            .iter()
            .map(|spec| {
                CacheExport::from_attrs(kind_name(spec.kind), &spec.attrs, "--export-cache")
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((imports, exports))
    }
}

/// The warning for a cache import that failed and is built without.
pub(crate) fn import_failed(e: CacheError) -> String {
    format!(
        "cache import failed, building without it: {:#}",
        anyhow::Error::new(e)
    )
}

impl BuildRequest {
    /// A request for `options` (its metadata file taken out of them), `exporters` and the
    /// caches; the Dockerfile, its source and label, and the state root are given. Reports,
    /// trace and command line start empty.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mut options: BuildOptions,
        exporters: Vec<Box<dyn Exporter>>,
        (cache_imports, cache_exports): (Vec<CacheImport>, Vec<CacheExport>),
        dockerfile: Dockerfile,
        dockerfile_source: String,
        dockerfile_label: String,
        dockerignore: Vec<String>,
        state_root: PathBuf,
    ) -> Self {
        BuildRequest {
            exporters,
            cache_imports,
            cache_exports,
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
