//! Sources that are neither a registry image nor a local directory: files downloaded for
//! `ADD <url>`, and images in OCI layout directories (`--build-context NAME=oci-layout://PATH`,
//! buildctl's `--oci-layout NAME=PATH`).
//!
//! Downloads live under `<state>/downloads/<sha256(url, file name)>/`: one directory per
//! content (`<sha256 hex>-<mtime>/<file name>`, renamed into place once complete and checked,
//! never changed afterwards) and `meta.json` with the `ETag` and `Last-Modified` the server
//! sent, for a conditional request next time. As Docker documents, the file is written with
//! mode 0600 and the `Last-Modified` time, and never unpacked; without a `Last-Modified` kiln
//! uses the Unix epoch, so that the same bytes always make the same layer.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_graph::graph::HttpSource;
use kiln_oci::layout::REF_NAME_ANNOTATION;
use kiln_oci::transport::{ReadWatch, RequestWatch, Stall};
use kiln_oci::{media_type, Algorithm, Descriptor, Digest, DigestWriter, Hasher, OciLayout};
use kiln_oci::{Manifest, RawManifest, Timeouts, TIMEOUT_ENV};
use serde::{Deserialize, Serialize};

pub use crate::error::SourceError;
use crate::provider::{BaseImage, BlobSource};
use crate::remote::LayoutBlobs;

/// The prefix of the image references that name an image in an OCI layout directory.
pub const LAYOUT_SCHEME: &str = "oci-layout://";

/// Downloads larger than this are refused unless `KILN_MAX_DOWNLOAD_BYTES` says otherwise.
const DEFAULT_MAX_DOWNLOAD: u64 = 8 << 30;

/// Manifests, indexes and configs read from a layout larger than this are refused.
const MAX_SMALL_BLOB: u64 = 16 << 20;

fn download_err(url: &str, message: impl Into<String>) -> SourceError {
    SourceError::Download {
        url: url.to_owned(),
        message: message.into(),
    }
}

/// What `meta.json` remembers of the last download of one URL.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DownloadRecord {
    url: String,
    /// The content directory's name, under the URL's directory.
    dir: String,
    sha256: Digest,
    size: u64,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// The directory holding the downloaded file of `src` (and nothing else), ready to be copied
