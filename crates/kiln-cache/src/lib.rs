//! Remote layer cache: the format of a cache ref (one OCI image manifest whose config blob is
//! the cache graph and whose layers are the blobs), and its export to and import from
//! registries and local OCI layouts. See `docs/cache-format.md`.

mod format;
mod inline;
mod transfer;

pub use format::{
    parse_duration, CacheFormatError, CacheGraph, CacheLayer, RetentionPolicy, ARTIFACT_TYPE,
    CONFIG_MEDIA_TYPE, FORMAT_VERSION, MIN_MERGED_RECORDS,
};
pub use inline::{
    graph_from_image, import_inline, InlineCache, InlineCacheError, INLINE_CONFIG_KEY,
    INLINE_VERSION,
};
pub use transfer::{
    export_local, export_registry, import_local, import_registry, ExportReport, TransferError,
};
