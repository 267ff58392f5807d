//! Attestations and annotations of the images a build makes.
//!
//! Attestations (`--attest`, `--provenance`, `--sbom`, buildctl's `--opt attest:KIND=`) are
//! in-toto statements stored as BuildKit stores them: the image is pushed as an OCI image
//! index holding the image manifest and, for it, one attestation manifest (platform
//! `unknown/unknown`, annotations `vnd.docker.reference.type=attestation-manifest` and
//! `vnd.docker.reference.digest=<image manifest digest>`) whose layers are the statements
//! (`application/vnd.in-toto+json`, each annotated with its `in-toto.io/predicate-type`).
//! [`provenance`] writes the SLSA provenance predicate, [`sbom`] the SPDX document of the
//! image's packages, read by kiln's own scanners.
//!
//! Annotations (`--annotation`, and the `annotation*.KEY=V` attributes of image outputs) go
//! on the image manifest, its descriptor in the index, the index, or the OCI layout's
//! descriptor of the index, optionally only for one platform.

pub mod provenance;
pub mod sbom;

use std::collections::BTreeMap;

use kiln_oci::{Descriptor, ImageIndex, ImageManifest, Platform, RawManifest};
use serde_json::{json, Value};

use crate::spec::{parse_attrs, SpecError};

/// The media type of an in-toto statement layer.
pub const IN_TOTO_MEDIA_TYPE: &str = "application/vnd.in-toto+json";
/// The layer annotation naming a statement's predicate type.
pub const PREDICATE_TYPE_ANNOTATION: &str = "in-toto.io/predicate-type";
/// The index-entry annotation naming what kind of reference an entry is.
pub const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";
/// The index-entry annotation naming the manifest an attestation manifest is about.
pub const REFERENCE_DIGEST_ANNOTATION: &str = "vnd.docker.reference.digest";
/// The value of [`REFERENCE_TYPE_ANNOTATION`] for attestation manifests.
pub const ATTESTATION_MANIFEST: &str = "attestation-manifest";
/// The in-toto statement type kiln writes (the one BuildKit writes).
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v0.1";

/// How much a provenance attestation records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvenanceMode {
    /// Builder, frontend, target, materials, platform, times; build arg values left out.
    Min,
    /// Also the build args' values and every step of the build (`buildConfig`).
    Max,
}

/// `--attest type=provenance,...`: a SLSA provenance v0.2 statement is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenanceRequest {
    /// `mode=min|max`.
    pub mode: ProvenanceMode,
    /// `builder-id=`: the predicate's `builder.id` (e.g. the CI run's URL).
    pub builder_id: Option<String>,
}

/// `--attest type=sbom,...`: an SPDX document of the image's packages is attached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SbomRequest {}

/// The attestations a build attaches to the images it pushes or writes as OCI layouts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttestRequest {
    /// The provenance statement, when asked (or by buildx's default on push).
    pub provenance: Option<ProvenanceRequest>,
    /// The SBOM statement, when asked.
    pub sbom: Option<SbomRequest>,
    /// Things said about the flags that do not stop the build (an SBOM `generator=`).
    pub warnings: Vec<String>,
}

impl AttestRequest {
    /// Whether nothing is attached.
    pub fn is_empty(&self) -> bool {
        self.provenance.is_none() && self.sbom.is_none()
    }
}

/// The attestation flags as the command line gave them, in both spellings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttestFlags {
    /// buildx `--attest type=provenance|sbom,...` (repeatable).
    pub attest: Vec<String>,
    /// buildx `--provenance true|false|mode=...`.
    pub provenance: Option<String>,
    /// buildx `--sbom true|false|generator=...`.
    pub sbom: Option<String>,
    /// buildctl `--opt attest:KIND=VALUE`, as the whole `attest:KIND=VALUE` text.
    pub opts: Vec<String>,
    /// Whether buildx's default (a `mode=min` provenance) applies: the build pushes with
    /// buildx's spelling (`--push`, `--output type=registry`). Turned off by
    /// `BUILDX_NO_DEFAULT_ATTESTATIONS` or by any `--provenance`/`--attest type=provenance`.
    pub default_provenance: bool,
}

