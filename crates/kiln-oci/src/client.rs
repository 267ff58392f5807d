//! A thin registry client on reqwest: resolve, pull and push images over the OCI distribution
//! API, streaming every blob (never a whole layer in memory) and verifying digests on the fly.
//!
//! Every request goes through [`RegistryClient::send`], which adds credentials (basic, or a
//! bearer token fetched for the request's scopes and reused until it expires), answers a 401
//! challenge once, and retries connection errors, 429 and 5xx with exponential backoff when the
//! request may be repeated. Uploads restart (monolithic) or resume (chunked) their session.

// RegistryError carries registry, repository and digests so its message says what to do; it
// only travels on the failure path, where its size costs nothing measurable.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::{parse_challenge, Challenge, Credential, DockerConfig};
use crate::config::ImageConfig;
use crate::digest::{Digest, Hasher};
use crate::error::RegistryError;
use crate::layout::OciLayout;
use crate::manifest::{Descriptor, ImageManifest, Manifest, RawManifest};
use crate::media_type;
use crate::platform::Platform;
use crate::reference::{api_host, normalize_registry, Reference};
use crate::transport::{self, ReadWatch, RequestWatch, Stall, Timeouts};

/// Largest token reply and error body kiln reads.
const MAX_TOKEN_REPLY: u64 = 1 << 20;

/// Largest manifest or config kiln reads into memory (the distribution spec suggests 4 MiB for
/// manifests; configs of big images are larger).
const MAX_SMALL_BLOB: u64 = 64 << 20;

/// Settings of one registry host.
#[derive(Debug, Clone, Default)]
pub struct HostConfig {
    /// Speak plain HTTP to this host (always done for localhost, 127.0.0.0/8 and ::1).
    pub insecure: bool,
    /// Hosts (`host[:port]`) to pull from first; the registry itself is tried last.
    pub mirrors: Vec<String>,
}

/// How failed requests are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per request, including the first.
    pub max_attempts: u32,
    /// Delay before the first retry; doubled each time.
    pub initial_backoff: Duration,
    /// Upper bound of one delay (also caps a registry's `Retry-After`).
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// Configuration of a [`RegistryClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Per-host settings, keyed by registry host as in references (`docker.io`, `host:5000`).
    pub hosts: BTreeMap<String, HostConfig>,
    /// Where stored credentials are read.
    pub docker_config: DockerConfig,
    /// Credentials given directly (e.g. from flags), which win over `docker_config`.
    pub credentials: BTreeMap<String, Credential>,
    /// Retry behaviour.
    pub retry: RetryPolicy,
    /// Blobs up to this size are uploaded in one PUT; larger ones in PATCH chunks.
    pub monolithic_limit: u64,
    /// Size of one PATCH chunk.
    pub chunk_size: u64,
    /// Requests to one registry in flight at once for blob work (existence checks, mounts,
    /// uploads, downloads) by [`RegistryClient::push_image`], the pull helpers and callers
    /// that ask [`RegistryClient::concurrency`]. Default [`DEFAULT_CONNECTIONS`];
    /// `KILN_REGISTRY_CONNECTIONS` overrides it (see [`RegistryClient::new`]).
    pub concurrency: usize,
    /// Connect, response and idle timeouts of every request. `None`: `KILN_REGISTRY_TIMEOUT`
    /// when set, else [`Timeouts::default`].
    pub timeouts: Option<Timeouts>,
}

/// Default number of blob requests in flight per operation (BuildKit uses 4 per registry;
/// a cache export of thousands of small blobs is bound by round trips, not bandwidth).
pub const DEFAULT_CONNECTIONS: usize = 32;

/// Highest accepted connection count.
pub const MAX_CONNECTIONS: usize = 1024;

/// Environment variable that sets [`ClientConfig::concurrency`] for every client.
pub const CONNECTIONS_ENV: &str = "KILN_REGISTRY_CONNECTIONS";

/// Parses a connection count given as `what` (a flag or variable name, named in the error).
pub fn parse_connections(what: &str, value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_CONNECTIONS).contains(&n) => Ok(n),
        _ => Err(format!(
            "{what}={value}: expected a whole number of connections from 1 to {MAX_CONNECTIONS}"
        )),
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            hosts: BTreeMap::new(),
            docker_config: DockerConfig::from_env(),
            credentials: BTreeMap::new(),
            retry: RetryPolicy::default(),
            monolithic_limit: 64 << 20,
            chunk_size: 64 << 20,
            concurrency: DEFAULT_CONNECTIONS,
            timeouts: None,
        }
    }
}

/// Where a blob to push comes from. Both can be read again, so an upload can restart.
#[derive(Debug, Clone)]
pub enum BlobSource {
    /// A file (e.g. in the content store) holding exactly the blob.
    File(PathBuf),
    /// Bytes in memory (configs, small blobs).
    Bytes(Bytes),
}

/// What pushing one blob did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository already had it (HEAD answered 200).
    Exists,
    /// The registry mounted it from another repository.
    Mounted,
    /// Its bytes were uploaded.
    Uploaded,
}

/// Byte and request counters of a client, for the caller's summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Request body bytes sent (blob and manifest uploads).
    pub bytes_sent: u64,
    /// Response body bytes received for blobs and manifests.
    pub bytes_received: u64,
    /// Blobs uploaded.
    pub blobs_uploaded: u64,
    /// Blobs mounted from another repository.
    pub blobs_mounted: u64,
    /// Blobs found already present.
    pub blobs_existing: u64,
    /// HTTP requests sent (including retries).
    pub requests: u64,
    /// Requests retried.
    pub retries: u64,
}

#[derive(Default)]
struct Counters {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    blobs_uploaded: AtomicU64,
    blobs_mounted: AtomicU64,
    blobs_existing: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// A resolved image: the manifest for one platform, its config, and the index it came from.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The reference pinned to the digest that was resolved (the index's if there was one).
    pub reference: Reference,
    /// The index or manifest list, if the reference named one.
    pub index: Option<RawManifest>,
    /// The image manifest's bytes (what is hashed).
    pub manifest: RawManifest,
    /// The parsed image manifest.
    pub image: ImageManifest,
    /// The config blob's bytes.
    pub config_bytes: Bytes,
    /// The parsed config.
    pub config: ImageConfig,
}

impl ResolvedImage {
    /// The layers a pull fetches: all but foreign/non-distributable ones.
    pub fn distributable_layers(&self) -> impl Iterator<Item = &Descriptor> {
        self.image
            .layers
            .iter()
            .filter(|l| !media_type::is_non_distributable(&l.media_type))
    }
}

#[derive(Default)]
struct HostAuth {
    challenge: Option<Challenge>,
    credential: Option<Option<Credential>>,
    tokens: HashMap<String, (String, Instant)>,
}

/// One host the client talks to.
#[derive(Debug, Clone)]
struct Endpoint {
    /// The registry host as named in references and config (for errors and credentials).
    registry: String,
    /// `scheme://host`.
    base: Url,
}

/// Context of one request, for auth scopes and error messages.
struct Req<'a> {
    ep: &'a Endpoint,
    repo: &'a str,
    scopes: Vec<String>,
    what: String,
    retry: bool,
}

/// The registry client. Cheap to clone; clones share connections, tokens and counters.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: ClientConfig,
    timeouts: Timeouts,
    auth: tokio::sync::Mutex<HashMap<String, HostAuth>>,
    counters: Arc<Counters>,
    /// Cancelled by [`RegistryClient::cancel`]; shared by every client made from this one.
    cancel: tokio_util::sync::CancellationToken,
    /// Calls of [`RegistryClient::block_on`] under way, for [`RegistryClient::shutdown`].
    active: Arc<ActiveCalls>,
}

/// A count of calls in flight and a condition to wait for it to reach zero.
#[derive(Default)]
struct ActiveCalls {
    count: std::sync::Mutex<usize>,
    idle: std::sync::Condvar,
}

/// Holds one [`ActiveCalls`] slot until dropped.
struct ActiveCall<'a>(&'a ActiveCalls);

