//! The HTTP API of the OCI distribution spec v1.1: routing and one handler per endpoint.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, Response, StatusCode};
use kiln_oci::{Algorithm, Digest, Hasher};

use crate::auth::{Auth, Scope};
use crate::error::{ApiError, Code};
use crate::manifest;
use crate::metrics::Metrics;
use crate::names::{is_valid_repository, is_valid_tag};
use crate::storage::Storage;
use crate::Config;

/// Response body: small buffers or a streamed file.
pub(crate) type Body = BoxBody<Bytes, io::Error>;
type Resp = Result<Response<Body>, ApiError>;

/// Writes are batched to this size before a blocking write + hash.
const WRITE_BATCH: usize = 256 << 10;

/// Batches in flight between the receiving task and the blocking writer (or reader).
const PIPELINE_DEPTH: usize = 4;

/// Blobs up to this size are read in one blocking call and sent from memory.
const SMALL_BLOB: u64 = 64 << 10;

/// Streaming sha256 state of one upload: `(bytes hashed, hasher)`, behind a per-upload lock
/// that also serialises its chunks.
type UploadHash = Arc<tokio::sync::Mutex<Option<(u64, Hasher)>>>;

/// Shared state of one running registry.
pub(crate) struct App {
    pub(crate) store: Storage,
    pub(crate) read_only: bool,
    pub(crate) max_manifest_bytes: usize,
    pub(crate) auth: Auth,
    pub(crate) metrics: Metrics,
    /// A request body that sends nothing for this long fails the request, so a stalled
    /// upload cannot hold its connection and staged file forever.
    body_timeout: Option<Duration>,
    /// Streaming sha256 state of open uploads, so resumable chunks are hashed once. Lost on
    /// restart; the staged file is then re-hashed.
    sessions: Mutex<HashStates>,
    /// Manifest bodies are buffered whole (up to the size limit); this caps how many are in
    /// memory at once so many concurrent pushes cannot exhaust memory.
    manifest_buffers: tokio::sync::Semaphore,
    /// Bounds on open upload sessions: `(in total, per repository)`, 0 for none.
    max_uploads: (usize, usize),
    /// Age after which an upload that still holds no data may be reclaimed.
    empty_upload_max_age: Duration,
    /// Serialises counting and creating upload sessions, so concurrent starts cannot
    /// overshoot the bounds together.
    upload_starts: tokio::sync::Mutex<()>,
}

/// Hash state of open uploads keyed by `(repository, upload id)`. Entries are made only
/// for uploads that exist in storage, and past `cap` the least recently used idle entry is
/// dropped: requests naming made-up uploads cannot add entries, and no client can flush
/// another's state wholesale (a dropped entry only costs that upload one re-hash).
#[derive(Default)]
struct HashStates {
    entries: HashMap<(String, String), (u64, UploadHash)>,
    /// Use counter: the entry with the smallest stamp is the least recently used.
    clock: u64,
    cap: usize,
}

impl HashStates {
    fn get(&mut self, key: &(String, String)) -> Option<UploadHash> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(key).map(|(used, h)| {
            *used = now;
            h.clone()
        })
    }

    /// File names of uploads a request is working on right now (it holds their entry).
    fn busy(&self) -> std::collections::HashSet<String> {
        self.entries
            .iter()
            .filter(|(_, (_, h))| Arc::strong_count(h) > 1)
            .map(|((name, id), _)| crate::storage::upload_file_name(name, id))
            .collect()
    }

    fn insert(&mut self, key: (String, String)) -> UploadHash {
        if let Some(h) = self.get(&key) {
            return h;
        }
        if self.entries.len() >= self.cap {
            // Only idle entries may go: a request holding one is writing a chunk, and a
            // second lock for the same upload would let two chunks interleave.
            let oldest = self
                .entries
                .iter()
                .filter(|(_, (_, h))| Arc::strong_count(h) == 1)
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
        let h = UploadHash::default();
        self.entries.insert(key, (self.clock, h.clone()));
        h
    }
}

impl App {
    pub(crate) fn new(store: Storage, cfg: &Config, auth: Auth) -> App {
        // Every entry belongs to an open upload, so the upload bound bounds the map too.
        let cap = match cfg.max_open_uploads {
            0 => 10_000,
            n => n,
        };
        App {
            store,
            read_only: cfg.read_only,
            max_manifest_bytes: cfg.max_manifest_bytes,
            auth,
            body_timeout: crate::secs_or_off(cfg.idle_timeout_secs),
            metrics: Metrics::default(),
            sessions: Mutex::new(HashStates {
                cap,
                ..HashStates::default()
            }),
            manifest_buffers: tokio::sync::Semaphore::new(64),
            max_uploads: (cfg.max_open_uploads, cfg.max_open_uploads_per_repository),
            empty_upload_max_age: Duration::from_secs(cfg.empty_upload_max_age_secs),
            upload_starts: tokio::sync::Mutex::new(()),
        }
    }

    fn hash_states(&self) -> std::sync::MutexGuard<'_, HashStates> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hash state of upload `id` in `name`; `BLOB_UPLOAD_UNKNOWN` (and no entry) when
    /// storage holds no such upload.
    async fn session(&self, name: &str, id: &str) -> Result<UploadHash, ApiError> {
        let key = (name.to_owned(), id.to_owned());
        if let Some(h) = self.hash_states().get(&key) {
            return Ok(h);
        }
        let store = self.store.clone();
        let (n2, i2) = key.clone();
        let exists = blocking("reading upload", move || store.upload_size(&n2, &i2))
            .await?
            .is_some();
        if !exists {
            return Err(upload_unknown(id));
        }
        Ok(self.hash_states().insert(key))
    }

    fn forget_session(&self, name: &str, id: &str) {
        self.hash_states()
            .entries
            .remove(&(name.to_owned(), id.to_owned()));
    }

