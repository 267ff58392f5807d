//! Exporters: where a build's result goes (`--output`, `-o`, `-t`, `--push`). One module per
//! exporter type, each parsing its own attributes once in `from_attrs`; the table of types is
//! [`exporter_from_attrs`], the only place a new type is added.
//!
//! The session makes the image (config + layers, inline-cache config fields) once, when any
//! exporter [`Exporter::makes_image`], and hands it to every exporter in a [`BuildResult`].

mod archive;
mod cacheonly;
pub mod daemon;
mod docker;
mod file;
mod image;
mod load;
mod local;
mod oci;
mod tar;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use kiln_oci::compression::Compression;
use kiln_oci::{Descriptor, Platform, RawManifest, RegistryClient};
use kiln_store::Store;
use kiln_worker::engine::{Rootfs, Worker, WorkerError};
use kiln_worker::image::Layer;
use kiln_worker::images::{self, StoredImage};

use crate::attest::{self, Annotation, AnnotationLevel, AttestationManifest, Predicates};
use crate::spec::SpecError;

pub use cacheonly::CacheonlyExporter;
pub use docker::DockerExporter;
pub use file::{write_file_atomic, ExportFile};
pub use image::ImageExporter;
pub use load::{outputs_with_load, refuse_manifest_list, LoadExporter};
pub use local::LocalExporter;
pub use oci::OciExporter;
pub use tar::TarExporter;

/// One destination of a build's result. Implementations are built from their flag attributes
/// by [`exporter_from_attrs`] and run by the session after the build succeeded, in flag order.
pub trait Exporter: Send + Sync {
    /// The exporter type as `--output type=` names it (`image`, `oci`, `local`, ...).
    fn kind(&self) -> &str;

    /// Whether this exporter needs the image (config + layers) made from the result: the
    /// session then makes it once, with the inline-cache fields, before any exporter runs.
    fn makes_image(&self) -> bool {
        false
    }

    /// The compression its layers should be made with, when it says (`compression=`): the
    /// first exporter that says decides for the whole build.
    fn layer_compression(&self) -> Option<Compression> {
        None
    }

    /// Image names whose registry this exporter reaches over plain HTTP
    /// (`registry.insecure=true`); the registry client is set up with them before the build.
    fn insecure_names(&self) -> &[String] {
        &[]
    }

    /// Checks, before any step runs, that the destination can take the result (`--load`: an
    /// image store answers), so that a build that could not be exported fails at once. Most
    /// exporters have nothing to check.
    fn check_destination(&self, _runtime: &tokio::runtime::Handle) -> Result<(), ExportError> {
        Ok(())
    }

    /// Where the last export put the result, in words, when that is worth telling the user
    /// (`--load`: which image store took it); shown by the build's progress.
    fn destination(&self) -> Option<String> {
        None
    }

    /// `force-compression=true`: every layer of the image, the base image's too, must be in
    /// [`Exporter::layer_compression`] (gzip when it says none), recompressed if need be.
    fn forces_compression(&self) -> bool {
        false
    }

    /// Whether this output can take a result of several platforms (an image index, or one
    /// directory per platform). `--load` cannot: the image store behind it takes one image
    /// per name, and the build is refused before any step runs.
    fn takes_several_platforms(&self) -> bool {
        true
    }

    /// The names the image is given (`name=`, `-t`), for the metadata file's `image.name`.
    fn image_names(&self) -> &[String] {
        &[]
    }

    /// Writes `result` to this exporter's destination.
    fn export(
        &self,
        cx: &ExportContext<'_>,
        result: &BuildResult<'_>,
    ) -> Result<ExportReport, ExportError>;
}

/// What an exporter may use besides the result: the state dir's store, the worker that built
/// the result (for snapshots and blobs), the registry client and the runtime to block on.
pub struct ExportContext<'a> {
    /// The content store and metadata of the state dir.
    pub store: &'a Store,
    /// The worker that solved the build: materializes snapshots, fetches lazily pulled blobs.
    pub worker: &'a Worker,
    /// The registry client (pushes), already configured for insecure registries.
    pub client: &'a RegistryClient,
    /// The runtime network work blocks on; exporters run on a thread outside it.
    pub runtime: &'a tokio::runtime::Handle,
    /// `SOURCE_DATE_EPOCH`, when set.
    pub source_date_epoch: Option<i64>,
}