impl AttestFlags {
    /// Reads the flags: buildctl's `--opt attest:`, then `--attest`, then `--provenance` and
    /// `--sbom` (a later one of the same type wins). Errors name the flag and its value.
    pub fn parse(&self) -> Result<AttestRequest, SpecError> {
        let mut req = AttestRequest::default();
        let mut provenance_given = false;
        for o in &self.opts {
            let rest = o.strip_prefix("attest:").unwrap_or(o);
            let (kind, value) = rest.split_once('=').unwrap_or((rest, ""));
            let attrs = shorthand_attrs("--opt", o, value)?;
            provenance_given |= kind == "provenance";
            apply_attest(&mut req, "--opt", o, kind, &attrs)?;
        }
        for v in &self.attest {
            let (kind, attrs) = parse_attrs("--attest", v)?;
            if kind.is_empty() {
                return Err(SpecError::new(
                    "--attest",
                    v,
                    "expected type=provenance or type=sbom",
                ));
            }
            provenance_given |= kind == "provenance";
            apply_attest(&mut req, "--attest", v, &kind, &attrs)?;
        }
        if let Some(v) = &self.provenance {
            let attrs = shorthand_attrs("--provenance", v, v)?;
            provenance_given = true;
            apply_attest(&mut req, "--provenance", v, "provenance", &attrs)?;
        }
        if let Some(v) = &self.sbom {
            let attrs = shorthand_attrs("--sbom", v, v)?;
            apply_attest(&mut req, "--sbom", v, "sbom", &attrs)?;
        }
        if !provenance_given && self.default_provenance && !no_default_attestations() {
            req.provenance = Some(ProvenanceRequest {
                mode: ProvenanceMode::Min,
                builder_id: None,
            });
        }
        Ok(req)
    }
}

/// `BUILDX_NO_DEFAULT_ATTESTATIONS` set to a true value.
fn no_default_attestations() -> bool {
    std::env::var("BUILDX_NO_DEFAULT_ATTESTATIONS")
        .ok()
        .and_then(|v| bool_value(&v))
        .unwrap_or(false)
}

fn bool_value(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "" | "true" | "1" | "t" => Some(true),
        "false" | "0" | "f" => Some(false),
        _ => None,
    }
}

/// The attributes of a shorthand value (`--provenance`, `--sbom`, `--opt attest:KIND=`):
/// a boolean (`false` turns it off) or `key=value,...`.
fn shorthand_attrs(
    flag: &str,
    whole: &str,
    value: &str,
) -> Result<BTreeMap<String, String>, SpecError> {
    let mut attrs = BTreeMap::new();
    if let Some(b) = bool_value(value) {
        attrs.insert("disabled".to_owned(), (!b).to_string());
        return Ok(attrs);
    }
    for f in value.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let (k, v) = f.split_once('=').ok_or_else(|| {
            SpecError::new(
                flag,
                whole,
                format!("`{f}` is not key=value; expected true, false or key=value,..."),
            )
        })?;
        attrs.insert(k.trim().to_owned(), v.to_owned());
    }
    Ok(attrs)
}

