//! `--output type=cacheonly`: nothing is exported; the build only fills the cache.

use super::{Attrs, BuildResult, ExportContext, ExportError, ExportReport, Exporter};
use crate::spec::SpecError;

/// Exports nothing: the build runs for its cache (and `--export-cache`) alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheonlyExporter;

impl CacheonlyExporter {
    /// Reads `type=cacheonly` attributes: only annotations, which it ignores.
    pub fn from_attrs(a: &Attrs<'_>) -> Result<Self, SpecError> {
        a.read(&[], true, |_, _| Ok(()))?;
        Ok(CacheonlyExporter)
    }
}

impl Exporter for CacheonlyExporter {
    fn kind(&self) -> &str {
        "cacheonly"
    }

    fn export(
        &self,
        _cx: &ExportContext<'_>,
        _result: &BuildResult<'_>,
    ) -> Result<ExportReport, ExportError> {
        Ok(ExportReport {
            kind: self.kind().to_owned(),
            image: None,
        })
    }
}