/// How the image of a result is made: the target's config and layers, its `created` time and
/// extra config fields (an inline cache). Made by the session when an exporter makes images.
#[derive(Debug, Clone)]
pub struct ImageRecipe {
    /// The target stage's image config.
    pub config: kiln_oci::ImageConfig,
    /// The layers, bottom first (clamped to `SOURCE_DATE_EPOCH` when it is set).
    pub layers: Vec<Layer>,
    /// The image's `created` timestamp.
    pub created: String,
    /// Extra top-level config fields (the inline cache), never replacing a standard one.
    pub config_fields: BTreeMap<String, serde_json::Value>,
}

impl ImageRecipe {
    /// The recipe for `rootfs` with `config`: its layers clamped to `source_date_epoch` (so a
    /// cache hit's layers match a fresh run's) and its created time. `config_fields` are
    /// added with [`ImageRecipe::with_config_fields`] once the layers are known.
    pub fn for_result(
        worker: &Worker,
        rootfs: Option<&Rootfs>,
        config: &kiln_oci::ImageConfig,
        source_date_epoch: Option<i64>,
    ) -> Result<Self, ExportError> {
        let layers = match (rootfs, source_date_epoch) {
            (Some(fs), Some(epoch)) => worker.layers_for_epoch(fs, epoch)?,
            (Some(fs), None) => fs.layers.clone(),
            (None, _) => Vec::new(),
        };
        let base_created = rootfs
            .and_then(|r| r.image.as_ref())
            .and_then(|c| c.created.clone());
        let fallback = base_created.unwrap_or_else(|| {
            kiln_worker::image::created_timestamp(source_date_epoch.map(|s| s.max(0) as u64))
        });
        let created = kiln_worker::image::image_created(&layers, fallback);
        Ok(ImageRecipe {
            config: config.clone(),
            layers,
            created,
            config_fields: BTreeMap::new(),
        })
    }

    /// The same recipe with extra config fields (the inline cache).
    pub fn with_config_fields(mut self, fields: BTreeMap<String, serde_json::Value>) -> Self {
        self.config_fields = fields;
        self
    }
}

/// One platform's result of a build: its root filesystem and, when an exporter makes images,
/// how its image is made. A multi-platform build has one part per target platform, in the
/// order `--platform` gave them.
pub struct PlatformPart<'a> {
    /// The target platform this part was built for.
    pub platform: Platform,
    /// The target stage's root filesystem (`None` for an empty `FROM scratch` stage).
    pub rootfs: Option<&'a Rootfs>,
    /// How the image is made; `None` when no exporter makes images.
    pub recipe: Option<ImageRecipe>,
}

/// The result of a build as exporters see it: one [`PlatformPart`] per target platform and,
/// when any exporter makes an image, each part's image (stored once per media-type choice,
/// on first use).
pub struct BuildResult<'a> {
    /// The parts, in request order; never empty.
    parts: Vec<PlatformPart<'a>>,
    /// Images stored so far: (part, OCI media types, image).
    stored: Mutex<Vec<(usize, bool, StoredImage)>>,
    /// `--annotation` values, for every image output.
    annotations: Vec<Annotation>,
    /// The attestations' predicates of each part (one entry for all when they are shared).
    predicates: Vec<Predicates>,
    /// The image index the outputs made (several platforms, attestations or index
    /// annotations): the last one, and the last one of an output that names its image.
    index: Mutex<MadeIndex>,
}

/// The indexes outputs made, for [`BuildResult::index`].
#[derive(Default)]
struct MadeIndex {
    /// The last one.
    last: Option<Descriptor>,
    /// The last one made for image names (its statements name them, so it differs from an
    /// unnamed output's).
    named: Option<Descriptor>,
}

/// One platform's image as an output publishes it: the image (its manifest annotated as
/// asked), its platform and its attestation manifest, when attestations are attached.
#[derive(Debug, Clone)]
pub struct PublishedPart {
    /// The image; its manifest carries the manifest annotations.
    pub image: StoredImage,
    /// The platform of the image (from its config).
    pub platform: Platform,
    /// The attestation manifest and its blobs, when attestations are attached.
    pub attestation: Option<AttestationManifest>,
}

/// A result as an output publishes it: every platform's image and, when there are several
/// platforms or attestations or index annotations ask for one, the image index holding them
/// (with each one's attestation manifest). Every blob named here is in the content store.
#[derive(Debug, Clone)]
pub struct PublishedImage {
    /// The images, one per platform, in request order.
    pub parts: Vec<PublishedPart>,
    /// The index, when one is made.
    pub index: Option<RawManifest>,
    /// The annotations of the index's descriptor in an OCI layout (`index-descriptor`).
    pub index_descriptor_annotations: BTreeMap<String, String>,
}

