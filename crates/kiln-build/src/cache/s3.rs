//! `type=s3`: the cache in an S3 bucket (AWS, Garage, MinIO, Ceph RGW), with BuildKit's
//! attributes and object layout: blobs under `PREFIX` + `blobs_prefix` + digest
//! (`blobs/sha256:…`), the cache manifest under `PREFIX` + `manifests_prefix` + name
//! (`manifests/buildkit`), once per name of `name=a;b`.
//!
//! The manifest is the one the registry backend pushes (`docs/cache-format.md`), its config a
//! blob like any other: an import reads the manifest and the config only, and a layer is
//! fetched when a step must run on top of it. An export uploads what the bucket lacks
//! (`upload_parallelism` at a time), refreshes the date of blobs older than `touch_refresh`
//! (a copy onto itself) so that a lifecycle rule expiring old objects keeps what builds still
//! use, merges the records the
//! same name held (within `max-age` / `max-records`), and writes the manifests last.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use kiln_oci::{Descriptor, Digest, Manifest, RawManifest};
use kiln_s3::{S3Client, S3Config};
use kiln_store::Store;
use kiln_worker::build::SolvedBuild;
use kiln_worker::engine::{BlobSource, WorkerError};

use super::{
    bool_attr, check_keys, flag_error, local_blob, CacheBackend, CacheContext, CacheError,
    CacheExportSummary, Direction, ExportScope, ImportedCache, ImportedCacheRef,
};

/// Attributes whose values are secrets: never echoed in messages, history or logs.
pub const SECRET_ATTRIBUTES: &[&str] = &["secret_access_key", "session_token"];

/// Blobs above this size are uploaded in parts, and fetched in ranges, of this size.
const PART_SIZE: u64 = 16 << 20;

/// A cache in an S3 bucket (`type=s3`).
#[derive(Debug, Clone)]
pub struct S3Cache {
    config: S3Config,
    /// `prefix`: prepended to every key, as given (BuildKit adds no `/`).
    prefix: String,
    manifests_prefix: String,
    blobs_prefix: String,
    /// `name=a;b`: an export writes every one, an import reads the first.
    names: Vec<String>,
    direction: Direction,
    scope: ExportScope,
    retention: kiln_cache::RetentionPolicy,
    upload_parallelism: usize,
    touch_refresh: Duration,
}

impl S3Cache {
    /// What an export through this backend writes (`mode`, cache mounts).
    pub fn scope(&self) -> ExportScope {
        self.scope
    }

    /// The bucket's configuration (endpoint, region, credentials) this cache uses.
    pub fn config(&self) -> &S3Config {
        &self.config
    }

    /// Parses the attributes of a `type=s3` cache flag, BuildKit's set: `bucket` (else
    /// `$AWS_BUCKET`), `region` (else `$AWS_REGION`, the AWS files, `us-east-1`),
    /// `endpoint_url`, `use_path_style`, `prefix`, `name` (`;`-separated, default
    /// `buildkit`), `manifests_prefix` (`manifests/`), `blobs_prefix` (`blobs/`),
    /// `access_key_id` / `secret_access_key` / `session_token` (else the AWS variables and
    /// files), and for an export `upload_parallelism` (4), `touch_refresh` (24h), `mode`,
    /// `max-age`, `max-records`.
    pub fn from_attrs(attrs: &BTreeMap<String, String>, flag: &str) -> Result<Self, CacheError> {
        Self::from_attrs_with(attrs, flag, &|name| std::env::var(name).ok())
    }

