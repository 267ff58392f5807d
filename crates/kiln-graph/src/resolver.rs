//! How the frontend learns about base images: the solver implements [`ImageConfigResolver`]
//! (pulling the manifest and config), tests use fixed configs.

use crate::graph::ImageConfig;
use crate::platform::Platform;

/// A base image's config and the digest it resolved to: what the frontend needs of an image
/// (the registry client's [`kiln_oci::ResolvedImage`] also carries the manifest bytes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvedConfig {
    /// Manifest digest (`sha256:...`), if known; part of the image source's cache key.
    pub digest: Option<String>,
    /// The image's config as stored (ENV, WORKDIR, USER, ONBUILD, SHELL, history...).
    pub config: ImageConfig,
}

/// Why an image could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot resolve image {reference} for {platform}: {reason}")]
pub struct ResolveError {
    /// The normalised image reference.
    pub reference: String,
    /// The requested platform (boxed: it is large, and this error travels in `Result`s).
    pub platform: Box<Platform>,
    /// What went wrong.
    pub reason: String,
}

/// Looks up base-image configs during lowering.
pub trait ImageConfigResolver {
    /// Returns the config and manifest digest of `reference` (normalised, e.g.
    /// `docker.io/library/busybox:latest`) for `platform`.
    fn resolve_image_config(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<ResolvedConfig, ResolveError>;
}

/// A resolver that knows nothing: every image has an empty config and no digest. Enough for
/// subrequests (`--call targets`, `--dry-run`), which do not need base-image contents.
#[derive(Debug, Clone, Copy, Default)]
pub struct OfflineResolver;

impl ImageConfigResolver for OfflineResolver {
    fn resolve_image_config(
        &self,
        _: &str,
        platform: &Platform,
    ) -> Result<ResolvedConfig, ResolveError> {
        Ok(ResolvedConfig {
            digest: None,
            config: ImageConfig {
                os: platform.os.clone(),
                architecture: platform.architecture.clone(),
                variant: platform.variant.clone(),
                ..ImageConfig::default()
            },
        })
    }
}