impl PublishedImage {
    /// The descriptor of what the output names: the index when there is one, else the image
    /// manifest.
    pub fn top(&self) -> Descriptor {
        match &self.index {
            Some(i) => i.descriptor(),
            None => self.parts[0].image.manifest.descriptor(),
        }
    }

    /// The first platform's image (the only one of a single-platform result).
    pub fn image(&self) -> &StoredImage {
        &self.parts[0].image
    }

    /// The image an output reports as what it made: the only one, or `None` when the result
    /// has several platforms (the index then stands for them).
    pub fn single_image(&self) -> Option<StoredImage> {
        (self.parts.len() == 1).then(|| self.parts[0].image.clone())
    }
}

impl<'a> BuildResult<'a> {
    /// A result with no image: for exporters that only write the filesystem. One part, of
    /// the host's platform.
    pub fn new(rootfs: Option<&'a Rootfs>) -> Self {
        Self::for_platforms(vec![PlatformPart {
            platform: Platform::host(),
            rootfs,
            recipe: None,
        }])
    }

    /// A result whose image is made from `recipe`. One part, of the platform in the recipe's
    /// config.
    pub fn with_image(rootfs: Option<&'a Rootfs>, recipe: ImageRecipe) -> Self {
        let platform = recipe_platform(&recipe);
        Self::for_platforms(vec![PlatformPart {
            platform,
            rootfs,
            recipe: Some(recipe),
        }])
    }

    /// A result of one part per target platform, in request order (1..n parts; an empty
    /// list is taken as one empty part of the host's platform).
    pub fn for_platforms(mut parts: Vec<PlatformPart<'a>>) -> Self {
        if parts.is_empty() {
            parts.push(PlatformPart {
                platform: Platform::host(),
                rootfs: None,
                recipe: None,
            });
        }
        BuildResult {
            parts,
            stored: Mutex::new(Vec::new()),
            annotations: Vec::new(),
            predicates: vec![Predicates::default()],
            index: Mutex::new(MadeIndex::default()),
        }
    }

    /// The parts, one per platform, in request order: what the local and tar exporters walk.
    pub fn parts(&self) -> &[PlatformPart<'a>] {
        &self.parts
    }

    /// Whether the result has several platforms (`parts().len() > 1`).
    pub fn is_multi_platform(&self) -> bool {
        self.parts.len() > 1
    }

