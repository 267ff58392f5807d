//! OCI image layouts (a directory with `oci-layout`, `index.json` and `blobs/<alg>/<hex>`),
//! the same as a tar (`oci-archive`), and `docker save`-format tarballs for `docker load` and
//! `podman load`.
//!
//! Blobs are written to a temporary file and renamed into place after their digest is
//! checked, so a blob path never holds wrong bytes.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::{Algorithm, Digest, DigestWriter};
use crate::manifest::{Descriptor, ImageIndex, Manifest, RawManifest};
use crate::media_type;
use crate::reference::Reference;

/// The annotation naming an image in `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
const LAYOUT_FILE: &str = "oci-layout";
const LAYOUT_CONTENT: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;

/// Why a layout operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The directory is not an OCI layout, or a file in it is invalid.
    #[error("{path} is not a valid OCI layout: {detail}")]
    Invalid {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A blob's bytes do not match its name.
    #[error("blob {expected} in {path} hashes to {actual}; the layout is corrupt")]
    DigestMismatch {
        /// The layout root.
        path: PathBuf,
        /// The digest it is stored under.
        expected: Digest,
        /// What it hashes to.
        actual: Digest,
    },
    /// No image of that name.
    #[error("no image named {name:?} in OCI layout {path} (it has: {available})")]
    NotFound {
        /// The layout root.
        path: PathBuf,
        /// The name asked for.
        name: String,
        /// Names present.
        available: String,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LayoutError {
    let path = path.to_owned();
    move |source| LayoutError::Io {
        action,
        path,
        source,
    }
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

impl OciLayout {
    /// Opens the layout at `root`, creating it (and an empty `index.json`) if needed.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let root = root.into();
        fs::create_dir_all(root.join("blobs").join("sha256")).map_err(io_err("creating", &root))?;
        let layout = OciLayout { root };
        let marker = layout.root.join(LAYOUT_FILE);
        if !marker.exists() {
            write_atomic(&marker, LAYOUT_CONTENT.as_bytes())?;
        }
        if !layout.root.join("index.json").exists() {
            layout.write_index(&ImageIndex::new())?;
        }
        Ok(layout)
    }

    /// Opens an existing layout, checking its `oci-layout` marker.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let root = root.into();
        let marker = root.join(LAYOUT_FILE);
        let text = fs::read(&marker).map_err(io_err("reading", &marker))?;
        let v: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| LayoutError::Invalid {
                path: marker.clone(),
                detail: e.to_string(),
            })?;
        if v.get("imageLayoutVersion")
            .and_then(|v| v.as_str())
            .is_none()
        {
            return Err(LayoutError::Invalid {
                path: marker,
                detail: "no imageLayoutVersion".into(),
            });
        }
        Ok(OciLayout { root })
    }

    /// The layout directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Stores `bytes` as a sha256 blob; returns its digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<Digest, LayoutError> {
        let d = Digest::sha256_of(bytes);
        let path = self.blob_path(&d);
        if !path.is_file() {
            write_atomic(&path, bytes)?;
        }
        Ok(d)
    }

    /// Streams `reader` into a sha256 blob; returns its digest and size.
    pub fn write_blob_from_reader(
        &self,
        mut reader: impl Read,
    ) -> Result<(Digest, u64), LayoutError> {
        let dir = self.root.join("blobs").join("sha256");
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&dir)
            .map_err(io_err("creating a file in", &dir))?;
        let mut w = DigestWriter::new(
            io::BufWriter::with_capacity(1 << 20, tmp),
            Algorithm::Sha256,
        );
        io::copy(&mut reader, &mut w).map_err(io_err("writing a blob in", &dir))?;
        let (buf, digest, size) = w.finish();
        let tmp = buf.into_inner().map_err(|e| LayoutError::Io {
            action: "writing a blob in",
            path: dir.clone(),
            source: e.into_error(),
        })?;
        let path = self.blob_path(&digest);
        tmp.persist(&path).map_err(|e| LayoutError::Io {
            action: "renaming",
            path: path.clone(),
            source: e.error,
        })?;
        Ok((digest, size))
    }

    /// Reads a blob whole, verifying its digest (for manifests and configs).
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, LayoutError> {
        let path = self.blob_path(digest);
        let bytes = fs::read(&path).map_err(io_err("reading", &path))?;
        let actual = Digest::of(digest.algorithm(), &bytes);
        if &actual != digest {
            return Err(LayoutError::DigestMismatch {
                path: self.root.clone(),
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// The layout's `index.json`.
    pub fn index(&self) -> Result<ImageIndex, LayoutError> {
        let path = self.root.join("index.json");
        let bytes = fs::read(&path).map_err(io_err("reading", &path))?;
        serde_json::from_slice(&bytes).map_err(|e| LayoutError::Invalid {
            path,
            detail: e.to_string(),
        })
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), LayoutError> {
        let bytes = serde_json::to_vec(index).unwrap_or_default();
        write_atomic(&self.root.join("index.json"), &bytes)
    }

    /// Adds `desc` (a manifest or index already stored as a blob) to `index.json` under
    /// `ref_name`, replacing an entry of the same name. An empty name adds an unnamed entry.
    pub fn add_manifest(&self, mut desc: Descriptor, ref_name: &str) -> Result<(), LayoutError> {
        let mut index = self.index()?;
        if !ref_name.is_empty() {
            index.manifests.retain(|d| {
                d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) != Some(ref_name)
            });
            desc.annotations
                .insert(REF_NAME_ANNOTATION.into(), ref_name.into());
        } else {
            index.manifests.retain(|d| {
                d.digest != desc.digest || d.annotations.contains_key(REF_NAME_ANNOTATION)
            });
        }
        index.manifests.push(desc);
        self.write_index(&index)
    }

    /// The manifest (or index) named `ref_name`; with an empty name, the only entry.
    pub fn manifest(&self, ref_name: &str) -> Result<RawManifest, LayoutError> {
        let index = self.index()?;
        let found = if ref_name.is_empty() && index.manifests.len() == 1 {
            index.manifests.first()
        } else {
            index.manifests.iter().find(|d| {
                d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) == Some(ref_name)
            })
        };
        let Some(desc) = found else {
            let names: Vec<&str> = index
                .manifests
                .iter()
                .filter_map(|d| d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str))
                .collect();
            return Err(LayoutError::NotFound {
                path: self.root.clone(),
                name: ref_name.to_owned(),
                available: if names.is_empty() {
                    "no named images".into()
                } else {
                    names.join(", ")
                },
            });
        };
        let bytes = self.read_blob(&desc.digest)?;
        Ok(RawManifest::new(&desc.media_type, bytes))
    }

    /// Writes the layout as a tar (`oci-archive`): `oci-layout`, `index.json`, then the blobs
    /// in sorted order, with fixed owners and times so the same layout gives the same bytes.
    pub fn write_archive(&self, w: impl Write) -> Result<(), LayoutError> {
        let mut files = vec![PathBuf::from(LAYOUT_FILE), PathBuf::from("index.json")];
        let blobs = self.root.join("blobs");
        let mut algs: Vec<_> = fs::read_dir(&blobs)
            .map_err(io_err("listing", &blobs))?
            .flatten()
            .collect();
        algs.sort_by_key(|e| e.file_name());
        for alg in algs {
            let mut entries: Vec<_> = fs::read_dir(alg.path())
                .map_err(io_err("listing", &blobs))?
                .flatten()
                .collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let name = e.file_name();
                if name.to_string_lossy().starts_with('.') {
                    continue; // temporary files of interrupted writes
                }
                files.push(Path::new("blobs").join(alg.file_name()).join(name));
            }
        }
        let mut tar = tar::Builder::new(w);
        for rel in files {
            append_file(&mut tar, &self.root.join(&rel), &rel.to_string_lossy())?;
        }
        tar.into_inner()
            .map_err(io_err("finishing the archive of", &self.root))?
            .flush()
            .map_err(io_err("writing the archive of", &self.root))?;
        Ok(())
    }

    /// Unpacks an `oci-archive` tar into `dest` (only `oci-layout`, `index.json` and blobs are
    /// taken; each blob is verified against its name).
    pub fn extract_archive(r: impl Read, dest: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let dest = dest.into();
        let layout = OciLayout::create(&dest)?;
        let mut ar = tar::Archive::new(r);
        let entries = ar
            .entries()
            .map_err(io_err("reading the archive for", &dest))?;
        for entry in entries {
            let mut entry = entry.map_err(io_err("reading the archive for", &dest))?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry
                .path()
                .map_err(io_err("reading the archive for", &dest))?
                .into_owned();
            let name = path.to_string_lossy().trim_start_matches("./").to_owned();
            if name == LAYOUT_FILE || name == "index.json" {
                let mut buf = Vec::new();
                entry
                    .read_to_end(&mut buf)
                    .map_err(io_err("reading the archive for", &dest))?;
                write_atomic(&dest.join(&name), &buf)?;
            } else if let Some(rest) = name.strip_prefix("blobs/") {
                let Some((alg, hex)) = rest.split_once('/') else {
                    continue;
                };
                let expected: Digest =
                    format!("{alg}:{hex}")
                        .parse()
                        .map_err(|e| LayoutError::Invalid {
                            path: dest.clone(),
                            detail: format!("archive entry {name}: {e}"),
                        })?;
                let (actual, _) = layout.write_blob_from_reader(&mut entry)?;
                if actual != expected {
                    let _ = fs::remove_file(layout.blob_path(&actual));
                    return Err(LayoutError::DigestMismatch {
                        path: dest,
                        expected,
                        actual,
                    });
                }
            }
        }
        OciLayout::open(dest)
    }
}

fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &Path,
    name: &str,
) -> Result<(), LayoutError> {
    let f = fs::File::open(path).map_err(io_err("reading", path))?;
    let len = f.metadata().map_err(io_err("reading", path))?.len();
    let mut h = tar::Header::new_ustar();
    h.set_size(len);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, name, f)
        .map_err(io_err("archiving", path))
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
) -> Result<(), LayoutError> {
    let mut h = tar::Header::new_ustar();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, name, bytes)
        .map_err(io_err("archiving", Path::new(name)))
}

/// Writes a `docker save`-format tarball of one image, loadable by `docker load` and
/// `podman load`: `manifest.json` and `repositories` as the classic format has them, plus the
/// OCI layout files newer Docker writes; blobs are taken from `blob_path(digest)`.
pub fn write_docker_archive(
    w: impl Write,
    manifest: &RawManifest,
    repo_tags: &[Reference],
    blob_path: &dyn Fn(&Digest) -> PathBuf,
) -> Result<(), LayoutError> {
    let image = match manifest.parse() {
        Ok(Manifest::Image(m)) => m,
        Ok(Manifest::Index(_)) => {
            return Err(LayoutError::Invalid {
                path: PathBuf::from("manifest"),
                detail: "docker archives hold single-platform images, not an index".into(),
            })
        }
        Err(e) => {
            return Err(LayoutError::Invalid {
                path: PathBuf::from("manifest"),
                detail: e.to_string(),
            })
        }
    };
    let blob_name = |d: &Digest| format!("blobs/{}/{}", d.algorithm().name(), d.hex());
    let layers: Vec<&Descriptor> = image
        .layers
        .iter()
        .filter(|l| !media_type::is_non_distributable(&l.media_type))
        .collect();
    let tags: Vec<String> = repo_tags
        .iter()
        .filter(|r| r.tag().is_some())
        .map(|r| r.familiar())
        .collect();
    let manifest_json = serde_json::json!([{
        "Config": blob_name(&image.config.digest),
        "RepoTags": tags,
        "Layers": layers.iter().map(|l| blob_name(&l.digest)).collect::<Vec<_>>(),
    }]);
    let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    if let Some(top) = layers.last() {
        for r in repo_tags {
            if let Some(t) = r.tag() {
                let fam = r.familiar();
                let name = fam
                    .rsplit_once(':')
                    .map(|(n, _)| n.to_owned())
                    .unwrap_or(fam);
                repositories
                    .entry(name)
                    .or_default()
                    .insert(t.to_owned(), top.digest.hex().to_owned());
            }
        }
    }
    let mut index = ImageIndex::new();
    let mut d = manifest.descriptor();
    if let Some(first) = repo_tags.first() {
        d.annotations
            .insert("io.containerd.image.name".into(), first.to_string());
        if let Some(t) = first.tag() {
            d.annotations
                .insert(REF_NAME_ANNOTATION.into(), t.to_owned());
        }
    }
    index.manifests.push(d);

    let mut tar = tar::Builder::new(w);
    let mut seen = std::collections::BTreeSet::new();
    let mut blobs: Vec<&Digest> = vec![&image.config.digest];
    blobs.extend(layers.iter().map(|l| &l.digest));
    for digest in blobs {
        if seen.insert(digest.clone()) {
            append_file(&mut tar, &blob_path(digest), &blob_name(digest))?;
        }
    }
    append_bytes(&mut tar, &blob_name(&manifest.digest), &manifest.bytes)?;
    append_bytes(&mut tar, LAYOUT_FILE, LAYOUT_CONTENT.as_bytes())?;
    append_bytes(
        &mut tar,
        "index.json",
        &serde_json::to_vec(&index).unwrap_or_default(),
    )?;
    append_bytes(
        &mut tar,
        "manifest.json",
        &serde_json::to_vec(&manifest_json).unwrap_or_default(),
    )?;
    append_bytes(
        &mut tar,
        "repositories",
        &serde_json::to_vec(&repositories).unwrap_or_default(),
    )?;
    tar.into_inner()
        .map_err(io_err("finishing", Path::new("docker archive")))?
        .flush()
        .map_err(io_err("writing", Path::new("docker archive")))?;
    Ok(())
}