    /// Whether another upload session may start in `name`; at a bound, first removes
    /// abandoned empty uploads and counts again.
    async fn upload_slot_free(&self, name: &str) -> Result<bool, ApiError> {
        let (max_total, max_here) = self.max_uploads;
        if max_total == 0 && max_here == 0 {
            return Ok(true);
        }
        let within = |(total, here): (usize, usize)| {
            (max_total == 0 || total < max_total) && (max_here == 0 || here < max_here)
        };
        let (store, n2) = (self.store.clone(), name.to_owned());
        if within(blocking("counting uploads", move || store.count_uploads(&n2)).await?) {
            return Ok(true);
        }
        let busy = self.hash_states().busy();
        let (store, n2, age) = (
            self.store.clone(),
            name.to_owned(),
            self.empty_upload_max_age,
        );
        let counts = blocking("reclaiming abandoned uploads", move || {
            let n = store.reclaim_empty_uploads(age, &busy)?;
            if n > 0 {
                tracing::info!("removed {n} abandoned empty uploads");
            }
            store.count_uploads(&n2)
        })
        .await?;
        Ok(within(counts))
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn builder(status: StatusCode) -> hyper::http::response::Builder {
    Response::builder()
        .status(status)
        .header("Docker-Distribution-API-Version", "registry/2.0")
}

fn finish(b: hyper::http::response::Builder, body: Body) -> Resp {
    b.body(body)
        .map_err(|e| ApiError::internal("building response", e))
}

pub(crate) fn error_response(e: &ApiError, head: bool) -> Response<Body> {
    let body = e.body();
    let mut b = builder(e.status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if let Some(c) = &e.challenge {
        b = b.header(header::WWW_AUTHENTICATE, c);
    }
    b.body(if head { empty() } else { full(body) })
        .unwrap_or_else(|_| Response::new(empty()))
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(ApiError::internal(what, e)),
        Err(e) => Err(ApiError::internal(what, e)),
    }
}

// ------------------------------------------------------------------------------- routing

enum Route {
    Base,
    Catalog,
    Tags(String),
    Manifest(String, String),
    Blob(String, String),
    UploadStart(String),
    Upload(String, String),
    Referrers(String, String),
    Token,
}

/// Decodes `%XX` escapes. Works on bytes: a path may hold non-ASCII characters, and slicing
/// the string after a `%` could split one (a panic a client could trigger at will).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| char::from(c).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn query<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn parse_route(path: &str) -> Result<Route, ApiError> {
    if path == "/token" || path == "/v2/token" {
        return Ok(Route::Token);
    }
    let rest = match path.strip_prefix("/v2") {
        Some("") | Some("/") => return Ok(Route::Base),
        Some(r) => r.strip_prefix('/').ok_or_else(not_found)?,
        None => return Err(not_found()),
    };
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    let segs: Vec<String> = rest.split('/').map(percent_decode).collect();
    let n = segs.len();
    let name = |k: usize| -> Result<String, ApiError> {
        let name = segs[..k].join("/");
        if is_valid_repository(&name) {
            Ok(name)
        } else {
            Err(ApiError::new(Code::NameInvalid, "invalid repository name")
                .with_detail(serde_json::json!({ "name": name })))
        }
    };
    let at = |i: usize, s: &str| segs.get(i).is_some_and(|x| x == s);
    if n >= 3 && at(n - 2, "tags") && at(n - 1, "list") {
        return Ok(Route::Tags(name(n - 2)?));
    }
    if n >= 2 && at(n - 2, "manifests") {
        return Ok(Route::Manifest(name(n - 2)?, segs[n - 1].clone()));
    }
    if n >= 4 && at(n - 3, "blobs") && at(n - 2, "uploads") {
        let id = segs[n - 1].clone();
        return Ok(if id.is_empty() {
            Route::UploadStart(name(n - 3)?)
        } else {
            Route::Upload(name(n - 3)?, id)
        });
    }
    if n >= 3 && at(n - 2, "blobs") && at(n - 1, "uploads") {
        return Ok(Route::UploadStart(name(n - 2)?));
    }
    if n >= 2 && at(n - 2, "blobs") {
        return Ok(Route::Blob(name(n - 2)?, segs[n - 1].clone()));
    }
    if n >= 2 && at(n - 2, "referrers") {
        return Ok(Route::Referrers(name(n - 2)?, segs[n - 1].clone()));
    }
    Err(not_found())
}

fn not_found() -> ApiError {
    ApiError::new(Code::Unsupported, "unknown endpoint").with_status(StatusCode::NOT_FOUND)
}

fn method_not_allowed() -> ApiError {
    ApiError::new(Code::Unsupported, "method not allowed on this endpoint")
}

/// Handles one request; never fails (errors become spec error bodies).
pub(crate) async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let bytes_in = req.body().size_hint().exact().unwrap_or(0);
    let head = method == Method::HEAD;
    let resp = match dispatch(&app, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e, head),
    };
    let status = resp.status().as_u16();
    let bytes_out = resp.body().size_hint().exact().unwrap_or_else(|| {
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0)
    });
    let elapsed = start.elapsed();
    app.metrics
        .observe(method.as_str(), status, bytes_in, bytes_out, elapsed);
    tracing::info!(
        target: "kiln_registry::access",
        "{method} {path} {status} in={bytes_in} out={bytes_out} {:.3}ms",
        elapsed.as_secs_f64() * 1000.0
    );
    resp
}