    /// The first platform's root filesystem (the only one of a single-platform result).
    pub fn rootfs(&self) -> Option<&'a Rootfs> {
        self.parts[0].rootfs
    }

    /// The same result with `--annotation` values and attestation predicates, which image
    /// outputs apply with [`BuildResult::publish`]; the predicates are every platform's.
    pub fn with_attachments(
        mut self,
        annotations: Vec<Annotation>,
        predicates: Predicates,
    ) -> Self {
        self.annotations = annotations;
        self.predicates = vec![predicates];
        self
    }

    /// The same result with each platform's own attestation predicates (one per part, in
    /// part order: the SBOM of each platform's root filesystem, the provenance naming each
    /// platform), replacing the shared ones of [`BuildResult::with_attachments`].
    pub fn with_platform_predicates(mut self, predicates: Vec<Predicates>) -> Self {
        if !predicates.is_empty() {
            self.predicates = predicates;
        }
        self
    }

    /// The predicates of part `i`.
    fn predicates_of(&self, i: usize) -> &Predicates {
        self.predicates
            .get(i)
            .unwrap_or_else(|| &self.predicates[0])
    }

    /// The image index the outputs made, if any, for the metadata file: the last one made
    /// for image names (what `image.name` points at), else the last one.
    pub fn index(&self) -> Option<Descriptor> {
        let made = self.index.lock().unwrap_or_else(|p| p.into_inner());
        made.named.clone().or_else(|| made.last.clone())
    }

    /// The result as an output publishes it: every platform's image with the manifest
    /// annotations of `--annotation` and of the output (`extra`) that apply to its platform,
    /// and an image index holding them when there are several platforms, or when `attach`
    /// and attestations were asked for, or index-level annotations were given. With
    /// attestations each image gets its attestation manifest in the index (after all the
    /// images, as BuildKit orders them). Several platforms without attestations or index
    /// annotations and `oci_media_types` false make a Docker manifest list of Docker
    /// manifests; otherwise an OCI index. Statements name the image `names`.
    pub fn publish(
        &self,
        store: &Store,
        oci_media_types: bool,
        names: &[String],
        extra: &[Annotation],
        attach: bool,
    ) -> Result<PublishedImage, ExportError> {
        let all: Vec<Annotation> = self.annotations.iter().chain(extra).cloned().collect();
        let n = self.parts.len();
        let mut firsts = Vec::with_capacity(n);
        for i in 0..n {
            let image = self.part_image(store, i, oci_media_types)?;
            let platform =
                image_platform(store, &image).unwrap_or_else(|| self.parts[i].platform.clone());
            firsts.push((image, platform));
        }
        let pick = |level, platform: &Platform| attest::annotations_for(&all, level, platform);
        // Index-level annotations: those for any platform of the result.
        let pick_index = |level| {
            let mut m = BTreeMap::new();
            for (_, p) in &firsts {
                m.extend(pick(level, p));
            }
            m
        };
        let index_annotations = pick_index(AnnotationLevel::Index);
        let index_descriptor_annotations = pick_index(AnnotationLevel::IndexDescriptor);
        let descriptor_annotations: Vec<_> = firsts
            .iter()
            .map(|(_, p)| pick(AnnotationLevel::ManifestDescriptor, p))
            .collect();
        let attaches = attach && (0..n).any(|i| !self.predicates_of(i).is_empty());
        // As BuildKit: attestations and index annotations turn OCI media types on (a Docker
        // manifest list has no place for them).
        let needs_oci = attaches
            || !index_annotations.is_empty()
            || descriptor_annotations.iter().any(|d| !d.is_empty());
        let wants_index = needs_oci || n > 1;
        let oci = oci_media_types || needs_oci;
        let mut parts = Vec::with_capacity(n);
        for (i, (first, platform)) in firsts.into_iter().enumerate() {
            let mut image = if oci != oci_media_types {
                self.part_image(store, i, oci)?
            } else {
                first
            };
            let manifest_annotations = pick(AnnotationLevel::Manifest, &platform);
            if !manifest_annotations.is_empty() {
                let annotated = attest::annotate_manifest(&image.manifest, &manifest_annotations)
                    .map_err(|e| ExportError::Image {
                    reference: names.join(","),
                    message: format!("annotating the manifest: {e}"),
                })?;
                store.content().put_bytes(&annotated.bytes)?;
                image.manifest = annotated;
            }
            let predicates = self.predicates_of(i);
            let attestation = (attaches && !predicates.is_empty()).then(|| {
                attest::attestation_manifest(
                    predicates,
                    &image.manifest.descriptor(),
                    names,
                    &platform,
                )
            });
            if let Some(a) = &attestation {
                for (_, bytes) in &a.blobs {
                    store.content().put_bytes(bytes)?;
                }
                store.content().put_bytes(&a.manifest.bytes)?;
            }
            parts.push(PublishedPart {
                image,
                platform,
                attestation,
            });
        }
        let index = if wants_index {
            let entries: Vec<attest::IndexEntry<'_>> = parts
                .iter()
                .zip(descriptor_annotations)
                .map(|(p, annotations)| attest::IndexEntry {
                    image: p.image.manifest.descriptor(),
                    platform: p.platform.clone(),
                    annotations,
                    attestation: p.attestation.as_ref().map(|a| &a.manifest),
                })
                .collect();
            let index = attest::index_of(&entries, !oci, index_annotations);
            store.content().put_bytes(&index.bytes)?;
            let mut made = self.index.lock().unwrap_or_else(|p| p.into_inner());
            made.last = Some(index.descriptor());
            if !names.is_empty() {
                made.named = Some(index.descriptor());
            }
            Some(index)
        } else {
            None
        };
        Ok(PublishedImage {
            parts,
            index,
            index_descriptor_annotations,
        })
    }

    /// The image of a single-platform result, with OCI media types or Docker's, stored in
    /// `store` the first time it is asked for. Fails with [`ExportError::MultiPlatform`] when
    /// the result has several platforms, and when the session made no recipe (no exporter
    /// said it makes images).
    pub fn image(&self, store: &Store, oci_media_types: bool) -> Result<StoredImage, ExportError> {
        if self.is_multi_platform() {
            return Err(ExportError::MultiPlatform {
                platforms: self
                    .parts
                    .iter()
                    .map(|p| attest::platform_string(&p.platform))
                    .collect(),
            });
        }
        self.part_image(store, 0, oci_media_types)
    }

    /// The image of part `i`, with OCI media types or Docker's, stored in `store` the first
    /// time it is asked for. Fails when that part has no recipe.
    pub fn part_image(
        &self,
        store: &Store,
        i: usize,
        oci_media_types: bool,
    ) -> Result<StoredImage, ExportError> {
        let recipe = self
            .parts
            .get(i)
            .and_then(|p| p.recipe.as_ref())
            .ok_or(ExportError::NoImage)?;
        let mut stored = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, img)) = stored
            .iter()
            .find(|(part, oci, _)| *part == i && *oci == oci_media_types)
        {
            return Ok(img.clone());
        }
        let img = images::store_image_with_fields(
            store,
            &recipe.config,
            &recipe.layers,
            &recipe.created,
            oci_media_types,
            &recipe.config_fields,
        )?;
        stored.push((i, oci_media_types, img.clone()));
        Ok(img)
    }
}