/// Applies one attestation of `kind` with `attrs` (from `value` of `flag`) to `req`.
fn apply_attest(
    req: &mut AttestRequest,
    flag: &str,
    value: &str,
    kind: &str,
    attrs: &BTreeMap<String, String>,
) -> Result<(), SpecError> {
    let err = |reason: String| SpecError::new(flag, value, reason);
    let flag_bool = |k: &str, v: &str| {
        bool_value(v).ok_or_else(|| err(format!("{k}=`{v}`: expected true or false")))
    };
    let disabled = match attrs.get("disabled") {
        Some(v) => flag_bool("disabled", v)?,
        None => false,
    };
    match kind {
        "provenance" => {
            let mut p = ProvenanceRequest {
                mode: ProvenanceMode::Min,
                builder_id: None,
            };
            for (k, v) in attrs {
                match k.as_str() {
                    "disabled" => {}
                    "mode" => {
                        p.mode = match v.as_str() {
                            "min" => ProvenanceMode::Min,
                            "max" => ProvenanceMode::Max,
                            _ => return Err(err(format!("mode=`{v}`: expected min or max"))),
                        }
                    }
                    "builder-id" => p.builder_id = Some(v.clone()),
                    "version" => {
                        if !matches!(v.as_str(), "v0.2" | "0.2") {
                            return Err(err(format!(
                                "version=`{v}`: kiln writes SLSA provenance v0.2 only"
                            )));
                        }
                    }
                    "reproducible" | "inline-only" => {
                        flag_bool(k, v)?;
                    }
                    "filename" => {}
                    _ => {
                        return Err(err(format!(
                            "unknown provenance key `{k}`; known: mode, builder-id, version, \
                             reproducible, inline-only, filename, disabled"
                        )))
                    }
                }
            }
            req.provenance = (!disabled).then_some(p);
        }
        "sbom" => {
            for (k, v) in attrs {
                match k.as_str() {
                    "disabled" => {}
                    "generator" => req.warnings.push(format!(
                        "{flag} {value}: kiln generates SBOMs itself (no scanner image is run); \
                         generator={v} is ignored"
                    )),
                    "scan-context" | "scan-stage" => {
                        flag_bool(k, v)?;
                    }
                    _ => {
                        return Err(err(format!(
                            "unknown sbom key `{k}`; known: generator, scan-context, \
                             scan-stage, disabled"
                        )))
                    }
                }
            }
            req.sbom = (!disabled).then_some(SbomRequest {});
        }
        _ => {
            return Err(err(format!(
                "unknown attestation type `{kind}`; expected provenance or sbom"
            )))
        }
    }
    Ok(())
}

/// Where an annotation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AnnotationLevel {
    /// The image manifest (the default).
    Manifest,
    /// The image manifest's descriptor in the index.
    ManifestDescriptor,
    /// The image index.
    Index,
    /// The index's descriptor in an OCI layout's `index.json`.
    IndexDescriptor,
}

impl AnnotationLevel {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "manifest" => AnnotationLevel::Manifest,
            "manifest-descriptor" => AnnotationLevel::ManifestDescriptor,
            "index" => AnnotationLevel::Index,
            "index-descriptor" => AnnotationLevel::IndexDescriptor,
            _ => return None,
        })
    }
}

/// One annotation: `KEY=VALUE` at a level, for every platform or only one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotation {
    /// Where it goes.
    pub level: AnnotationLevel,
    /// Only images of this platform (`[linux/amd64]`); `None` for all.
    pub platform: Option<Platform>,
    /// The annotation's key.
    pub key: String,
    /// Its value.
    pub value: String,
}

const LEVELS: &str = "manifest, manifest-descriptor, index, index-descriptor";

/// Parses `LEVELS[PLATFORM]` (levels comma-separated, both parts optional) of `what`.
fn parse_levels_and_platform(
    prefix: &str,
    err: &dyn Fn(String) -> SpecError,
) -> Result<(Vec<AnnotationLevel>, Option<Platform>), SpecError> {
    let (levels, platform) = match prefix.split_once('[') {
        Some((l, rest)) => {
            let p = rest
                .strip_suffix(']')
                .ok_or_else(|| err(format!("`{prefix}`: a platform selector ends with `]`")))?;
            let platform: Platform = p
                .parse()
                .map_err(|e| err(format!("platform selector `[{p}]`: {e}")))?;
            (l, Some(platform))
        }
        None => (prefix, None),
    };
    let mut out = Vec::new();
    for l in levels.split(',').map(str::trim).filter(|l| !l.is_empty()) {
        out.push(
            AnnotationLevel::parse(l)
                .ok_or_else(|| err(format!("unknown annotation type `{l}`; expected {LEVELS}")))?,
        );
    }
    if out.is_empty() {
        out.push(AnnotationLevel::Manifest);
    }
    Ok((out, platform))
}

