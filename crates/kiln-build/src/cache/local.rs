//! `type=local`: the cache as an OCI layout directory (`src=DIR` to import, `dest=DIR` to
//! export), its manifest under a `tag` (default `latest`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_worker::build::SolvedBuild;
use kiln_worker::engine::BlobSource;
use kiln_worker::remote::LayoutBlobs;

use super::{
    check_keys, flag_error, local_blob, CacheBackend, CacheContext, CacheError, CacheExportSummary,
    Direction, ExportScope, ImportedCache, ImportedCacheRef,
};

/// A cache in a local OCI layout directory (`type=local`).
#[derive(Debug, Clone)]
pub struct LocalCache {
    dir: PathBuf,
    tag: String,
    scope: ExportScope,
}

impl LocalCache {
    /// What an export through this backend writes (`mode`, cache mounts).
    pub fn scope(&self) -> ExportScope {
        self.scope
    }

    /// Parses the attributes of a `type=local` cache flag: `src=DIR` for an import,
    /// `dest=DIR` for an export; an import may name the `tag` (default `latest`) it reads.
    pub fn from_attrs(attrs: &BTreeMap<String, String>, flag: &str) -> Result<Self, CacheError> {
        let direction = Direction::of_flag(flag);
        let (dir_key, allowed): (&str, &[&str]) = match direction {
            Direction::Import => ("src", &["src", "tag", "digest"]),
            Direction::Export => ("dest", &["dest"]),
        };
        check_keys(attrs, "local", flag, direction, allowed)?;
        let dir = attrs.get(dir_key).ok_or_else(|| {
            flag_error(
                flag,
                "type=local",
                format!("type=local needs {dir_key}=DIR"),
            )
        })?;
        Ok(LocalCache {
            dir: PathBuf::from(dir),
            tag: attrs.get("tag").cloned().unwrap_or_else(|| "latest".into()),
            scope: ExportScope::from_attrs(attrs, flag)?,
        })
    }
}

#[async_trait]
impl CacheBackend for LocalCache {
    fn name(&self) -> String {
        self.dir.display().to_string()
    }

    async fn import(&self, cx: &CacheContext) -> Result<Option<Arc<ImportedCache>>, CacheError> {
        match kiln_cache::import_local(&self.dir, &self.tag)? {
            Some((graph, _)) => {
                let source: Arc<dyn BlobSource> = Arc::new(LayoutBlobs::new(self.dir.clone()));
                Ok(Some(cx.imported(graph, source)))
            }
            None => {
                cx.warn(&format!(
                    "no cache in {}; building without it",
                    self.dir.display()
                ));
                Ok(None)
            }
        }
    }

    async fn export(
        &self,
        cx: &CacheContext,
        build: &SolvedBuild,
        _imported: &[ImportedCacheRef],
    ) -> Result<CacheExportSummary, CacheError> {
        let graph = self.scope.records(cx, build).await?;
        let store = cx.store.clone();
        let blob_file: Box<dyn Fn(&kiln_oci::Digest) -> Option<PathBuf> + Send + Sync> =
            Box::new(move |d| local_blob(&store, d));
        let report = kiln_cache::export_local(&self.dir, &self.tag, &graph, &*blob_file)?;
        Ok(CacheExportSummary {
            records: report.records,
            blobs: report.blobs,
            expired: 0,
            description: format!(
                "{} records, {} blobs to {}",
                report.records,
                report.blobs,
                self.dir.display()
            ),
        })
    }
}