/// The platform a recipe's config names (`os`, `architecture`, `variant`); the host's when
/// it names none.
fn recipe_platform(recipe: &ImageRecipe) -> Platform {
    let c = &recipe.config;
    if c.os.is_empty() || c.architecture.is_empty() {
        return Platform::host();
    }
    config_platform(&c.os, &c.architecture, c.variant.as_deref())
}

/// The platform an image config names, exactly as it names it: an index entry's `platform`
/// is the config's own fields, never normalised (an `arm64` config without a variant stays
/// `linux/arm64`, not `linux/arm64/v8`).
fn config_platform(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
    Platform {
        architecture: architecture.to_owned(),
        os: os.to_owned(),
        os_version: None,
        os_features: Vec::new(),
        variant: variant.filter(|v| !v.is_empty()).map(str::to_owned),
        features: Vec::new(),
    }
}

/// The platform in `image`'s config (`os`, `architecture`, `variant`), when it can be read.
fn image_platform(store: &Store, image: &StoredImage) -> Option<Platform> {
    let path = store.content().blob_path(&image.config.digest);
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let field = |k: &str| config.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    Some(config_platform(
        &field("os")?,
        &field("architecture")?,
        field("variant").as_deref(),
    ))
}

/// The annotations among an output's attributes (`annotation[-TYPE][[PLATFORM]].KEY=V`).
pub(crate) fn annotation_attrs(a: &Attrs<'_>) -> Result<Vec<Annotation>, SpecError> {
    let mut out = Vec::new();
    for (k, v) in a.attrs {
        if let Some(ann) = attest::parse_annotation_attr(a.flag, k, v)? {
            out.push(ann);
        }
    }
    Ok(out)
}

/// What one exporter did.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The exporter's type.
    pub kind: String,
    /// The image it stored, tagged, wrote or pushed, if it made one.
    pub image: Option<StoredImage>,
}

/// An export that failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The worker or the store failed (materializing a snapshot, fetching a blob, storing).
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] kiln_store::StoreError),
    /// A file or directory of the export could not be written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// An image name was invalid or its push failed.
    #[error("image {reference}: {message}")]
    Image {
        /// The name(s) concerned.
        reference: String,
        /// What went wrong.
        message: String,
    },
    /// The OCI layout or Docker archive could not be written.
    #[error("internal: {0}")]
    Layout(#[from] kiln_oci::LayoutError),
    /// `--load` found no image store, or the store did not take the image.
    #[error(transparent)]
    Load(#[from] daemon::LoadError),
    /// An output that takes one image was given a result of several platforms.
    #[error(
        "this output takes one image but the build made {} platforms ({}); \
         use an output that holds an image index (type=image, registry or oci)",
        platforms.len(),
        platforms.join(", ")
    )]
    MultiPlatform {
        /// The result's platforms (`linux/amd64`, ...).
        platforms: Vec<String>,
    },
    /// `platform-split=false`: two platforms' trees have a file at the same path.
    #[error(
        "cannot overwrite {} from {first} with {second} when platform-split=false; \
         drop platform-split=false to write one directory per platform",
        path.display()
    )]
    PlatformClash {
        /// The path, relative to the output's root.
        path: PathBuf,
        /// The platform whose file is there first.
        first: String,
        /// The platform that has a file there too.
        second: String,
    },
    /// An exporter asked for the image but the session made none.
    #[error("internal: an exporter needs the image but none was made")]
    NoImage,
}