/// Parses one buildx `--annotation` value: `[TYPE,...][\[PLATFORM\]]:KEY=VALUE` or
/// `KEY=VALUE` (the image manifest).
pub fn parse_annotation_flag(value: &str) -> Result<Vec<Annotation>, SpecError> {
    let err = |reason: String| SpecError::new("--annotation", value, reason);
    let (left, v) = value
        .split_once('=')
        .ok_or_else(|| err("expected KEY=VALUE or TYPE:KEY=VALUE".to_owned()))?;
    let (prefix, key) = match left.split_once(':') {
        Some((p, k)) if p.chars().all(|c| c != '.') || p.contains('[') => (p, k),
        _ => ("", left),
    };
    if key.is_empty() {
        return Err(err("the annotation key is empty".to_owned()));
    }
    let (levels, platform) = parse_levels_and_platform(prefix, &err)?;
    Ok(levels
        .into_iter()
        .map(|level| Annotation {
            level,
            platform: platform.clone(),
            key: key.to_owned(),
            value: v.to_owned(),
        })
        .collect())
}

/// Parses one output attribute `annotation[-TYPE][\[PLATFORM\]].KEY=VALUE`; `None` when the
/// key is not an annotation. Errors name `flag`.
pub fn parse_annotation_attr(
    flag: &str,
    key: &str,
    value: &str,
) -> Result<Option<Annotation>, SpecError> {
    let Some(rest) = key.strip_prefix("annotation") else {
        return Ok(None);
    };
    let err = |reason: String| SpecError::new(flag, &format!("{key}={value}"), reason);
    // `annotation.KEY`, `annotation-TYPE.KEY`, `annotation[P].KEY`, `annotation-TYPE[P].KEY`.
    let (prefix, k) = match rest.find(']') {
        Some(close) => {
            let (p, k) = rest.split_at(close + 1);
            (p, k.strip_prefix('.').unwrap_or(""))
        }
        None => rest.split_once('.').unwrap_or((rest, "")),
    };
    if k.is_empty() {
        return Err(err(
            "expected annotation[-TYPE][[PLATFORM]].KEY=VALUE".to_owned()
        ));
    }
    let prefix = prefix.strip_prefix('-').unwrap_or(prefix);
    let (levels, platform) = parse_levels_and_platform(prefix, &err)?;
    if levels.len() != 1 {
        return Err(err("one annotation type per attribute".to_owned()));
    }
    Ok(Some(Annotation {
        level: levels[0],
        platform,
        key: k.to_owned(),
        value: value.to_owned(),
    }))
}

/// The annotations of `level` that apply to an image of `platform`, as a map.
pub fn annotations_for(
    all: &[Annotation],
    level: AnnotationLevel,
    platform: &Platform,
) -> BTreeMap<String, String> {
    all.iter()
        .filter(|a| a.level == level)
        .filter(|a| a.platform.as_ref().is_none_or(|p| p.matches(platform)))
        .map(|a| (a.key.clone(), a.value.clone()))
        .collect()
}

/// The predicates of a build's attestations, made once after the steps; each exporter wraps
/// them into statements about the manifest it made.
#[derive(Debug, Clone, Default)]
pub struct Predicates {
    /// The SLSA provenance v0.2 predicate.
    pub provenance: Option<Value>,
    /// The SPDX 2.3 document.
    pub sbom: Option<Value>,
}

impl Predicates {
    /// Whether there is nothing to attach.
    pub fn is_empty(&self) -> bool {
        self.provenance.is_none() && self.sbom.is_none()
    }
}

/// The in-toto statement of `predicate` (of `predicate_type`) about the manifest `subject`,
/// named after every image name ([`docker_purl`]; `_` without names).
pub fn statement(
    predicate_type: &str,
    predicate: &Value,
    subject: &Descriptor,
    names: &[String],
    platform: &Platform,
) -> Value {
    let hex = subject.digest.to_string();
    let hex = hex.strip_prefix("sha256:").unwrap_or(&hex).to_owned();
    let mut subjects: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": docker_purl(n, platform), "digest": {"sha256": hex}}))
        .collect();
    if subjects.is_empty() {
        subjects.push(json!({"name": "_", "digest": {"sha256": hex}}));
    }
    json!({
        "_type": STATEMENT_TYPE,
        "predicateType": predicate_type,
        "subject": subjects,
        "predicate": predicate,
    })
}