/// from. With `--checksum`, a file an earlier build downloaded with that digest is reused
/// without any request; otherwise the URL is requested again, conditionally (`If-None-Match`,
/// `If-Modified-Since`) when an earlier download is known. `log` gets progress lines.
pub(crate) fn download(
    state_root: &Path,
    src: &HttpSource,
    cancel: &tokio_util::sync::CancellationToken,
    log: &dyn Fn(String),
) -> Result<PathBuf, SourceError> {
    let max = std::env::var("KILN_MAX_DOWNLOAD_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DEFAULT_MAX_DOWNLOAD);
    download_bounded(state_root, src, cancel, log, max)
}

/// [`download`], refusing files larger than `max` bytes.
fn download_bounded(
    state_root: &Path,
    src: &HttpSource,
    cancel: &tokio_util::sync::CancellationToken,
    log: &dyn Fn(String),
    max: u64,
) -> Result<PathBuf, SourceError> {
    let url = src.url.as_str();
    if url.starts_with("git@") || url.ends_with(".git") {
        return Err(download_err(
            url,
            "git repositories as ADD sources are not supported; clone the repository into the build context instead",
        ));
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|e| download_err(url, format!("invalid URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(download_err(
            url,
            "only http:// and https:// URLs can be downloaded",
        ));
    }
    let filename = src.filename.as_str();
    if filename.is_empty() || filename == "." || filename == ".." || filename.contains(['/', '\0'])
    {
        return Err(download_err(
            url,
            format!("cannot save the download as {filename:?}; end the URL path with a file name"),
        ));
    }
    let expected = match &src.checksum {
        Some(c) => Some(c.parse::<Digest>().map_err(|e| {
            download_err(
                url,
                format!("invalid --checksum={c}: {e} (expected sha256:<64 hex digits>)"),
            )
        })?),
        None => None,
    };

    let url_dir = state_root
        .join("downloads")
        .join(Digest::sha256_of(format!("{url}\0{filename}").as_bytes()).hex());
    let io_fail = |what: &str, path: &Path, e: io::Error| {
        download_err(url, format!("{what} {}: {e}", path.display()))
    };
    fs::create_dir_all(&url_dir).map_err(|e| io_fail("cannot create", &url_dir, e))?;
    let meta_path = url_dir.join("meta.json");
    let previous: Option<DownloadRecord> = fs::read(&meta_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|r: &DownloadRecord| url_dir.join(&r.dir).join(filename).is_file());

    if let (Some(want), Some(prev)) = (&expected, &previous) {
        let dir = url_dir.join(&prev.dir);
        let have = if want.algorithm() == Algorithm::Sha256 {
            prev.sha256.clone()
        } else {
            hash_file(&dir.join(filename), want.algorithm())
                .map_err(|e| io_fail("cannot read", &dir, e))?
        };
        if &have == want {
            log(format!("kiln: {url}: {want} already downloaded"));
            mark_used(&dir);
            return Ok(dir);
        }
    }

    let conditional = if expected.is_none() {
        previous.as_ref()
    } else {
        None
    };
    let handle = tokio::runtime::Handle::try_current().ok();
    let fetch = fetch(
        url,
        &url_dir,
        conditional,
        max,
        expected.as_ref().map(|d| d.algorithm()),
    );
    let fetched = match handle {
        Some(h) => h.block_on(async {
            tokio::select! {
                r = fetch => r,
                _ = cancel.cancelled() => Err(download_err(url, "cancelled")),
            }
        }),
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| download_err(url, format!("cannot start a runtime: {e}")))?
            .block_on(fetch),
    }?;
    let fresh = match fetched {
        Fetched::NotModified => {
            let prev = previous.ok_or_else(|| {
                download_err(
                    url,
                    "the server answered 304 Not Modified to an unconditional request",
                )
            })?;
            log(format!("kiln: {url}: not modified since the last download"));
            let dir = url_dir.join(prev.dir);
            mark_used(&dir);
            return Ok(dir);
        }
        Fetched::File(f) => f,
    };
    let tmp_file = fresh.tmp.path().join("file");
    if let (Some(want), Some(actual)) = (&expected, &fresh.checked) {
        if want != actual {
            return Err(SourceError::ChecksumMismatch {
                url: url.to_owned(),
                expected: src.checksum.clone().unwrap_or_default(),
                actual: actual.clone(),
            });
        }
    }
    let mtime = fresh
        .last_modified
        .as_deref()
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let dir_name = format!("{}-{mtime}", fresh.sha256.hex());
    let final_dir = url_dir.join(&dir_name);
    if !final_dir.join(filename).is_file() {
        let content = fresh.tmp.path().join("content");
        fs::create_dir(&content).map_err(|e| io_fail("cannot create", &content, e))?;
        let dest = content.join(filename);
        fs::rename(&tmp_file, &dest).map_err(|e| io_fail("cannot move", &dest, e))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o600))
            .map_err(|e| io_fail("cannot chmod", &dest, e))?;
        filetime::set_file_mtime(&dest, filetime::FileTime::from_unix_time(mtime, 0))
            .map_err(|e| io_fail("cannot set the time of", &dest, e))?;
        match fs::rename(&content, &final_dir) {
            Ok(()) => {}
            // Another build stored the same content first: theirs is as good as ours.
            Err(_) if final_dir.join(filename).is_file() => {}
            Err(e) => return Err(io_fail("cannot store", &final_dir, e)),
        }
    }
    let record = DownloadRecord {
        url: url.to_owned(),
        dir: dir_name,
        sha256: fresh.sha256.clone(),
        size: fresh.size,
        etag: fresh.etag,
        last_modified: fresh.last_modified,
    };
    let bytes = serde_json::to_vec(&record).unwrap_or_default();
    crate::context::write_rebuildable(&meta_path, &bytes)
        .map_err(|e| io_fail("cannot write", &meta_path, e))?;
    remove_stale(&url_dir, &record.dir);
    log(format!(
        "kiln: {url}: downloaded {} bytes, {}",
        fresh.size, fresh.sha256
    ));
    Ok(final_dir)
}

/// Stored downloads are aged by their directory's mtime: a build that reuses one marks it.
fn mark_used(dir: &Path) {
    let _ = filetime::set_file_mtime(dir, filetime::FileTime::now());
}

/// Stored `ADD <url>` downloads under `state_root`: how many contents, how many bytes.
pub fn downloads_usage(state_root: &Path) -> (u64, u64) {
    let mut count = 0;
    let mut bytes = 0;
    for (_, entry) in download_entries(state_root) {
        count += 1;
        bytes += tree_bytes(&entry);
    }
    (count, bytes)
}