pub(crate) fn io_at(
    what: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> ExportError {
    let path = path.to_owned();
    move |source| ExportError::Io { what, path, source }
}

/// The exporter of type `kind` with attributes `attrs` (without `type`), as `flag` gave
/// them. The table of exporter types: the only place a new type is added.
pub fn exporter_from_attrs(
    kind: &str,
    attrs: &BTreeMap<String, String>,
    flag: &str,
) -> Result<Box<dyn Exporter>, SpecError> {
    let a = Attrs { kind, attrs, flag };
    Ok(match kind {
        "image" | "registry" => Box::new(ImageExporter::from_attrs(&a)?),
        "oci" => Box::new(OciExporter::from_attrs(&a)?),
        // buildx's `--load` is `type=docker` without a file: into the local image store.
        "docker" if !attrs.contains_key("dest") => Box::new(LoadExporter::from_attrs(&a)?),
        "docker" => Box::new(DockerExporter::from_attrs(&a)?),
        "local" => Box::new(LocalExporter::from_attrs(&a)?),
        "tar" => Box::new(TarExporter::from_attrs(&a)?),
        "cacheonly" => Box::new(CacheonlyExporter::from_attrs(&a)?),
        _ => {
            return Err(a.error(format!(
                "unknown output type `{kind}`; expected image, registry, oci, docker, local, tar or cacheonly"
            )))
        }
    })
}

/// Splits one `--output` value into its type and attributes: `type=KIND,k=v,...` (type
/// `local` when absent), or buildx's shorthands `DIR` (a local directory) and `-` (a tar on
/// standard output).
pub fn output_attrs(
    flag: &str,
    value: &str,
) -> Result<(String, BTreeMap<String, String>), SpecError> {
    let (kind, attrs) = crate::spec::parse_attrs(flag, value)?;
    let kind = if kind.is_empty() {
        "local".to_owned()
    } else {
        kind
    };
    Ok((kind, attrs))
}

/// Parses one `--output` value into its exporter; errors name the whole value.
pub fn parse_output(flag: &str, value: &str) -> Result<Box<dyn Exporter>, SpecError> {
    OutputRequest::from_flag(flag, value, &[], false)?.exporter()
}

/// One `--output` as the flags gave it, with buildx's shorthands, `-t` and `--push` applied
/// to its attributes: what [`exporter_from_attrs`] is called with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRequest {
    /// The flag as spelled (`--output`, `-o`, or `--tag` for the output `-t` makes).
    pub flag: String,
    /// The value as the user gave it (errors name it whole).
    pub value: String,
    /// The exporter type.
    pub kind: String,
    /// Its attributes, without `type`.
    pub attrs: BTreeMap<String, String>,
}

impl OutputRequest {
    /// Parses one `--output` value and applies buildx's `-t` tags (the name of an image,
    /// oci or docker output that gives none) and `--push` (image outputs push) to it.
    pub fn from_flag(
        flag: &str,
        value: &str,
        tags: &[String],
        push: bool,
    ) -> Result<Self, SpecError> {
        let (kind, mut attrs) = output_attrs(flag, value)?;
        // As buildx, `-t` names the image of the image, oci and docker outputs (`--load`).
        if matches!(kind.as_str(), "image" | "registry" | "oci" | "docker")
            && split_list(attrs.get("name").map_or("", String::as_str)).is_empty()
        {
            attrs.remove("name");
            if !tags.is_empty() {
                attrs.insert("name".into(), tags.join(","));
            }
        }
        // A `push=` value that does not parse keeps its own error.
        if (kind == "image" || kind == "registry")
            && push
            && attrs.get("push").is_none_or(|v| bool_value(v).is_some())
        {
            attrs.insert("push".into(), "true".into());
        }
        Ok(OutputRequest {
            flag: flag.to_owned(),
            value: value.to_owned(),
            kind,
            attrs,
        })
    }

    /// The output buildx's `-t` or `--push` make when no `--output` is given: `type=registry`
    /// when pushing, `type=image` otherwise; `None` with neither.
    pub fn from_tags(tags: &[String], push: bool) -> Option<Self> {
        if tags.is_empty() && !push {
            return None;
        }
        let kind = if push { "registry" } else { "image" };
        let mut attrs = BTreeMap::new();
        if !tags.is_empty() {
            attrs.insert("name".to_owned(), tags.join(","));
        }
        Some(OutputRequest {
            flag: "--tag".to_owned(),
            value: tags.join(","),
            kind: kind.to_owned(),
            attrs,
        })
    }

    /// Whether this is an image output that pushes but names no image.
    fn pushes_unnamed(&self) -> bool {
        let image = self.kind == "image" || self.kind == "registry";
        let pushes = self.kind == "registry"
            || self.attrs.get("push").and_then(|v| bool_value(v)) == Some(true);
        image && pushes && !self.attrs.contains_key("name")
    }

