//! The registry's filesystem layout under `--root`, and every operation on it.
//!
//! ```text
//! blobs/<alg>/<hex[0..2]>/<hex>                 content (blobs and manifests), shared
//! uploads/<repo-key>-<id>                       staged upload data
//! repos/<name>/_layers/<alg>/<hex>              empty link: blob visible in <name>
//! repos/<name>/_manifests/revisions/<alg>/<hex> link holding the manifest's media type
//! repos/<name>/_manifests/tags/<tag>            the tagged manifest's digest
//! repos/<name>/_referrers/<alg>/<hex>/<alg>-<hex>  descriptor JSON of a referrer
//! gc.lock                                       flock: commits shared, GC exclusive
//! ```
//!
//! Every file that becomes visible is complete before it gets its name: data is written to
//! a temporary name, fsynced (unless disabled), renamed, and the directory fsynced. Readers
//! only ever look at final names. See `docs/registry.md` for the crash-safety argument.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use kiln_oci::{Algorithm, Digest, Hasher};

/// The directory tree of one registry.
#[derive(Debug, Clone)]
pub(crate) struct Storage {
    root: PathBuf,
    /// fsync files and directories before acknowledging writes (survives power loss, not
    /// only process death).
    sync: bool,
}

/// A manifest as stored: its bytes and the media type it was pushed with.
pub(crate) struct StoredManifest {
    pub(crate) digest: Digest,
    pub(crate) media_type: String,
    pub(crate) bytes: Vec<u8>,
}

/// A shared or exclusive hold on `gc.lock`; released on drop (closing the descriptor).
pub(crate) struct GcLock {
    _file: File,
}

/// The repository part of a staged upload's file name: uploads of all repositories share
/// one directory, and a fixed-length key keeps names short whatever the repository name.
fn upload_key(name: &str) -> String {
    Digest::sha256_of(name.as_bytes()).hex()[..16].to_owned()
}

/// The file name under `uploads/` of upload `id` in repository `name`.
pub(crate) fn upload_file_name(name: &str, id: &str) -> String {
    format!("{}-{id}", upload_key(name))
}

/// Splits a staged upload's file name `<repo-key>-<id>` into its parts; `None` for any
/// other file.
fn parse_upload_file(file: &str) -> Option<(&str, &str)> {
    let (k, id) = file.split_once('-')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(k, 16) && hex(id, 32)).then_some((k, id))
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

impl Storage {
    pub(crate) fn open(root: &Path, sync: bool) -> io::Result<Storage> {
        for d in ["blobs", "uploads", "repos"] {
            fs::create_dir_all(root.join(d))?;
        }
        Ok(Storage {
            root: root.to_owned(),
            sync,
        })
    }

    // ---------------------------------------------------------------- locking

