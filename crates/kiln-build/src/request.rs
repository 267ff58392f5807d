//! Everything one build needs, gathered before it starts: [`BuildRequest`], and the parse of
//! the flags that say where its results and caches go ([`ExportFlags`]).

use std::path::PathBuf;

use kiln_dockerfile::Dockerfile;
use kiln_graph::BuildOptions;

use crate::attest::{Annotation, AttestRequest};
use crate::cache::{CacheError, CacheExport, CacheImport};
use crate::export::{exporters_from_flags, Exporter};
use crate::session::CancelHandle;
use crate::spec::{parse_attrs, SpecError};

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
    /// Where to write the image ID (`--iidfile`): the config digest of the image made, as
    /// buildx writes it; removed first, so a failed build leaves none.
    pub iidfile: Option<PathBuf>,
    /// Where to write the timeline report page (`--report`).
    pub report: Option<PathBuf>,
    /// Where to write the Chrome trace-event JSON (`--trace`).
    pub trace: Option<PathBuf>,
    /// kiln's state directory (content store, snapshots, cache DB, history).
    pub state_root: PathBuf,
    /// The command line, as recorded in the build's history.
    pub command_line: Vec<String>,
    /// `--annotation` values, applied to every image output (with the outputs' own).
    pub annotations: Vec<Annotation>,
    /// The attestations attached to pushed images and OCI layouts (`--attest`,
    /// `--provenance`, `--sbom`); none by default (the caller applies buildx's defaults).
    pub attestations: AttestRequest,
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
    /// A cache flag value no backend accepts (its type, a key, a value, a missing one).
    #[error(transparent)]
    Cache(SpecError),
    /// A cache backend that could not be made from a well-formed value (e.g. a ref that does
    /// not parse, a bad `max-age`); the text is the backend's own.
    #[error("{error}")]
    CacheBackend {
        /// The flag as the user spelled it.
        flag: String,
        /// Why the backend could not be made.
        error: Box<CacheError>,
    },
    /// A bad `--output`, `-t/--tag` or `--push`.
    #[error(transparent)]
    Output(#[from] SpecError),
}

impl ExportFlagError {
    /// The flag as the user spelled it.
    pub fn flag(&self) -> &str {
        match self {
            ExportFlagError::Cache(e) | ExportFlagError::Output(e) => &e.flag,
            ExportFlagError::CacheBackend { flag, .. } => flag,
        }
    }

    /// `error` of `value` of `flag`: a bad attribute is reported with the whole value.
    fn of_cache(flag: &str, value: &str, error: CacheError) -> Self {
        match error {
            CacheError::Flag(e) => ExportFlagError::Cache(SpecError::new(
                flag,
                &crate::cache::redact_cache_flag_value(value),
                e.reason,
            )),
            error => ExportFlagError::CacheBackend {
                flag: flag.to_owned(),
                error: Box::new(error),
            },
        }
    }
}

/// Where a build's results and caches go, validated.
pub struct Exports {
    /// Every output, in order; `-t`/`--push` folded in. Empty: build only (the cache is
    /// still filled).
    pub exporters: Vec<Box<dyn Exporter>>,
    /// Caches to export to, in flag order.
    pub cache_exports: Vec<CacheExport>,
    /// Caches to import from, in flag order.
    pub cache_imports: Vec<CacheImport>,
    /// One warning per import left out because its backend could not be made and it
    /// ignores errors (the default for imports); for the caller to report.
    pub warnings: Vec<String>,
}

impl ExportFlags {
    /// Validates the flags: the cache flags, then the outputs, and makes every cache backend,
    /// so that a typo in a cache's attributes fails before the build starts. Every error
    /// names the flag as spelled and the bad value. An import whose backend cannot be made
    /// from a well-formed value is left out with a warning unless `ignore-error=false`.
    pub fn parse(&self) -> Result<Exports, ExportFlagError> {
        let mut cache_exports = Vec::new();
        for (flag, value) in &self.cache_to {
            let (kind, attrs) = parse_attrs(flag, value).map_err(redacted)?;
            let export = CacheExport::from_attrs(&kind, &attrs, flag)
                .map_err(|e| ExportFlagError::of_cache(flag, value, e))?;
            cache_exports.push(export);
        }
        let mut cache_imports = Vec::new();
        let mut warnings = Vec::new();
        for (flag, value) in &self.cache_from {
            let (kind, attrs) = parse_attrs(flag, value).map_err(redacted)?;
            match CacheImport::from_attrs(&kind, &attrs, flag) {
                Ok(i) => cache_imports.push(i),
                Err(CacheError::Flag(e)) => {
                    return Err(ExportFlagError::of_cache(flag, value, CacheError::Flag(e)))
                }
                Err(e) if attrs.get("ignore-error").map(String::as_str) != Some("false") => {
                    warnings.push(import_failed(e))
                }
                Err(e) => return Err(ExportFlagError::of_cache(flag, value, e)),
            }
        }
        let exporters = exporters_from_flags(&self.outputs, &self.tags, self.push)?;
        Ok(Exports {
            exporters,
            cache_exports,
            cache_imports,
            warnings,
        })
    }
}

/// A malformed cache flag value's error, without the values of secret attributes.
fn redacted(mut e: SpecError) -> ExportFlagError {
    e.value = crate::cache::redact_cache_flag_value(&e.value);
    ExportFlagError::Cache(e)
}

/// The warning for a cache import that failed and is built without.
pub(crate) fn import_failed(e: CacheError) -> String {
    format!(
        "cache import failed, building without it: {:#}",
        anyhow::Error::new(e)
    )
}

impl BuildRequest {
    /// A request to build `dockerfile` with `options` (its metadata file taken out of them),
    /// keeping state under `state_root`. Everything else starts empty, to be set as fields:
    /// no outputs, no caches, no `.dockerignore` patterns, no reports or trace, the
    /// Dockerfile's source empty and its label `Dockerfile`.
    pub fn new(mut options: BuildOptions, dockerfile: Dockerfile, state_root: PathBuf) -> Self {
        BuildRequest {
            exporters: Vec::new(),
            cache_imports: Vec::new(),
            cache_exports: Vec::new(),
            metadata_file: options.metadata_file.take(),
            options,
            dockerfile,
            dockerfile_source: String::new(),
            dockerfile_label: "Dockerfile".to_owned(),
            dockerignore: Vec::new(),
            iidfile: None,
            report: None,
            trace: None,
            state_root,
            command_line: Vec::new(),
            annotations: Vec::new(),
            attestations: AttestRequest::default(),
            cancel: CancelHandle::default(),
        }
    }
}