    /// The exporter this output selects; errors name the whole value.
    pub fn exporter(&self) -> Result<Box<dyn Exporter>, SpecError> {
        exporter_from_attrs(&self.kind, &self.attrs, &self.flag)
            .map_err(|e| SpecError::new(&self.flag, &self.value, e.reason))
    }
}

/// The exporters of a build from its flags: every `--output`/`-o` value, then buildx's
/// `-t/--tag` names and `--push` (see [`OutputRequest::from_flag`] and
/// [`OutputRequest::from_tags`]). Errors name the flag (`--output`, `--tag`, `--push`).
pub fn exporters_from_flags(
    outputs: &[String],
    tags: &[String],
    push: bool,
) -> Result<Vec<Box<dyn Exporter>>, SpecError> {
    let mut requests = Vec::new();
    let mut exporters = Vec::new();
    for value in outputs {
        let r = OutputRequest::from_flag("--output", value, tags, push)?;
        exporters.push(r.exporter()?);
        requests.push(r);
    }
    for t in tags {
        if t.is_empty() || t.contains(char::is_whitespace) || t.contains(',') {
            return Err(SpecError::new(
                "--tag",
                t,
                "expected an image reference like reg.example/app:tag",
            ));
        }
    }
    if requests.is_empty() {
        if let Some(r) = OutputRequest::from_tags(tags, push) {
            exporters.push(r.exporter()?);
            requests.push(r);
        }
    }
    if push && requests.iter().any(OutputRequest::pushes_unnamed) {
        return Err(SpecError::new(
            "--push",
            "",
            "nothing to push: give an image name with -t/--tag",
        ));
    }
    Ok(exporters)
}

/// One exporter's attributes while its `from_attrs` reads them.
pub struct Attrs<'a> {
    kind: &'a str,
    attrs: &'a BTreeMap<String, String>,
    flag: &'a str,
}

impl<'a> Attrs<'a> {
    /// Attributes `attrs` of an exporter of type `kind`, given with `flag`.
    pub fn new(kind: &'a str, attrs: &'a BTreeMap<String, String>, flag: &'a str) -> Self {
        Attrs { kind, attrs, flag }
    }

    /// The exporter type these attributes were given for.
    pub fn kind(&self) -> &str {
        self.kind
    }

    /// An error about these attributes (its value is the attributes written back as a flag
    /// value; [`parse_output`] replaces it with the user's own text).
    pub fn error(&self, reason: impl Into<String>) -> SpecError {
        let mut value = format!("type={}", self.kind);
        for (k, v) in self.attrs {
            value.push_str(&format!(",{k}={v}"));
        }
        SpecError::new(self.flag, &value, reason)
    }

    /// Visits every attribute in key order after checking it is one of `known` (or an
    /// `annotation...` key, when `annotations`): the first bad key or value is the error.
    pub fn read(
        &self,
        known: &[&str],
        annotations: bool,
        mut each: impl FnMut(&str, &str) -> Result<(), SpecError>,
    ) -> Result<(), SpecError> {
        for (k, v) in self.attrs {
            if !(known.contains(&k.as_str()) || (annotations && k.starts_with("annotation"))) {
                return Err(self.error(format!(
                    "unknown key `{k}` for type={}; known: {}",
                    self.kind,
                    known.join(", ")
                )));
            }
            each(k, v)?;
        }
        Ok(())
    }

    /// `key=v` as a boolean (`true`/`1`/empty or `false`/`0`).
    pub fn bool(&self, key: &str, v: &str) -> Result<bool, SpecError> {
        bool_value(v).ok_or_else(|| self.error(format!("{key}=`{v}`: expected true or false")))
    }

    /// `compression=v`.
    pub fn compression(&self, v: &str) -> Result<Compression, SpecError> {
        match v {
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            "uncompressed" => Ok(Compression::Uncompressed),
            _ => Err(self.error(format!(
                "compression `{v}`: expected gzip, zstd or uncompressed"
            ))),
        }
    }

    /// `compression-level=v` (0 to 22).
    pub fn compression_level(&self, v: &str) -> Result<u32, SpecError> {
        v.parse::<u32>()
            .ok()
            .filter(|l| *l <= 22)
            .ok_or_else(|| self.error(format!("compression-level `{v}`: expected 0..=22")))
    }

    /// `dest=v`, which must not be empty.
    pub fn dest(&self, v: &str) -> Result<PathBuf, SpecError> {
        if v.is_empty() {
            return Err(self.error("dest= is empty"));
        }
        Ok(PathBuf::from(v))
    }

    /// The error of an exporter that writes a file or directory but was given no `dest=`.
    pub fn missing_dest(&self) -> SpecError {
        self.error(format!("type={} needs dest=PATH", self.kind))
    }

