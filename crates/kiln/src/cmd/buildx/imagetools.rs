//! `docker buildx imagetools inspect|create`: images in registries, read and combined
//! through kiln's registry client.
//!
//! `inspect` shows what buildx shows: the manifest's name, media type and digest and, for an
//! index, each manifest with its platform and annotations; `--raw` the manifest's bytes;
//! `--format` renders a template over `Name`, `Manifest`, `Image`, `Provenance` and `SBOM`.
//! Attestations are read from BuildKit's storage layout: per image, an attestation manifest
//! in the index (`vnd.docker.reference.type=attestation-manifest`,
//! `vnd.docker.reference.digest` = the image manifest's digest) whose layers are in-toto
//! statements, their predicate type in the layer annotation `in-toto.io/predicate-type`.
//!
//! `create` merges the manifests of its sources into one index (a single source is copied
//! as it is) and pushes it under every `--tag`, copying what the target repository lacks.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context as _;
use kiln_oci::{
    media_type, BlobSource, ClientConfig, Descriptor, ImageIndex, Manifest, Platform, RawManifest,
    Reference, RegistryClient,
};
use serde_json::{json, Value};

use crate::Globals;

use kiln_build::attest::sbom::PREDICATE_TYPE as SPDX_TYPE;
use kiln_build::attest::{
    ATTESTATION_MANIFEST, PREDICATE_TYPE_ANNOTATION as PREDICATE_TYPE,
    REFERENCE_DIGEST_ANNOTATION as REFERENCE_DIGEST, REFERENCE_TYPE_ANNOTATION as REFERENCE_TYPE,
};

/// Predicate types of SLSA provenance start with this (any version kiln or BuildKit writes).
const SLSA_PREFIX: &str = "https://slsa.dev/provenance/";