    /// As [`S3Cache::from_attrs`], reading environment variables through `env`.
    pub fn from_attrs_with(
        attrs: &BTreeMap<String, String>,
        flag: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, CacheError> {
        let direction = Direction::of_flag(flag);
        const BOTH: &[&str] = &[
            "bucket",
            "region",
            "endpoint_url",
            "use_path_style",
            "prefix",
            "name",
            "manifests_prefix",
            "blobs_prefix",
            "access_key_id",
            "secret_access_key",
            "session_token",
            // Export settings BuildKit also accepts (and ignores) on an import, so that one
            // attribute list serves both flags.
            "upload_parallelism",
            "touch_refresh",
        ];
        const EXPORT: &[&str] = &["max-age", "max-records"];
        let allowed: Vec<&str> = match direction {
            Direction::Import => BOTH.to_vec(),
            Direction::Export => BOTH.iter().chain(EXPORT).copied().collect(),
        };
        check_keys(attrs, "s3", flag, direction, &allowed)?;
        let attr = |k: &str| attrs.get(k).filter(|v| !v.is_empty()).cloned();
        let bucket = attr("bucket")
            .or_else(|| env("AWS_BUCKET").filter(|v| !v.is_empty()))
            .ok_or_else(|| {
                flag_error(
                    flag,
                    "type=s3",
                    "type=s3 needs bucket=BUCKET (or the AWS_BUCKET variable)",
                )
            })?;
        if attr("access_key_id").is_some() != attr("secret_access_key").is_some() {
            return Err(flag_error(
                flag,
                "type=s3",
                "access_key_id and secret_access_key must be given together",
            ));
        }
        // The flag's attributes stand in for the AWS variables they correspond to; the rest
        // (profiles, files) is kiln-s3's, as for `kiln registry serve --storage s3://`.
        let overrides: BTreeMap<&str, String> = [
            ("AWS_ACCESS_KEY_ID", "access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
            ("AWS_SESSION_TOKEN", "session_token"),
            ("AWS_REGION", "region"),
            ("AWS_ENDPOINT_URL_S3", "endpoint_url"),
        ]
        .into_iter()
        .filter_map(|(var, key)| attr(key).map(|v| (var, v)))
        .collect();
        let lookup = |name: &str| match overrides.get(name) {
            Some(v) => Some(v.clone()),
            // Attribute credentials replace the environment's as a whole.
            None if name == "AWS_SESSION_TOKEN" && overrides.contains_key("AWS_ACCESS_KEY_ID") => {
                None
            }
            None => env(name),
        };
        let mut config = S3Config::from_url_with(&format!("s3://{bucket}"), &lookup)
            .map_err(|e| CacheError::Spec(format!("{} type=s3: {e}", direction.flag())))?;
        if let Some(style) = bool_attr(attrs, "use_path_style", flag)? {
            config.path_style = style;
        }
        let upload_parallelism = match attrs.get("upload_parallelism") {
            None => 4,
            Some(v) => v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
                flag_error(
                    flag,
                    &format!("upload_parallelism={v}"),
                    format!("upload_parallelism=`{v}`: expected a positive whole number"),
                )
            })?,
        };
        let touch_refresh = match attrs.get("touch_refresh") {
            None => Duration::from_secs(24 * 3600),
            Some(v) => kiln_cache::parse_duration(v).map_err(|e| {
                flag_error(
                    flag,
                    &format!("touch_refresh={v}"),
                    format!("touch_refresh=`{v}`: {e}"),
                )
            })?,
        };
        let names: Vec<String> = match attrs.get("name") {
            Some(v) => v
                .split(';')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect(),
            None => vec!["buildkit".to_owned()],
        };
        if names.is_empty() {
            return Err(flag_error(
                flag,
                "name=",
                "name= names no cache; give name=NAME[;NAME...]",
            ));
        }
        Ok(S3Cache {
            config,
            prefix: attrs.get("prefix").cloned().unwrap_or_default(),
            manifests_prefix: attrs
                .get("manifests_prefix")
                .cloned()
                .unwrap_or_else(|| "manifests/".to_owned()),
            blobs_prefix: attrs
                .get("blobs_prefix")
                .cloned()
                .unwrap_or_else(|| "blobs/".to_owned()),
            names,
            direction,
            scope: ExportScope::from_attrs(attrs, flag)?,
            retention: super::registry::retention_policy(attrs)?,
            upload_parallelism,
            touch_refresh,
        })
    }

    /// The object key of the manifest named `name`.
    pub fn manifest_key(&self, name: &str) -> String {
        format!("{}{}{name}", self.prefix, self.manifests_prefix)
    }

    /// The object key of the blob `digest` (`blobs/sha256:…` by default, as BuildKit).
    pub fn blob_key(&self, digest: &Digest) -> String {
        blob_key(&self.prefix, &self.blobs_prefix, digest)
    }

    fn client(&self) -> Result<S3Client, CacheError> {
        S3Client::new(self.config.clone()).map_err(|e| self.err(e))
    }

    fn err(&self, e: impl std::error::Error + Send + Sync + 'static) -> CacheError {
        CacheError::Backend {
            name: self.name(),
            source: Box::new(e),
        }
    }

    fn format_err(&self, message: String) -> CacheError {
        CacheError::Spec(format!("cache {}: {message}", self.name()))
    }