    /// The attributes of an exporter that writes the target's files (`local`, `tar`): a
    /// required `dest=`, and `platform-split=` (a boolean; unset, a multi-platform result is
    /// split into one directory per platform).
    pub fn rootfs_dest(&self) -> Result<(PathBuf, Option<bool>), SpecError> {
        let mut dest = None;
        let mut split = None;
        self.read(&["dest", "platform-split"], false, |k, v| {
            match k {
                "dest" => dest = Some(self.dest(v)?),
                _ => split = Some(self.bool(k, v)?),
            }
            Ok(())
        })?;
        Ok((dest.ok_or_else(|| self.missing_dest())?, split))
    }
}

/// The directory a platform's files go to in a split multi-platform `local` or `tar`
/// output, as BuildKit names it: the platform with `/` replaced by `_` (`linux_amd64`,
/// `linux_arm_v7`).
pub fn platform_dir_name(platform: &Platform) -> String {
    attest::platform_string(platform).replace('/', "_")
}

/// Where each part's files go in a `local` or `tar` output: its own directory
/// ([`platform_dir_name`]) when the result has several platforms and `split` (given, or
/// unset) says so, else the output's root (`None`).
pub(crate) fn part_dirs(result: &BuildResult<'_>, split: Option<bool>) -> Vec<Option<String>> {
    let split = split.unwrap_or(true) && result.is_multi_platform();
    result
        .parts()
        .iter()
        .map(|p| split.then(|| platform_dir_name(&p.platform)))
        .collect()
}

/// Checks that the parts' files can be merged into one tree (`platform-split=false`):
/// a path that is not a directory in two platforms' trees fails, as BuildKit refuses to
/// overwrite one platform's file with another's.
pub(crate) fn check_no_clash(worker: &Worker, result: &BuildResult<'_>) -> Result<(), ExportError> {
    let mut seen: BTreeMap<PathBuf, String> = BTreeMap::new();
    for part in result.parts() {
        let name = attest::platform_string(&part.platform);
        let paths = with_rootfs_view(worker, part.rootfs, |root| {
            let mut out = Vec::new();
            for entry in walkdir::WalkDir::new(root).min_depth(1) {
                let entry = entry.map_err(|e| {
                    let path = e.path().unwrap_or(root).to_owned();
                    io_at("reading", &path)(e.into())
                })?;
                if !entry.file_type().is_dir() {
                    if let Ok(rel) = entry.path().strip_prefix(root) {
                        out.push(rel.to_owned());
                    }
                }
            }
            Ok(out)
        })?;
        for path in paths {
            if let Some(first) = seen.get(&path) {
                return Err(ExportError::PlatformClash {
                    path,
                    first: first.clone(),
                    second: name,
                });
            }
            seen.insert(path, name.clone());
        }
    }
    Ok(())
}

fn bool_value(v: &str) -> Option<bool> {
    match v {
        "" | "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

/// A comma-separated list, trimmed, without empty items (`name=a,b`).
pub(crate) fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

pub(crate) fn parse_names(names: &[String]) -> Result<Vec<kiln_oci::Reference>, ExportError> {
    names
        .iter()
        .map(|n| {
            n.parse::<kiln_oci::Reference>()
                .map_err(|e| ExportError::Image {
                    reference: n.clone(),
                    message: e.to_string(),
                })
        })
        .collect()
}

/// The packages kiln's SBOM scanners find in `rootfs` (see [`crate::attest::sbom`]).
pub(crate) fn scan_rootfs(
    worker: &Worker,
    rootfs: Option<&Rootfs>,
) -> Result<Vec<crate::attest::sbom::Package>, ExportError> {
    if let Some(r) = rootfs {
        worker.fetch_blobs(r)?;
    }
    with_rootfs_view(worker, rootfs, |root| Ok(crate::attest::sbom::scan(root)))
}

/// Runs `f` on a read-only view of `rootfs` (an empty directory for an empty one).
pub(crate) fn with_rootfs_view<T>(
    worker: &Worker,
    rootfs: Option<&Rootfs>,
    f: impl FnOnce(&std::path::Path) -> Result<T, ExportError>,
) -> Result<T, ExportError> {
    let store = worker.store();
    let snap = match rootfs {
        Some(r) => worker.materialize(r)?,
        None => None,
    };
    let view = match snap {
        Some(s) => store.view(s, None)?,
        None => store.prepare(None, None)?,
    };
    let r = f(&view.rootfs);
    let _ = store.remove(view.id);
    r
}