/// The package URL BuildKit writes for an image reference: the familiar name (its last
/// path part as the name, the rest as namespace), the tag (else the digest) as the version,
/// the platform as a qualifier (`pkg:docker/busybox@latest?platform=linux%2Famd64`).
pub fn docker_purl(reference: &str, platform: &Platform) -> String {
    let platform_q = platform_string(platform).replace('/', "%2F");
    let Ok(r) = reference.parse::<kiln_oci::Reference>() else {
        return format!("pkg:docker/{reference}?platform={platform_q}");
    };
    let name = r.with_tag("x").map(|t| t.familiar()).unwrap_or_default();
    let name = name.strip_suffix(":x").unwrap_or(&name).to_owned();
    let version = match (r.tag(), r.digest()) {
        (Some(t), _) => t.to_owned(),
        (None, Some(d)) => d.to_string().replace(':', "%3A"),
        (None, None) => "latest".to_owned(),
    };
    format!("pkg:docker/{name}@{version}?platform={platform_q}")
}

/// `os/arch[/variant]`.
pub fn platform_string(p: &Platform) -> String {
    match &p.variant {
        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
        None => format!("{}/{}", p.os, p.architecture),
    }
}

/// An attestation manifest and the blobs it references, ready to store or push.
#[derive(Debug, Clone)]
pub struct AttestationManifest {
    /// The manifest (OCI media types).
    pub manifest: RawManifest,
    /// Its config and its statement layers, with their bytes.
    pub blobs: Vec<(Descriptor, Vec<u8>)>,
}

/// The attestation manifest for the image manifest `subject` of `platform`: one in-toto
/// statement layer per predicate (provenance first, then the SBOM).
pub fn attestation_manifest(
    predicates: &Predicates,
    subject: &Descriptor,
    names: &[String],
    platform: &Platform,
) -> AttestationManifest {
    let mut layers = Vec::new();
    let mut blobs = Vec::new();
    let kinds = [
        (provenance::PREDICATE_TYPE, &predicates.provenance),
        (sbom::PREDICATE_TYPE, &predicates.sbom),
    ];
    for (ptype, p) in kinds {
        let Some(p) = p else { continue };
        let bytes =
            serde_json::to_vec(&statement(ptype, p, subject, names, platform)).unwrap_or_default();
        let mut d = Descriptor::of_bytes(IN_TOTO_MEDIA_TYPE, &bytes);
        d.annotations
            .insert(PREDICATE_TYPE_ANNOTATION.to_owned(), ptype.to_owned());
        layers.push(d.clone());
        blobs.push((d, bytes));
    }
    // A valid image config, only there for registries and tools that expect one.
    let diff_ids: Vec<String> = layers.iter().map(|l| l.digest.to_string()).collect();
    let config = json!({
        "architecture": "unknown",
        "os": "unknown",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
    let config_desc = Descriptor::of_bytes(kiln_oci::media_type::OCI_CONFIG, &config_bytes);
    blobs.insert(0, (config_desc.clone(), config_bytes));
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(kiln_oci::media_type::OCI_MANIFEST.to_owned()),
        artifact_type: None,
        config: config_desc,
        layers,
        subject: None,
        annotations: BTreeMap::new(),
    };
    AttestationManifest {
        manifest: RawManifest::from_image(&manifest),
        blobs,
    }
}

/// The image index of one image (with `platform` and its descriptor annotations) and, when
/// given, its attestation manifest, with the index's own annotations.
pub fn image_index(
    image: &Descriptor,
    platform: &Platform,
    descriptor_annotations: BTreeMap<String, String>,
    attestation: Option<&RawManifest>,
    index_annotations: BTreeMap<String, String>,
) -> RawManifest {
    let entry = IndexEntry {
        image: image.clone(),
        platform: platform.clone(),
        annotations: descriptor_annotations,
        attestation,
    };
    index_of(&[entry], false, index_annotations)
}

/// One platform's image as an index lists it.
#[derive(Debug, Clone)]
pub struct IndexEntry<'a> {
    /// The image manifest's descriptor.
    pub image: Descriptor,
    /// Its platform (the index entry's `platform` field).
    pub platform: Platform,
    /// The annotations of its descriptor in the index (`manifest-descriptor`).
    pub annotations: BTreeMap<String, String>,
    /// Its attestation manifest, when attestations are attached.
    pub attestation: Option<&'a RawManifest>,
}