    fn blobs(&self, cx: &CacheContext, client: S3Client) -> Arc<dyn BlobSource> {
        Arc::new(S3Blobs {
            client,
            registry: cx.client.clone(),
            handle: cx.runtime.clone(),
            prefix: self.prefix.clone(),
            blobs_prefix: self.blobs_prefix.clone(),
            name: self.name(),
        })
    }

    /// Uploads `path` (holding `size` bytes) to `key`: one PUT, or a multipart upload for a
    /// blob larger than a part.
    async fn upload(
        &self,
        client: &S3Client,
        key: &str,
        path: &std::path::Path,
        size: u64,
    ) -> Result<(), CacheError> {
        let read_err = |e: std::io::Error| {
            CacheError::Worker(WorkerError::Io {
                what: "reading cache blob",
                path: path.to_owned(),
                source: e,
            })
        };
        if size <= PART_SIZE {
            let body = tokio::fs::read(path).await.map_err(read_err)?;
            return client
                .put(key, Bytes::from(body))
                .await
                .map_err(|e| self.err(e));
        }
        use tokio::io::AsyncReadExt;
        let upload_id = client
            .create_multipart(key)
            .await
            .map_err(|e| self.err(e))?;
        let result: Result<Vec<(u16, String)>, CacheError> = async {
            let mut file = tokio::fs::File::open(path).await.map_err(read_err)?;
            let mut parts = Vec::new();
            let mut number: u16 = 1;
            loop {
                let mut buf = Vec::with_capacity(PART_SIZE as usize);
                (&mut file)
                    .take(PART_SIZE)
                    .read_to_end(&mut buf)
                    .await
                    .map_err(read_err)?;
                if buf.is_empty() {
                    break;
                }
                let etag = client
                    .upload_part(key, &upload_id, number, Bytes::from(buf))
                    .await
                    .map_err(|e| self.err(e))?;
                parts.push((number, etag));
                number = number.checked_add(1).ok_or_else(|| {
                    self.format_err(format!(
                        "blob {} needs more than 65535 parts",
                        path.display()
                    ))
                })?;
            }
            Ok(parts)
        }
        .await;
        match result {
            Ok(parts) => client
                .complete_multipart(key, &upload_id, &parts)
                .await
                .map_err(|e| self.err(e)),
            Err(e) => {
                let _ = client.abort_multipart(key, &upload_id).await;
                Err(e)
            }
        }
    }
}

fn blob_key(prefix: &str, blobs_prefix: &str, digest: &Digest) -> String {
    format!("{prefix}{blobs_prefix}{digest}")
}

#[async_trait]
impl CacheBackend for S3Cache {
    fn name(&self) -> String {
        format!(
            "s3://{}/{}",
            self.config.bucket,
            self.manifest_key(&self.names[0])
        )
    }