async fn dispatch(app: &Arc<App>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    if path == "/metrics" {
        // Open registries serve it to anyone; with auth configured it needs credentials
        // (basic: any user; token: `registry:metrics:pull`).
        app.auth.check(req.headers(), &Scope::Metrics).await?;
        return match *req.method() {
            Method::GET | Method::HEAD => metrics(app).await,
            _ => Err(method_not_allowed()),
        };
    }
    let route = parse_route(&path)?;
    let method = req.method().clone();
    let writes = !matches!(method, Method::GET | Method::HEAD);
    let scope = match &route {
        Route::Base | Route::Token => Scope::Base,
        Route::Catalog => Scope::Catalog,
        Route::Tags(n)
        | Route::Manifest(n, _)
        | Route::Blob(n, _)
        | Route::UploadStart(n)
        | Route::Upload(n, _)
        | Route::Referrers(n, _) => Scope::Repository {
            name: n.clone(),
            action: match method {
                Method::DELETE => "delete",
                Method::GET | Method::HEAD => "pull",
                _ => "push",
            },
        },
    };
    if let Route::Token = route {
        return token(app, &req).await;
    }
    app.auth.check(req.headers(), &scope).await?;
    if writes && app.read_only {
        return Err(
            ApiError::new(Code::Unsupported, "the registry is in read-only mode")
                .with_status(StatusCode::METHOD_NOT_ALLOWED),
        );
    }
    let q = query_pairs(req.uri().query());
    match (route, method) {
        (Route::Base, Method::GET | Method::HEAD) => finish(
            builder(StatusCode::OK).header(header::CONTENT_TYPE, "application/json"),
            full("{}"),
        ),
        (Route::Catalog, Method::GET) => catalog(app, &q).await,
        (Route::Tags(n), Method::GET) => tags_list(app, n, &q).await,
        (Route::Manifest(n, r), Method::GET) => get_manifest(app, n, r, req.headers(), false).await,
        (Route::Manifest(n, r), Method::HEAD) => get_manifest(app, n, r, req.headers(), true).await,
        (Route::Manifest(n, r), Method::PUT) => put_manifest(app, n, r, &q, req).await,
        (Route::Manifest(n, r), Method::DELETE) => delete_manifest(app, n, r).await,
        (Route::Blob(n, d), Method::GET) => get_blob(app, n, d, req.headers(), false).await,
        (Route::Blob(n, d), Method::HEAD) => get_blob(app, n, d, req.headers(), true).await,
        (Route::Blob(n, d), Method::DELETE) => delete_blob(app, n, d).await,
        (Route::UploadStart(n), Method::POST) => start_upload(app, n, &q, req).await,
        (Route::Upload(n, id), Method::GET) => upload_status(app, n, id).await,
        (Route::Upload(n, id), Method::PATCH) => patch_upload(app, n, id, req).await,
        (Route::Upload(n, id), Method::PUT) => put_upload(app, n, id, &q, req).await,
        (Route::Upload(n, id), Method::DELETE) => cancel_upload(app, n, id).await,
        (Route::Referrers(n, d), Method::GET) => referrers(app, n, d, &q).await,
        _ => Err(method_not_allowed()),
    }
}

// ------------------------------------------------------------------------------- blobs

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse::<Digest>().map_err(|e| {
        ApiError::new(Code::DigestInvalid, e.to_string())
            .with_detail(serde_json::json!({ "digest": s }))
    })
}

/// Parses `bytes=a-b`, `bytes=a-` or `bytes=-n` against `size`; `None` when unsatisfiable.
fn parse_range(v: &str, size: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        (size.saturating_sub(n), size.checked_sub(1)?)
    } else {
        let s: u64 = a.parse().ok()?;
        let e: u64 = if b.is_empty() {
            size.checked_sub(1)?
        } else {
            b.parse().ok()?
        };
        (s, e.min(size.checked_sub(1)?))
    };
    (start <= end && start < size).then_some((start, end))
}

async fn get_blob(app: &Arc<App>, name: String, d: String, h: &HeaderMap, head: bool) -> Resp {
    let d = parse_digest(&d)?;
    let store = app.store.clone();
    let (dd, n2) = (d.clone(), name.clone());
    let size = blocking("reading blob", move || {
        let s = store.blob_size(&n2, &dd)?;
        if head && s.is_some() {
            store.touch_blob(&dd);
        }
        Ok(s)
    })
    .await?
    .ok_or_else(|| {
        ApiError::new(Code::BlobUnknown, "blob unknown to registry")
            .with_detail(serde_json::json!({ "digest": d.to_string() }))
    })?;
    let range = match h.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) => match parse_range(r, size) {
            Some(x) => Some(x),
            None => {
                return finish(
                    builder(StatusCode::RANGE_NOT_SATISFIABLE)
                        .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                        .header(header::CONTENT_LENGTH, 0),
                    empty(),
                )
            }
        },
        None => None,
    };
    let (status, start, len) = match range {
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        None => (StatusCode::OK, 0, size),
    };
    let mut b = builder(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{d}\""))
        .header("Docker-Content-Digest", d.to_string());
    if let Some((s, e)) = range {
        b = b.header(header::CONTENT_RANGE, format!("bytes {s}-{e}/{size}"));
    }
    if head || len == 0 {
        return finish(b, empty());
    }
    let path = app.store.blob_path(&d);
    let opened = blocking("reading blob", move || {
        use std::io::Read;
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if start > 0 {
            file.seek(io::SeekFrom::Start(start))?;
        }
        if len <= SMALL_BLOB {
            let mut data = Vec::with_capacity(len as usize);
            file.take(len).read_to_end(&mut data)?;
            return Ok(Some((None, Some(Bytes::from(data)))));
        }
        Ok(Some((Some(file), None)))
    })
    .await?;
    match opened {
        // Deleted (GC) between the existence check and the open.
        None => Err(ApiError::new(Code::BlobUnknown, "blob unknown to registry")
            .with_detail(serde_json::json!({ "digest": d.to_string() }))),
        Some((_, Some(data))) => finish(b, full(data)),
        Some((Some(file), None)) => finish(b, file_body(file, len)),
        Some((None, None)) => Err(ApiError::internal("reading blob", "nothing opened")),
    }
}