/// Removes stored downloads not used for `older_than` or longer; with `busy` (a build is
/// running) anything used in the last hour stays, since that build may be copying from it.
/// Returns the contents removed and their bytes.
pub fn prune_downloads(state_root: &Path, older_than: Duration, busy: bool) -> (u64, u64) {
    let keep_for = if busy {
        older_than.max(Duration::from_secs(3600))
    } else {
        older_than
    };
    let (mut count, mut bytes) = (0, 0);
    for (url_dir, entry) in download_entries(state_root) {
        let age = fs::metadata(&entry)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if age < keep_for {
            continue;
        }
        let size = tree_bytes(&entry);
        let removed = if entry.is_dir() {
            fs::remove_dir_all(&entry)
        } else {
            fs::remove_file(&entry)
        };
        if removed.is_ok() {
            count += 1;
            bytes += size;
            let mut stat = entry.into_os_string();
            stat.push(".stat.json");
            let _ = fs::remove_file(stat);
        }
        // A URL with no content left forgets its validators too.
        let empty = fs::read_dir(&url_dir).is_ok_and(|rd| {
            rd.flatten().all(|e| {
                e.file_name() == "meta.json" || e.path().extension() == Some("json".as_ref())
            })
        });
        if empty {
            let _ = fs::remove_dir_all(&url_dir);
        }
    }
    (count, bytes)
}

/// Every stored content (a directory holding one file) or leftover temporary file, with its
/// URL's directory.
fn download_entries(state_root: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    let Ok(urls) = fs::read_dir(state_root.join("downloads")) else {
        return out;
    };
    for u in urls.flatten() {
        let Ok(entries) = fs::read_dir(u.path()) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name == "meta.json" || name.ends_with(".stat.json") {
                continue;
            }
            out.push((u.path(), e.path()));
        }
    }
    out
}