impl ActiveCalls {
    fn enter(&self) -> ActiveCall<'_> {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        ActiveCall(self)
    }

    /// Waits until no call is in flight or `grace` has passed; whether none is.
    fn wait_idle(&self, grace: Duration) -> bool {
        let count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let (count, _) = self
            .idle
            .wait_timeout_while(count, grace, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        *count == 0
    }
}

impl Drop for ActiveCall<'_> {
    fn drop(&mut self) {
        let mut n = self.0.count.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// Why reading a response body stopped early.
enum BodyError {
    Broken(reqwest::Error),
    Stalled(Stall),
    Cancelled,
    TooLarge,
}

/// Whether `registry` is reached over plain HTTP without being configured so: loopback only.
fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(registry)
    };
    if host == "localhost" {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => false,
    }
}

fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

fn push_scope(repo: &str) -> String {
    format!("repository:{repo}:pull,push")
}

impl RegistryClient {
    /// A client with `config`. TLS uses rustls with the ring provider and the system's root
    /// certificates (through rustls-platform-verifier), so private CAs installed on the host
    /// work; the roots are read at the first HTTPS request, so a client that only speaks to
    /// plain-HTTP registries works on a host without any.
    /// `KILN_REGISTRY_CONNECTIONS`, when set, wins over `config.concurrency`, and
    /// `KILN_REGISTRY_TIMEOUT` gives the timeouts when `config.timeouts` is `None`; an invalid
    /// value is an error naming the variable.
    pub fn new(mut config: ClientConfig) -> Result<Self, RegistryError> {
        if let Ok(v) = std::env::var(CONNECTIONS_ENV) {
            config.concurrency =
                parse_connections(CONNECTIONS_ENV, &v).map_err(RegistryError::Client)?;
        }
        let timeouts = match config.timeouts {
            Some(t) => t,
            None => Timeouts::from_env()
                .map_err(RegistryError::Client)?
                .unwrap_or_default(),
        };
        let http = transport::client_builder(&timeouts)
            .map_err(RegistryError::Client)?
            .pool_max_idle_per_host(config.concurrency.max(32))
            .build()
            .map_err(|e| RegistryError::Client(e.to_string()))?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                http,
                config,
                timeouts,
                auth: tokio::sync::Mutex::new(HashMap::new()),
                counters: Arc::default(),
                cancel: tokio_util::sync::CancellationToken::new(),
                active: Arc::default(),
            }),
        })
    }

    /// The timeouts of this client's requests.
    pub fn timeouts(&self) -> Timeouts {
        self.inner.timeouts
    }

    /// Cancels every request of this client and of the clients made from it, in flight or
    /// to come: each ends at once with [`RegistryError::Cancelled`] (Ctrl-C, a failed build).
    pub fn cancel(&self) {
        self.inner.cancel.cancel();
    }

    /// Whether [`RegistryClient::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Runs `op` to its end on `handle` from a thread outside the runtime (the worker's
    /// blocking threads). It ends with [`RegistryError::Cancelled`] as soon as the client is
    /// cancelled, and counts as in flight until it returns, so that
    /// [`RegistryClient::shutdown`] can wait for it before the runtime goes away.
    pub fn block_on<T>(
        &self,
        handle: &tokio::runtime::Handle,
        registry: &str,
        what: &str,
        op: impl std::future::Future<Output = Result<T, RegistryError>>,
    ) -> Result<T, RegistryError> {
        let _active = self.inner.active.enter();
        let cancelled = || RegistryError::Cancelled {
            registry: registry.to_owned(),
            what: what.to_owned(),
        };
        // Checked under the count: once shutdown has seen it at zero, nothing here touches
        // the runtime (its timers panic once it is shutting down).
        if self.is_cancelled() {
            return Err(cancelled());
        }
        handle.block_on(async {
            tokio::select! {
                biased;
                _ = self.inner.cancel.cancelled() => Err(cancelled()),
                r = op => r,
            }
        })
    }

    /// Cancels the client (see [`RegistryClient::cancel`]) and waits up to `grace` for the
    /// calls of [`RegistryClient::block_on`] under way to return; whether they all did. Call it
    /// before the runtime they run on is dropped.
    pub fn shutdown(&self, grace: Duration) -> bool {
        self.cancel();
        self.inner.active.wait_idle(grace)
    }

    fn cancelled(&self, req: &Req<'_>) -> RegistryError {
        RegistryError::Cancelled {
            registry: req.ep.registry.clone(),
            what: req.what.clone(),
        }
    }

    /// Waits `d` (a backoff), or fails at once if the client is cancelled.
    async fn pause(&self, req: &Req<'_>, d: Duration) -> Result<(), RegistryError> {
        tokio::select! {
            biased;
            _ = self.inner.cancel.cancelled() => Err(self.cancelled(req)),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }

    /// The next chunk of `stream` under the idle rule of `watch` and the client's cancellation.
    async fn next_chunk<S>(
        &self,
        stream: &mut S,
        watch: &mut ReadWatch,
    ) -> Result<Option<Bytes>, BodyError>
    where
        S: futures::Stream<Item = reqwest::Result<Bytes>> + Unpin,
    {
        let next = tokio::select! {
            biased;
            _ = self.inner.cancel.cancelled() => return Err(BodyError::Cancelled),
            r = tokio::time::timeout_at(watch.deadline(), stream.next()) => r,
        };
        match next {
            Err(_) => Err(BodyError::Stalled(watch.stall())),
            Ok(None) => Ok(None),
            Ok(Some(Err(e))) => Err(BodyError::Broken(e)),
            Ok(Some(Ok(b))) => {
                watch.received(b.len());
                Ok(Some(b))
            }
        }
    }

    /// A whole (small) body, at most `limit` bytes, read under the idle rule.
    async fn read_body(&self, resp: Response, limit: u64) -> Result<Bytes, BodyError> {
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(BodyError::TooLarge);
        }
        let mut stream = resp.bytes_stream();
        let mut watch = ReadWatch::new(self.inner.timeouts);
        let mut buf = bytes::BytesMut::new();
        while let Some(b) = self.next_chunk(&mut stream, &mut watch).await? {
            if buf.len() as u64 + b.len() as u64 > limit {
                return Err(BodyError::TooLarge);
            }
            buf.extend_from_slice(&b);
        }
        Ok(buf.freeze())
    }

    /// The error for a body read that stopped early during `req`, attempt `attempts`.
    fn body_error(&self, req: &Req<'_>, e: BodyError, attempts: u32, limit: u64) -> RegistryError {
        match e {
            BodyError::Broken(source) => RegistryError::Transport {
                registry: req.ep.registry.clone(),
                what: req.what.clone(),
                attempts,
                source,
            },
            BodyError::Stalled(stall) => self.timeout_error(req, stall, attempts),
            BodyError::Cancelled => self.cancelled(req),
            BodyError::TooLarge => RegistryError::Protocol {
                registry: req.ep.registry.clone(),
                what: req.what.clone(),
                detail: format!("body is larger than {limit} bytes"),
            },
        }
    }

    fn timeout_error(&self, req: &Req<'_>, stall: Stall, attempts: u32) -> RegistryError {
        RegistryError::Timeout {
            registry: req.ep.registry.clone(),
            repository: req.repo.to_owned(),
            what: req.what.clone(),
            attempts,
            stall,
            timeouts: self.inner.timeouts,
        }
    }

    /// Sends `rb` under the response/idle rules of `watch` and the client's cancellation.
    async fn send_watched(
        &self,
        req: &Req<'_>,
        rb: RequestBuilder,
        watch: &RequestWatch,
    ) -> Result<Result<Response, reqwest::Error>, Result<Stall, RegistryError>> {
        tokio::select! {
            biased;
            _ = self.inner.cancel.cancelled() => Err(Err(self.cancelled(req))),
            r = rb.send() => Ok(r),
            stall = watch.stalled(self.inner.timeouts) => Err(Ok(stall)),
        }
    }

    /// Blob requests this client keeps in flight at once (see [`ClientConfig::concurrency`]).
    pub fn concurrency(&self) -> usize {
        self.inner.config.concurrency.max(1)
    }

    /// A client like this one with `n` blob requests in flight at once. It shares this
    /// client's connection pool and byte counters; tokens are fetched again as needed.
    pub fn with_concurrency(&self, n: usize) -> RegistryClient {
        let mut config = self.inner.config.clone();
        config.concurrency = n.max(1);
        RegistryClient {
            inner: Arc::new(Inner {
                http: self.inner.http.clone(),
                config,
                timeouts: self.inner.timeouts,
                auth: tokio::sync::Mutex::new(HashMap::new()),
                counters: self.inner.counters.clone(),
                cancel: self.inner.cancel.clone(),
                active: self.inner.active.clone(),
            }),
        }
    }

    /// Counters since the client was made.
    pub fn stats(&self) -> TransferStats {
        let c = &self.inner.counters;
        TransferStats {
            bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
            bytes_received: c.bytes_received.load(Ordering::Relaxed),
            blobs_uploaded: c.blobs_uploaded.load(Ordering::Relaxed),
            blobs_mounted: c.blobs_mounted.load(Ordering::Relaxed),
            blobs_existing: c.blobs_existing.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
        }
    }

    fn endpoint_for(&self, registry: &str) -> Endpoint {
        let host = api_host(registry);
        let insecure = is_loopback(host)
            || self
                .inner
                .config
                .hosts
                .get(registry)
                .is_some_and(|h| h.insecure)
            || self
                .inner
                .config
                .hosts
                .get(host)
                .is_some_and(|h| h.insecure);
        let scheme = if insecure { "http" } else { "https" };
        // A reference's registry is a validated host[:port]: the URL always parses.
        let base = Url::parse(&format!("{scheme}://{host}/"))
            .unwrap_or_else(|_| Url::parse("https://invalid.invalid/").expect("static URL"));
        Endpoint {
            registry: registry.to_owned(),
            base,
        }
    }

    /// Mirrors first, then the registry itself.
    fn pull_endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let mut eps: Vec<Endpoint> = self
            .inner
            .config
            .hosts
            .get(registry)
            .map(|h| {
                h.mirrors
                    .iter()
                    .map(|m| self.endpoint_for(&normalize_registry(m)))
                    .collect()
            })
            .unwrap_or_default();
        eps.push(self.endpoint_for(registry));
        eps
    }

    fn url(&self, ep: &Endpoint, path: &str) -> Url {
        let mut u = ep.base.clone();
        u.set_path(path);
        u
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let p = &self.inner.config.retry;
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1).min(16))
            .unwrap_or(u32::MAX);
        p.initial_backoff.saturating_mul(factor).min(p.max_backoff)
    }

    async fn credential(
        &self,
        ha: &mut HostAuth,
        registry: &str,
    ) -> Result<Option<Credential>, RegistryError> {
        if let Some(c) = &ha.credential {
            return Ok(c.clone());
        }
        let c = match self.inner.config.credentials.get(registry) {
            Some(c) => Some(c.clone()),
            None => {
                let cfg = self.inner.config.docker_config.clone();
                let reg = registry.to_owned();
                tokio::task::spawn_blocking(move || cfg.credential(&reg))
                    .await
                    .map_err(|e| {
                        RegistryError::Client(format!("credential lookup task failed: {e}"))
                    })??
            }
        };
        ha.credential = Some(c.clone());
        Ok(c)
    }

    /// The Authorization header for a request with `scopes`, fetching a token if needed.
    async fn auth_header(&self, req: &Req<'_>) -> Result<Option<HeaderValue>, RegistryError> {
        let mut map = self.inner.auth.lock().await;
        let ha = map.entry(req.ep.base.to_string()).or_default();
        let Some(ch) = ha.challenge.clone() else {
            return Ok(None);
        };
        let cred = self.credential(ha, &req.ep.registry).await?;
        match ch.scheme.as_str() {
            "basic" => Ok(match cred {
                Some(Credential::Basic { username, password }) => {
                    let v = base64::engine::general_purpose::STANDARD
                        .encode(format!("{username}:{password}"));
                    HeaderValue::from_str(&format!("Basic {v}")).ok()
                }
                _ => None,
            }),
            "bearer" => {
                let mut scopes = req.scopes.clone();
                if let Some(s) = ch.params.get("scope") {
                    scopes.extend(s.split(' ').map(str::to_owned));
                }
                scopes.sort();
                scopes.dedup();
                let key = scopes.join(" ");
                if let Some((tok, until)) = ha.tokens.get(&key) {
                    if Instant::now() < *until {
                        return Ok(HeaderValue::from_str(&format!("Bearer {tok}")).ok());
                    }
                }
                let (tok, until) = self.fetch_token(req, &ch, &scopes, cred.as_ref()).await?;
                let h = HeaderValue::from_str(&format!("Bearer {tok}")).ok();
                ha.tokens.insert(key, (tok, until));
                Ok(h)
            }
            _ => Ok(None),
        }
    }

    async fn fetch_token(
        &self,
        req: &Req<'_>,
        ch: &Challenge,
        scopes: &[String],
        cred: Option<&Credential>,
    ) -> Result<(String, Instant), RegistryError> {
        let registry = &req.ep.registry;
        let what = "token request".to_owned();
        let protocol = |detail: String| RegistryError::Protocol {
            registry: registry.clone(),
            what: what.clone(),
            detail,
        };
        let realm = ch
            .params
            .get("realm")
            .ok_or_else(|| protocol("the Bearer challenge has no realm".into()))?;
        let mut url = Url::parse(realm)
            .map_err(|e| protocol(format!("realm {realm:?} is not a URL: {e}")))?;
        let service = ch.params.get("service").cloned().unwrap_or_default();
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.inner.counters.requests.fetch_add(1, Ordering::Relaxed);
            let rb = match cred {
                Some(Credential::IdentityToken(refresh)) => {
                    let mut form = url::form_urlencoded_pairs(&[
                        ("grant_type", "refresh_token"),
                        ("refresh_token", refresh),
                        ("service", &service),
                        ("client_id", "kiln"),
                    ]);
                    if !scopes.is_empty() {
                        form.push('&');
                        form.push_str(&url::form_urlencoded_pairs(&[("scope", &scopes.join(" "))]));
                    }
                    self.inner
                        .http
                        .post(url.clone())
                        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(form)
                }
                _ => {
                    {
                        let mut q = url.query_pairs_mut();
                        q.clear();
                        if !service.is_empty() {
                            q.append_pair("service", &service);
                        }
                        for s in scopes {
                            q.append_pair("scope", s);
                        }
                    }
                    let rb = self.inner.http.get(url.clone());
                    match cred {
                        Some(Credential::Basic { username, password }) => {
                            rb.basic_auth(username, Some(password))
                        }
                        _ => rb,
                    }
                }
            };
            // The token server is another host: its errors and stalls name it.
            let token_req = Req {
                ep: req.ep,
                repo: req.repo,
                scopes: Vec::new(),
                what: format!("token request to {realm}"),
                retry: true,
            };
            let watch = RequestWatch::new(0);
            let sent = match self.send_watched(&token_req, rb, &watch).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(source)) => Err(RegistryError::Transport {
                    registry: registry.clone(),
                    what: token_req.what.clone(),
                    attempts: attempt,
                    source,
                }),
                Err(Ok(stall)) => Err(self.timeout_error(&token_req, stall, attempt)),
                Err(Err(cancelled)) => return Err(cancelled),
            };
            let resp = match sent {
                Ok(r) => r,
                Err(e) if attempt >= self.inner.config.retry.max_attempts => return Err(e),
                Err(_) => {
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    self.pause(&token_req, self.backoff(attempt)).await?;
                    continue;
                }
            };
            let status = resp.status();
            if (status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
                && attempt < self.inner.config.retry.max_attempts
            {
                self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                drop(resp);
                self.pause(&token_req, self.backoff(attempt)).await?;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                let detail = self.error_detail(resp).await;
                let who = if cred.is_some() {
                    "the stored credentials"
                } else {
                    "anonymous access"
                };
                return Err(RegistryError::Unauthorized {
                    registry: registry.clone(),
                    repository: req.repo.to_owned(),
                    what: format!("{}; token server {realm} refused {who}", req.what),
                    detail,
                });
            }
            if !status.is_success() {
                let detail = self.error_detail(resp).await;
                return Err(RegistryError::Status {
                    registry: registry.clone(),
                    repository: req.repo.to_owned(),
                    what: format!("token request to {realm}"),
                    status: status.as_u16(),
                    detail,
                });
            }
            #[derive(serde::Deserialize)]
            struct TokenReply {
                token: Option<String>,
                access_token: Option<String>,
                expires_in: Option<u64>,
            }
            let body = self
                .read_body(resp, MAX_TOKEN_REPLY)
                .await
                .map_err(|e| self.body_error(&token_req, e, attempt, MAX_TOKEN_REPLY))?;
            let reply: TokenReply = serde_json::from_slice(&body)
                .map_err(|e| protocol(format!("the token reply is not JSON: {e}")))?;
            let token = reply
                .token
                .or(reply.access_token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| protocol("the token reply has no token".into()))?;
            // The spec's default lifetime is 60 s; renew a little early.
            let secs = reply.expires_in.unwrap_or(60).max(10);
            let until =
                Instant::now() + Duration::from_secs(secs) - Duration::from_secs(secs / 10 + 1);
            return Ok((token, until));
        }
    }

    /// Sends a request built by `make` (called again for each attempt, so bodies can be
    /// recreated), with credentials, one answer to a 401 challenge, and retries of connection
    /// errors, 429 and 5xx if `req.retry`. Returns the final response, whatever its status.
    async fn send(
        &self,
        req: &Req<'_>,
        make: &(dyn Fn(&reqwest::Client, &RequestWatch) -> Result<RequestBuilder, RegistryError>
              + Sync),
    ) -> Result<Response, RegistryError> {
        let max = self.inner.config.retry.max_attempts.max(1);
        if req.ep.base.scheme() == "https" {
            transport::check_system_roots().map_err(|detail| RegistryError::TlsRoots {
                registry: req.ep.registry.clone(),
                detail,
            })?;
        }
        let mut attempt = 0;
        let mut answered_challenge = false;
        loop {
            attempt += 1;
            if self.is_cancelled() {
                return Err(self.cancelled(req));
            }
            let auth = self.auth_header(req).await?;
            let watch = RequestWatch::new(0);
            let mut rb = make(&self.inner.http, &watch)?;
            if let Some(h) = auth.clone() {
                rb = rb.header(header::AUTHORIZATION, h);
            }
            self.inner.counters.requests.fetch_add(1, Ordering::Relaxed);
            let sent = match self.send_watched(req, rb, &watch).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(source)) => Err(RegistryError::Transport {
                    registry: req.ep.registry.clone(),
                    what: req.what.clone(),
                    attempts: attempt,
                    source,
                }),
                Err(Ok(stall)) => Err(self.timeout_error(req, stall, attempt)),
                Err(Err(cancelled)) => return Err(cancelled),
            };
            let resp = match sent {
                Ok(r) => r,
                Err(e) if req.retry && attempt < max => {
                    tracing::debug!(registry = %req.ep.registry, what = %req.what, error = %e, "retrying");
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    self.pause(req, self.backoff(attempt)).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !answered_challenge {
                let challenge = resp
                    .headers()
                    .get_all(header::WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .filter_map(parse_challenge)
                    .find(|c| c.scheme == "bearer" || c.scheme == "basic");
                if let Some(ch) = challenge {
                    answered_challenge = true;
                    let mut map = self.inner.auth.lock().await;
                    let ha = map.entry(req.ep.base.to_string()).or_default();
                    ha.challenge = Some(ch);
                    // A token that was refused (e.g. too narrow a scope) must not be reused.
                    if auth.is_some() {
                        ha.tokens.clear();
                    }
                    drop(map);
                    attempt -= 1;
                    continue;
                }
            }
            let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            if retryable && req.retry && attempt < max {
                let delay = retry_after(resp.headers())
                    .map(|d| {
                        d.min(
                            self.inner
                                .config
                                .retry
                                .max_backoff
                                .max(Duration::from_secs(1)),
                        )
                    })
                    .unwrap_or_else(|| self.backoff(attempt));
                tracing::debug!(registry = %req.ep.registry, what = %req.what, %status, "retrying");
                self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                // The response's body is not read: the connection is closed, not reused.
                drop(resp);
                self.pause(req, delay).await?;
                continue;
            }
            return Ok(resp);
        }
    }

    /// The registry's error message in `resp`'s body, prefixed with ": " (empty if there is
    /// none, or if the body does not arrive in time).
    async fn error_detail(&self, resp: Response) -> String {
        match self.read_body(resp, MAX_TOKEN_REPLY).await {
            Ok(body) => error_detail_of(&body),
            Err(_) => String::new(),
        }
    }

    /// Turns an unexpected response into the error that names registry, repository and action.
    async fn status_error(&self, req: &Req<'_>, resp: Response) -> RegistryError {
        let status = resp.status();
        let detail = self.error_detail(resp).await;
        let (registry, repository, what) = (
            req.ep.registry.clone(),
            req.repo.to_owned(),
            req.what.clone(),
        );
        match status {
            StatusCode::UNAUTHORIZED => RegistryError::Unauthorized {
                registry,
                repository,
                what,
                detail,
            },
            StatusCode::FORBIDDEN => RegistryError::Denied {
                registry,
                repository,
                what,
                detail,
            },
            StatusCode::NOT_FOUND => RegistryError::NotFound {
                registry,
                repository,
                what,
                detail,
            },
            s => RegistryError::Status {
                registry,
                repository,
                what,
                status: s.as_u16(),
                detail,
            },
        }
    }

    /// `GET /v2/`: checks that `registry` speaks the distribution API and that the credentials
    /// (if any) are accepted.
    pub async fn ping(&self, registry: &str) -> Result<(), RegistryError> {
        let ep = self.endpoint_for(registry);
        let req = Req {
            ep: &ep,
            repo: "its API root",
            scopes: vec![],
            what: "GET /v2/".into(),
            retry: true,
        };
        let url = self.url(&ep, "/v2/");
        let resp = self.send(&req, &|c, _w| Ok(c.get(url.clone()))).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.status_error(&req, resp).await)
        }
    }

    /// Fetches the manifest or index `reference` names (tag or digest), with an `Accept` of all
    /// four manifest media types. A digest reference is verified against the bytes.
    pub async fn pull_manifest(&self, reference: &Reference) -> Result<RawManifest, RegistryError> {
        let mut last = None;
        for ep in self.pull_endpoints(reference.registry()) {
            match self.pull_manifest_from(&ep, reference).await {
                Ok(m) => return Ok(m),
                Err(e) if ep.registry != reference.registry() => {
                    tracing::warn!(mirror = %ep.registry, error = %e, "mirror failed, trying the next");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Client("no endpoint".into())))
    }

    async fn pull_manifest_from(
        &self,
        ep: &Endpoint,
        reference: &Reference,
    ) -> Result<RawManifest, RegistryError> {
        let repo = reference.repository();
        let r = reference.api_reference();
        let req = Req {
            ep,
            repo,
            scopes: vec![pull_scope(repo)],
            what: format!("manifest {r}"),
            retry: true,
        };
        let url = self.url(ep, &format!("/v2/{repo}/manifests/{r}"));
        let max = self.inner.config.retry.max_attempts.max(1);
        let mut attempt = 0;
        let (content_type, header_digest, bytes) = loop {
            attempt += 1;
            let resp = self
                .send(&req, &|c, _w| {
                    Ok(c.get(url.clone())
                        .header(header::ACCEPT, media_type::MANIFEST_ACCEPT))
                })
                .await?;
            if !resp.status().is_success() {
                return Err(self.status_error(&req, resp).await);
            }
            let content_type = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned())
                .unwrap_or_default();
            let header_digest = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<Digest>().ok());
            // A body that breaks off or stalls is asked for again, like a failed request.
            match self.read_small_body(&req, resp, attempt).await {
                Ok(bytes) => break (content_type, header_digest, bytes),
                Err(e) if e.is_retryable() && attempt < max => {
                    tracing::debug!(registry = %ep.registry, what = %req.what, error = %e, "retrying");
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    self.pause(&req, self.backoff(attempt)).await?;
                }
                Err(e) => return Err(e),
            }
        };
        let raw = RawManifest::new(&content_type, bytes);
        let expected = reference
            .digest()
            .cloned()
            .or(header_digest.filter(|d| d.algorithm() == raw.digest.algorithm()));
        if let Some(expected) = expected {
            let actual = match expected.algorithm() {
                crate::digest::Algorithm::Sha256 => raw.digest.clone(),
                a => Digest::of(a, &raw.bytes),
            };
            if actual != expected {
                return Err(RegistryError::DigestMismatch {
                    registry: ep.registry.clone(),
                    repository: repo.to_owned(),
                    what: format!("manifest {r}"),
                    expected,
                    expected_size: 0,
                    actual,
                    actual_size: raw.bytes.len() as u64,
                });
            }
        }
        Ok(raw)
    }

    /// A manifest's body (at most [`MAX_SMALL_BLOB`]), read on attempt `attempt` of `req`.
    async fn read_small_body(
        &self,
        req: &Req<'_>,
        resp: Response,
        attempt: u32,
    ) -> Result<Bytes, RegistryError> {
        let bytes = self
            .read_body(resp, MAX_SMALL_BLOB)
            .await
            .map_err(|e| self.body_error(req, e, attempt, MAX_SMALL_BLOB))?;
        self.inner
            .counters
            .bytes_received
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// `HEAD` of a manifest: its descriptor (digest, size, media type), or `None` if absent.
    pub async fn head_manifest(
        &self,
        reference: &Reference,
    ) -> Result<Option<Descriptor>, RegistryError> {
        let ep = self.endpoint_for(reference.registry());
        let repo = reference.repository();
        let r = reference.api_reference();
        let req = Req {
            ep: &ep,
            repo,
            scopes: vec![pull_scope(repo)],
            what: format!("HEAD manifest {r}"),
            retry: true,
        };
        let url = self.url(&ep, &format!("/v2/{repo}/manifests/{r}"));
        let resp = self
            .send(&req, &|c, _w| {
                Ok(c.head(url.clone())
                    .header(header::ACCEPT, media_type::MANIFEST_ACCEPT))
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.status_error(&req, resp).await);
        }
        let h = resp.headers();
        let digest = h
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok());
        let size = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok());
        let mt = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        match (digest, size) {
            (Some(d), Some(s)) => Ok(Some(Descriptor::new(mt, d, s))),
            // Without a digest header the only way to know is a GET.
            _ => Ok(Some(self.pull_manifest(reference).await?.descriptor())),
        }
    }

    /// Resolves `reference` to the image for `platform`: tag → manifest or index → the
    /// platform's manifest → config.
    pub async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedImage, RegistryError> {
        let top = self.pull_manifest(reference).await?;
        let parse_err = |r: &Reference| {
            let r = r.to_string();
            move |source| RegistryError::Manifest {
                reference: r,
                source,
            }
        };
        let (index, manifest) = match top.parse().map_err(parse_err(reference))? {
            Manifest::Image(_) => (None, top.clone()),
            Manifest::Index(idx) => {
                let candidates: Vec<&Descriptor> = idx
                    .manifests
                    .iter()
                    .filter(|d| media_type::is_manifest(&d.media_type) || d.media_type.is_empty())
                    // Attestation manifests (BuildKit's provenance) carry unknown/unknown.
                    .filter(|d| !d.annotations.contains_key("vnd.docker.reference.type"))
                    .collect();
                let chosen = candidates
                    .iter()
                    .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
                    .or_else(|| match candidates.as_slice() {
                        [only] if only.platform.is_none() => Some(only),
                        _ => None,
                    });
                let Some(chosen) = chosen else {
                    let available: Vec<String> = candidates
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                        .collect();
                    return Err(RegistryError::NoMatchingPlatform {
                        reference: reference.to_string(),
                        platform: platform.to_string(),
                        available: if available.is_empty() {
                            "none".into()
                        } else {
                            available.join(", ")
                        },
                    });
                };
                let child_ref = reference.with_digest(chosen.digest.clone());
                let child = self.pull_manifest(&child_ref).await?;
                (Some(top.clone()), child)
            }
        };
        let image = match manifest.parse().map_err(parse_err(reference))? {
            Manifest::Image(m) => m,
            Manifest::Index(_) => {
                return Err(RegistryError::Protocol {
                    registry: reference.registry().to_owned(),
                    what: format!("manifest of {reference}"),
                    detail: "an index points at another index; nested indexes are not supported"
                        .into(),
                })
            }
        };
        let mut config_bytes = Vec::new();
        let config_ref = reference.clone();
        if image.config.size > MAX_SMALL_BLOB {
            return Err(RegistryError::Protocol {
                registry: reference.registry().to_owned(),
                what: format!("config of {reference}"),
                detail: format!(
                    "config blob is {} bytes, larger than {MAX_SMALL_BLOB}",
                    image.config.size
                ),
            });
        }
        self.pull_blob(&config_ref, &image.config, &mut config_bytes)
            .await?;
        let config: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|source| RegistryError::Config {
                reference: reference.to_string(),
                digest: image.config.digest.clone(),
                source,
            })?;
        Ok(ResolvedImage {
            reference: reference.with_digest(top.digest.clone()),
            index,
            manifest,
            image,
            config_bytes: Bytes::from(config_bytes),
            config,
        })
    }

    /// Streams blob `desc` of `reference`'s repository into `sink`, hashing as it goes. A broken
    /// connection resumes with a `Range` request. Returns only once size and digest match;
    /// on any error the bytes already written to `sink` must be discarded by the caller
    /// ([`RegistryClient::pull_blob_to_file`] does that for files).
    pub async fn pull_blob<W>(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        sink: &mut W,
    ) -> Result<(), RegistryError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let eps = self.pull_endpoints(reference.registry());
        let n = eps.len();
        for (i, ep) in eps.into_iter().enumerate() {
            match self
                .pull_blob_from(&ep, reference.repository(), desc, sink)
                .await
            {
                Ok(()) => return Ok(()),
                // Only a mirror that failed before writing anything can be skipped.
                Err((e, 0)) if i + 1 < n => {
                    tracing::warn!(mirror = %ep.registry, error = %e, "mirror failed, trying the next");
                }
                Err((e, _)) => return Err(e),
            }
        }
        Err(RegistryError::Client("no endpoint".into()))
    }

    async fn pull_blob_from<W>(
        &self,
        ep: &Endpoint,
        repo: &str,
        desc: &Descriptor,
        sink: &mut W,
    ) -> Result<(), (RegistryError, u64)>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut hasher = Hasher::new(desc.digest.algorithm());
        let mut written: u64 = 0;
        let mut broken = 0;
        let what = format!("blob {}", desc.digest);
        let url = self.url(ep, &format!("/v2/{repo}/blobs/{}", desc.digest));
        let sink_err = |source: std::io::Error, written| {
            (
                RegistryError::Io {
                    action: "writing pulled".into(),
                    path: what.clone(),
                    source,
                },
                written,
            )
        };
        'request: loop {
            let req = Req {
                ep,
                repo,
                scopes: vec![pull_scope(repo)],
                what: what.clone(),
                retry: true,
            };
            let offset = written;
            let resp = self
                .send(&req, &|c, _w| {
                    let rb = c.get(url.clone());
                    Ok(if offset > 0 {
                        rb.header(header::RANGE, format!("bytes={offset}-"))
                    } else {
                        rb
                    })
                })
                .await
                .map_err(|e| (e, written))?;
            let mut skip = match resp.status() {
                StatusCode::OK => written,
                StatusCode::PARTIAL_CONTENT if offset > 0 => 0,
                _ => return Err((self.status_error(&req, resp).await, written)),
            };
            let mut stream = resp.bytes_stream();
            let mut watch = ReadWatch::new(self.inner.timeouts);
            loop {
                let chunk = match self.next_chunk(&mut stream, &mut watch).await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(BodyError::Cancelled) => return Err((self.cancelled(&req), written)),
                    // A body that broke off or stalled resumes where it stopped (`Range`).
                    Err(e) => {
                        broken += 1;
                        if broken >= self.inner.config.retry.max_attempts {
                            return Err((self.body_error(&req, e, broken, desc.size), written));
                        }
                        self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                        self.pause(&req, self.backoff(broken))
                            .await
                            .map_err(|e| (e, written))?;
                        continue 'request;
                    }
                };
                self.inner
                    .counters
                    .bytes_received
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                let mut data = &chunk[..];
                if skip > 0 {
                    let s = skip.min(data.len() as u64) as usize;
                    data = &data[s..];
                    skip -= s as u64;
                }
                if written + data.len() as u64 > desc.size {
                    hasher.update(data);
                    return Err((
                        self.mismatch(ep, repo, desc, hasher, written + data.len() as u64),
                        written,
                    ));
                }
                hasher.update(data);
                sink.write_all(data)
                    .await
                    .map_err(|e| sink_err(e, written))?;
                written += data.len() as u64;
            }
            break;
        }
        sink.flush().await.map_err(|e| sink_err(e, written))?;
        let actual = hasher.finish();
        if written != desc.size || actual != desc.digest {
            return Err((
                RegistryError::DigestMismatch {
                    registry: ep.registry.clone(),
                    repository: repo.to_owned(),
                    what,
                    expected: desc.digest.clone(),
                    expected_size: desc.size,
                    actual,
                    actual_size: written,
                },
                written,
            ));
        }
        Ok(())
    }

    fn mismatch(
        &self,
        ep: &Endpoint,
        repo: &str,
        desc: &Descriptor,
        hasher: Hasher,
        n: u64,
    ) -> RegistryError {
        RegistryError::DigestMismatch {
            registry: ep.registry.clone(),
            repository: repo.to_owned(),
            what: format!("blob {} (more bytes than its size)", desc.digest),
            expected: desc.digest.clone(),
            expected_size: desc.size,
            actual: hasher.finish(),
            actual_size: n,
        }
    }

    /// Pulls blob `desc` into `path`: written to a temporary file beside it and renamed into
    /// place only after the digest is verified, so `path` never holds unverified bytes.
    pub async fn pull_blob_to_file(
        &self,
        reference: &Reference,
        desc: &Descriptor,
        path: &Path,
    ) -> Result<(), RegistryError> {
        let io = |action: &str, source| RegistryError::Io {
            action: action.into(),
            path: path.display().to_string(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| io("creating the directory of", e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".pull-")
            .tempfile_in(dir)
            .map_err(|e| io("creating a temporary file beside", e))?;
        let (file, tmp_path) = tmp.into_parts();
        // Locked for the download's whole life, as the content store's own ingests are: a
        // reclaim in another process (`ContentStore::stale_ingests`) takes only files it can
        // lock, so it never deletes a download still in flight. `held` shares the open file
        // description, so the lock lasts until it is dropped after the rename.
        let held = file
            .try_clone()
            .and_then(|dup| {
                kiln_fs::FileLock::try_lock(dup, kiln_fs::LockMode::Exclusive)?
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::WouldBlock))
            })
            .map_err(|e| io("locking a temporary file beside", e))?;
        let mut f = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file));
        let result = self.pull_blob(reference, desc, &mut f).await;
        let file = f.into_inner();
        if let Err(e) = result {
            drop(file);
            drop(tmp_path); // removes the temporary file
            return Err(e);
        }
        file.sync_data().await.map_err(|e| io("syncing", e))?;
        drop(file);
        tmp_path
            .persist(path)
            .map_err(|e| io("renaming a verified blob to", e.error))?;
        drop(held);
        Ok(())
    }

    /// Whether the repository of `reference` has blob `digest` (`HEAD`).
    pub async fn blob_exists(
        &self,
        reference: &Reference,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        let ep = self.endpoint_for(reference.registry());
        let repo = reference.repository();
        let req = Req {
            ep: &ep,
            repo,
            scopes: vec![push_scope(repo)],
            what: format!("HEAD blob {digest}"),
            retry: true,
        };
        let url = self.url(&ep, &format!("/v2/{repo}/blobs/{digest}"));
        let resp = self.send(&req, &|c, _w| Ok(c.head(url.clone()))).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.status_error(&req, resp).await),
        }
    }

    /// Pushes one blob to `target`'s repository: HEAD first; then, if `mount_from` names another
    /// repository of the same registry, a cross-repository mount; else (or if the registry
    /// answers the mount with 202) an upload streamed from `source`, in one PUT up to
    /// `monolithic_limit` bytes and in PATCH chunks beyond. Failed uploads are resumed or
    /// restarted up to the retry policy's attempts.
    pub async fn push_blob(
        &self,
        target: &Reference,
        desc: &Descriptor,
        source: &BlobSource,
        mount_from: Option<&str>,
    ) -> Result<BlobPush, RegistryError> {
        if self.blob_exists(target, &desc.digest).await? {
            self.inner
                .counters
                .blobs_existing
                .fetch_add(1, Ordering::Relaxed);
            return Ok(BlobPush::Exists);
        }
        let ep = self.endpoint_for(target.registry());
        let mount_from = mount_from.filter(|f| *f != target.repository());
        let max = self.inner.config.retry.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .upload_once(&ep, target.repository(), desc, source, mount_from)
                .await
            {
                Ok(r) => {
                    let c = match r {
                        BlobPush::Mounted => &self.inner.counters.blobs_mounted,
                        _ => &self.inner.counters.blobs_uploaded,
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                    return Ok(r);
                }
                // A request that already used up its own retries is not restarted again.
                Err(e) if e.is_retryable() && e.attempts() < max && attempt < max => {
                    tracing::debug!(digest = %desc.digest, error = %e, "restarting upload");
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    if self.is_cancelled() {
                        return Err(RegistryError::Cancelled {
                            registry: ep.registry.clone(),
                            what: format!("upload of blob {}", desc.digest),
                        });
                    }
                    tokio::select! {
                        biased;
                        _ = self.inner.cancel.cancelled() => {}
                        _ = tokio::time::sleep(self.backoff(attempt)) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn location(&self, req: &Req<'_>, resp: &Response) -> Result<Url, RegistryError> {
        let loc = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Protocol {
                registry: req.ep.registry.clone(),
                what: req.what.clone(),
                detail: format!("{} without a Location header", resp.status()),
            })?;
        resp.url().join(loc).map_err(|e| RegistryError::Protocol {
            registry: req.ep.registry.clone(),
            what: req.what.clone(),
            detail: format!("Location {loc:?} is not a URL: {e}"),
        })
    }

    /// The request body of bytes `[offset, offset+len)` of `source`, streamed and counted; each
    /// chunk handed to the connection is reported to `watch` (the idle rule while sending).
    fn body(
        &self,
        source: &BlobSource,
        offset: u64,
        len: u64,
        watch: &RequestWatch,
    ) -> Result<reqwest::Body, RegistryError> {
        let counters = Arc::clone(&self.inner.counters);
        watch.sending(len);
        let watch = watch.clone();
        let count = move |b: &Bytes| {
            counters
                .bytes_sent
                .fetch_add(b.len() as u64, Ordering::Relaxed);
            watch.sent(b.len() as u64);
        };
        match source {
            BlobSource::Bytes(b) => {
                let start = offset.min(b.len() as u64) as usize;
                let end = (offset + len).min(b.len() as u64) as usize;
                let part = b.slice(start..end);
                let s = futures::stream::once(async move {
                    count(&part);
                    Ok::<Bytes, std::io::Error>(part)
                });
                Ok(reqwest::Body::wrap_stream(s))
            }
            BlobSource::File(path) => {
                let io = |source| RegistryError::Io {
                    action: "reading blob".into(),
                    path: path.display().to_string(),
                    source,
                };
                let mut f = std::fs::File::open(path).map_err(io)?;
                f.seek(SeekFrom::Start(offset)).map_err(io)?;
                let f = tokio::fs::File::from_std(f).take(len);
                let s = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20)
                    .inspect_ok(move |b| count(b));
                Ok(reqwest::Body::wrap_stream(s))
            }
        }
    }

    async fn upload_once(
        &self,
        ep: &Endpoint,
        repo: &str,
        desc: &Descriptor,
        source: &BlobSource,
        mount_from: Option<&str>,
    ) -> Result<BlobPush, RegistryError> {
        let mut scopes = vec![push_scope(repo)];
        if let Some(from) = mount_from {
            scopes.push(pull_scope(from));
        }
        let digest = desc.digest.to_string();
        let mut req = Req {
            ep,
            repo,
            scopes,
            what: format!("upload of blob {digest}"),
            retry: true,
        };
        let mut start = self.url(ep, &format!("/v2/{repo}/blobs/uploads/"));
        if let Some(from) = mount_from {
            start
                .query_pairs_mut()
                .append_pair("mount", &digest)
                .append_pair("from", from);
        }
        let resp = self
            .send(&req, &|c, _w| {
                Ok(c.post(start.clone()).header(header::CONTENT_LENGTH, "0"))
            })
            .await?;
        match resp.status() {
            StatusCode::CREATED if mount_from.is_some() => return Ok(BlobPush::Mounted),
            StatusCode::ACCEPTED => {}
            _ => return Err(self.status_error(&req, resp).await),
        }
        let mut location = self.location(&req, &resp)?;
        // The data requests must not be repeated blindly: the session may hold part of the body.
        req.retry = false;
        let size = desc.size;
        if size <= self.inner.config.monolithic_limit {
            return self
                .finish_upload(&req, location, &digest, source, 0, size)
                .await;
        }
        let chunk = self.inner.config.chunk_size.max(1);
        let mut offset = 0u64;
        let mut resumes = 0;
        while offset < size {
            let end = (offset + chunk).min(size);
            let loc = location.clone();
            let result = self
                .send(&req, &|c, w| {
                    Ok(c.patch(loc.clone())
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .header(header::CONTENT_LENGTH, end - offset)
                        .header("Content-Range", format!("{}-{}", offset, end - 1))
                        .body(self.body(source, offset, end - offset, w)?))
                })
                .await;
            match result {
                Ok(resp) if resp.status() == StatusCode::ACCEPTED => {
                    location = self.location(&req, &resp)?;
                    offset = upload_range_end(resp.headers()).unwrap_or(end);
                }
                Ok(resp)
                    if !(resp.status().is_server_error()
                        || resp.status() == StatusCode::TOO_MANY_REQUESTS) =>
                {
                    return Err(self.status_error(&req, resp).await);
                }
                other => {
                    // Connection broken or 5xx mid-chunk: ask the session how much it holds
                    // and continue from there.
                    resumes += 1;
                    if resumes >= self.inner.config.retry.max_attempts {
                        return match other {
                            Ok(resp) => Err(self.status_error(&req, resp).await),
                            Err(e) => Err(e),
                        };
                    }
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    self.pause(&req, self.backoff(resumes)).await?;
                    let status_req = Req {
                        ep,
                        repo,
                        scopes: req.scopes.clone(),
                        what: req.what.clone(),
                        retry: true,
                    };
                    let loc = location.clone();
                    let resp = self
                        .send(&status_req, &|c, _w| Ok(c.get(loc.clone())))
                        .await?;
                    if resp.status() != StatusCode::NO_CONTENT {
                        // The session is gone or cannot continue (distribution refuses a
                        // session whose stored size moved past its state token): restart.
                        return Err(RegistryError::UploadLost {
                            registry: ep.registry.clone(),
                            repository: repo.to_owned(),
                            digest: digest.clone(),
                            detail: self.error_detail(resp).await,
                        });
                    }
                    if resp.headers().contains_key(header::LOCATION) {
                        location = self.location(&status_req, &resp)?;
                    }
                    offset = upload_range_end(resp.headers()).unwrap_or(0);
                }
            }
        }
        self.finish_upload(&req, location, &digest, source, size, 0)
            .await
    }

    /// The closing PUT of an upload with `?digest=`, carrying bytes `[offset, offset+len)`.
    async fn finish_upload(
        &self,
        req: &Req<'_>,
        mut location: Url,
        digest: &str,
        source: &BlobSource,
        offset: u64,
        len: u64,
    ) -> Result<BlobPush, RegistryError> {
        location.query_pairs_mut().append_pair("digest", digest);
        let resp = self
            .send(req, &|c, w| {
                let rb = c
                    .put(location.clone())
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_LENGTH, len);
                Ok(if len > 0 {
                    rb.body(self.body(source, offset, len, w)?)
                } else {
                    rb
                })
            })
            .await?;
        if resp.status() == StatusCode::CREATED {
            Ok(BlobPush::Uploaded)
        } else {
            Err(self.status_error(req, resp).await)
        }
    }

    /// Pushes manifest bytes under `target`'s tag (or digest). Returns the digest the registry
    /// stored, checked against the bytes' own.
    pub async fn push_manifest(
        &self,
        target: &Reference,
        manifest: &RawManifest,
    ) -> Result<Digest, RegistryError> {
        let ep = self.endpoint_for(target.registry());
        let repo = target.repository();
        let r = target
            .tag()
            .map(str::to_owned)
            .unwrap_or_else(|| manifest.digest.to_string());
        let req = Req {
            ep: &ep,
            repo,
            scopes: vec![push_scope(repo)],
            what: format!("push of manifest {r}"),
            retry: true,
        };
        let url = self.url(&ep, &format!("/v2/{repo}/manifests/{r}"));
        let body = manifest.bytes.clone();
        let mt = manifest.media_type.clone();
        let resp = self
            .send(&req, &|c, _w| {
                Ok(c.put(url.clone())
                    .header(header::CONTENT_TYPE, mt.as_str())
                    .body(body.clone()))
            })
            .await?;
        if resp.status() != StatusCode::CREATED && !resp.status().is_success() {
            return Err(self.status_error(&req, resp).await);
        }
        self.inner
            .counters
            .bytes_sent
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
        {
            if d.parse::<Digest>().ok().as_ref() != Some(&manifest.digest) {
                return Err(RegistryError::Protocol {
                    registry: ep.registry.clone(),
                    what: req.what.clone(),
                    detail: format!(
                        "registry stored digest {d}, but the bytes sent hash to {}",
                        manifest.digest
                    ),
                });
            }
        }
        Ok(manifest.digest.clone())
    }

    /// Pushes an image: every blob (several at once, each HEAD-checked and mounted from
    /// `mount_from` or from the first target's repository when possible), then the manifest
    /// under every target (tags may be in different repositories of different registries).
    /// A blob listed more than once (an image with the same layer twice) is pushed once.
    pub async fn push_image(
        &self,
        targets: &[Reference],
        manifest: &RawManifest,
        blobs: &[(Descriptor, BlobSource)],
        mount_from: Option<&Reference>,
    ) -> Result<Digest, RegistryError> {
        // Two concurrent uploads of one digest would both miss the HEAD check and upload it
        // twice (or race in the registry); one per digest suffices.
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<&(Descriptor, BlobSource)> = blobs
            .iter()
            .filter(|(d, _)| seen.insert(d.digest.clone()))
            .collect();
        let mut done: Vec<Reference> = Vec::new();
        for target in targets {
            if done
                .iter()
                .any(|d| d.registry() == target.registry() && d.repository() == target.repository())
            {
                continue;
            }
            let from = mount_from
                .filter(|m| m.registry() == target.registry())
                .or_else(|| done.iter().find(|d| d.registry() == target.registry()))
                .map(|r| r.repository().to_owned());
            let results: Vec<Result<BlobPush, RegistryError>> =
                futures::stream::iter(unique.iter())
                    .filter(|(d, _)| {
                        futures::future::ready(!media_type::is_non_distributable(&d.media_type))
                    })
                    .map(|(d, s)| self.push_blob(target, d, s, from.as_deref()))
                    .buffer_unordered(self.inner.config.concurrency.max(1))
                    .collect()
                    .await;
            for r in results {
                r?;
            }
            done.push(target.clone());
        }
        for target in targets {
            self.push_manifest(target, manifest).await?;
        }
        Ok(manifest.digest.clone())
    }

    /// Pulls the image `reference` names for `platform` into an OCI layout: config and layers
    /// (several at once, each verified, existing blobs skipped), the manifest, and an
    /// `index.json` entry named `ref_name`. A layer listed more than once is pulled once.
    pub async fn pull_to_layout(
        &self,
        reference: &Reference,
        platform: &Platform,
        layout: &OciLayout,
        ref_name: &str,
    ) -> Result<ResolvedImage, RegistryError> {
        let image = self.resolve(reference, platform).await?;
        let io = |e: crate::layout::LayoutError| RegistryError::Io {
            action: "writing to the OCI layout".into(),
            path: layout.root().display().to_string(),
            source: std::io::Error::other(e.to_string()),
        };
        layout.write_blob(&image.config_bytes).map_err(io)?;
        // One download per digest: concurrent pulls of a layer listed twice would both miss
        // `has_blob` and write the same blob path at once.
        let mut seen = std::collections::HashSet::new();
        let layers: Vec<&Descriptor> = image
            .distributable_layers()
            .filter(|l| seen.insert(l.digest.clone()))
            .collect();
        let results: Vec<Result<(), RegistryError>> = futures::stream::iter(layers)
            .map(|l| async move {
                if layout.has_blob(&l.digest) {
                    return Ok(());
                }
                self.pull_blob_to_file(reference, l, &layout.blob_path(&l.digest))
                    .await
            })
            .buffer_unordered(self.inner.config.concurrency.max(1))
            .collect()
            .await;
        for r in results {
            r?;
        }
        layout.write_blob(&image.manifest.bytes).map_err(io)?;
        layout
            .add_manifest(image.manifest.descriptor(), ref_name)
            .map_err(io)?;
        Ok(image)
    }

    /// Pushes the image named `ref_name` in an OCI layout to every target (blobs streamed from
    /// the layout's files).
    pub async fn push_from_layout(
        &self,
        layout: &OciLayout,
        ref_name: &str,
        targets: &[Reference],
    ) -> Result<Digest, RegistryError> {
        let io = |e: crate::layout::LayoutError| RegistryError::Io {
            action: "reading the OCI layout".into(),
            path: layout.root().display().to_string(),
            source: std::io::Error::other(e.to_string()),
        };
        let manifest = layout.manifest(ref_name).map_err(io)?;
        let image = match manifest.parse() {
            Ok(Manifest::Image(m)) => m,
            Ok(Manifest::Index(_)) => {
                return Err(RegistryError::Io {
                    action: "pushing".into(),
                    path: format!("{}:{ref_name}", layout.root().display()),
                    source: std::io::Error::other(
                        "the layout entry is an index; push its manifests one by one",
                    ),
                })
            }
            Err(source) => {
                return Err(RegistryError::Manifest {
                    reference: ref_name.into(),
                    source,
                })
            }
        };
        let mut blobs = vec![(
            image.config.clone(),
            BlobSource::File(layout.blob_path(&image.config.digest)),
        )];
        for l in &image.layers {
            blobs.push((l.clone(), BlobSource::File(layout.blob_path(&l.digest))));
        }
        self.push_image(targets, &manifest, &blobs, None).await
    }
}

/// `Range: 0-N` of an upload session: the next offset to send (N+1).
fn upload_range_end(h: &HeaderMap) -> Option<u64> {
    let v = h.get(header::RANGE)?.to_str().ok()?;
    let v = v.strip_prefix("bytes=").unwrap_or(v);
    let (_, end) = v.split_once('-')?;
    let end: u64 = end.trim().parse().ok()?;
    // Distribution reports an empty session as "0-0"; a 1-byte one is the same. Restarting
    // from 0 is always safe for the registry (it rejects a wrong offset with 416).
    if end == 0 {
        Some(0)
    } else {
        Some(end + 1)
    }
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The registry's error message (`{"errors":[{"code","message"}]}`), prefixed with ": ".
fn error_detail_of(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(body) {
        let parts: Vec<String> = e
            .errors
            .iter()
            .map(|e| format!("{} {}", e.code, e.message).trim().to_owned())
            .collect();
        if !parts.is_empty() {
            return format!(": {}", parts.join("; "));
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_owned();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// Minimal `application/x-www-form-urlencoded` encoding for the token POST.
mod url {
    pub(super) fn form_urlencoded_pairs(pairs: &[(&str, &str)]) -> String {
        let mut u = reqwest::Url::parse("http://x/").expect("static URL");
        {
            let mut q = u.query_pairs_mut();
            for (k, v) in pairs {
                q.append_pair(k, v);
            }
        }
        u.query().unwrap_or("").to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_use_plain_http_and_others_https() {
        let c = RegistryClient::new(ClientConfig::default()).unwrap();
        for h in [
            "localhost:5000",
            "127.0.0.1:5000",
            "127.3.4.5",
            "[::1]:5000",
            "localhost",
        ] {
            assert_eq!(c.endpoint_for(h).base.scheme(), "http", "{h}");
        }
        for h in [
            "docker.io",
            "ghcr.io",
            "10.0.0.1:5000",
            "localhost.example.com",
        ] {
            assert_eq!(c.endpoint_for(h).base.scheme(), "https", "{h}");
        }
        assert_eq!(
            c.endpoint_for("docker.io").base.host_str(),
            Some("registry-1.docker.io")
        );
        let mut cfg = ClientConfig::default();
        cfg.hosts.insert(
            "reg.internal:5000".into(),
            HostConfig {
                insecure: true,
                mirrors: vec![],
            },
        );
        let c = RegistryClient::new(cfg).unwrap();
        assert_eq!(c.endpoint_for("reg.internal:5000").base.scheme(), "http");
    }

    #[test]
    fn connection_counts_parse_within_bounds_and_bad_ones_name_their_flag() {
        assert_eq!(parse_connections("connections", "64"), Ok(64));
        assert_eq!(parse_connections("connections", " 1 "), Ok(1));
        for bad in ["0", "-3", "many", "", "1025"] {
            let e = parse_connections("--export-cache connections", bad).unwrap_err();
            assert!(e.starts_with("--export-cache connections="), "{e}");
            assert!(e.contains("1 to 1024"), "{e}");
        }
        assert!(
            ClientConfig::default().concurrency > 4,
            "above BuildKit's 4"
        );
    }

    #[test]
    fn a_client_with_another_connection_count_shares_the_byte_counters() {
        let c = RegistryClient::new(ClientConfig {
            concurrency: 5,
            ..ClientConfig::default()
        })
        .unwrap();
        let d = c.with_concurrency(64);
        assert_eq!((c.concurrency(), d.concurrency()), (5, 64));
        d.inner.counters.bytes_sent.fetch_add(7, Ordering::Relaxed);
        assert_eq!(c.stats().bytes_sent, 7);
    }

    #[test]
    fn mirrors_come_before_the_registry() {
        let mut cfg = ClientConfig::default();
        cfg.hosts.insert(
            "docker.io".into(),
            HostConfig {
                insecure: false,
                mirrors: vec!["mirror.local:5000".into()],
            },
        );
        let c = RegistryClient::new(cfg).unwrap();
        let eps: Vec<String> = c
            .pull_endpoints("docker.io")
            .iter()
            .map(|e| e.base.to_string())
            .collect();
        assert_eq!(
            eps,
            [
                "https://mirror.local:5000/",
                "https://registry-1.docker.io/"
            ]
        );
    }

    #[test]
    fn upload_range_and_retry_after_headers_parse() {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("0-1048575"));
        assert_eq!(upload_range_end(&h), Some(1048576));
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-0"));
        assert_eq!(upload_range_end(&h), Some(0));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let cfg = ClientConfig {
            retry: RetryPolicy {
                max_attempts: 5,
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_millis(350),
            },
            ..ClientConfig::default()
        };
        let c = RegistryClient::new(cfg).unwrap();
        assert_eq!(c.backoff(1), Duration::from_millis(100));
        assert_eq!(c.backoff(2), Duration::from_millis(200));
        assert_eq!(c.backoff(3), Duration::from_millis(350));
        assert_eq!(c.backoff(40), Duration::from_millis(350));
    }
}