/// Streams `len` bytes of `file` from its current position: a blocking reader fills
/// `WRITE_BATCH`-sized buffers ahead of the network (at most `PIPELINE_DEPTH` in flight).
fn file_body(file: File, len: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(PIPELINE_DEPTH);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = file.take(len);
        let mut left = len;
        while left > 0 {
            let n = left.min(WRITE_BATCH as u64);
            let mut buf = Vec::with_capacity(n as usize);
            let item = match (&mut file).take(n).read_to_end(&mut buf) {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob shorter than its size",
                )),
                Ok(got) => {
                    left -= got as u64;
                    Ok(Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                break; // client gone, or error already reported
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(Frame::data), rx))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

async fn delete_blob(app: &Arc<App>, name: String, d: String) -> Resp {
    let d = parse_digest(&d)?;
    let store = app.store.clone();
    let dd = d.clone();
    if !blocking("deleting blob", move || store.unlink_blob(&name, &dd)).await? {
        return Err(ApiError::new(Code::BlobUnknown, "blob unknown to registry")
            .with_detail(serde_json::json!({ "digest": d.to_string() })));
    }
    finish(
        builder(StatusCode::ACCEPTED).header(header::CONTENT_LENGTH, 0),
        empty(),
    )
}

/// The next frame of a request body; an error when none arrives within `limit`.
async fn next_frame(
    body: &mut Incoming,
    limit: Option<Duration>,
) -> Option<Result<Frame<Bytes>, String>> {
    let frame = match limit {
        None => body.frame().await,
        Some(d) => match tokio::time::timeout(d, body.frame()).await {
            Ok(f) => f,
            Err(_) => {
                return Some(Err(format!(
                    "no body data arrived for {} s (the idle timeout)",
                    d.as_secs()
                )))
            }
        },
    };
    frame.map(|f| f.map_err(|e| e.to_string()))
}

/// A staged file being appended to, with the running hash and byte count.
struct Sink {
    file: File,
    hasher: Hasher,
    written: u64,
}

/// Appends the request body to `sink`, hashing as it goes. A body that fits one batch is
/// written with a single blocking call; a larger one streams through a bounded channel to a
/// blocking writer, so receiving, hashing and writing overlap while memory per upload stays
/// under `WRITE_BATCH * (PIPELINE_DEPTH + 2)`. On a body error (truncated upload, client
/// gone) the sink holds what was written so far.
async fn append_body(sink: Sink, mut body: Incoming, app: &App) -> (Sink, Result<(), String>) {
    let mut buf = bytes::BytesMut::new();
    let mut result = Ok(());
    let mut writer: Option<(tokio::sync::mpsc::Sender<Bytes>, WriterTask)> = None;
    let mut sink = Some(sink);
    loop {
        match next_frame(&mut body, app.body_timeout).await {
            None => break,
            Some(Err(e)) => {
                result = Err(format!("reading request body: {e}"));
                break;
            }
            Some(Ok(f)) => {
                let Ok(data) = f.into_data() else { continue };
                app.metrics.add_bytes_in(data.len() as u64);
                buf.extend_from_slice(&data);
                if buf.len() < WRITE_BATCH {
                    continue;
                }
                let chunk = buf.split().freeze();
                let (tx, _) = writer.get_or_insert_with(|| {
                    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(PIPELINE_DEPTH);
                    let sink = sink.take().expect("sink moves to the writer once");
                    (
                        tx,
                        tokio::task::spawn_blocking(move || write_stream(sink, rx)),
                    )
                });
                if tx.send(chunk).await.is_err() {
                    break; // the writer failed; its result says why
                }
            }
        }
    }
    match writer {
        None => {
            let sink = sink.expect("sink still here without a writer");
            if result.is_ok() && !buf.is_empty() {
                return write_chunk(sink, buf.freeze()).await;
            }
            (sink, result)
        }
        Some((tx, handle)) => {
            if result.is_ok() && !buf.is_empty() {
                let _ = tx.send(buf.freeze()).await;
            }
            drop(tx);
            let (sink, wr) = match handle.await {
                Ok(x) => x,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
            (sink, wr.and(result))
        }
    }
}

/// The blocking writer of an upload pipeline; gives the sink back when done.
type WriterTask = tokio::task::JoinHandle<(Sink, Result<(), String>)>;

/// The blocking half of the upload pipeline: write and hash chunks until the channel closes.
fn write_stream(
    mut sink: Sink,
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> (Sink, Result<(), String>) {
    while let Some(chunk) = rx.blocking_recv() {
        if let Err(e) = sink.file.write_all(&chunk) {
            return (sink, Err(format!("writing upload: {e}")));
        }
        sink.hasher.update(&chunk);
        sink.written += chunk.len() as u64;
    }
    (sink, Ok(()))
}

async fn write_chunk(sink: Sink, chunk: Bytes) -> (Sink, Result<(), String>) {
    // The sink moves into the blocking task and back; if the task is lost the file is only
    // staged data, never visible.
    let h = tokio::task::spawn_blocking(move || {
        let mut sink = sink;
        let r = sink.file.write_all(&chunk);
        if r.is_ok() {
            sink.hasher.update(&chunk);
            sink.written += chunk.len() as u64;
        }
        (sink, r.map_err(|e| format!("writing upload: {e}")))
    });
    match h.await {
        Ok(x) => x,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn upload_location(name: &str, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

fn range_header(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

fn upload_unknown(id: &str) -> ApiError {
    ApiError::new(Code::BlobUploadUnknown, "blob upload unknown to registry")
        .with_detail(serde_json::json!({ "uuid": id }))
}

fn blob_created(name: &str, d: &Digest) -> Resp {
    finish(
        builder(StatusCode::CREATED)
            .header(header::LOCATION, format!("/v2/{name}/blobs/{d}"))
            .header("Docker-Content-Digest", d.to_string())
            .header(header::CONTENT_LENGTH, 0),
        empty(),
    )
}

async fn start_upload(
    app: &Arc<App>,
    name: String,
    q: &[(String, String)],
    req: Request<Incoming>,
) -> Resp {
    if let (Some(mount), Some(from)) = (query(q, "mount"), query(q, "from")) {
        let d = parse_digest(mount)?;
        // The source must be readable by this client too.
        let from_ok = is_valid_repository(from)
            && app
                .auth
                .check(
                    req.headers(),
                    &Scope::Repository {
                        name: from.to_owned(),
                        action: "pull",
                    },
                )
                .await
                .is_ok();
        if from_ok {
            let (store, from, to, dd) =
                (app.store.clone(), from.to_owned(), name.clone(), d.clone());
            if blocking("mounting blob", move || store.mount_blob(&from, &to, &dd)).await? {
                return blob_created(&name, &d);
            }
        }
    } else if let (Some(mount), true) = (query(q, "mount"), app.auth.is_open()) {
        // Mount without `from` (spec v1.1): only on an open registry, where every
        // repository is readable anyway; with auth, a digest must not grant access.
        let d = parse_digest(mount)?;
        let (store, to, dd) = (app.store.clone(), name.clone(), d.clone());
        if blocking("mounting blob", move || store.mount_any(&to, &dd)).await? {
            return blob_created(&name, &d);
        }
    } else if let Some(digest) = query(q, "digest") {
        let d = parse_digest(digest)?;
        return monolithic_upload(app, name, d, req.into_body()).await;
    }
    let slots = app.upload_starts.lock().await;
    if !app.upload_slot_free(&name).await? {
        return Err(ApiError::new(
            Code::TooManyRequests,
            "too many open uploads: finish or cancel one, or retry later",
        )
        .with_detail(serde_json::json!({
            "max_open_uploads": app.max_uploads.0,
            "max_open_uploads_per_repository": app.max_uploads.1,
        })));
    }
    let store = app.store.clone();
    let n2 = name.clone();
    let id = blocking("creating upload", move || store.create_upload(&n2)).await?;
    drop(slots);
    finish(
        builder(StatusCode::ACCEPTED)
            .header(header::LOCATION, upload_location(&name, &id))
            .header(header::RANGE, "0-0")
            .header("Docker-Upload-UUID", &id)
            .header(header::CONTENT_LENGTH, 0),
        empty(),
    )
}

async fn monolithic_upload(app: &Arc<App>, name: String, d: Digest, body: Incoming) -> Resp {
    let store = app.store.clone();
    let n2 = name.clone();
    let (id, file) = blocking("creating upload", move || store.create_temp_upload(&n2)).await?;
    let sink = Sink {
        file,
        hasher: Hasher::new(d.algorithm()),
        written: 0,
    };
    let (sink, r) = append_body(sink, body, app).await;
    let store = app.store.clone();
    let remove = {
        let (store, name, id) = (store.clone(), name.clone(), id.clone());
        move || {
            store.delete_upload(&name, &id)?;
            Ok(())
        }
    };
    if let Err(e) = r {
        blocking("discarding upload", remove).await?;
        return Err(ApiError::new(Code::BlobUploadInvalid, e));
    }
    let got = sink.hasher.finish();
    if got != d {
        blocking("discarding upload", remove).await?;
        return Err(ApiError::new(
            Code::DigestInvalid,
            "provided digest did not match uploaded content",
        )
        .with_detail(serde_json::json!({ "expected": d.to_string(), "actual": got.to_string() })));
    }
    let (n2, dd) = (name.clone(), d.clone());
    let file = sink.file;
    blocking("committing blob", move || {
        store.commit_upload(&n2, &id, file, &dd)
    })
    .await?;
    blob_created(&name, &d)
}

async fn upload_status(app: &Arc<App>, name: String, id: String) -> Resp {
    let store = app.store.clone();
    let (n2, i2) = (name.clone(), id.clone());
    let size = blocking("reading upload", move || store.upload_size(&n2, &i2))
        .await?
        .ok_or_else(|| upload_unknown(&id))?;
    finish(
        builder(StatusCode::NO_CONTENT)
            .header(header::LOCATION, upload_location(&name, &id))
            .header(header::RANGE, range_header(size))
            .header("Docker-Upload-UUID", &id)
            .header(header::CONTENT_LENGTH, 0),
        empty(),
    )
}

/// Parses a `Content-Range` of an upload chunk: `<start>-<end>` (optionally `bytes `-prefixed).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim();
    let v = v
        .strip_prefix("bytes=")
        .or_else(|| v.strip_prefix("bytes "))
        .unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

/// Opens an upload, checks a chunk's `Content-Range` against its size, and returns a sink
/// positioned at the end with the sha256 state (re-hashed if the server lost it).
async fn open_sink(
    app: &Arc<App>,
    name: &str,
    id: &str,
    state: &mut Option<(u64, Hasher)>,
    headers: &HeaderMap,
) -> Result<Sink, ApiError> {
    let store = app.store.clone();
    let (n2, i2) = (name.to_owned(), id.to_owned());
    let (mut file, size) = blocking("opening upload", move || store.open_upload(&n2, &i2))
        .await?
        .ok_or_else(|| upload_unknown(id))?;
    if let Some(cr) = headers.get(header::CONTENT_RANGE) {
        let cr = cr.to_str().ok().and_then(parse_content_range);
        let len: Option<u64> = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let ok = match cr {
            Some((s, e)) => s == size && len.is_none_or(|l| l == e - s + 1),
            None => false,
        };
        if !ok {
            return Err(ApiError::new(
                Code::BlobUploadInvalid,
                format!("chunk out of order: the upload has {size} bytes; the next chunk must start there"),
            )
            .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
            .with_detail(serde_json::json!({ "size": size })));
        }
    }
    let hasher = match state.take() {
        Some((off, h)) if off == size => h,
        _ => {
            if size > 0 {
                app.metrics.add_upload_rehash();
            }
            let (f, h) = blocking("hashing upload", move || {
                let mut h = Hasher::new(Algorithm::Sha256);
                file.seek(io::SeekFrom::Start(0))?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = io::Read::read(&mut file, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                Ok((file, h))
            })
            .await?;
            file = f;
            h
        }
    };
    Ok(Sink {
        file,
        hasher,
        written: size,
    })
}

/// Appends the body; on failure cuts the staged file back to where the chunk started so a
/// truncated chunk leaves the upload resumable from its last good size.
async fn append_or_rollback(app: &Arc<App>, sink: Sink, body: Incoming) -> Result<Sink, ApiError> {
    let start = sink.written;
    let (mut sink, r) = append_body(sink, body, app).await;
    if let Err(e) = r {
        let file = sink.file;
        let _ = blocking("rolling back chunk", move || file.set_len(start)).await;
        return Err(ApiError::new(Code::BlobUploadInvalid, e));
    }
    sink.written = sink
        .file
        .metadata()
        .map(|m| m.len())
        .unwrap_or(sink.written);
    Ok(sink)
}

async fn patch_upload(app: &Arc<App>, name: String, id: String, req: Request<Incoming>) -> Resp {
    let session = app.session(&name, &id).await?;
    let mut state = session.lock().await;
    let sink = open_sink(app, &name, &id, &mut state, req.headers()).await?;
    let sink = append_or_rollback(app, sink, req.into_body()).await?;
    let size = sink.written;
    *state = Some((size, sink.hasher));
    finish(
        builder(StatusCode::ACCEPTED)
            .header(header::LOCATION, upload_location(&name, &id))
            .header(header::RANGE, range_header(size))
            .header("Docker-Upload-UUID", &id)
            .header(header::CONTENT_LENGTH, 0),
        empty(),
    )
}

async fn put_upload(
    app: &Arc<App>,
    name: String,
    id: String,
    q: &[(String, String)],
    req: Request<Incoming>,
) -> Resp {
    let d = parse_digest(query(q, "digest").unwrap_or(""))?;
    let session = app.session(&name, &id).await?;
    let mut state = session.lock().await;
    let sink = open_sink(app, &name, &id, &mut state, req.headers()).await?;
    let sink = append_or_rollback(app, sink, req.into_body()).await?;
    let Sink {
        mut file,
        hasher,
        written,
    } = sink;
    let got = if d.algorithm() == Algorithm::Sha256 {
        hasher.finish()
    } else {
        let alg = d.algorithm();
        let (f, got) = blocking("hashing upload", move || {
            let got = Storage::hash_file(&mut file, alg)?;
            Ok((file, got))
        })
        .await?;
        file = f;
        got
    };
    let store = app.store.clone();
    if got != d {
        // The upload stays open at its current size so the client may retry the PUT.
        *state = None;
        return Err(ApiError::new(
            Code::DigestInvalid,
            "provided digest did not match uploaded content",
        )
        .with_detail(serde_json::json!({
            "expected": d.to_string(), "actual": got.to_string(), "size": written
        })));
    }
    let (n2, i2, dd) = (name.clone(), id.clone(), d.clone());
    blocking("committing blob", move || {
        store.commit_upload(&n2, &i2, file, &dd)
    })
    .await?;
    drop(state);
    app.forget_session(&name, &id);
    blob_created(&name, &d)
}

async fn cancel_upload(app: &Arc<App>, name: String, id: String) -> Resp {
    let session = app.session(&name, &id).await?;
    let _state = session.lock().await;
    let store = app.store.clone();
    let (n2, i2) = (name.clone(), id.clone());
    let found = blocking("cancelling upload", move || store.delete_upload(&n2, &i2)).await?;
    app.forget_session(&name, &id);
    if !found {
        return Err(upload_unknown(&id));
    }
    finish(
        builder(StatusCode::NO_CONTENT).header(header::CONTENT_LENGTH, 0),
        empty(),
    )
}

// ------------------------------------------------------------------------------- manifests

fn manifest_unknown(reference: &str) -> ApiError {
    ApiError::new(Code::ManifestUnknown, "manifest unknown to registry")
        .with_detail(serde_json::json!({ "reference": reference }))
}

fn check_reference(reference: &str) -> Result<(), ApiError> {
    if reference.contains(':') {
        parse_digest(reference).map(|_| ())
    } else if is_valid_tag(reference) {
        Ok(())
    } else {
        Err(ApiError::new(Code::TagInvalid, "invalid tag")
            .with_detail(serde_json::json!({ "tag": reference })))
    }
}

/// Whether a client's `Accept` headers admit `media_type`. No `Accept`, a wildcard, or
/// `application/json` admit everything; an explicit list of media types must name it
/// (clients that cannot parse a manifest kind get 404 instead of bytes they misread).
fn accepts(headers: &HeaderMap, media_type: &str) -> bool {
    let mut listed = false;
    for v in headers.get_all(header::ACCEPT) {
        let Ok(v) = v.to_str() else { return true };
        for item in v.split(',') {
            let t = item.split(';').next().unwrap_or("").trim();
            if t.is_empty() {
                continue;
            }
            listed = true;
            if t == media_type || matches!(t, "*/*" | "application/*" | "application/json") {
                return true;
            }
        }
    }
    !listed
}

async fn get_manifest(
    app: &Arc<App>,
    name: String,
    reference: String,
    headers: &HeaderMap,
    head: bool,
) -> Resp {
    check_reference(&reference).map_err(|e| {
        if head {
            manifest_unknown(&reference)
        } else {
            e
        }
    })?;
    let store = app.store.clone();
    let r2 = reference.clone();
    let m = if head {
        blocking("reading manifest", move || {
            let Some(d) = store.resolve(&name, &r2)? else {
                return Ok(None);
            };
            let Some(mt) = store.manifest_media_type(&name, &d)? else {
                return Ok(None);
            };
            match std::fs::metadata(store.blob_path(&d)) {
                Ok(md) => Ok(Some((d, mt, md.len(), None))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await?
    } else {
        blocking("reading manifest", move || {
            Ok(store
                .read_manifest(&name, &r2)?
                .map(|m| (m.digest, m.media_type, m.bytes.len() as u64, Some(m.bytes))))
        })
        .await?
    };
    let (d, mt, len, bytes) = m.ok_or_else(|| manifest_unknown(&reference))?;
    if !accepts(headers, &mt) {
        return Err(ApiError::new(
            Code::ManifestUnknown,
            format!("manifest is {mt}, which the Accept header does not list"),
        )
        .with_detail(serde_json::json!({ "reference": reference, "mediaType": mt })));
    }
    let b = builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, mt)
        .header(header::CONTENT_LENGTH, len)
        .header(header::ETAG, format!("\"{d}\""))
        .header("Docker-Content-Digest", d.to_string());
    match bytes {
        Some(b2) => finish(b, full(b2)),
        None => finish(b, empty()),
    }
}

async fn read_limited(body: Incoming, limit: usize, app: &App) -> Result<Vec<u8>, ApiError> {
    let too_big = || {
        ApiError::new(
            Code::SizeInvalid,
            format!("manifest exceeds the {limit} byte limit"),
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    if body.size_hint().lower() > limit as u64 {
        return Err(too_big());
    }
    let mut body = body;
    let mut out = Vec::new();
    while let Some(f) = next_frame(&mut body, app.body_timeout).await {
        let f =
            f.map_err(|e| ApiError::new(Code::ManifestInvalid, format!("reading body: {e}")))?;
        if let Ok(d) = f.into_data() {
            app.metrics.add_bytes_in(d.len() as u64);
            if out.len() + d.len() > limit {
                return Err(too_big());
            }
            out.extend_from_slice(&d);
        }
    }
    Ok(out)
}

async fn put_manifest(
    app: &Arc<App>,
    name: String,
    reference: String,
    q: &[(String, String)],
    req: Request<Incoming>,
) -> Resp {
    check_reference(&reference)?;
    // `?tag=` on a push by digest tags it too (distribution-spec, tag query parameter).
    let extra_tags: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "tag")
        .map(|(_, v)| v.clone())
        .collect();
    for t in &extra_tags {
        if !is_valid_tag(t) {
            return Err(ApiError::new(Code::TagInvalid, "invalid tag")
                .with_detail(serde_json::json!({ "tag": t })));
        }
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned())
        .filter(|s| !s.is_empty());
    let _buffer = app
        .manifest_buffers
        .acquire()
        .await
        .map_err(|e| ApiError::internal("waiting for a manifest buffer", e))?;
    let bytes = read_limited(req.into_body(), app.max_manifest_bytes, app).await?;
    let refs = manifest::parse(&bytes).map_err(|reason| {
        ApiError::new(Code::ManifestInvalid, "manifest invalid")
            .with_detail(serde_json::json!({ "reason": reason }))
    })?;
    let media_type = match (&content_type, &refs.media_type) {
        (Some(ct), Some(mt)) if ct != mt => {
            return Err(ApiError::new(Code::ManifestInvalid, "manifest invalid").with_detail(
                serde_json::json!({ "reason": format!("Content-Type {ct} differs from the manifest's mediaType {mt}") }),
            ))
        }
        (Some(ct), _) => ct.clone(),
        (None, Some(mt)) => mt.clone(),
        (None, None) => {
            if refs.manifests.is_empty() {
                manifest::OCI_MANIFEST.to_owned()
            } else {
                manifest::OCI_INDEX.to_owned()
            }
        }
    };
    let (digest, mut tags) = if reference.contains(':') {
        let want = parse_digest(&reference)?;
        let got = Digest::of(want.algorithm(), &bytes);
        if got != want {
            return Err(ApiError::new(
                Code::DigestInvalid,
                "manifest digest did not match the reference",
            )
            .with_detail(
                serde_json::json!({ "expected": want.to_string(), "actual": got.to_string() }),
            ));
        }
        (want, Vec::new())
    } else {
        (Digest::sha256_of(&bytes), vec![reference.clone()])
    };
    tags.extend(extra_tags);
    let applied_tags = tags.clone();
    let referrer = refs.subject.as_ref().map(|s| {
        let mut desc = serde_json::json!({
            "mediaType": media_type, "digest": digest.to_string(), "size": bytes.len(),
        });
        if let Some(at) = &refs.artifact_type {
            desc["artifactType"] = serde_json::Value::String(at.clone());
        }
        if let Some(a) = &refs.annotations {
            desc["annotations"] = a.clone();
        }
        (s.clone(), serde_json::to_vec(&desc).unwrap_or_default())
    });
    let store = app.store.clone();
    let (n2, d2, mt2) = (name.clone(), digest.clone(), media_type.clone());
    let subject = refs.subject.clone();
    let missing = blocking("storing manifest", move || {
        let _lock = store.gc_lock(false)?;
        for b in &refs.blobs {
            if store.blob_size(&n2, b)?.is_none() {
                return Ok(Some(b.clone()));
            }
        }
        for m in &refs.manifests {
            if !store.has_manifest(&n2, m)? {
                return Ok(Some(m.clone()));
            }
        }
        let r = referrer.as_ref().map(|(s, d)| (s, d.as_slice()));
        store.put_manifest(&n2, &d2, &mt2, &bytes, &tags, r)?;
        Ok(None)
    })
    .await?;
    if let Some(m) = missing {
        return Err(ApiError::new(
            Code::ManifestBlobUnknown,
            "manifest references a blob unknown to the repository",
        )
        .with_detail(serde_json::json!({ "digest": m.to_string() })));
    }
    let mut b = builder(StatusCode::CREATED)
        .header(header::LOCATION, format!("/v2/{name}/manifests/{digest}"))
        .header("Docker-Content-Digest", digest.to_string())
        .header(header::CONTENT_LENGTH, 0);
    if let Some(s) = subject {
        b = b.header("OCI-Subject", s.to_string());
    }
    if reference.contains(':') {
        for t in &applied_tags {
            b = b.header("OCI-Tag", t);
        }
    }
    finish(b, empty())
}

async fn delete_manifest(app: &Arc<App>, name: String, reference: String) -> Resp {
    check_reference(&reference)?;
    let store = app.store.clone();
    let r2 = reference.clone();
    let found = blocking("deleting manifest", move || {
        if r2.contains(':') {
            let d: Digest = r2.parse().map_err(io::Error::other)?;
            store.delete_manifest(&name, &d)
        } else {
            store.delete_tag(&name, &r2)
        }
    })
    .await?;
    if !found {
        return Err(manifest_unknown(&reference));
    }
    finish(
        builder(StatusCode::ACCEPTED).header(header::CONTENT_LENGTH, 0),
        empty(),
    )
}

// ------------------------------------------------------------------------------- discovery

/// Applies `n`/`last` to a sorted list; returns the page and whether more follow.
fn paginate(
    all: Vec<String>,
    q: &[(String, String)],
) -> Result<(Vec<String>, Option<usize>, bool), ApiError> {
    let n = match query(q, "n") {
        None | Some("") => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            ApiError::new(Code::Unsupported, "n must be a non-negative integer")
                .with_status(StatusCode::BAD_REQUEST)
        })?),
    };
    let mut items: Vec<String> = match query(q, "last").filter(|l| !l.is_empty()) {
        Some(last) => all.into_iter().filter(|t| t.as_str() > last).collect(),
        None => all,
    };
    let more = n.is_some_and(|n| items.len() > n);
    if let Some(n) = n {
        items.truncate(n);
    }
    Ok((items, n, more))
}

fn link_header(path: &str, n: Option<usize>, last: Option<&String>) -> Option<String> {
    let (n, last) = (n?, last?);
    Some(format!("<{path}?n={n}&last={last}>; rel=\"next\""))
}

async fn tags_list(app: &Arc<App>, name: String, q: &[(String, String)]) -> Resp {
    let store = app.store.clone();
    let n2 = name.clone();
    let tags = blocking("listing tags", move || store.tags(&n2))
        .await?
        .ok_or_else(|| {
            ApiError::new(Code::NameUnknown, "repository name not known to registry")
                .with_detail(serde_json::json!({ "name": name }))
        })?;
    let (page, n, more) = paginate(tags, q)?;
    let body = serde_json::to_vec(&serde_json::json!({ "name": name, "tags": page }))
        .map_err(|e| ApiError::internal("encoding tags", e))?;
    let mut b = builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if more {
        if let Some(l) = link_header(&format!("/v2/{name}/tags/list"), n, page.last()) {
            b = b.header(header::LINK, l);
        }
    }
    finish(b, full(body))
}

async fn catalog(app: &Arc<App>, q: &[(String, String)]) -> Resp {
    let store = app.store.clone();
    let repos = blocking("listing repositories", move || store.repositories()).await?;
    let (page, n, more) = paginate(repos, q)?;
    let body = serde_json::to_vec(&serde_json::json!({ "repositories": page }))
        .map_err(|e| ApiError::internal("encoding catalog", e))?;
    let mut b = builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if more {
        if let Some(l) = link_header("/v2/_catalog", n, page.last()) {
            b = b.header(header::LINK, l);
        }
    }
    finish(b, full(body))
}

async fn referrers(app: &Arc<App>, name: String, d: String, q: &[(String, String)]) -> Resp {
    let d = parse_digest(&d)?;
    let filter = query(q, "artifactType")
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let store = app.store.clone();
    let entries = blocking("listing referrers", move || store.referrers(&name, &d)).await?;
    let mut manifests = Vec::new();
    for e in entries {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&e) else {
            continue;
        };
        if let Some(f) = &filter {
            if v.get("artifactType").and_then(|a| a.as_str()) != Some(f.as_str()) {
                continue;
            }
        }
        manifests.push(v);
    }
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": manifest::OCI_INDEX, "manifests": manifests
    }))
    .map_err(|e| ApiError::internal("encoding referrers", e))?;
    let mut b = builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, manifest::OCI_INDEX)
        .header(header::CONTENT_LENGTH, body.len());
    if filter.is_some() {
        b = b.header("OCI-Filters-Applied", "artifactType");
    }
    finish(b, full(body))
}

// ------------------------------------------------------------------------------- extras

async fn metrics(app: &Arc<App>) -> Resp {
    let store = app.store.clone();
    let size = blocking("measuring storage", move || Ok(store.blob_store_size())).await?;
    let states = app.hash_states().entries.len();
    let text = app.metrics.render(size, states);
    finish(
        builder(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .header(header::CONTENT_LENGTH, text.len()),
        full(text),
    )
}

async fn token(app: &Arc<App>, req: &Request<Incoming>) -> Resp {
    let q = query_pairs(req.uri().query());
    let scopes: Vec<&str> = q
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.as_str())
        .collect();
    let token = app.auth.issue_for_request(req.headers(), &scopes).await?;
    let body = serde_json::to_vec(
        &serde_json::json!({ "token": token, "access_token": token, "expires_in": 3600 }),
    )
    .map_err(|e| ApiError::internal("encoding token", e))?;
    finish(
        builder(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, body.len()),
        full(body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> (String, String) {
        ("repo".to_owned(), id.to_owned())
    }

    #[test]
    fn hash_states_evict_the_least_recently_used_idle_entry() {
        let mut m = HashStates {
            cap: 2,
            ..HashStates::default()
        };
        m.insert(key("a"));
        m.insert(key("b"));
        // `a` used again: `b` is now the least recently used.
        assert!(m.get(&key("a")).is_some());
        m.insert(key("c"));
        assert_eq!(m.entries.len(), 2);
        assert!(m.entries.contains_key(&key("a")));
        assert!(m.entries.contains_key(&key("c")));
        assert!(!m.entries.contains_key(&key("b")));
    }

    #[test]
    fn hash_states_never_evict_an_entry_in_use() {
        let mut m = HashStates {
            cap: 1,
            ..HashStates::default()
        };
        let held = m.insert(key("a"));
        let again = m.insert(key("b"));
        // `a` is being written by a request: it stays, and the map grows past its cap
        // rather than handing a second lock for `a` to the next request.
        assert!(Arc::ptr_eq(&held, &m.get(&key("a")).expect("a kept")));
        assert_eq!(m.entries.len(), 2);
        drop((held, again));
        m.insert(key("c"));
        assert_eq!(m.entries.len(), 2, "one idle entry evicted at the cap");
    }

    #[test]
    fn ranges_follow_rfc9110() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=9-1", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=0-0", 0), None);
    }

    #[test]
    fn percent_escapes_next_to_non_ascii_characters_decode_without_panicking() {
        // Found by the registry_request fuzz target: '%' then a two-byte character.
        assert_eq!(percent_decode("%\u{79c}x"), "%\u{79c}x");
        assert_eq!(percent_decode("a%2Fb%zz%+1"), "a/b%zz%+1");
        assert!(parse_route("/v2/a/manifests/%\u{79c}").is_ok());
    }

    #[test]
    fn routes_split_nested_names_from_the_endpoint() {
        assert!(matches!(parse_route("/v2/").unwrap(), Route::Base));
        match parse_route("/v2/a/blobs/b/manifests/latest").unwrap() {
            Route::Manifest(n, r) => assert_eq!((n.as_str(), r.as_str()), ("a/blobs/b", "latest")),
            _ => panic!("wrong route"),
        }
        match parse_route("/v2/x/y/blobs/uploads/").unwrap() {
            Route::UploadStart(n) => assert_eq!(n, "x/y"),
            _ => panic!("wrong route"),
        }
        assert!(parse_route("/v2/../etc/manifests/x").is_err());
        assert!(parse_route("/v2/a/%2e%2e/manifests/x").is_err());
    }
}