    async fn import(&self, cx: &CacheContext) -> Result<Option<Arc<ImportedCache>>, CacheError> {
        let client = self.client()?;
        let key = self.manifest_key(&self.names[0]);
        let Some(bytes) = client.get(&key).await.map_err(|e| self.err(e))? else {
            cx.warn(&format!(
                "cache {} does not exist yet; building without it",
                self.name()
            ));
            return Ok(None);
        };
        let raw = RawManifest::new(kiln_oci::media_type::OCI_MANIFEST, bytes);
        let manifest = match raw.parse() {
            Ok(Manifest::Image(m)) => m,
            Ok(Manifest::Index(_)) => {
                return Err(self.format_err("holds an image index, not a kiln cache".into()))
            }
            Err(e) => return Err(self.format_err(format!("not a kiln cache manifest: {e}"))),
        };
        let config_key = self.blob_key(&manifest.config.digest);
        let config = client
            .get(&config_key)
            .await
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.format_err(format!("its config {config_key} is missing")))?;
        if Digest::sha256_of(&config) != manifest.config.digest {
            return Err(
                self.format_err(format!("its config {config_key} does not hash to its name"))
            );
        }
        let graph = kiln_cache::CacheGraph::from_manifest(&manifest, &config)
            .map_err(|e| self.format_err(e.to_string()))?;
        Ok(Some(cx.imported(graph, self.blobs(cx, client))))
    }

    async fn export(
        &self,
        cx: &CacheContext,
        build: &SolvedBuild,
        imported: &[ImportedCacheRef],
    ) -> Result<CacheExportSummary, CacheError> {
        debug_assert_eq!(self.direction, Direction::Export);
        use futures::StreamExt;
        let client = self.client()?;
        let mut graph = self.scope.records(cx, build).await?;
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        graph.mark_used(now);
        // Keep what other builds (branches, targets) recorded under the same name.
        let name = self.name();
        if let Some(c) = imported.iter().find(|c| c.name == name) {
            graph.merge_missing(c.cache.graph());
        }
        let expired = graph.retain_recent(&self.retention, now);

        // Every blob: present and fresh → nothing; present but older than touch_refresh →
        // its date renewed; absent → uploaded from the local store, or its records dropped
        // when the local store lacks it too.
        let layers: Vec<Descriptor> = graph.layers().iter().map(|l| l.blob.clone()).collect();
        let outcomes = futures::stream::iter(layers)
            .map(|blob| {
                let client = &client;
                let store = cx.store.clone();
                async move {
                    let key = self.blob_key(&blob.digest);
                    let head = client.head(&key).await.map_err(|e| self.err(e))?;
                    let local = local_blob(&store, &blob.digest);
                    let stale = head
                        .as_ref()
                        .is_some_and(|m| is_older_than(m.last_modified, self.touch_refresh));
                    match (head, local) {
                        // Copied onto itself on the store's side: a new date, no bytes sent.
                        (Some(_), _) if stale => {
                            client.copy(&key, &key).await.map_err(|e| self.err(e))?;
                            Ok::<_, CacheError>((blob.digest, BlobOutcome::Touched))
                        }
                        (Some(_), _) => Ok((blob.digest, BlobOutcome::Present)),
                        (None, Some(path)) => {
                            self.upload(client, &key, &path, blob.size).await?;
                            Ok((blob.digest, BlobOutcome::Uploaded))
                        }
                        (None, None) => Ok((blob.digest, BlobOutcome::Missing)),
                    }
                }
            })
            .buffer_unordered(self.upload_parallelism)
            .collect::<Vec<_>>()
            .await;
        let mut missing = HashSet::new();
        let (mut uploaded, mut touched) = (0usize, 0usize);
        for o in outcomes {
            match o? {
                (_, BlobOutcome::Uploaded) => uploaded += 1,
                (_, BlobOutcome::Touched) => touched += 1,
                (_, BlobOutcome::Present) => {}
                (d, BlobOutcome::Missing) => {
                    missing.insert(d);
                }
            }
        }
        let before = graph.len();
        graph.retain_blobs(|d| !missing.contains(d));
        let dropped = before - graph.len();
        if dropped > 0 {
            cx.warn(&format!(
                "cache {name}: {dropped} records dropped: their blobs are neither in the local store nor in the bucket"
            ));
        }

        let (manifest, config) = graph.to_manifest();
        let config_key = self.blob_key(&manifest.config.digest);
        if client
            .head(&config_key)
            .await
            .map_err(|e| self.err(e))?
            .is_none()
        {
            client
                .put(&config_key, Bytes::from(config))
                .await
                .map_err(|e| self.err(e))?;
        }
        // The manifests last: a reader never sees a graph whose blobs are not there yet.
        let raw = RawManifest::from_image(&manifest);
        for n in &self.names {
            client
                .put(&self.manifest_key(n), raw.bytes.clone())
                .await
                .map_err(|e| self.err(e))?;
        }
        let mut notes = Vec::new();
        if uploaded > 0 || touched > 0 {
            notes.push(format!("{uploaded} uploaded, {touched} refreshed"));
        }
        if expired > 0 {
            notes.push(format!("{expired} old records dropped"));
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join("; "))
        };
        Ok(CacheExportSummary {
            records: graph.len(),
            blobs: manifest.layers.len(),
            expired,
            description: format!(
                "{} records, {} blobs to {name}{notes}",
                graph.len(),
                manifest.layers.len()
            ),
        })
    }
}

enum BlobOutcome {
    Present,
    Touched,
    Uploaded,
    Missing,
}

/// Whether an object last modified at `modified` is older than `age` (unknown: not older).
fn is_older_than(modified: Option<SystemTime>, age: Duration) -> bool {
    modified
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .is_some_and(|elapsed| elapsed > age)
}

/// Blobs of an S3 cache, fetched into the local store when a step needs them.
struct S3Blobs {
    client: S3Client,
    /// The build's registry client: its cancellation also stops S3 transfers.
    registry: kiln_oci::RegistryClient,
    handle: tokio::runtime::Handle,
    prefix: String,
    blobs_prefix: String,
    name: String,
}

