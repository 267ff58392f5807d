//! `--load` (buildx's shorthand for `--output type=docker`) and `type=docker` without
//! `dest=`: the image goes into the local image store a user runs containers from — the
//! Docker daemon, else podman's store (see [`ImageStore::find`]) — streamed as the same
//! Docker archive `type=docker,dest=FILE` writes.

use std::sync::OnceLock;

use kiln_oci::compression::Compression;

use super::archive::TarballSettings;
use super::daemon::{ImageStore, LoadError, Loaded, StoreEnv};
use super::{parse_names, Attrs, BuildResult, ExportContext, ExportError};
use super::{ExportReport, Exporter};
use crate::spec::SpecError;

/// Loads the image into the local Docker daemon or podman store (Docker media types unless
/// `oci-mediatypes=true`), tagged with its `name=` (`-t`) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadExporter {
    /// The archive's settings (names, media types, compression); `dest` is empty.
    pub settings: TarballSettings,
    /// `context=`: the docker CLI context to load into, instead of the current one.
    pub context: Option<String>,
    /// The store found before the build ([`Exporter::check_destination`]).
    store: OnceLock<ImageStore>,
    /// What the store said it loaded, once the export ran.
    loaded: OnceLock<Loaded>,
}

impl LoadExporter {
    /// Reads `type=docker` attributes given without `dest=`.
    pub fn from_attrs(a: &Attrs<'_>) -> Result<Self, SpecError> {
        // `context=` is this exporter's own; the rest are the archive's.
        let mut rest = a.attrs.clone();
        let context = rest.remove("context");
        if context.as_deref() == Some("") {
            return Err(a.error("context= is empty; name a docker context"));
        }
        let archive = Attrs::new(a.kind, &rest, a.flag);
        let (settings, dest) = TarballSettings::read(&archive)?;
        if dest.is_some() {
            return Err(a.error("type=docker with dest= writes a file; --load takes no dest"));
        }
        Ok(LoadExporter {
            settings,
            context,
            store: OnceLock::new(),
            loaded: OnceLock::new(),
        })
    }

    /// The store this exporter loads into, found from `env` (and its `context=`).
    pub fn find_store(
        &self,
        env: StoreEnv,
        runtime: &tokio::runtime::Handle,
    ) -> Result<ImageStore, LoadError> {
        let env = match &self.context {
            Some(name) => env.with_docker_context(name),
            None => env,
        };
        ImageStore::find(&env, runtime)
    }

    /// The store of this process's environment, found once (before the build, when the
    /// session checks destinations).
    fn store(&self, runtime: &tokio::runtime::Handle) -> Result<&ImageStore, LoadError> {
        if let Some(found) = self.store.get() {
            return Ok(found);
        }
        let found = self.find_store(StoreEnv::from_process(), runtime)?;
        Ok(self.store.get_or_init(|| found))
    }

    /// Loads `result`'s image into `store`: what the store said it loaded, and the image.
    pub fn load_into(
        &self,
        store: &ImageStore,
        cx: &ExportContext<'_>,
        result: &BuildResult<'_>,
    ) -> Result<(Loaded, kiln_worker::images::StoredImage), ExportError> {
        let image = self.settings.image(cx, result, false)?;
        let refs = parse_names(&self.settings.names)?;
        let content = cx.store.content();
        let manifest = &image.manifest;
        let loaded = store.load(cx.runtime, |out| {
            kiln_oci::write_docker_archive(out, manifest, &refs, &|d| content.blob_path(d))
        })?;
        Ok((loaded, image))
    }
}

/// The `--output` values of a build given buildx's `--load`: `type=docker` added unless an
/// output already loads (`type=docker` without `dest`). With `--push` and no output of its
/// own, the push keeps its output (`type=registry`, named by `-t`) beside the load, as
/// buildx pushes and loads in one build.
pub fn outputs_with_load(outputs: &[String], push: bool) -> Vec<String> {
    let loads = |v: &String| {
        super::output_attrs("--output", v)
            .is_ok_and(|(kind, attrs)| kind == "docker" && !attrs.contains_key("dest"))
    };
    let mut all = outputs.to_vec();
    if push && outputs.is_empty() {
        all.push("type=registry".to_owned());
    }
    if !outputs.iter().any(loads) {
        all.push("type=docker".to_owned());
    }
    all
}

/// Refuses a multi-platform build with an output that takes one image (`--load`, with
/// buildx's message): the image store behind it holds one image per name. A Docker archive
/// file (`type=docker,dest=`) holds the index, as an OCI layout does. The one place this is
/// checked.
pub fn refuse_manifest_list(
    exporters: &[Box<dyn Exporter>],
    platforms: usize,
) -> Result<(), LoadError> {
    if platforms > 1 && exporters.iter().any(|e| !e.takes_several_platforms()) {
        return Err(LoadError::ManifestList { platforms });
    }
    Ok(())
}

impl Exporter for LoadExporter {
    fn kind(&self) -> &str {
        "docker"
    }

    fn image_names(&self) -> &[String] {
        &self.settings.names
    }

    fn forces_compression(&self) -> bool {
        self.settings.force_compression
    }

    fn makes_image(&self) -> bool {
        true
    }

    fn layer_compression(&self) -> Option<Compression> {
        self.settings.compression
    }

    fn takes_several_platforms(&self) -> bool {
        false
    }

    fn check_destination(&self, runtime: &tokio::runtime::Handle) -> Result<(), ExportError> {
        self.store(runtime)?;
        Ok(())
    }

    fn destination(&self) -> Option<String> {
        let store = self.store.get()?;
        // The store's own words (`Loaded image: NAME`, or the id of an unnamed image).
        let names = match self.loaded.get() {
            Some(l) if !l.images.is_empty() => &l.images,
            _ => &self.settings.names,
        };
        Some(match names.as_slice() {
            [] => format!("image loaded into {store}"),
            names => format!("image loaded into {store} as {}", names.join(", ")),
        })
    }

    fn export(
        &self,
        cx: &ExportContext<'_>,
        result: &BuildResult<'_>,
    ) -> Result<ExportReport, ExportError> {
        let store = self.store(cx.runtime)?;
        let (loaded, image) = self.load_into(store, cx, result)?;
        let _ = self.loaded.set(loaded);
        Ok(ExportReport {
            kind: self.kind().to_owned(),
            image: Some(image),
        })
    }
}