    /// Takes `gc.lock` shared (every commit) or exclusive (GC). Blocks.
    pub(crate) fn gc_lock(&self, exclusive: bool) -> io::Result<GcLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("gc.lock"))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(GcLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    // ---------------------------------------------------------------- paths

    pub(crate) fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root
            .join("blobs")
            .join(d.algorithm().name())
            .join(&hex[..2])
            .join(hex)
    }

    pub(crate) fn repo_dir(&self, name: &str) -> PathBuf {
        self.root.join("repos").join(name)
    }

    fn layer_link(&self, name: &str, d: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join("_layers")
            .join(d.algorithm().name())
            .join(d.hex())
    }

    fn revision_link(&self, name: &str, d: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join("_manifests/revisions")
            .join(d.algorithm().name())
            .join(d.hex())
    }

    fn tags_dir(&self, name: &str) -> PathBuf {
        self.repo_dir(name).join("_manifests/tags")
    }

    fn referrers_dir(&self, name: &str, subject: &Digest) -> PathBuf {
        self.repo_dir(name)
            .join("_referrers")
            .join(subject.algorithm().name())
            .join(subject.hex())
    }

    fn upload_path(&self, name: &str, id: &str) -> PathBuf {
        self.root.join("uploads").join(upload_file_name(name, id))
    }

    // ---------------------------------------------------------------- durable writes

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.sync {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Renames `from` to `to`, creating `to`'s parent on demand, then syncs the parent.
    fn rename_into_place(&self, from: &Path, to: &Path) -> io::Result<()> {
        let parent = to
            .parent()
            .ok_or_else(|| io::Error::other("path without parent"))?;
        match fs::rename(from, to) {
            Err(e) if e.kind() == ErrorKind::NotFound && from.exists() => {
                fs::create_dir_all(parent)?;
                fs::rename(from, to)?;
            }
            r => r?,
        }
        self.sync_dir(parent)
    }

    /// Writes `data` to `path` atomically: temp file beside it, fsync, rename, fsync dir.
    fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let parent = path
            .parent()
            .ok_or_else(|| io::Error::other("path without parent"))?;
        let tmp = parent.join(format!(".tmp-{}", random_hex(8)));
        let mut f = match File::create(&tmp) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir_all(parent)?;
                File::create(&tmp)?
            }
            r => r?,
        };
        let res = f
            .write_all(data)
            .and_then(|()| if self.sync { f.sync_data() } else { Ok(()) });
        drop(f);
        if let Err(e) = res.and_then(|()| self.rename_into_place(&tmp, path)) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- blobs

    /// Size of the blob if `name` may see it (link present and content present).
    pub(crate) fn blob_size(&self, name: &str, d: &Digest) -> io::Result<Option<u64>> {
        if !self.layer_link(name, d).exists() {
            return Ok(None);
        }
        match fs::metadata(self.blob_path(d)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Refreshes a blob's mtime so a GC running now treats it as freshly pushed; called when
    /// a pusher learns the blob exists (HEAD, mount) and may reference it next.
    pub(crate) fn touch_blob(&self, d: &Digest) {
        // Only refresh stale times: a HEAD storm on a hot blob should not write metadata.
        let fresh = fs::metadata(self.blob_path(d))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < std::time::Duration::from_secs(60));
        if fresh {
            return;
        }
        let _ = File::options()
            .append(true)
            .open(self.blob_path(d))
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    }

    /// Links a blob present anywhere in the store into `name` (mount without `from`).
    /// Returns false when the store does not hold it.
    pub(crate) fn mount_any(&self, to: &str, d: &Digest) -> io::Result<bool> {
        let _lock = self.gc_lock(false)?;
        if !self.blob_path(d).is_file() {
            return Ok(false);
        }
        self.touch_blob(d);
        self.link_blob(to, d)?;
        Ok(true)
    }

    /// Makes an existing blob visible in `name` (push of already-present content, mount).
    pub(crate) fn link_blob(&self, name: &str, d: &Digest) -> io::Result<()> {
        let link = self.layer_link(name, d);
        if link.exists() {
            return Ok(());
        }
        let parent = link
            .parent()
            .ok_or_else(|| io::Error::other("link without parent"))?;
        match File::create(&link) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir_all(parent)?;
                File::create(&link)?;
            }
            r => {
                r?;
            }
        }
        self.sync_dir(parent)
    }

    /// Mounts `d` from `from` into `to` when `from` can see it. Returns false otherwise.
    pub(crate) fn mount_blob(&self, from: &str, to: &str, d: &Digest) -> io::Result<bool> {
        let _lock = self.gc_lock(false)?;
        if self.blob_size(from, d)?.is_none() {
            return Ok(false);
        }
        self.touch_blob(d);
        self.link_blob(to, d)?;
        Ok(true)
    }

    /// Removes `d` from `name`'s view. Returns false when it was not visible.
    pub(crate) fn unlink_blob(&self, name: &str, d: &Digest) -> io::Result<bool> {
        match fs::remove_file(self.layer_link(name, d)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    // ---------------------------------------------------------------- uploads

    /// Starts an upload session for `name`; returns its id.
    pub(crate) fn create_upload(&self, name: &str) -> io::Result<String> {
        let id = random_hex(16);
        File::create(self.upload_path(name, &id))?;
        Ok(id)
    }

    /// Counts staged uploads: `(in all repositories, in name)`. Monolithic uploads in
    /// progress count too; they hold a file for as long as their request runs.
    pub(crate) fn count_uploads(&self, name: &str) -> io::Result<(usize, usize)> {
        let key = upload_key(name);
        let (mut total, mut here) = (0, 0);
        for e in fs::read_dir(self.root.join("uploads"))? {
            let file = e?.file_name();
            let Some(file) = file.to_str() else { continue };
            if let Some((k, _)) = parse_upload_file(file) {
                total += 1;
                if k == key {
                    here += 1;
                }
            }
        }
        Ok((total, here))
    }

    /// Removes staged uploads that hold no data and were created (or last written) more than
    /// `age` ago: sessions a client opened and never used. Returns how many went. A client
    /// that comes back to one later gets `BLOB_UPLOAD_UNKNOWN` and starts over, which costs
    /// it nothing since nothing was sent. Files named in `busy` (see [`upload_file_name`])
    /// have a request writing to them and are kept: a slow body may not have filled its
    /// first write batch yet.
    pub(crate) fn reclaim_empty_uploads(
        &self,
        age: std::time::Duration,
        busy: &std::collections::HashSet<String>,
    ) -> io::Result<usize> {
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for e in fs::read_dir(self.root.join("uploads"))? {
            let e = e?;
            let file = e.file_name();
            match file.to_str() {
                Some(f) if parse_upload_file(f).is_some() && !busy.contains(f) => {}
                _ => continue,
            }
            let Ok(meta) = e.metadata() else { continue };
            // Age 0 reclaims every empty upload, even one whose timestamp reads as just
            // ahead of this clock.
            let idle = age.is_zero()
                || meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|d| d >= age);
            if meta.len() == 0 && idle {
                match fs::remove_file(e.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }

    /// Opens the staged data of an upload for appending; `None` when the id is unknown in
    /// this repository.
    pub(crate) fn open_upload(&self, name: &str, id: &str) -> io::Result<Option<(File, u64)>> {
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        match OpenOptions::new()
            .read(true)
            .append(true)
            .open(self.upload_path(name, id))
        {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn upload_size(&self, name: &str, id: &str) -> io::Result<Option<u64>> {
        Ok(self.open_upload(name, id)?.map(|(_, n)| n))
    }

    pub(crate) fn delete_upload(&self, name: &str, id: &str) -> io::Result<bool> {
        if self.open_upload(name, id)?.is_none() {
            return Ok(false);
        }
        fs::remove_file(self.upload_path(name, id))?;
        Ok(true)
    }

    /// Digest of the staged data of an upload under `alg` (used after a restart, or when
    /// the client finishes with a different algorithm than the streaming hash).
    pub(crate) fn hash_file(file: &mut File, alg: Algorithm) -> io::Result<Digest> {
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(0))?;
        let mut h = Hasher::new(alg);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(h.finish())
    }

    /// Moves a verified upload into the blob store and links it into `name`.
    pub(crate) fn commit_upload(
        &self,
        name: &str,
        id: &str,
        file: File,
        d: &Digest,
    ) -> io::Result<()> {
        if self.sync {
            file.sync_data()?;
        }
        drop(file);
        let _lock = self.gc_lock(false)?;
        self.rename_into_place(&self.upload_path(name, id), &self.blob_path(d))?;
        self.link_blob(name, d)
    }

    /// A fresh staging file for a monolithic upload whose session is never exposed.
    pub(crate) fn create_temp_upload(&self, name: &str) -> io::Result<(String, File)> {
        let id = random_hex(16);
        let f = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(self.upload_path(name, &id))?;
        Ok((id, f))
    }

    // ---------------------------------------------------------------- manifests

    /// Resolves a tag or digest reference to the digest of a manifest present in `name`.
    pub(crate) fn resolve(&self, name: &str, reference: &str) -> io::Result<Option<Digest>> {
        let digest = if reference.contains(':') {
            match reference.parse::<Digest>() {
                Ok(d) => d,
                Err(_) => return Ok(None),
            }
        } else {
            match fs::read_to_string(self.tags_dir(name).join(reference)) {
                Ok(s) => match s.trim().parse::<Digest>() {
                    Ok(d) => d,
                    Err(_) => return Ok(None),
                },
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            }
        };
        Ok(self.manifest_media_type(name, &digest)?.map(|_| digest))
    }

    /// The media type a manifest was pushed with, when `name` holds it.
    pub(crate) fn manifest_media_type(&self, name: &str, d: &Digest) -> io::Result<Option<String>> {
        match fs::read_to_string(self.revision_link(name, d)) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn read_manifest(
        &self,
        name: &str,
        reference: &str,
    ) -> io::Result<Option<StoredManifest>> {
        let Some(digest) = self.resolve(name, reference)? else {
            return Ok(None);
        };
        let Some(media_type) = self.manifest_media_type(name, &digest)? else {
            return Ok(None);
        };
        match fs::read(self.blob_path(&digest)) {
            Ok(bytes) => Ok(Some(StoredManifest {
                digest,
                media_type,
                bytes,
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores a manifest already checked by the caller: content, revision link, referrer
    /// entry, then the tag (in that order, so every visible name points at complete data).
    pub(crate) fn put_manifest(
        &self,
        name: &str,
        digest: &Digest,
        media_type: &str,
        bytes: &[u8],
        tags: &[String],
        referrer: Option<(&Digest, &[u8])>,
    ) -> io::Result<()> {
        let blob = self.blob_path(digest);
        if !blob.exists() {
            self.write_atomic(&blob, bytes)?;
        } else {
            self.touch_blob(digest);
        }
        self.write_atomic(&self.revision_link(name, digest), media_type.as_bytes())?;
        if let Some((subject, descriptor)) = referrer {
            let entry = self.referrers_dir(name, subject).join(format!(
                "{}-{}",
                digest.algorithm().name(),
                digest.hex()
            ));
            self.write_atomic(&entry, descriptor)?;
        }
        for tag in tags {
            self.write_atomic(
                &self.tags_dir(name).join(tag),
                digest.to_string().as_bytes(),
            )?;
        }
        Ok(())
    }

    /// True when all referenced child manifests of an index exist in `name`.
    pub(crate) fn has_manifest(&self, name: &str, d: &Digest) -> io::Result<bool> {
        Ok(self.manifest_media_type(name, d)?.is_some() && self.blob_path(d).exists())
    }

    /// Deletes a tag. Returns false when absent.
    pub(crate) fn delete_tag(&self, name: &str, tag: &str) -> io::Result<bool> {
        match fs::remove_file(self.tags_dir(name).join(tag)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes a manifest revision from `name`, with every tag pointing at it and its
    /// referrer entry. Returns false when absent.
    pub(crate) fn delete_manifest(&self, name: &str, d: &Digest) -> io::Result<bool> {
        if self.manifest_media_type(name, d)?.is_none() {
            return Ok(false);
        }
        let want = d.to_string();
        for (tag, target) in self.tags_with_targets(name)? {
            if target == want {
                self.delete_tag(name, &tag)?;
            }
        }
        if let Ok(bytes) = fs::read(self.blob_path(d)) {
            if let Some(subject) = crate::manifest::subject_of(&bytes) {
                let entry = self.referrers_dir(name, &subject).join(format!(
                    "{}-{}",
                    d.algorithm().name(),
                    d.hex()
                ));
                let _ = fs::remove_file(entry);
            }
        }
        match fs::remove_file(self.revision_link(name, d)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn repo_exists(&self, name: &str) -> bool {
        self.repo_dir(name).join("_manifests").is_dir()
            || self.repo_dir(name).join("_layers").is_dir()
    }

    /// Tags of `name`, sorted; `None` when the repository is unknown.
    pub(crate) fn tags(&self, name: &str) -> io::Result<Option<Vec<String>>> {
        if !self.repo_exists(name) {
            return Ok(None);
        }
        let mut tags = Vec::new();
        match fs::read_dir(self.tags_dir(name)) {
            Ok(rd) => {
                for e in rd {
                    let n = e?.file_name().to_string_lossy().into_owned();
                    if !n.starts_with(".tmp-") {
                        tags.push(n);
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        tags.sort();
        Ok(Some(tags))
    }

    /// `(tag, digest string)` pairs of `name`.
    pub(crate) fn tags_with_targets(&self, name: &str) -> io::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for t in self.tags(name)?.unwrap_or_default() {
            if let Ok(s) = fs::read_to_string(self.tags_dir(name).join(&t)) {
                out.push((t, s.trim().to_owned()));
            }
        }
        Ok(out)
    }

    /// Referrer descriptors (raw JSON) of `subject` in `name`.
    pub(crate) fn referrers(&self, name: &str, subject: &Digest) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let dir = self.referrers_dir(name, subject);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        let mut names: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        names.sort();
        for n in names {
            let n = n.to_string_lossy().into_owned();
            if n.starts_with(".tmp-") {
                continue;
            }
            // The entry is only valid while its manifest revision exists.
            let Some((alg, hex)) = n.split_once('-') else {
                continue;
            };
            let Ok(d) = format!("{alg}:{hex}").parse::<Digest>() else {
                continue;
            };
            if !self.has_manifest(name, &d)? {
                continue;
            }
            if let Ok(b) = fs::read(dir.join(&n)) {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Every repository name, sorted.
    pub(crate) fn repositories(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let base = self.root.join("repos");
        let mut stack = vec![(base.clone(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut is_repo = false;
            for e in rd {
                let e = e?;
                let n = e.file_name().to_string_lossy().into_owned();
                if n == "_manifests" || n == "_layers" {
                    is_repo = true;
                } else if !n.starts_with(['_', '.']) && e.file_type()?.is_dir() {
                    let p = if prefix.is_empty() {
                        n.clone()
                    } else {
                        format!("{prefix}/{n}")
                    };
                    stack.push((e.path(), p));
                }
            }
            if is_repo && !prefix.is_empty() {
                out.push(prefix);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Total bytes in the blob store.
    pub(crate) fn blob_store_size(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = fs::read_dir(p) else { return 0 };
            rd.filter_map(|e| e.ok())
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk(&e.path()),
                    Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.root.join("blobs"))
    }
}
