//! The HTTP API of the OCI distribution spec v1.1: routing and one handler per endpoint.
//! Handlers speak to storage only through [`Storage`], whatever the driver.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, Response, StatusCode};
use kiln_oci::Digest;

use crate::auth::{Auth, Scope};
use crate::error::{ApiError, Code};
use crate::manifest;
use crate::metrics::Metrics;
use crate::names::{is_valid_repository, is_valid_tag};
use crate::storage::{self, BlobContent, ByteStream, LockMode, Storage, StorageError};
use crate::Config;

/// Response body: small buffers or a stream.
pub(crate) type Body = BoxBody<Bytes, io::Error>;
type Resp = Result<Response<Body>, ApiError>;

/// Shared state of one running registry.
pub(crate) struct App {
    pub(crate) store: Arc<dyn Storage>,
    pub(crate) read_only: bool,
    pub(crate) max_manifest_bytes: usize,
    pub(crate) auth: Auth,
    pub(crate) metrics: Metrics,
    /// A request body that sends nothing for this long fails the request, so a stalled
    /// upload cannot hold its connection and staged file forever.
    body_timeout: Option<Duration>,
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

impl App {
    pub(crate) fn new(store: Arc<dyn Storage>, cfg: &Config, auth: Auth) -> App {
        App {
            store,
            read_only: cfg.read_only,
            max_manifest_bytes: cfg.max_manifest_bytes,
            auth,
            body_timeout: crate::secs_or_off(cfg.idle_timeout_secs),
            metrics: Metrics::default(),
            manifest_buffers: tokio::sync::Semaphore::new(64),
            max_uploads: (cfg.max_open_uploads, cfg.max_open_uploads_per_repository),
            empty_upload_max_age: Duration::from_secs(cfg.empty_upload_max_age_secs),
            upload_starts: tokio::sync::Mutex::new(()),
        }
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
        let counts = self
            .store
            .count_uploads(name)
            .await
            .map_err(internal("counting uploads"))?;
        if within(counts) {
            return Ok(true);
        }
        let n = self
            .store
            .reclaim_empty_uploads(self.empty_upload_max_age)
            .await
            .map_err(internal("reclaiming abandoned uploads"))?;
        if n > 0 {
            tracing::info!("removed {n} abandoned empty uploads");
        }
        let counts = self
            .store
            .count_uploads(name)
            .await
            .map_err(internal("reclaiming abandoned uploads"))?;
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

/// Maps a storage failure to a 500 naming what the server was doing.
fn internal(what: &'static str) -> impl Fn(StorageError) -> ApiError {
    move |e| ApiError::internal(what, e)
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

fn blob_unknown(d: &Digest) -> ApiError {
    ApiError::new(Code::BlobUnknown, "blob unknown to registry")
        .with_detail(serde_json::json!({ "digest": d.to_string() }))
}

async fn get_blob(app: &Arc<App>, name: String, d: String, h: &HeaderMap, head: bool) -> Resp {
    let d = parse_digest(&d)?;
    let store = &app.store;
    let size = store
        .repository_blob_size(&name, &d)
        .await
        .map_err(internal("reading blob"))?;
    if head && size.is_some() {
        store.touch_blob(&d).await;
    }
    let size = size.ok_or_else(|| blob_unknown(&d))?;
    if !head && !h.contains_key(header::RANGE) {
        // Object storage may hand the bytes out itself (a presigned URL).
        if let Some(url) = store.blob_redirect(&d) {
            return finish(
                builder(StatusCode::TEMPORARY_REDIRECT)
                    .header(header::LOCATION, url)
                    .header("Docker-Content-Digest", d.to_string())
                    .header(header::CONTENT_LENGTH, 0),
                empty(),
            );
        }
    }
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
    match store
        .read_blob(&d, start, len)
        .await
        .map_err(internal("reading blob"))?
    {
        // Deleted (GC) between the existence check and the read.
        None => Err(blob_unknown(&d)),
        Some(BlobContent::Bytes(data)) => finish(b, full(data)),
        Some(BlobContent::Stream(s)) => {
            let frames = SyncStream(std::sync::Mutex::new(s)).map(|item| item.map(Frame::data));
            finish(b, BodyExt::boxed(StreamBody::new(frames)))
        }
    }
}

/// A stream made `Sync` for the response body type. It is only ever polled through
/// `&mut`, so the mutex is never locked (nothing can poison it either).
struct SyncStream(std::sync::Mutex<ByteStream>);

impl futures::Stream for SyncStream {
    type Item = io::Result<Bytes>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let inner = self.get_mut().0.get_mut();
        inner
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .poll_next(cx)
    }
}

async fn delete_blob(app: &Arc<App>, name: String, d: String) -> Resp {
    let d = parse_digest(&d)?;
    let found = app
        .store
        .unlink_blob(&name, &d)
        .await
        .map_err(internal("deleting blob"))?;
    if !found {
        return Err(blob_unknown(&d));
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

/// A request body as the data stream storage appends: counted in the metrics as it
/// arrives, failing when it stalls past the idle timeout or the client goes away.
fn body_stream(app: &Arc<App>, body: Incoming) -> ByteStream {
    let app = app.clone();
    Box::pin(futures::stream::unfold(Some(body), move |body| {
        let app = app.clone();
        async move {
            let mut body = body?;
            loop {
                match next_frame(&mut body, app.body_timeout).await {
                    None => return None,
                    Some(Err(e)) => {
                        let e = io::Error::other(format!("reading request body: {e}"));
                        return Some((Err(e), None));
                    }
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data() {
                            app.metrics.add_bytes_in(data.len() as u64);
                            return Some((Ok(data), Some(body)));
                        }
                    }
                }
            }
        }
    }))
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

/// Links blob `d` into `to` when the store holds it (visible in `from`, when given).
/// Returns false when it does not, and the client uploads instead.
async fn mount_blob(app: &App, from: Option<&str>, to: &str, d: &Digest) -> Result<bool, ApiError> {
    let store = &app.store;
    let err = internal("mounting blob");
    let _lock = store.lock(LockMode::Shared).await.map_err(&err)?;
    let present = match from {
        Some(from) => store.repository_blob_size(from, d).await,
        None => store.blob_size(d).await,
    }
    .map_err(&err)?
    .is_some();
    if !present {
        return Ok(false);
    }
    store.touch_blob(d).await;
    store.link_blob(to, d).await.map_err(&err)?;
    Ok(true)
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
        if from_ok && mount_blob(app, Some(from), &name, &d).await? {
            return blob_created(&name, &d);
        }
    } else if let (Some(mount), true) = (query(q, "mount"), app.auth.is_open()) {
        // Mount without `from` (spec v1.1): only on an open registry, where every
        // repository is readable anyway; with auth, a digest must not grant access.
        let d = parse_digest(mount)?;
        if mount_blob(app, None, &name, &d).await? {
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
    let id = app
        .store
        .start_upload(&name)
        .await
        .map_err(internal("creating upload"))?;
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

/// A whole blob in one POST: staged as an upload no client ever sees, committed on a
/// digest match, discarded otherwise.
async fn monolithic_upload(app: &Arc<App>, name: String, d: Digest, body: Incoming) -> Resp {
    let store = &app.store;
    let id = store
        .start_upload(&name)
        .await
        .map_err(internal("creating upload"))?;
    let appended = store
        .append_upload(&name, &id, Some(0), body_stream(app, body))
        .await;
    let committed = match appended {
        Ok(_) => store.finish_upload(&name, &id, &d).await,
        Err(e) => Err(e),
    };
    let failure = match committed {
        Ok(()) => return blob_created(&name, &d),
        Err(StorageError::UploadData(e)) => ApiError::new(Code::BlobUploadInvalid, e),
        Err(StorageError::DigestMismatch { actual, .. }) => ApiError::new(
            Code::DigestInvalid,
            "provided digest did not match uploaded content",
        )
        .with_detail(
            serde_json::json!({ "expected": d.to_string(), "actual": actual.to_string() }),
        ),
        Err(e) => return Err(ApiError::internal("committing blob", e)),
    };
    store
        .cancel_upload(&name, &id)
        .await
        .map_err(internal("discarding upload"))?;
    Err(failure)
}

async fn upload_status(app: &Arc<App>, name: String, id: String) -> Resp {
    let size = app
        .store
        .upload_size(&name, &id)
        .await
        .map_err(internal("reading upload"))?
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

fn chunk_out_of_order(size: u64) -> ApiError {
    ApiError::new(
        Code::BlobUploadInvalid,
        format!("chunk out of order: the upload has {size} bytes; the next chunk must start there"),
    )
    .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
    .with_detail(serde_json::json!({ "size": size }))
}

/// Where a chunk must start according to its `Content-Range` (`None`: no header, append
/// at the end). A malformed header, or one whose length disagrees with `Content-Length`,
/// is answered as out of order.
async fn chunk_offset(
    app: &App,
    name: &str,
    id: &str,
    headers: &HeaderMap,
) -> Result<Option<u64>, ApiError> {
    let Some(cr) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let cr = cr.to_str().ok().and_then(parse_content_range);
    let len: Option<u64> = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    match cr {
        Some((s, e)) if len.is_none_or(|l| l == e - s + 1) => Ok(Some(s)),
        _ => {
            let size = app
                .store
                .upload_size(name, id)
                .await
                .map_err(internal("opening upload"))?
                .ok_or_else(|| upload_unknown(id))?;
            Err(chunk_out_of_order(size))
        }
    }
}

/// Appends a request body to upload `id`; returns the upload's new size.
async fn append_chunk(
    app: &Arc<App>,
    name: &str,
    id: &str,
    req: Request<Incoming>,
) -> Result<u64, ApiError> {
    let offset = chunk_offset(app, name, id, req.headers()).await?;
    let data = body_stream(app, req.into_body());
    app.store
        .append_upload(name, id, offset, data)
        .await
        .map_err(|e| match e {
            StorageError::UploadUnknown => upload_unknown(id),
            StorageError::UploadOutOfOrder { size } => chunk_out_of_order(size),
            StorageError::UploadData(e) => ApiError::new(Code::BlobUploadInvalid, e),
            e => ApiError::internal("writing upload", e),
        })
}

async fn patch_upload(app: &Arc<App>, name: String, id: String, req: Request<Incoming>) -> Resp {
    let size = append_chunk(app, &name, &id, req).await?;
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
    append_chunk(app, &name, &id, req).await?;
    match app.store.finish_upload(&name, &id, &d).await {
        Ok(()) => blob_created(&name, &d),
        Err(StorageError::UploadUnknown) => Err(upload_unknown(&id)),
        // The upload stays open at its current size so the client may retry the PUT.
        Err(StorageError::DigestMismatch { actual, size }) => Err(ApiError::new(
            Code::DigestInvalid,
            "provided digest did not match uploaded content",
        )
        .with_detail(serde_json::json!({
            "expected": d.to_string(), "actual": actual.to_string(), "size": size
        }))),
        Err(e) => Err(ApiError::internal("committing blob", e)),
    }
}

async fn cancel_upload(app: &Arc<App>, name: String, id: String) -> Resp {
    let found = app
        .store
        .cancel_upload(&name, &id)
        .await
        .map_err(internal("cancelling upload"))?;
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
    let store = &*app.store;
    let err = internal("reading manifest");
    let found = match storage::resolve(store, &name, &reference)
        .await
        .map_err(&err)?
    {
        None => None,
        Some(d) if head => store
            .manifest_info(&name, &d)
            .await
            .map_err(&err)?
            .map(|(mt, len)| (d, mt, len, None)),
        Some(d) => store.get_manifest(&name, &d).await.map_err(&err)?.map(|m| {
            let len = m.bytes.len() as u64;
            (d, m.media_type, len, Some(m.bytes))
        }),
    };
    let (d, mt, len, bytes) = found.ok_or_else(|| manifest_unknown(&reference))?;
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
    let subject = refs.subject.clone();
    let store = &*app.store;
    let err = internal("storing manifest");
    let missing = {
        let _lock = store.lock(LockMode::Shared).await.map_err(&err)?;
        let mut missing = None;
        for b in &refs.blobs {
            if store
                .repository_blob_size(&name, b)
                .await
                .map_err(&err)?
                .is_none()
            {
                missing = Some(b.clone());
                break;
            }
        }
        if missing.is_none() {
            for m in &refs.manifests {
                if store.manifest_info(&name, m).await.map_err(&err)?.is_none() {
                    missing = Some(m.clone());
                    break;
                }
            }
        }
        if missing.is_none() {
            // Content and revision, referrer entry, then the tags: every visible name
            // points at complete data.
            store
                .put_manifest(&name, &digest, &media_type, Bytes::from(bytes))
                .await
                .map_err(&err)?;
            if let Some((s, desc)) = referrer {
                store
                    .add_referrer(&name, &s, &digest, Bytes::from(desc))
                    .await
                    .map_err(&err)?;
            }
            for tag in &tags {
                store.put_tag(&name, tag, &digest).await.map_err(&err)?;
            }
        }
        missing
    };
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
    let store = &*app.store;
    let found = if reference.contains(':') {
        let d = parse_digest(&reference)?;
        storage::delete_manifest_and_tags(store, &name, &d).await
    } else {
        store.delete_tag(&name, &reference).await
    }
    .map_err(internal("deleting manifest"))?;
    if !found {
        return Err(manifest_unknown(&reference));
    }
    finish(
        builder(StatusCode::ACCEPTED).header(header::CONTENT_LENGTH, 0),
        empty(),
    )
}

// ------------------------------------------------------------------------------- discovery

/// The `n` and `last` query parameters of a paginated list.
fn page_request(q: &[(String, String)]) -> Result<(Option<usize>, Option<&str>), ApiError> {
    let n = match query(q, "n") {
        None | Some("") => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            ApiError::new(Code::Unsupported, "n must be a non-negative integer")
                .with_status(StatusCode::BAD_REQUEST)
        })?),
    };
    Ok((n, query(q, "last").filter(|l| !l.is_empty())))
}

/// Cuts a list fetched with one item beyond `n` to `n`; returns whether more follow.
fn cut_page(mut items: Vec<String>, n: Option<usize>) -> (Vec<String>, bool) {
    let more = n.is_some_and(|n| items.len() > n);
    if let Some(n) = n {
        items.truncate(n);
    }
    (items, more)
}

fn link_header(path: &str, n: Option<usize>, last: Option<&String>) -> Option<String> {
    let (n, last) = (n?, last?);
    Some(format!("<{path}?n={n}&last={last}>; rel=\"next\""))
}

async fn tags_list(app: &Arc<App>, name: String, q: &[(String, String)]) -> Resp {
    let (n, last) = page_request(q)?;
    let tags = app
        .store
        .list_tags(&name, last, n.map(|n| n.saturating_add(1)))
        .await
        .map_err(internal("listing tags"))?
        .ok_or_else(|| {
            ApiError::new(Code::NameUnknown, "repository name not known to registry")
                .with_detail(serde_json::json!({ "name": name }))
        })?;
    let (page, more) = cut_page(tags, n);
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
    let (n, last) = page_request(q)?;
    let repos = app
        .store
        .repositories()
        .await
        .map_err(internal("listing repositories"))?;
    let (page, more) = cut_page(
        storage::page(repos, last, n.map(|n| n.saturating_add(1))),
        n,
    );
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
    let err = internal("listing referrers");
    let entries = app.store.referrers(&name, &d).await.map_err(&err)?;
    let mut manifests = Vec::new();
    for (referrer, e) in entries {
        // An entry is only valid while its manifest revision exists.
        if app
            .store
            .manifest_info(&name, &referrer)
            .await
            .map_err(&err)?
            .is_none()
        {
            continue;
        }
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
    let size = app
        .store
        .stored_bytes()
        .await
        .map_err(internal("measuring storage"))?;
    let text = app.metrics.render(size, app.store.upload_stats());
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