impl S3Blobs {
    /// Runs an S3 request from a worker thread, stopped when the build is cancelled.
    fn block_on<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = Result<T, kiln_s3::S3Error>>,
    ) -> Result<T, WorkerError> {
        let r = self
            .registry
            .block_on(&self.handle, &self.name, what, async {
                Ok::<_, kiln_oci::RegistryError>(op.await)
            });
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(WorkerError::Internal(format!(
                "cache {}: {what}: {e}",
                self.name
            ))),
            Err(e) => Err(WorkerError::Internal(format!(
                "cache {}: {what}: {e}",
                self.name
            ))),
        }
    }
}

impl BlobSource for S3Blobs {
    fn fetch(&self, blob: &Descriptor, store: &Store) -> Result<(), WorkerError> {
        use std::io::Write as _;
        if store.content().blob_path(&blob.digest).is_file() {
            return Ok(());
        }
        let key = blob_key(&self.prefix, &self.blobs_prefix, &blob.digest);
        let what = format!("download of blob {}", blob.digest);
        let mut w = store.content().writer()?;
        let write_err = |e: std::io::Error| WorkerError::Io {
            what: "writing a cache blob",
            path: PathBuf::from(&key),
            source: e,
        };
        let missing = || {
            WorkerError::Internal(format!(
                "cache {}: blob {key} is gone from the bucket",
                self.name
            ))
        };
        if blob.size <= PART_SIZE {
            let bytes = self
                .block_on(&what, self.client.get(&key))?
                .ok_or_else(missing)?;
            w.write_all(&bytes).map_err(write_err)?;
        } else {
            // In ranges: a large layer never sits in memory whole.
            let mut offset = 0;
            while offset < blob.size {
                let len = PART_SIZE.min(blob.size - offset);
                let bytes = self
                    .block_on(&what, self.client.get_range(&key, offset, len))?
                    .ok_or_else(missing)?;
                if bytes.is_empty() {
                    break;
                }
                w.write_all(&bytes).map_err(write_err)?;
                offset += bytes.len() as u64;
            }
        }
        // The content store checks size and digest before the blob becomes visible.
        w.commit(&blob.digest, blob.size)?;
        Ok(())
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn has(&self, blob: &Descriptor) -> bool {
        let key = blob_key(&self.prefix, &self.blobs_prefix, &blob.digest);
        matches!(
            self.block_on(
                &format!("HEAD blob {}", blob.digest),
                self.client.head(&key)
            ),
            Ok(Some(_))
        )
    }
}

/// `value` of a cache flag with the values of [`SECRET_ATTRIBUTES`] replaced by `***`, for
/// anything that records or prints flags (build history, error messages).
pub fn redact_cache_flag_value(value: &str) -> String {
    value
        .split(',')
        .map(|part| match part.split_once('=') {
            Some((k, _)) if SECRET_ATTRIBUTES.contains(&k.trim()) => format!("{k}=***"),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn full() -> Vec<(&'static str, &'static str)> {
        vec![
            ("bucket", "kiln-cache"),
            ("region", "garage"),
            ("endpoint_url", "http://127.0.0.1:3900"),
            ("access_key_id", "GKexample"),
            ("secret_access_key", "s3cr3t-value"),
        ]
    }

    #[test]
    fn buildkit_layout_by_default() {
        let c = S3Cache::from_attrs_with(&attrs(&full()), "--export-cache", &no_env).unwrap();
        assert_eq!(c.manifest_key("buildkit"), "manifests/buildkit");
        let d = Digest::sha256_of(b"x");
        assert_eq!(c.blob_key(&d), format!("blobs/{d}"));
        assert_eq!(c.name(), "s3://kiln-cache/manifests/buildkit");
        assert_eq!(c.upload_parallelism, 4);
        assert_eq!(c.touch_refresh, Duration::from_secs(86400));
        assert_eq!(c.config.region, "garage");
        assert!(c.config.path_style, "a custom endpoint is path style");
        assert_eq!(c.config.credentials.key, "GKexample");
    }

    #[test]
    fn prefixes_names_and_settings() {
        let mut a = full();
        a.extend([
            ("prefix", "ci/"),
            ("manifests_prefix", "m/"),
            ("blobs_prefix", "b/"),
            ("name", "main;pr-7"),
            ("upload_parallelism", "9"),
            ("touch_refresh", "2h"),
            ("use_path_style", "false"),
            ("mode", "max"),
        ]);
        let c = S3Cache::from_attrs_with(&attrs(&a), "--export-cache", &no_env).unwrap();
        assert_eq!(c.names, ["main", "pr-7"]);
        assert_eq!(c.manifest_key("pr-7"), "ci/m/pr-7");
        assert_eq!(
            c.blob_key(&Digest::sha256_of(b"")).split(':').next(),
            Some("ci/b/sha256")
        );
        assert_eq!(c.upload_parallelism, 9);
        assert_eq!(c.touch_refresh, Duration::from_secs(7200));
        assert!(!c.config.path_style);
        assert!(c.scope().max);
    }

    #[test]
    fn bucket_and_credentials_from_the_environment() {
        let env = |k: &str| match k {
            "AWS_BUCKET" => Some("env-bucket".to_owned()),
            "AWS_ACCESS_KEY_ID" => Some("AKENV".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("envsecret".to_owned()),
            "AWS_SESSION_TOKEN" => Some("envtoken".to_owned()),
            _ => None,
        };
        let c = S3Cache::from_attrs_with(&attrs(&[]), "--import-cache", &env).unwrap();
        assert_eq!(c.config.bucket, "env-bucket");
        assert_eq!(c.config.credentials.key, "AKENV");
        assert_eq!(
            c.config.credentials.session_token.as_deref(),
            Some("envtoken")
        );
        // Credentials in the flag replace the environment's, token included.
        let c = S3Cache::from_attrs_with(
            &attrs(&[("access_key_id", "AKFLAG"), ("secret_access_key", "x")]),
            "--import-cache",
            &env,
        )
        .unwrap();
        assert_eq!(c.config.credentials.key, "AKFLAG");
        assert_eq!(c.config.credentials.session_token, None);
    }

    #[test]
    fn bad_values_name_the_attribute_and_never_the_secret() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (
                &[("upload_parallelism", "0")],
                "--export-cache",
                "upload_parallelism",
            ),
            (
                &[("touch_refresh", "soon")],
                "--export-cache",
                "touch_refresh",
            ),
            (
                &[("use_path_style", "maybe")],
                "--export-cache",
                "use_path_style",
            ),
            (&[("mode", "all")], "--export-cache", "mode"),
            (&[("bukket", "x")], "--export-cache", "bukket"),
            (&[("max-age", "7d")], "--import-cache", "max-age"),
            (&[("name", ";")], "--export-cache", "name"),
        ];
        for (extra, flag, named) in cases {
            let mut a = full();
            a.extend_from_slice(extra);
            let e = S3Cache::from_attrs_with(&attrs(&a), flag, &no_env).unwrap_err();
            let text = format!("{e:#}");
            let text = match &e {
                CacheError::Flag(s) => format!("{text} {}", s.reason),
                _ => text,
            };
            assert!(text.contains(named), "{named}: {text}");
            assert!(!text.contains("s3cr3t-value"), "{text}");
        }
        let e = S3Cache::from_attrs_with(&attrs(&[]), "--export-cache", &no_env).unwrap_err();
        assert!(format!("{e}").contains("bucket"), "{e}");
        let e = S3Cache::from_attrs_with(
            &attrs(&[("bucket", "b-1"), ("access_key_id", "AK")]),
            "--export-cache",
            &no_env,
        )
        .unwrap_err();
        let CacheError::Flag(s) = e else {
            panic!("not a flag error")
        };
        assert!(s.reason.contains("secret_access_key"), "{}", s.reason);
    }

    #[test]
    fn redacts_secrets_in_flag_values() {
        assert_eq!(
            redact_cache_flag_value(
                "type=s3,bucket=b,access_key_id=AK,secret_access_key=abc,session_token=t,mode=max"
            ),
            "type=s3,bucket=b,access_key_id=AK,secret_access_key=***,session_token=***,mode=max"
        );
        assert_eq!(
            redact_cache_flag_value("type=registry,ref=r"),
            "type=registry,ref=r"
        );
    }

    #[test]
    fn age_of_objects() {
        let day = Duration::from_secs(86400);
        assert!(!is_older_than(None, day));
        assert!(!is_older_than(Some(SystemTime::now()), day));
        assert!(is_older_than(Some(SystemTime::now() - 2 * day), day));
    }
}