/// Arguments of `docker buildx imagetools`.
#[derive(clap::Args, Debug)]
pub struct ImagetoolsArgs {
    #[command(subcommand)]
    command: ImagetoolsCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ImagetoolsCommand {
    /// Show the details of an image in a registry
    Inspect(InspectArgs),
    /// Create a new image (an index) from existing ones and push it
    Create(CreateArgs),
}

/// Arguments of `docker buildx imagetools inspect`.
#[derive(clap::Args, Debug)]
struct InspectArgs {
    /// Image reference
    #[arg(value_name = "NAME")]
    name: String,
    /// Print the manifest or index exactly as the registry serves it
    #[arg(long, conflicts_with = "format")]
    raw: bool,
    /// Go template over Name, Manifest, Image, Provenance, SBOM (e.g. `{{json .Provenance}}`)
    #[arg(long, value_name = "TEMPLATE")]
    format: Option<String>,
    /// Builder override (accepted)
    #[arg(long, value_name = "NAME")]
    builder: Option<String>,
}

/// Arguments of `docker buildx imagetools create`.
#[derive(clap::Args, Debug)]
struct CreateArgs {
    /// Source images (references, or `sha256:…` digests in the first tag's repository)
    #[arg(value_name = "SOURCE")]
    sources: Vec<String>,
    /// Name of the result (repeatable)
    #[arg(short = 't', long = "tag", value_name = "REF")]
    tags: Vec<String>,
    /// Add the manifests the first tag names now to the new index
    #[arg(long)]
    append: bool,
    /// Print the index instead of pushing it
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// Annotation of the new index (`KEY=VALUE` or `index:KEY=VALUE`)
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    annotations: Vec<String>,
    /// Progress mode (accepted; kiln prints one line per pushed tag)
    #[arg(long, value_name = "MODE")]
    progress: Option<String>,
    /// Builder override (accepted)
    #[arg(long, value_name = "NAME")]
    builder: Option<String>,
}

/// Runs `docker buildx imagetools ...`.
pub fn run(args: ImagetoolsArgs, _globals: &Globals) -> anyhow::Result<ExitCode> {
    let client =
        RegistryClient::new(ClientConfig::default()).context("setting up the registry client")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match args.command {
        ImagetoolsCommand::Inspect(a) => rt.block_on(inspect(&client, a)),
        ImagetoolsCommand::Create(a) => rt.block_on(create(&client, a)),
    }
}

fn parse_ref(flag: &str, s: &str) -> anyhow::Result<Reference> {
    s.parse::<Reference>()
        .map_err(|e| anyhow::anyhow!("{flag} {s:?}: {e}"))
}

async fn inspect(client: &RegistryClient, args: InspectArgs) -> anyhow::Result<ExitCode> {
    let _ = args.builder;
    let reference = parse_ref("imagetools inspect", &args.name)?;
    let raw = client
        .pull_manifest(&reference)
        .await
        .with_context(|| format!("fetching the manifest of {reference}"))?;
    if args.raw {
        super::super::print_stdout(&String::from_utf8_lossy(&raw.bytes))?;
        return Ok(ExitCode::SUCCESS);
    }
    let parsed = raw
        .parse()
        .with_context(|| format!("reading the manifest of {reference}"))?;
    match args.format.as_deref() {
        // buildx prints the text view for a template that starts with `.Manifest`.
        None => super::super::print_stdout(&text_view(&reference, &raw, &parsed))?,
        Some(f) if f.starts_with("{{.Manifest") => {
            super::super::print_stdout(&text_view(&reference, &raw, &parsed))?
        }
        Some(f) => {
            let data = template_data(client, &reference, &args.name, &raw, &parsed).await?;
            super::super::print_stdout(&super::template::render(f, &data)?)?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Rows `key:` / value with the values in one column, as Go's tabwriter aligns them
/// (`width`: the widest key's, or `None` for these rows' own).
fn aligned(prefix: &str, rows: &[(&str, String)], width: Option<usize>) -> String {
    let w = width.unwrap_or_else(|| key_width(rows));
    rows.iter()
        .map(|(k, v)| {
            format!("{prefix}{:<w$}{v}", format!("{k}:"))
                .trim_end()
                .to_owned()
                + "\n"
        })
        .collect()
}

/// The column of values after `rows`' keys: the widest `key:` and one space.
fn key_width(rows: &[(&str, String)]) -> usize {
    rows.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0) + 1
}

/// buildx's default view of a manifest or index.
fn text_view(reference: &Reference, raw: &RawManifest, parsed: &Manifest) -> String {
    let mut out = aligned(
        "",
        &[
            ("Name", reference.to_string()),
            ("MediaType", raw.media_type.clone()),
            ("Digest", raw.digest.to_string()),
        ],
        None,
    );
    let Manifest::Index(index) = parsed else {
        return out;
    };
    out += "\nManifests:\n";
    // One column for every manifest's rows, as buildx's one tabwriter gives them.
    let blocks: Vec<Vec<(&str, String)>> = index
        .manifests
        .iter()
        .map(|m| {
            let mut rows = vec![
                ("Name", reference.with_digest(m.digest.clone()).to_string()),
                ("MediaType", m.media_type.clone()),
            ];
            if let Some(p) = &m.platform {
                rows.push(("Platform", p.to_string()));
            }
            if !m.annotations.is_empty() {
                rows.push(("Annotations", String::new()));
            }
            rows
        })
        .collect();
    let width = blocks.iter().map(|b| key_width(b)).max();
    for (i, (m, rows)) in index.manifests.iter().zip(&blocks).enumerate() {
        if i > 0 {
            out += "\n";
        }
        out += &aligned("  ", rows, width);
        let ann: Vec<(&str, String)> = m
            .annotations
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        out += &aligned("    ", &ann, None);
    }
    out
}

/// One image of the result and what is attached to it.
#[derive(Default)]
struct ImageInfo {
    config: Option<Value>,
    provenance: Option<Value>,
    spdx: Vec<Value>,
}

/// The values a `--format` template sees, as buildx gives them: `Name` as typed, `Manifest`
/// (the descriptor of a manifest, or an index with its digest and size), and `Image`,
/// `Provenance` (`{"SLSA": predicate}`) and `SBOM` (`{"SPDX": predicate}`) — for one
/// platform those themselves, for several a map from platform to them.
async fn template_data(
    client: &RegistryClient,
    reference: &Reference,
    name: &str,
    raw: &RawManifest,
    parsed: &Manifest,
) -> anyhow::Result<Value> {
    let mut images: BTreeMap<String, ImageInfo> = BTreeMap::new();
    let manifest_value = match parsed {
        Manifest::Image(m) => {
            let config = fetch_json(client, reference, &m.config).await?;
            let platform = platform_of_config(&config);
            images.entry(platform).or_default().config = Some(config);
            json!({
                "mediaType": raw.media_type,
                "digest": raw.digest.to_string(),
                "size": raw.bytes.len(),
            })
        }
        Manifest::Index(index) => {
            let mut platform_of: BTreeMap<String, String> = BTreeMap::new();
            for m in index.manifests.iter().filter(|m| !is_attestation(m)) {
                if !media_type::is_manifest(&m.media_type) {
                    continue;
                }
                let child = pull_child(client, reference, m).await?;
                let Manifest::Image(im) = child else { continue };
                let config = fetch_json(client, reference, &im.config).await?;
                let platform = m
                    .platform
                    .as_ref()
                    .map(Platform::to_string)
                    .unwrap_or_else(|| platform_of_config(&config));
                platform_of.insert(m.digest.to_string(), platform.clone());
                images.entry(platform).or_default().config = Some(config);
            }
            for m in index.manifests.iter().filter(|m| is_attestation(m)) {
                let Some(platform) = m
                    .annotations
                    .get(REFERENCE_DIGEST)
                    .and_then(|d| platform_of.get(d))
                else {
                    continue;
                };
                let Manifest::Image(att) = pull_child(client, reference, m).await? else {
                    continue;
                };
                let info = images.entry(platform.clone()).or_default();
                for layer in &att.layers {
                    let Some(kind) = layer.annotations.get(PREDICATE_TYPE) else {
                        continue;
                    };
                    let is_slsa = kind.starts_with(SLSA_PREFIX);
                    if !is_slsa && kind != SPDX_TYPE {
                        continue;
                    }
                    let statement = fetch_json(client, reference, layer).await?;
                    let predicate = statement.get("predicate").cloned().unwrap_or(Value::Null);
                    if is_slsa {
                        info.provenance.get_or_insert(predicate);
                    } else {
                        info.spdx.push(predicate);
                    }
                }
            }
            json!({
                "schemaVersion": index.schema_version,
                "mediaType": raw.media_type,
                "digest": raw.digest.to_string(),
                "size": raw.bytes.len(),
                "manifests": index.manifests,
                "annotations": if index.annotations.is_empty() { Value::Null } else { json!(index.annotations) },
            })
        }
    };
    let provenance = |i: &ImageInfo| match &i.provenance {
        Some(p) => json!({ "SLSA": p }),
        None => json!({}),
    };
    let sbom = |i: &ImageInfo| {
        let mut o = serde_json::Map::new();
        if let Some(first) = i.spdx.first() {
            o.insert("SPDX".into(), first.clone());
        }
        if i.spdx.len() > 1 {
            o.insert("AdditionalSPDXs".into(), json!(i.spdx[1..]));
        }
        Value::Object(o)
    };
    let mut data = json!({ "Name": name, "Manifest": manifest_value });
    if images.len() > 1 {
        let per = |f: &dyn Fn(&ImageInfo) -> Value| -> Value {
            Value::Object(images.iter().map(|(p, i)| (p.clone(), f(i))).collect())
        };
        data["Image"] = per(&|i| i.config.clone().unwrap_or(Value::Null));
        data["Provenance"] = per(&provenance);
        data["SBOM"] = per(&sbom);
    } else {
        let one = images.into_values().next().unwrap_or_default();
        data["Image"] = one.config.clone().unwrap_or(Value::Null);
        data["Provenance"] = provenance(&one);
        data["SBOM"] = sbom(&one);
    }
    Ok(data)
}

fn is_attestation(d: &Descriptor) -> bool {
    d.annotations.get(REFERENCE_TYPE).map(String::as_str) == Some(ATTESTATION_MANIFEST)
}

fn platform_of_config(config: &Value) -> String {
    let s = |k: &str| {
        config
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let mut p = format!("{}/{}", s("os"), s("architecture"));
    if !s("variant").is_empty() {
        p = format!("{p}/{}", s("variant"));
    }
    p
}

async fn pull_child(
    client: &RegistryClient,
    reference: &Reference,
    d: &Descriptor,
) -> anyhow::Result<Manifest> {
    let r = reference.with_digest(d.digest.clone());
    let raw = client
        .pull_manifest(&r)
        .await
        .with_context(|| format!("fetching {r}"))?;
    raw.parse().with_context(|| format!("reading {r}"))
}

async fn fetch_blob(
    client: &RegistryClient,
    reference: &Reference,
    d: &Descriptor,
) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    client
        .pull_blob(reference, d, &mut buf)
        .await
        .with_context(|| format!("fetching blob {} of {reference}", d.digest))?;
    Ok(buf)
}

async fn fetch_json(
    client: &RegistryClient,
    reference: &Reference,
    d: &Descriptor,
) -> anyhow::Result<Value> {
    let bytes = fetch_blob(client, reference, d).await?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("blob {} of {reference} is not JSON", d.digest))
}

/// One source of `create`: its manifest and where it lives.
struct Source {
    reference: Reference,
    raw: RawManifest,
    parsed: Manifest,
}

async fn create(client: &RegistryClient, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let _ = (args.progress, args.builder);
    let tags = args
        .tags
        .iter()
        .map(|t| parse_ref("--tag", t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let Some(first_tag) = tags.first() else {
        anyhow::bail!("imagetools create: name the result with -t/--tag REF");
    };
    let mut refs = Vec::new();
    if args.append {
        refs.push(first_tag.clone());
    }
    for s in &args.sources {
        refs.push(match s.parse::<kiln_oci::Digest>() {
            Ok(d) => first_tag.with_digest(d),
            Err(_) => parse_ref("imagetools create", s)?,
        });
    }
    if refs.is_empty() {
        anyhow::bail!("imagetools create: name at least one SOURCE image");
    }
    let mut sources = Vec::new();
    for r in refs {
        let raw = client
            .pull_manifest(&r)
            .await
            .with_context(|| format!("fetching the manifest of {r}"))?;
        let parsed = raw.parse().with_context(|| format!("reading {r}"))?;
        sources.push(Source {
            reference: r,
            raw,
            parsed,
        });
    }
    let annotations = parse_annotations(&args.annotations)?;
    let result = if sources.len() == 1 && annotations.is_empty() {
        sources[0].raw.clone()
    } else {
        merged_index(client, &sources, annotations).await?
    };
    if args.dry_run {
        let v: Value = serde_json::from_slice(&result.bytes)?;
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    for tag in &tags {
        for s in &sources {
            copy_into(client, s, tag).await?;
        }
        client
            .push_manifest(tag, &result)
            .await
            .with_context(|| format!("pushing {tag}"))?;
        outln!("{tag}@{}", result.digest);
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_annotations(values: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in values {
        let (k, v) = a.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--annotation {a:?}: expected KEY=VALUE (or index:KEY=VALUE)")
        })?;
        let k = match k.split_once(':') {
            Some(("index", k)) => k,
            Some((other, _)) if !other.contains('.') => anyhow::bail!(
                "--annotation {a:?}: imagetools create annotates the index only (prefix index: or none)"
            ),
            _ => k,
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// One index holding every source's manifests (an index source gives its own list), each
/// digest once; OCI media types unless every source is Docker's.
async fn merged_index(
    client: &RegistryClient,
    sources: &[Source],
    annotations: BTreeMap<String, String>,
) -> anyhow::Result<RawManifest> {
    let mut manifests: Vec<Descriptor> = Vec::new();
    let mut all_docker = true;
    for s in sources {
        all_docker &= s.raw.media_type.starts_with("application/vnd.docker.");
        let mut add = |d: Descriptor| {
            if !manifests.iter().any(|m| m.digest == d.digest) {
                manifests.push(d);
            }
        };
        match &s.parsed {
            Manifest::Index(idx) => idx.manifests.iter().cloned().for_each(&mut add),
            Manifest::Image(m) => {
                let config = fetch_json(client, &s.reference, &m.config).await?;
                let mut d = s.raw.descriptor();
                let p = platform_of_config(&config);
                d.platform = Platform::parse(&p).ok();
                add(d);
            }
        }
    }
    let mut index = ImageIndex::new();
    index.media_type = Some(
        if all_docker {
            media_type::DOCKER_MANIFEST_LIST
        } else {
            media_type::OCI_INDEX
        }
        .to_owned(),
    );
    index.manifests = manifests;
    index.annotations = annotations;
    Ok(RawManifest::from_index(&index))
}

/// Makes `target`'s repository hold everything `source` refers to: blobs (mounted when the
/// registry is the same, else copied) and the child manifests by digest.
async fn copy_into(
    client: &RegistryClient,
    source: &Source,
    target: &Reference,
) -> anyhow::Result<()> {
    if source.reference.registry() == target.registry()
        && source.reference.repository() == target.repository()
    {
        return Ok(());
    }
    let children: Vec<(Reference, RawManifest)> = match &source.parsed {
        Manifest::Image(_) => vec![(source.reference.clone(), source.raw.clone())],
        Manifest::Index(idx) => {
            let mut v = Vec::new();
            for d in &idx.manifests {
                let r = source.reference.with_digest(d.digest.clone());
                let raw = client
                    .pull_manifest(&r)
                    .await
                    .with_context(|| format!("fetching {r}"))?;
                v.push((r, raw));
            }
            v
        }
    };
    let mount_from = (source.reference.registry() == target.registry())
        .then(|| source.reference.repository().to_owned());
    let staging = StagingDir::new()?;
    for (r, raw) in children {
        if let Ok(Manifest::Image(m)) = raw.parse() {
            for d in std::iter::once(&m.config).chain(&m.layers) {
                if media_type::is_non_distributable(&d.media_type) {
                    continue;
                }
                if client.blob_exists(target, &d.digest).await? {
                    continue;
                }
                // Layers can be large: through a file, never all in memory.
                let file = staging.path.join(d.digest.to_string().replace(':', "-"));
                client
                    .pull_blob_to_file(&r, d, &file)
                    .await
                    .with_context(|| format!("fetching blob {} of {r}", d.digest))?;
                let pushed = client
                    .push_blob(
                        target,
                        d,
                        &BlobSource::File(file.clone()),
                        mount_from.as_deref(),
                    )
                    .await
                    .with_context(|| format!("copying blob {} to {target}", d.digest));
                let _ = std::fs::remove_file(&file);
                pushed?;
            }
        }
        client
            .push_manifest(&target.with_digest(raw.digest.clone()), &raw)
            .await
            .with_context(|| format!("copying manifest {} to {target}", raw.digest))?;
    }
    Ok(())
}

/// A private directory for blobs on their way from one repository to another, removed with
/// what is left in it when dropped.
struct StagingDir {
    path: std::path::PathBuf,
}

impl StagingDir {
    fn new() -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("kiln-imagetools-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating the staging directory {}", path.display()))?;
        Ok(StagingDir { path })
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_annotations_parse_with_and_without_prefix() {
        let a = parse_annotations(&[
            "index:org.opencontainers.image.title=x".into(),
            "k=v".into(),
        ])
        .unwrap();
        assert_eq!(a["org.opencontainers.image.title"], "x");
        assert_eq!(a["k"], "v");
        assert!(parse_annotations(&["manifest:k=v".into()]).is_err());
        assert!(parse_annotations(&["novalue".into()]).is_err());
    }

    #[test]
    fn text_view_lists_manifests_with_platform_and_annotations() {
        let img = Descriptor {
            platform: Some(Platform::new("linux", "amd64", None)),
            ..Descriptor::of_bytes(media_type::OCI_MANIFEST, b"a")
        };
        let mut att = Descriptor {
            platform: Some(Platform::new("unknown", "unknown", None)),
            ..Descriptor::of_bytes(media_type::OCI_MANIFEST, b"b")
        };
        att.annotations
            .insert(REFERENCE_TYPE.into(), ATTESTATION_MANIFEST.into());
        let mut index = ImageIndex::new();
        index.manifests = vec![img, att];
        let raw = RawManifest::from_index(&index);
        let r: Reference = "127.0.0.1:5000/app:1".parse().unwrap();
        let text = text_view(&r, &raw, &raw.parse().unwrap());
        assert!(text.starts_with("Name:      127.0.0.1:5000/app:1\nMediaType: application/vnd.oci.image.index.v1+json\n"), "{text}");
        assert!(text.contains("  Platform:    linux/amd64\n"), "{text}");
        assert!(text.contains("  Platform:    unknown/unknown\n"), "{text}");
        assert!(
            text.contains("    vnd.docker.reference.type: attestation-manifest\n"),
            "{text}"
        );
    }
}