/// Writes a layout file (blob, `index.json`, `oci-layout`) in a directory created if missing:
/// atomic for readers, not fsynced (a layout is an output kiln writes again on the next run).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    kiln_fs::write_atomic(path, bytes, kiln_fs::Durability::NoSync).map_err(|e| match e.step {
        kiln_fs::WriteStep::Create => io_err("creating a file in", dir)(e.source),
        kiln_fs::WriteStep::Rename => io_err("renaming", path)(e.source),
        kiln_fs::WriteStep::Write | kiln_fs::WriteStep::Sync => io_err("writing", path)(e.source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ImageManifest;

    fn sample(layout: &OciLayout) -> RawManifest {
        let layer = layout.write_blob(b"layer bytes").unwrap();
        let config = layout.write_blob(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#).unwrap();
        let m = ImageManifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.into()),
            artifact_type: None,
            config: Descriptor::new(
                media_type::OCI_CONFIG,
                config.clone(),
                fs::metadata(layout.blob_path(&config)).unwrap().len(),
            ),
            layers: vec![Descriptor::new(media_type::OCI_LAYER_TAR, layer, 11)],
            subject: None,
            annotations: Default::default(),
        };
        let raw = RawManifest::from_image(&m);
        layout.write_blob(&raw.bytes).unwrap();
        layout.add_manifest(raw.descriptor(), "v1").unwrap();
        raw
    }

    #[test]
    fn layout_round_trips_through_an_archive() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path().join("a")).unwrap();
        let raw = sample(&layout);
        assert_eq!(layout.manifest("v1").unwrap(), raw);
        assert!(matches!(
            layout.manifest("v2"),
            Err(LayoutError::NotFound { .. })
        ));
        let mut tar = Vec::new();
        layout.write_archive(&mut tar).unwrap();
        let mut tar2 = Vec::new();
        layout.write_archive(&mut tar2).unwrap();
        assert_eq!(tar, tar2, "archives of the same layout are identical");
        let copy = OciLayout::extract_archive(&tar[..], dir.path().join("b")).unwrap();
        assert_eq!(copy.manifest("v1").unwrap(), raw);
        assert_eq!(
            copy.read_blob(&Digest::sha256_of(b"layer bytes")).unwrap(),
            b"layer bytes"
        );
    }

    #[test]
    fn corrupt_blob_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let d = layout.write_blob(b"good").unwrap();
        fs::write(layout.blob_path(&d), b"evil").unwrap();
        assert!(matches!(
            layout.read_blob(&d),
            Err(LayoutError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn docker_archive_has_manifest_json_and_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let raw = sample(&layout);
        let mut out = Vec::new();
        let tags = ["localhost/app:v1".parse::<Reference>().unwrap()];
        write_docker_archive(&mut out, &raw, &tags, &|d| layout.blob_path(d)).unwrap();
        let mut ar = tar::Archive::new(&out[..]);
        let mut found = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut s = String::new();
            if name.ends_with(".json") || name == "repositories" {
                e.read_to_string(&mut s).unwrap();
            }
            found.insert(name, s);
        }
        let mj: serde_json::Value = serde_json::from_str(&found["manifest.json"]).unwrap();
        assert_eq!(mj[0]["RepoTags"][0], "localhost/app:v1");
        let layer_name = mj[0]["Layers"][0].as_str().unwrap();
        assert!(found.contains_key(layer_name), "{layer_name} missing");
        assert!(found["repositories"].contains("localhost/app"));
    }
}