fn tree_bytes(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Older contents of one URL (and temporary files of killed downloads) are removed once
/// they have not been touched for an hour, so the downloads directory holds about one copy
/// per URL; a build still copying from an old one finishes well within that time.
fn remove_stale(url_dir: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(url_dir) else {
        return;
    };
    let hour = Duration::from_secs(3600);
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "meta.json" || name == keep || name == format!("{keep}.stat.json") {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > hour);
        if old {
            let path = e.path();
            let _ = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
    }
}

fn hash_file(path: &Path, alg: Algorithm) -> io::Result<Digest> {
    let mut f = fs::File::open(path)?;
    let mut w = DigestWriter::new(io::sink(), alg);
    io::copy(&mut f, &mut w)?;
    Ok(w.finish().1)
}

enum Fetched {
    NotModified,
    File(FreshFile),
}

struct FreshFile {
    /// A temporary directory holding `file`; removed when dropped.
    tmp: tempfile::TempDir,
    sha256: Digest,
    /// The digest in the `--checksum` algorithm, when that is not sha256.
    checked: Option<Digest>,
    size: u64,
    etag: Option<String>,
    last_modified: Option<String>,
}

/// The timeouts of downloads: the registry client's (`KILN_REGISTRY_TIMEOUT`).
fn download_timeouts(url: &str) -> Result<Timeouts, SourceError> {
    Ok(Timeouts::from_env()
        .map_err(|e| download_err(url, e))?
        .unwrap_or_default())
}

/// An HTTP client for `url`; the system's TLS roots are read only for an https:// one.
fn http_client(url: &str, timeouts: &Timeouts) -> Result<reqwest::Client, SourceError> {
    if url.starts_with("https://") {
        kiln_oci::transport::check_system_roots().map_err(|e| download_err(url, e))?;
    }
    kiln_oci::transport::client_builder(timeouts)
        .map_err(|e| download_err(url, format!("cannot make an HTTP client: {e}")))?
        .build()
        .map_err(|e| download_err(url, format!("cannot make an HTTP client: {e}")))
}

fn stalled(url: &str, stall: Stall) -> SourceError {
    download_err(
        url,
        format!("the server stopped answering: {stall}; give it longer with {TIMEOUT_ENV}"),
    )
}

/// Full error chain of a reqwest error (its top message alone hides the cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

async fn fetch(
    url: &str,
    url_dir: &Path,
    previous: Option<&DownloadRecord>,
    max: u64,
    checksum_alg: Option<Algorithm>,
) -> Result<Fetched, SourceError> {
    let timeouts = download_timeouts(url)?;
    let client = http_client(url, &timeouts)?;
    let mut req = client.get(url);
    if let Some(prev) = previous {
        if let Some(etag) = &prev.etag {
            req = req.header("If-None-Match", etag);
        }
        if let Some(lm) = &prev.last_modified {
            req = req.header("If-Modified-Since", lm);
        }
    }
    let watch = RequestWatch::new(0);
    let mut resp = tokio::select! {
        r = req.send() => r.map_err(|e| download_err(url, format!("request failed: {}", chain(&e))))?,
        stall = watch.stalled(timeouts) => return Err(stalled(url, stall)),
    };
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_MODIFIED && previous.is_some() {
        return Ok(Fetched::NotModified);
    }
    if !status.is_success() {
        return Err(download_err(
            url,
            format!("the server answered {status}; check the URL"),
        ));
    }
    if let Some(len) = resp.content_length() {
        if len > max {
            return Err(too_big(url, max));
        }
    }
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let etag = header("etag");
    let last_modified = header("last-modified");
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(url_dir)
        .map_err(|e| {
            download_err(
                url,
                format!("cannot create a file in {}: {e}", url_dir.display()),
            )
        })?;
    let path = tmp.path().join("file");
    let file = fs::File::create(&path)
        .map_err(|e| download_err(url, format!("cannot create {}: {e}", path.display())))?;
    let mut out = DigestWriter::new(
        io::BufWriter::with_capacity(1 << 20, file),
        Algorithm::Sha256,
    );
    let mut other = checksum_alg
        .filter(|a| *a != Algorithm::Sha256)
        .map(Hasher::new);
    let write_err = |e: io::Error| download_err(url, format!("writing {}: {e}", path.display()));
    let mut read = ReadWatch::new(timeouts);
    loop {
        let chunk = match tokio::time::timeout_at(read.deadline(), resp.chunk()).await {
            Err(_) => return Err(stalled(url, read.stall())),
            Ok(Err(e)) => {
                return Err(download_err(
                    url,
                    format!("the download broke off: {}", chain(&e)),
                ))
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        read.received(chunk.len());
        if out.written() + chunk.len() as u64 > max {
            return Err(too_big(url, max));
        }
        out.write_all(&chunk).map_err(write_err)?;
        if let Some(h) = &mut other {
            h.update(&chunk);
        }
    }
    let (buf, sha256, size) = out.finish();
    let file = buf.into_inner().map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)?;
    Ok(Fetched::File(FreshFile {
        tmp,
        checked: other
            .map(Hasher::finish)
            .or_else(|| checksum_alg.map(|_| sha256.clone())),
        sha256,
        size,
        etag,
        last_modified,
    }))
}

fn too_big(url: &str, max: u64) -> SourceError {
    download_err(
        url,
        format!("the file is larger than {max} bytes; set KILN_MAX_DOWNLOAD_BYTES to allow more"),
    )
}

/// The reference string the frontend and the engine use for an image in an OCI layout:
/// `oci-layout://PATH@sha256:...` or `oci-layout://PATH:TAG`.
pub fn layout_reference(path: &str, reference: &str) -> String {
    let sep = if reference.contains(':') { '@' } else { ':' };
    format!("{LAYOUT_SCHEME}{path}{sep}{reference}")
}

/// Splits a [`layout_reference`] back into the directory and the tag or digest.
pub fn parse_layout_reference(s: &str) -> Option<(String, String)> {
    let rest = s.strip_prefix(LAYOUT_SCHEME)?;
    if let Some((p, d)) = rest.rsplit_once('@') {
        return Some((p.to_owned(), d.to_owned()));
    }
    let last = rest.rsplit('/').next().unwrap_or(rest);
    match last.rsplit_once(':') {
        Some((_, tag)) if !tag.is_empty() => Some((
            rest[..rest.len() - tag.len() - 1].to_owned(),
            tag.to_owned(),
        )),
        _ => Some((rest.to_owned(), "latest".to_owned())),
    }
}

/// Resolves the image `reference` (a tag, matched against the
/// `org.opencontainers.image.ref.name` annotations of `index.json`, or a manifest digest) in
/// the OCI layout at `path`, for `platform`. Manifests and the config are read whole and
/// digest-checked; layer blobs are copied (and checked) only when a step needs them.
pub fn resolve_layout(
    path: &str,
    reference: &str,
    platform: &kiln_graph::Platform,
) -> Result<BaseImage, SourceError> {
    let fail = |message: String| SourceError::Layout {
        path: path.to_owned(),
        message,
    };
    let dir = Path::new(path);
    if !dir.is_dir() {
        return Err(fail(
            "no such directory; give the directory of an OCI image layout \
             (--build-context NAME=oci-layout:///PATH[:TAG|@DIGEST], or buildctl's --oci-layout NAME=PATH with --opt context:NAME=oci-layout://NAME@DIGEST)"
        .into()));
    }
    let layout = OciLayout::open(dir).map_err(|e| {
        fail(format!(
            "not an OCI image layout ({e}); an OCI layout holds oci-layout, index.json and blobs/"
        ))
    })?;
    let index = layout.index().map_err(|e| fail(e.to_string()))?;
    let read = |desc: &Descriptor| -> Result<RawManifest, SourceError> {
        if desc.size > MAX_SMALL_BLOB {
            return Err(fail(format!(
                "manifest {} is {} bytes, larger than {MAX_SMALL_BLOB}",
                desc.digest, desc.size
            )));
        }
        let bytes = layout
            .read_blob(&desc.digest)
            .map_err(|e| fail(e.to_string()))?;
        Ok(RawManifest::new(&desc.media_type, bytes))
    };

    let top: Vec<Descriptor> = if reference.contains(':') {
        let digest: Digest = reference
            .parse()
            .map_err(|e| fail(format!("invalid digest {reference}: {e}")))?;
        let known = index.manifests.iter().find(|d| d.digest == digest).cloned();
        match known {
            Some(d) => vec![d],
            None if layout.has_blob(&digest) => {
                let size = fs::metadata(layout.blob_path(&digest))
                    .map(|m| m.len())
                    .unwrap_or(0);
                vec![Descriptor::new("", digest, size)]
            }
            None => {
                return Err(fail(format!(
                    "no manifest {digest} in the layout (index.json lists: {})",
                    list_entries(&index.manifests)
                )))
            }
        }
    } else {
        let name_of = |d: &Descriptor| d.annotations.get(REF_NAME_ANNOTATION).cloned();
        let mut named: Vec<Descriptor> = index
            .manifests
            .iter()
            .filter(|d| name_of(d).as_deref() == Some(reference))
            .cloned()
            .collect();
        if named.is_empty() {
            // Some tools (kiln's and podman's oci exporters) name the image in full
            // (`app:v1`, `reg/app:v1`); its tag part then matches too.
            named = index
                .manifests
                .iter()
                .filter(|d| {
                    name_of(d).is_some_and(|n| {
                        let last = n.rsplit('/').next().unwrap_or(&n);
                        last.rsplit_once(':').map(|(_, t)| t) == Some(reference)
                    })
                })
                .cloned()
                .collect();
        }
        if !named.is_empty() {
            named
        } else if reference == "latest"
            && index.manifests.len() == 1
            && !index.manifests[0]
                .annotations
                .contains_key(REF_NAME_ANNOTATION)
        {
            // A layout with one unnamed image (e.g. `skopeo copy ... oci:DIR`) is its own latest.
            index.manifests.clone()
        } else {
            return Err(fail(format!(
                "no image tagged {reference:?} (tags in index.json: {})",
                list_entries(&index.manifests)
            )));
        }
    };

    let want: kiln_oci::Platform = platform
        .to_string()
        .parse()
        .map_err(|e: kiln_oci::PlatformError| fail(e.to_string()))?;
    // Follow indexes down to the one image manifest for the platform.
    let mut candidates = top;
    let mut manifest = None;
    for _ in 0..4 {
        let chosen = choose_platform(&candidates, &want).ok_or_else(|| {
            let available: Vec<String> = candidates
                .iter()
                .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                .collect();
            fail(format!(
                "no image for {want} under {reference} (platforms: {})",
                if available.is_empty() {
                    "none".into()
                } else {
                    available.join(", ")
                }
            ))
        })?;
        let raw = read(&chosen)?;
        match raw
            .parse()
            .map_err(|e| fail(format!("manifest {}: {e}", raw.digest)))?
        {
            Manifest::Image(m) => {
                manifest = Some((raw.digest.clone(), m));
                break;
            }
            Manifest::Index(idx) => candidates = idx.manifests,
        }
    }
    let Some((manifest_digest, manifest)) = manifest else {
        return Err(fail(format!("{reference}: indexes nested too deeply")));
    };
    if manifest.config.size > MAX_SMALL_BLOB {
        return Err(fail(format!(
            "config {} is too large",
            manifest.config.digest
        )));
    }
    let config_bytes = layout
        .read_blob(&manifest.config.digest)
        .map_err(|e| fail(e.to_string()))?;
    let config: kiln_oci::ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| fail(format!("config {}: {e}", manifest.config.digest)))?;
    let layers = crate::image::image_layers(&config, &manifest.layers).ok_or_else(|| {
        fail(format!(
            "image {manifest_digest}: its config lists {} layers, its manifest {}",
            config.rootfs.diff_ids.len(),
            manifest.layers.len()
        ))
    })?;
    let source: Arc<dyn BlobSource> = Arc::new(LayoutBlobs::new(dir.to_owned()));
    Ok(BaseImage {
        manifest_digest,
        config,
        layers,
        source: Some(source),
    })
}

fn choose_platform(candidates: &[Descriptor], want: &kiln_oci::Platform) -> Option<Descriptor> {
    let usable: Vec<&Descriptor> = candidates
        .iter()
        .filter(|d| {
            d.media_type.is_empty()
                || media_type::is_manifest(&d.media_type)
                || media_type::is_index(&d.media_type)
        })
        // Attestation manifests (BuildKit's provenance) carry unknown/unknown.
        .filter(|d| !d.annotations.contains_key("vnd.docker.reference.type"))
        .collect();
    usable
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
        .or_else(|| {
            let unplatformed: Vec<&&Descriptor> =
                usable.iter().filter(|d| d.platform.is_none()).collect();
            match unplatformed.as_slice() {
                [only] => Some(*only),
                _ => None,
            }
        })
        .map(|d| (*d).clone())
}

fn list_entries(manifests: &[Descriptor]) -> String {
    let names: Vec<String> = manifests
        .iter()
        .map(|d| match d.annotations.get(REF_NAME_ANNOTATION) {
            Some(n) => n.clone(),
            None => format!("{} (untagged)", d.digest),
        })
        .collect();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Serves `body` with an ETag on 127.0.0.1 for `n` requests, answering 304 to a matching
    /// If-None-Match; counts the 304s.
    fn serve(body: &'static [u8], n: usize) -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/dir/file.bin", l.local_addr().unwrap());
        let not_modified = Arc::new(AtomicUsize::new(0));
        let nm = not_modified.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().take(n) {
                let mut conn = conn.unwrap();
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut conditional = false;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    conditional |= h.to_ascii_lowercase().starts_with("if-none-match: \"e1\"");
                }
                let reply = if conditional {
                    nm.fetch_add(1, Ordering::SeqCst);
                    "HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n".to_string()
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"e1\"\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                };
                let _ = conn.write_all(reply.as_bytes());
                if !conditional {
                    let _ = conn.write_all(body);
                }
            }
        });
        (url, not_modified)
    }

    fn http(url: &str, checksum: Option<String>) -> HttpSource {
        HttpSource {
            url: url.to_owned(),
            checksum,
            filename: "file.bin".into(),
        }
    }

    #[test]
    fn download_is_0600_at_the_epoch_and_a_second_one_is_conditional() {
        let state = tempfile::tempdir().unwrap();
        let (url, not_modified) = serve(b"payload", 2);
        let cancel = tokio_util::sync::CancellationToken::new();
        let dir = download(state.path(), &http(&url, None), &cancel, &|_| {}).unwrap();
        let file = dir.join("file.bin");
        assert_eq!(fs::read(&file).unwrap(), b"payload");
        let meta = fs::metadata(&file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(meta.mtime(), 0, "no Last-Modified: the epoch");
        let again = download(state.path(), &http(&url, None), &cancel, &|_| {}).unwrap();
        assert_eq!(again, dir);
        assert_eq!(not_modified.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_known_checksum_needs_no_request_and_a_wrong_one_names_both_digests() {
        let state = tempfile::tempdir().unwrap();
        // The server answers exactly one request: a second one would fail to connect.
        let (url, _) = serve(b"payload", 1);
        let cancel = tokio_util::sync::CancellationToken::new();
        let sum = Digest::sha256_of(b"payload").to_string();
        download(
            state.path(),
            &http(&url, Some(sum.clone())),
            &cancel,
            &|_| {},
        )
        .unwrap();
        let dir = download(state.path(), &http(&url, Some(sum)), &cancel, &|_| {}).unwrap();
        assert_eq!(fs::read(dir.join("file.bin")).unwrap(), b"payload");

        let (url, _) = serve(b"payload", 1);
        let wrong = format!("sha256:{}", "0".repeat(64));
        let e = download(
            state.path(),
            &http(&url, Some(wrong.clone())),
            &cancel,
            &|_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(&url) && e.contains(&wrong), "{e}");
        assert!(
            e.contains(&Digest::sha256_of(b"payload").to_string()),
            "{e}"
        );
    }

    #[test]
    fn prune_removes_unused_downloads_but_spares_recent_ones_while_a_build_runs() {
        let state = tempfile::tempdir().unwrap();
        let url_dir = state.path().join("downloads").join("u1");
        let (old, recent) = (url_dir.join("aaaa-0"), url_dir.join("bbbb-0"));
        for d in [&old, &recent] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("f"), b"12345").unwrap();
        }
        fs::write(url_dir.join("meta.json"), b"{}").unwrap();
        fs::write(url_dir.join("aaaa-0.stat.json"), b"{}").unwrap();
        let now = filetime::FileTime::now().unix_seconds();
        filetime::set_file_mtime(&old, filetime::FileTime::from_unix_time(now - 7200, 0)).unwrap();
        assert_eq!(downloads_usage(state.path()), (2, 10));

        // A running build may be copying from what it used in the last hour.
        assert_eq!(prune_downloads(state.path(), Duration::ZERO, true), (1, 5));
        assert!(!old.exists() && !url_dir.join("aaaa-0.stat.json").exists());
        assert!(recent.exists());

        // With no build running, `--all` takes the rest, and the URL's record with it.
        assert_eq!(prune_downloads(state.path(), Duration::ZERO, false), (1, 5));
        assert!(!url_dir.exists());
        assert_eq!(downloads_usage(state.path()), (0, 0));
    }

    #[test]
    fn a_new_download_removes_contents_of_the_same_url_untouched_for_an_hour() {
        let state = tempfile::tempdir().unwrap();
        let (url, _) = serve(b"v2", 1);
        let url_dir = state
            .path()
            .join("downloads")
            .join(Digest::sha256_of(format!("{url}\0file.bin").as_bytes()).hex());
        let (stale, recent) = (url_dir.join("0000-0"), url_dir.join("1111-0"));
        fs::create_dir_all(&stale).unwrap();
        fs::create_dir_all(&recent).unwrap();
        let now = filetime::FileTime::now().unix_seconds();
        filetime::set_file_mtime(&stale, filetime::FileTime::from_unix_time(now - 7200, 0))
            .unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let dir = download(state.path(), &http(&url, None), &cancel, &|_| {}).unwrap();
        assert_eq!(fs::read(dir.join("file.bin")).unwrap(), b"v2");
        assert!(
            !stale.exists(),
            "a content untouched for two hours is removed"
        );
        assert!(recent.exists(), "a recent one is kept");
    }

    #[test]
    fn a_download_over_the_bound_is_refused_and_leaves_nothing() {
        let state = tempfile::tempdir().unwrap();
        let (url, _) = serve(b"0123456789", 1);
        let cancel = tokio_util::sync::CancellationToken::new();
        let e = download_bounded(state.path(), &http(&url, None), &cancel, &|_| {}, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than 4 bytes"), "{e}");
        let url_dirs: Vec<_> = fs::read_dir(state.path().join("downloads"))
            .unwrap()
            .collect();
        for d in url_dirs {
            let entries: Vec<_> = fs::read_dir(d.unwrap().path()).unwrap().collect();
            assert!(
                entries.is_empty(),
                "temporary files are removed: {entries:?}"
            );
        }
    }

    #[test]
    fn layout_references_round_trip_tags_and_digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        for (p, r) in [("/srv/l", "v1"), ("./a:b/l", "latest"), ("/l", d.as_str())] {
            let s = layout_reference(p, r);
            assert_eq!(
                parse_layout_reference(&s),
                Some((p.to_owned(), r.to_owned())),
                "{s}"
            );
        }
        assert_eq!(parse_layout_reference("docker.io/x"), None);
    }

    #[test]
    fn missing_layout_is_an_error_naming_the_path_and_the_flags() {
        let e = resolve_layout(
            "/nonexistent/layout",
            "v1",
            &kiln_graph::Platform::parse("linux/amd64").unwrap(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("/nonexistent/layout") && e.contains("--build-context"),
            "{e}"
        );
    }

    /// A layout with one image (one layer `layer`) tagged `v1`; returns its manifest digest.
    fn one_image_layout(dir: &Path, layer: &[u8]) -> Digest {
        let layout = OciLayout::create(dir).unwrap();
        let ld = layout.write_blob(layer).unwrap();
        let cfg = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["A=1"]}},"rootfs":{{"type":"layers","diff_ids":["{ld}"]}}}}"#
        );
        let cd = layout.write_blob(cfg.as_bytes()).unwrap();
        let m = kiln_oci::ImageManifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.into()),
            artifact_type: None,
            config: Descriptor::new(media_type::OCI_CONFIG, cd, cfg.len() as u64),
            layers: vec![Descriptor::new(
                media_type::OCI_LAYER_TAR,
                ld,
                layer.len() as u64,
            )],
            subject: None,
            annotations: Default::default(),
        };
        let raw = RawManifest::from_image(&m);
        layout.write_blob(&raw.bytes).unwrap();
        layout.add_manifest(raw.descriptor(), "v1").unwrap();
        raw.digest
    }

    #[test]
    fn layout_blobs_are_digest_checked_manifests_when_read_layers_when_fetched() {
        let tmp = tempfile::tempdir().unwrap();
        let layer = b"not really a tar, but bytes with a digest".to_vec();
        let digest = one_image_layout(tmp.path(), &layer);
        let p = kiln_graph::Platform::parse("linux/amd64").unwrap();
        let path = tmp.path().to_str().unwrap();
        let img = resolve_layout(path, "v1", &p).unwrap();
        assert_eq!(
            img.config.config.as_ref().unwrap().env.as_deref(),
            Some(&["A=1".to_string()][..])
        );
        let store = kiln_store::Store::open(tmp.path().join("state")).unwrap();
        let blob = &img.layers[0].blob;
        // A layer whose bytes no longer match its name is refused when fetched.
        let blob_path = tmp.path().join("blobs/sha256").join(blob.digest.hex());
        let mut bad = layer.clone();
        bad[0] ^= 1;
        fs::write(&blob_path, &bad).unwrap();
        let source = img.source.clone().unwrap();
        assert!(
            source.fetch(blob, &store).is_err(),
            "a corrupt layer is refused"
        );
        assert!(!store.content().has(&blob.digest));
        fs::write(&blob_path, &layer).unwrap();
        source.fetch(blob, &store).unwrap();
        assert!(store.content().has(&blob.digest));
        // A manifest whose bytes no longer match is refused when the image is resolved.
        let manifest_path = tmp.path().join("blobs/sha256").join(digest.hex());
        let mut m = fs::read(&manifest_path).unwrap();
        m.push(b' ');
        fs::write(&manifest_path, m).unwrap();
        let e = resolve_layout(path, "v1", &p).err().unwrap().to_string();
        assert!(e.contains("corrupt"), "{e}");
    }

    #[test]
    fn an_index_in_the_layout_is_followed_to_the_wanted_platform() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(tmp.path()).unwrap();
        let mut index = kiln_oci::ImageIndex::new();
        let mut by_arch = Vec::new();
        for arch in ["arm64", "amd64"] {
            let raw = empty_image(&layout, arch);
            let mut d = raw.descriptor();
            d.platform = Some(kiln_oci::Platform::new("linux", arch, None));
            index.manifests.push(d);
            by_arch.push((arch, raw.digest));
        }
        let raw = RawManifest::from_index(&index);
        layout.write_blob(&raw.bytes).unwrap();
        layout.add_manifest(raw.descriptor(), "multi").unwrap();
        let path = tmp.path().to_str().unwrap();
        for (arch, digest) in &by_arch {
            let p = kiln_graph::Platform::parse(&format!("linux/{arch}")).unwrap();
            let img = resolve_layout(path, "multi", &p).unwrap();
            assert_eq!(&img.manifest_digest, digest, "{arch}");
            assert_eq!(img.config.architecture, *arch);
        }
        let p = kiln_graph::Platform::parse("linux/s390x").unwrap();
        let e = resolve_layout(path, "multi", &p).err().unwrap().to_string();
        assert!(
            e.contains("linux/s390x") && e.contains("linux/amd64"),
            "{e}"
        );
    }

    /// Writes a linux/`arch` image with no layers into `layout` (config and manifest blobs,
    /// no index entry); its manifest.
    fn empty_image(layout: &OciLayout, arch: &str) -> RawManifest {
        let cfg = format!(
            r#"{{"architecture":"{arch}","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let cd = layout.write_blob(cfg.as_bytes()).unwrap();
        let m = kiln_oci::ImageManifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.into()),
            artifact_type: None,
            config: Descriptor::new(media_type::OCI_CONFIG, cd, cfg.len() as u64),
            layers: vec![],
            subject: None,
            annotations: Default::default(),
        };
        let raw = RawManifest::from_image(&m);
        layout.write_blob(&raw.bytes).unwrap();
        raw
    }

    #[test]
    fn unknown_tag_lists_the_tags_the_layout_has() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(tmp.path()).unwrap();
        let raw = empty_image(&layout, "amd64");
        layout.add_manifest(raw.descriptor(), "v1").unwrap();
        let p = kiln_graph::Platform::parse("linux/amd64").unwrap();
        let path = tmp.path().to_str().unwrap();
        let img = resolve_layout(path, "v1", &p).unwrap();
        assert_eq!(img.manifest_digest, raw.digest);
        let by_digest = resolve_layout(path, &raw.digest.to_string(), &p).unwrap();
        assert_eq!(by_digest.manifest_digest, raw.digest);
        let e = resolve_layout(path, "v2", &p).err().unwrap().to_string();
        assert!(
            e.contains("\"v2\"") && e.contains("v1") && e.contains(path),
            "{e}"
        );
    }
}
