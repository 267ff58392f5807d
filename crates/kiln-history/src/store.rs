//! The history store: one JSON file per build under `<state root>/history/`, written atomically
//! (temp file + rename), bounded by count and size, oldest pruned first.

use std::fs;
use std::path::{Path, PathBuf};

use crate::record::{BuildRecord, RECORD_VERSION};

/// How many builds are kept by default.
pub const DEFAULT_KEEP: usize = 200;

/// Default cap on the history directory's size.
const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// What can go wrong reading or writing history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// A file or directory could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A record file is not valid JSON of a build record.
    #[error("build record {path} is damaged ({source}); delete it")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error, with line and column.
        source: serde_json::Error,
    },
    /// A record was written by a newer kiln.
    #[error("build record {path} has format version {version}, newer than this kiln reads ({RECORD_VERSION}); upgrade kiln")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
    /// No build matches the id.
    #[error("no build {id} in history (see `kiln history ls`)")]
    NotFound {
        /// The id or prefix asked for.
        id: String,
    },
    /// A prefix matches several builds.
    #[error("build id prefix {prefix} matches {} builds ({}); give more characters", .matches.len(), .matches.join(", "))]
    Ambiguous {
        /// The prefix asked for.
        prefix: String,
        /// The ids it matches.
        matches: Vec<String>,
    },
    /// A record could not be encoded.
    #[error("encoding build record {id}: {source}")]
    Encode {
        /// The record's id.
        id: String,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// The builds recorded in one state directory.
#[derive(Debug, Clone)]
pub struct HistoryStore {
    dir: PathBuf,
    keep: usize,
    max_bytes: u64,
}

impl HistoryStore {
    /// The history of the state directory `state_root` (files in `state_root/history/`).
    pub fn new(state_root: &Path) -> HistoryStore {
        HistoryStore {
            dir: state_root.join("history"),
            keep: DEFAULT_KEEP,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    /// Keeps at most `keep` builds (at least one) and at most `max_bytes` of records.
    pub fn with_limits(mut self, keep: usize, max_bytes: u64) -> HistoryStore {
        self.keep = keep.max(1);
        self.max_bytes = max_bytes;
        self
    }

    /// The directory records live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores `record` (temp file + rename, so readers never see half a record), then prunes.
    pub fn save(&self, record: &BuildRecord) -> Result<PathBuf, HistoryError> {
        fs::create_dir_all(&self.dir).map_err(|source| HistoryError::Io {
            action: "creating history directory",
            path: self.dir.clone(),
            source,
        })?;
        let json = serde_json::to_vec(record).map_err(|source| HistoryError::Encode {
            id: record.id.clone(),
            source,
        })?;
        let path = self.dir.join(format!("{}.json", record.id));
        write_atomic(&path, &json, "writing build record")?;
        self.prune()?;
        Ok(path)
    }

    /// Ids of the stored builds, newest first.
    pub fn ids(&self) -> Result<Vec<String>, HistoryError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(HistoryError::Io {
                    action: "listing",
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut ids: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let id = name.strip_suffix(".json")?;
                (!id.starts_with('.')).then(|| id.to_string())
            })
            .collect();
        // Ids start with the start time in fixed-width hex, so they sort by time.
        ids.sort_unstable_by(|a, b| b.cmp(a));
        Ok(ids)
    }

    /// Reads the build `id` (exact).
    pub fn load(&self, id: &str) -> Result<BuildRecord, HistoryError> {
        let path = self.dir.join(format!("{id}.json"));
        let bytes = fs::read(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => HistoryError::NotFound { id: id.to_string() },
            _ => HistoryError::Io {
                action: "reading build record",
                path: path.clone(),
                source,
            },
        })?;
        parse_record(&path, &bytes)
    }

    /// Resolves `latest`, a full id or a unique prefix of one to a full id.
    pub fn resolve(&self, id: &str) -> Result<String, HistoryError> {
        let ids = self.ids()?;
        if id == "latest" {
            return ids
                .into_iter()
                .next()
                .ok_or(HistoryError::NotFound { id: id.into() });
        }
        if ids.iter().any(|i| i == id) {
            return Ok(id.to_string());
        }
        let matches: Vec<String> = ids.into_iter().filter(|i| i.starts_with(id)).collect();
        match matches.len() {
            0 => Err(HistoryError::NotFound { id: id.into() }),
            1 => Ok(matches.into_iter().next().unwrap_or_default()),
            _ => Err(HistoryError::Ambiguous {
                prefix: id.into(),
                matches,
            }),
        }
    }

    /// Loads the build named by `latest`, an id or a unique prefix.
    pub fn find(&self, id: &str) -> Result<BuildRecord, HistoryError> {
        self.load(&self.resolve(id)?)
    }

    /// Deletes the oldest builds beyond the count and size limits; returns how many.
    pub fn prune(&self) -> Result<usize, HistoryError> {
        let ids = self.ids()?;
        let mut total = 0u64;
        let mut removed = 0;
        for (n, id) in ids.iter().enumerate() {
            let path = self.dir.join(format!("{id}.json"));
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            total += size;
            // The newest build is always kept, whatever its size.
            if n > 0 && (n >= self.keep || total > self.max_bytes) {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(HistoryError::Io {
                            action: "pruning",
                            path,
                            source,
                        })
                    }
                }
            }
        }
        Ok(removed)
    }
}

/// Writes `bytes` to `path` atomically and durably (kiln-fs's fsync rule: a record that
/// `history ls` lists must survive a crash).
pub(crate) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    action: &'static str,
) -> Result<(), HistoryError> {
    kiln_fs::write_atomic(path, bytes, kiln_fs::Durability::Fsync).map_err(|e| HistoryError::Io {
        action,
        path: path.to_path_buf(),
        source: e.source,
    })
}

fn parse_record(path: &Path, bytes: &[u8]) -> Result<BuildRecord, HistoryError> {
    #[derive(serde::Deserialize)]
    struct Version {
        version: u32,
    }
    if let Ok(v) = serde_json::from_slice::<Version>(bytes) {
        if v.version > RECORD_VERSION {
            return Err(HistoryError::TooNew {
                path: path.to_path_buf(),
                version: v.version,
            });
        }
    }
    serde_json::from_slice(bytes).map_err(|source| HistoryError::Parse {
        path: path.to_path_buf(),
        source,
    })
}