/// The image index of `entries`: every image with its platform, in the order given, then the
/// attestation manifests of those that have one (platform `unknown/unknown`, pointing at
/// their image by [`REFERENCE_DIGEST_ANNOTATION`]), as BuildKit orders them. With
/// `docker_list` it is a Docker manifest list (`oci-mediatypes=false`): the caller gives
/// Docker manifests and no attestations or annotations, which a manifest list cannot hold.
pub fn index_of(
    entries: &[IndexEntry<'_>],
    docker_list: bool,
    index_annotations: BTreeMap<String, String>,
) -> RawManifest {
    let mut index = ImageIndex::new();
    if docker_list {
        index.media_type = Some(kiln_oci::media_type::DOCKER_MANIFEST_LIST.to_owned());
    }
    for e in entries {
        let mut d = e.image.clone();
        d.platform = Some(e.platform.clone());
        d.annotations = e.annotations.clone();
        index.manifests.push(d);
    }
    for e in entries {
        let Some(a) = e.attestation else { continue };
        let mut d = a.descriptor();
        d.platform = Some(Platform::new("unknown", "unknown", None));
        d.annotations.insert(
            REFERENCE_DIGEST_ANNOTATION.to_owned(),
            e.image.digest.to_string(),
        );
        d.annotations.insert(
            REFERENCE_TYPE_ANNOTATION.to_owned(),
            ATTESTATION_MANIFEST.to_owned(),
        );
        index.manifests.push(d);
    }
    index.annotations = index_annotations;
    RawManifest::from_index(&index)
}

/// The image manifest `manifest` with `annotations` added (existing keys overwritten).
pub fn annotate_manifest(
    manifest: &RawManifest,
    annotations: &BTreeMap<String, String>,
) -> Result<RawManifest, kiln_oci::ManifestError> {
    match manifest.parse()? {
        kiln_oci::Manifest::Image(mut m) => {
            m.annotations.extend(annotations.clone());
            Ok(RawManifest::from_image(&m))
        }
        kiln_oci::Manifest::Index(mut i) => {
            i.annotations.extend(annotations.clone());
            Ok(RawManifest::from_index(&i))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(f: impl FnOnce(&mut AttestFlags)) -> Result<AttestRequest, SpecError> {
        let mut a = AttestFlags::default();
        f(&mut a);
        a.parse()
    }

    #[test]
    fn provenance_and_sbom_flags_in_every_spelling() {
        let r = flags(|a| a.provenance = Some("mode=max".into())).unwrap();
        assert_eq!(r.provenance.unwrap().mode, ProvenanceMode::Max);
        let r = flags(|a| a.provenance = Some("true".into())).unwrap();
        assert_eq!(r.provenance.unwrap().mode, ProvenanceMode::Min);
        let r = flags(|a| a.sbom = Some("true".into())).unwrap();
        assert!(r.sbom.is_some() && r.provenance.is_none());
        let r = flags(|a| a.attest = vec!["type=provenance,mode=max,builder-id=x".into()]).unwrap();
        assert_eq!(r.provenance.unwrap().builder_id.as_deref(), Some("x"));
        let r =
            flags(|a| a.opts = vec!["attest:provenance=mode=max".into(), "attest:sbom=".into()])
                .unwrap();
        assert_eq!(r.provenance.unwrap().mode, ProvenanceMode::Max);
        assert!(r.sbom.is_some());
    }

    #[test]
    fn default_provenance_is_min_on_push_and_turned_off_by_false() {
        let r = flags(|a| a.default_provenance = true).unwrap();
        assert_eq!(r.provenance.unwrap().mode, ProvenanceMode::Min);
        let r = flags(|a| {
            a.default_provenance = true;
            a.provenance = Some("false".into());
        })
        .unwrap();
        assert!(r.is_empty());
        assert!(flags(|_| {}).unwrap().is_empty());
    }

    #[test]
    fn bad_attestation_values_name_the_flag() {
        let e = flags(|a| a.attest = vec!["type=vex".into()]).unwrap_err();
        assert_eq!(e.flag, "--attest");
        assert!(e.reason.contains("unknown attestation type"), "{e}");
        let e = flags(|a| a.provenance = Some("mode=most".into())).unwrap_err();
        assert_eq!(e.flag, "--provenance");
        let e = flags(|a| a.sbom = Some("colour=red".into())).unwrap_err();
        assert!(
            e.to_string().contains("--sbom") && e.reason.contains("colour"),
            "{e}"
        );
        let e = flags(|a| a.provenance = Some("version=v1".into())).unwrap_err();
        assert!(e.reason.contains("v0.2"), "{e}");
    }

    #[test]
    fn an_sbom_generator_is_a_warning_not_an_error() {
        let r = flags(|a| a.sbom = Some("generator=docker/scout-sbom-indexer:1".into())).unwrap();
        assert!(r.sbom.is_some());
        assert!(
            r.warnings[0].contains("kiln generates SBOMs itself"),
            "{r:?}"
        );
    }

    #[test]
    fn annotation_flags_with_types_and_platforms() {
        let a = parse_annotation_flag("org.opencontainers.image.source=https://x/y").unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].level, AnnotationLevel::Manifest);
        assert_eq!(a[0].key, "org.opencontainers.image.source");
        assert_eq!(a[0].value, "https://x/y");
        let a = parse_annotation_flag("index,manifest-descriptor:k=v").unwrap();
        assert_eq!(
            a.iter().map(|x| x.level).collect::<Vec<_>>(),
            [AnnotationLevel::Index, AnnotationLevel::ManifestDescriptor]
        );
        let a = parse_annotation_flag("manifest[linux/arm64]:k=v").unwrap();
        assert_eq!(a[0].platform, Some(Platform::new("linux", "arm64", None)));
        let e = parse_annotation_flag("layer:k=v").unwrap_err();
        assert_eq!(e.flag, "--annotation");
        assert!(parse_annotation_flag("novalue").is_err());
    }

    #[test]
    fn annotation_output_attributes() {
        let a = parse_annotation_attr("--output", "annotation.k", "v")
            .unwrap()
            .unwrap();
        assert_eq!((a.level, a.key.as_str()), (AnnotationLevel::Manifest, "k"));
        let a = parse_annotation_attr("--output", "annotation-index.a.b", "v")
            .unwrap()
            .unwrap();
        assert_eq!((a.level, a.key.as_str()), (AnnotationLevel::Index, "a.b"));
        let a = parse_annotation_attr("--output", "annotation-manifest[linux/amd64].k", "v")
            .unwrap()
            .unwrap();
        assert_eq!(a.platform, Some(Platform::new("linux", "amd64", None)));
        assert!(parse_annotation_attr("--output", "name", "x")
            .unwrap()
            .is_none());
        assert!(parse_annotation_attr("--output", "annotation-layer.k", "v").is_err());
        let amd = Platform::new("linux", "amd64", None);
        let arm = Platform::new("linux", "arm64", None);
        let only_arm = parse_annotation_flag("manifest[linux/arm64]:k=v").unwrap();
        assert!(annotations_for(&only_arm, AnnotationLevel::Manifest, &amd).is_empty());
        assert_eq!(
            annotations_for(&only_arm, AnnotationLevel::Manifest, &arm).len(),
            1
        );
    }

    #[test]
    fn a_multi_platform_index_lists_the_images_then_their_attestations_in_order() {
        let amd_img = Descriptor::of_bytes(kiln_oci::media_type::OCI_MANIFEST, b"amd");
        let arm_img = Descriptor::of_bytes(kiln_oci::media_type::OCI_MANIFEST, b"arm");
        let amd = Platform::new("linux", "amd64", None);
        let arm = Platform::parse("linux/arm64").unwrap();
        let preds = Predicates {
            provenance: Some(json!({"builder": {"id": ""}})),
            sbom: None,
        };
        let amd_att = attestation_manifest(&preds, &amd_img, &[], &amd);
        let arm_att = attestation_manifest(&preds, &arm_img, &[], &arm);
        let entries = [
            IndexEntry {
                image: amd_img.clone(),
                platform: amd.clone(),
                annotations: BTreeMap::new(),
                attestation: Some(&amd_att.manifest),
            },
            IndexEntry {
                image: arm_img.clone(),
                platform: arm.clone(),
                annotations: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
                attestation: Some(&arm_att.manifest),
            },
        ];
        let idx = index_of(&entries, false, BTreeMap::new());
        assert_eq!(idx.media_type, kiln_oci::media_type::OCI_INDEX);
        let v: Value = serde_json::from_slice(&idx.bytes).unwrap();
        let m = v["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[0]["digest"], amd_img.digest.to_string());
        assert_eq!(m[1]["digest"], arm_img.digest.to_string());
        // The requested platform as it is: no variant is added to arm64.
        assert_eq!(
            m[1]["platform"],
            json!({"architecture": "arm64", "os": "linux"})
        );
        assert_eq!(m[1]["annotations"]["k"], "v");
        assert_eq!(m[2]["digest"], amd_att.manifest.digest.to_string());
        assert_eq!(
            m[3]["annotations"][REFERENCE_DIGEST_ANNOTATION],
            arm_img.digest.to_string()
        );
        // A Docker manifest list of the two images, without attestations.
        let plain: Vec<IndexEntry<'_>> = entries
            .iter()
            .map(|e| IndexEntry {
                attestation: None,
                annotations: BTreeMap::new(),
                ..e.clone()
            })
            .collect();
        let list = index_of(&plain, true, BTreeMap::new());
        assert_eq!(list.media_type, kiln_oci::media_type::DOCKER_MANIFEST_LIST);
        let v: Value = serde_json::from_slice(&list.bytes).unwrap();
        assert_eq!(v["mediaType"], kiln_oci::media_type::DOCKER_MANIFEST_LIST);
        assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn the_index_lists_the_image_then_its_attestation_manifest() {
        let image = Descriptor::of_bytes(kiln_oci::media_type::OCI_MANIFEST, b"{}");
        let amd = Platform::new("linux", "amd64", None);
        let preds = Predicates {
            provenance: Some(json!({"builder": {"id": ""}})),
            sbom: Some(json!({"spdxVersion": "SPDX-2.3"})),
        };
        let att = attestation_manifest(&preds, &image, &["reg/app:1".into()], &amd);
        assert_eq!(att.blobs.len(), 3);
        let layer: Value = serde_json::from_slice(&att.blobs[1].1).unwrap();
        assert_eq!(layer["predicateType"], provenance::PREDICATE_TYPE);
        assert_eq!(
            layer["subject"][0]["name"],
            "pkg:docker/reg/app@1?platform=linux%2Famd64"
        );
        assert_eq!(
            docker_purl("docker.io/library/busybox:latest", &amd),
            "pkg:docker/busybox@latest?platform=linux%2Famd64"
        );
        assert_eq!(
            docker_purl("127.0.0.1:5000/att/app:1", &amd),
            "pkg:docker/127.0.0.1:5000/att/app@1?platform=linux%2Famd64"
        );
        let idx = image_index(
            &image,
            &amd,
            BTreeMap::new(),
            Some(&att.manifest),
            BTreeMap::new(),
        );
        let v: Value = serde_json::from_slice(&idx.bytes).unwrap();
        assert_eq!(v["manifests"][0]["digest"], image.digest.to_string());
        assert_eq!(v["manifests"][1]["platform"]["os"], "unknown");
        assert_eq!(
            v["manifests"][1]["annotations"][REFERENCE_DIGEST_ANNOTATION],
            image.digest.to_string()
        );
        assert_eq!(
            v["manifests"][1]["annotations"][REFERENCE_TYPE_ANNOTATION],
            ATTESTATION_MANIFEST
        );
    }
}
