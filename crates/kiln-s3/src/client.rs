//! [`S3Client`]: the requests kiln sends to a bucket, signed by `rusty-s3`, sent by reqwest.
//!
//! Every request carries its signature in the query string (AWS Signature V4 with an unsigned
//! payload), so the same code makes the presigned GETs handed to registry clients. Answers
//! that may be passing trouble (connection refused or reset, 500, 502, 503, 504) are retried
//! a few times with a growing pause: a store node restarting or a replica stopping should cost
//! a moment, not a build.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{header, StatusCode};
use rusty_s3::actions::{CompleteMultipartUpload, CreateMultipartUpload, ListObjectsV2, ListParts};
use rusty_s3::{Bucket, S3Action, UrlStyle};
use url::Url;

use crate::{time, S3Config, S3Error};

/// How long the signature of one request stays valid: the request must reach the store
/// within it (a long body may take longer to send; only its start is checked).
const SIGN_FOR: Duration = Duration::from_secs(15 * 60);

/// Tries per request when the store may be briefly unavailable.
const ATTEMPTS: u32 = 4;

/// First pause before a retry; doubled each time.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A body is read while it moves; this long without a byte ends the request.
const READ_IDLE: Duration = Duration::from_secs(60);

/// Bytes that stay as they are in a copy source (`x-amz-copy-source`): the unreserved ones
/// and the path separator.
const COPY_SOURCE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// An object as a listing or a HEAD shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key, relative to the client's prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// The store's entity tag (quoted, as sent), when it gave one.
    pub etag: Option<String>,
    /// When the object was written (or last copied onto itself).
    pub last_modified: Option<SystemTime>,
}

/// The body of a GET, read while it arrives.
pub struct ObjectStream {
    /// How many bytes the stream yields (the `Content-Length`).
    pub len: u64,
    /// The bytes; an error item ends the stream.
    pub stream: Pin<Box<dyn Stream<Item = Result<Bytes, S3Error>> + Send>>,
}

/// A client for one bucket (and prefix). Cheap to clone: clones share connections.
#[derive(Clone)]
pub struct S3Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    bucket: Bucket,
    credentials: rusty_s3::Credentials,
    prefix: String,
    config: S3Config,
}

impl std::fmt::Debug for S3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Client")
            .field("endpoint", &self.inner.config.endpoint.as_str())
            .field("bucket", &self.inner.config.bucket)
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

/// Whether an answer with `status` may be a passing failure worth another try.
fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// The text of `<tag>...</tag>` in an S3 error document, when present.
fn xml_field(body: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    body.find(&open)
        .and_then(|i| {
            let rest = &body[i + open.len()..];
            rest.find(&close).map(|j| rest[..j].trim().to_owned())
        })
        .unwrap_or_default()
}

/// An error's message with its causes (reqwest hides the useful part in `source()`).
fn error_chain(e: &dyn std::error::Error) -> String {
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

/// Decodes a key of a listing asked for with `encoding-type=url`.
fn decode_key(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

impl S3Client {
    /// A client for `cfg`'s bucket. Builds the HTTP client; sends nothing.
    pub fn new(cfg: S3Config) -> Result<Self, S3Error> {
        let style = if cfg.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            cfg.endpoint.clone(),
            style,
            cfg.bucket.clone(),
            cfg.region.clone(),
        )
        .map_err(|e| S3Error::Url {
            url: cfg.endpoint.to_string(),
            reason: e.to_string(),
        })?;
        let credentials = match &cfg.credentials.session_token {
            Some(t) => rusty_s3::Credentials::new_with_token(
                cfg.credentials.key.clone(),
                cfg.credentials.secret.clone(),
                t.clone(),
            ),
            None => rusty_s3::Credentials::new(
                cfg.credentials.key.clone(),
                cfg.credentials.secret.clone(),
            ),
        };
        let http = kiln_oci::transport::client_builder(&kiln_oci::Timeouts::default())
            .map_err(S3Error::Config)?
            .read_timeout(READ_IDLE)
            .build()
            .map_err(|e| S3Error::Config(format!("HTTP client: {}", error_chain(&e))))?;
        Ok(S3Client {
            inner: Arc::new(Inner {
                http,
                bucket,
                credentials,
                prefix: cfg.prefix.clone(),
                config: cfg,
            }),
        })
    }

    /// The configuration the client was made from.
    pub fn config(&self) -> &S3Config {
        &self.inner.config
    }

    /// Where the client writes, for messages: `s3://BUCKET/PREFIX at ENDPOINT`.
    pub fn location(&self) -> String {
        format!(
            "{} at {}",
            self.inner.config.url(),
            self.inner.config.endpoint
        )
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{}", self.inner.prefix, key)
    }

    fn creds(&self) -> Option<&rusty_s3::Credentials> {
        Some(&self.inner.credentials)
    }

    /// Sends the request `make` builds, retrying passing failures; any answer the store
    /// gives last is returned as it is.
    async fn send(
        &self,
        op: &'static str,
        key: &str,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, S3Error> {
        let mut pause = FIRST_RETRY_PAUSE;
        let mut attempt = 1;
        loop {
            let last = attempt >= ATTEMPTS;
            match make().send().await {
                Ok(r) if !last && retryable(r.status()) => {
                    tracing::debug!(op, key, status = %r.status(), attempt, "S3 request retried");
                }
                Ok(r) => return Ok(r),
                Err(e) if !last && (e.is_connect() || e.is_timeout() || e.is_request()) => {
                    tracing::debug!(op, key, error = %error_chain(&e), attempt, "S3 request retried");
                }
                Err(e) => {
                    return Err(S3Error::Transport {
                        op,
                        key: key.to_owned(),
                        reason: error_chain(&e),
                    })
                }
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
            attempt += 1;
        }
    }

    /// `resp` when it is a success, its error document as [`S3Error::Status`] otherwise.
    async fn success(
        op: &'static str,
        key: &str,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, S3Error> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let mut message = xml_field(&body, "Message");
        if message.is_empty() && !body.contains('<') {
            message = body.chars().take(200).collect();
        }
        Err(S3Error::Status {
            op,
            key: key.to_owned(),
            status: status.as_u16(),
            code: xml_field(&body, "Code"),
            message,
        })
    }

    /// The whole body of a successful answer.
    /// The answer of a call that may fail after its 200 has been sent (CopyObject,
    /// CompleteMultipartUpload): the error is then in the body.
    async fn success_in_body(
        op: &'static str,
        key: String,
        resp: reqwest::Response,
    ) -> Result<(), S3Error> {
        let resp = Self::success(op, &key, resp).await?;
        let body = Self::body(op, &key, resp).await?;
        let text = String::from_utf8_lossy(&body);
        if text.contains("<Error>") {
            return Err(S3Error::Status {
                op,
                key,
                status: 200,
                code: xml_field(&text, "Code"),
                message: xml_field(&text, "Message"),
            });
        }
        Ok(())
    }

    async fn body(op: &'static str, key: &str, resp: reqwest::Response) -> Result<Bytes, S3Error> {
        resp.bytes().await.map_err(|e| S3Error::Transport {
            op,
            key: key.to_owned(),
            reason: error_chain(&e),
        })
    }

    /// Size, entity tag and age of object `key`; `None` when there is no such object.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, S3Error> {
        let full = self.full_key(key);
        let resp = self
            .send("HEAD", &full, || {
                let url = self
                    .inner
                    .bucket
                    .head_object(self.creds(), &full)
                    .sign(SIGN_FOR);
                self.inner.http.head(url)
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = Self::success("HEAD", &full, resp).await?;
        let h = resp.headers();
        let text = |name: header::HeaderName| h.get(name).and_then(|v| v.to_str().ok());
        let size = text(header::CONTENT_LENGTH)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| S3Error::Response {
                op: "HEAD",
                key: full.clone(),
                reason: "no Content-Length".into(),
            })?;
        Ok(Some(ObjectMeta {
            key: key.to_owned(),
            size,
            etag: text(header::ETAG).map(str::to_owned),
            last_modified: text(header::LAST_MODIFIED).and_then(time::parse_http_date),
        }))
    }

    /// The content of object `key`; `None` when there is no such object.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, S3Error> {
        let full = self.full_key(key);
        let resp = self
            .send("GET", &full, || {
                let url = self
                    .inner
                    .bucket
                    .get_object(self.creds(), &full)
                    .sign(SIGN_FOR);
                self.inner.http.get(url)
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = Self::success("GET", &full, resp).await?;
        Self::body("GET", &full, resp).await.map(Some)
    }

    /// `len` bytes of object `key` from `offset`; `None` when there is no such object.
    pub async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Option<Bytes>, S3Error> {
        let Some(s) = self.get_stream(key, offset, len).await? else {
            return Ok(None);
        };
        let mut out = bytes::BytesMut::with_capacity(s.len as usize);
        let mut stream = s.stream;
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(Some(out.freeze()))
    }

    /// `len` bytes of object `key` from `offset`, as a stream; `None` when there is no such
    /// object. The range must lie within the object.
    pub async fn get_stream(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Option<ObjectStream>, S3Error> {
        if len == 0 {
            return Ok(self.head(key).await?.map(|_| ObjectStream {
                len: 0,
                stream: Box::pin(futures::stream::empty()),
            }));
        }
        let full = self.full_key(key);
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        let resp = self
            .send("GET", &full, || {
                let url = self
                    .inner
                    .bucket
                    .get_object(self.creds(), &full)
                    .sign(SIGN_FOR);
                self.inner.http.get(url).header(header::RANGE, &range)
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = Self::success("GET", &full, resp).await?;
        let whole = resp.status() == StatusCode::OK;
        let got = resp.content_length();
        if whole && offset > 0 {
            return Err(S3Error::Response {
                op: "GET",
                key: full,
                reason: "the store ignored the Range header".into(),
            });
        }
        if got.is_some_and(|n| n < len) {
            return Err(S3Error::Response {
                op: "GET",
                key: full,
                reason: format!("asked for {len} bytes at {offset}, the answer holds {got:?}"),
            });
        }
        let key_for_errors = full.clone();
        let mut remaining = len;
        let stream = resp.bytes_stream().map(move |r| {
            r.map_err(|e| S3Error::Transport {
                op: "GET",
                key: key_for_errors.clone(),
                reason: error_chain(&e),
            })
        });
        // A store answering 200 to a range from 0 sends the whole object: cut it at `len`.
        let stream = stream
            .take_while(move |_| {
                let more = remaining > 0;
                futures::future::ready(more)
            })
            .map(move |r| {
                r.map(|mut b| {
                    if b.len() as u64 > remaining {
                        b.truncate(remaining as usize);
                    }
                    remaining -= b.len() as u64;
                    b
                })
            });
        Ok(Some(ObjectStream {
            len,
            stream: Box::pin(stream),
        }))
    }

    /// Writes object `key` with `body` (replacing it whole, atomically for readers).
    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        let full = self.full_key(key);
        let resp = self
            .send("PUT", &full, || {
                let url = self
                    .inner
                    .bucket
                    .put_object(self.creds(), &full)
                    .sign(SIGN_FOR);
                self.inner.http.put(url).body(body.clone())
            })
            .await?;
        Self::success("PUT", &full, resp).await.map(drop)
    }

    /// Copies object `from` to `to` inside the bucket, on the store's side (objects up to
    /// 5 GiB). Copying an object onto itself refreshes its `last_modified`.
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), S3Error> {
        let (src, dst) = (self.full_key(from), self.full_key(to));
        let source = format!(
            "/{}/{}",
            self.inner.config.bucket,
            utf8_percent_encode(&src, COPY_SOURCE)
        );
        let same = from == to;
        let resp = self
            .send("CopyObject", &dst, || {
                let mut action = self.inner.bucket.put_object(self.creds(), &dst);
                action
                    .headers_mut()
                    .insert("x-amz-copy-source", source.clone());
                if same {
                    action
                        .headers_mut()
                        .insert("x-amz-metadata-directive", "REPLACE");
                }
                let url = action.sign(SIGN_FOR);
                let mut req = self
                    .inner
                    .http
                    .put(url)
                    .header("x-amz-copy-source", &source);
                if same {
                    req = req.header("x-amz-metadata-directive", "REPLACE");
                }
                req
            })
            .await?;
        Self::success_in_body("CopyObject", dst, resp).await
    }

    /// Removes object `key`; removing a missing object succeeds.
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        let full = self.full_key(key);
        let resp = self
            .send("DELETE", &full, || {
                let url = self
                    .inner
                    .bucket
                    .delete_object(self.creds(), &full)
                    .sign(SIGN_FOR);
                self.inner.http.delete(url)
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Self::success("DELETE", &full, resp).await.map(drop)
    }

    /// Every object whose key starts with `prefix`, in key order (all pages).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, S3Error> {
        let mut out = Vec::new();
        self.list_pages(prefix, None, |page| {
            for c in page.contents {
                let key = decode_key(&c.key);
                let key = key
                    .strip_prefix(&self.inner.prefix)
                    .unwrap_or(&key)
                    .to_owned();
                out.push(ObjectMeta {
                    key,
                    size: c.size,
                    etag: Some(c.etag).filter(|e| !e.is_empty()),
                    last_modified: time::parse_iso8601(&c.last_modified),
                });
            }
        })
        .await?;
        Ok(out)
    }

    /// The "directories" right under `prefix`: the distinct key parts up to the next `/`
    /// after it, each ending in `/` and relative to the client's prefix, in key order.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        let mut out = Vec::new();
        self.list_pages(prefix, Some("/"), |page| {
            for p in page.common_prefixes {
                let p = decode_key(&p.prefix);
                out.push(p.strip_prefix(&self.inner.prefix).unwrap_or(&p).to_owned());
            }
        })
        .await?;
        Ok(out)
    }

    async fn list_pages(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        mut each: impl FnMut(rusty_s3::actions::ListObjectsV2Response),
    ) -> Result<(), S3Error> {
        let full = self.full_key(prefix);
        let mut token: Option<String> = None;
        loop {
            let resp = self
                .send("ListObjectsV2", &full, || {
                    let mut action = self.inner.bucket.list_objects_v2(self.creds());
                    action.with_prefix(full.as_str());
                    if let Some(d) = delimiter {
                        action.with_delimiter(d);
                    }
                    if let Some(t) = &token {
                        action.with_continuation_token(t.as_str());
                    }
                    self.inner.http.get(action.sign(SIGN_FOR))
                })
                .await?;
            let resp = Self::success("ListObjectsV2", &full, resp).await?;
            let body = Self::body("ListObjectsV2", &full, resp).await?;
            let page = ListObjectsV2::parse_response(&body).map_err(|e| S3Error::Response {
                op: "ListObjectsV2",
                key: full.clone(),
                reason: e.to_string(),
            })?;
            let next = page.next_continuation_token.clone();
            each(page);
            match next {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(()),
            }
        }
    }

    /// Starts a multipart upload to `key`; returns its upload id.
    pub async fn create_multipart(&self, key: &str) -> Result<String, S3Error> {
        let full = self.full_key(key);
        let resp = self
            .send("CreateMultipartUpload", &full, || {
                let url = self
                    .inner
                    .bucket
                    .create_multipart_upload(self.creds(), &full)
                    .sign(SIGN_FOR);
                self.inner.http.post(url)
            })
            .await?;
        let resp = Self::success("CreateMultipartUpload", &full, resp).await?;
        let body = Self::body("CreateMultipartUpload", &full, resp).await?;
        let parsed =
            CreateMultipartUpload::parse_response(&body).map_err(|e| S3Error::Response {
                op: "CreateMultipartUpload",
                key: full.clone(),
                reason: e.to_string(),
            })?;
        Ok(parsed.upload_id().to_owned())
    }

    /// Uploads part number `part` (1 to 10 000; every part but the last at least 5 MiB) of
    /// multipart upload `upload_id`; returns the part's entity tag.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part: u16,
        body: Bytes,
    ) -> Result<String, S3Error> {
        let full = self.full_key(key);
        let resp = self
            .send("UploadPart", &full, || {
                let url = self
                    .inner
                    .bucket
                    .upload_part(self.creds(), &full, part, upload_id)
                    .sign(SIGN_FOR);
                self.inner.http.put(url).body(body.clone())
            })
            .await?;
        let resp = Self::success("UploadPart", &full, resp).await?;
        resp.headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| S3Error::Response {
                op: "UploadPart",
                key: full,
                reason: "no ETag".into(),
            })
    }

    /// The parts uploaded so far: `(part number, entity tag, size)`, by part number.
    pub async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<(u16, String, u64)>, S3Error> {
        let full = self.full_key(key);
        let mut out = Vec::new();
        let mut marker: Option<u16> = None;
        loop {
            let resp = self
                .send("ListParts", &full, || {
                    let mut action = self.inner.bucket.list_parts(self.creds(), &full, upload_id);
                    if let Some(m) = marker {
                        action.set_part_number_marker(m);
                    }
                    self.inner.http.get(action.sign(SIGN_FOR))
                })
                .await?;
            let resp = Self::success("ListParts", &full, resp).await?;
            let body = Self::body("ListParts", &full, resp).await?;
            let page = ListParts::parse_response(&body).map_err(|e| S3Error::Response {
                op: "ListParts",
                key: full.clone(),
                reason: e.to_string(),
            })?;
            let n = page.parts.len();
            let last = page.parts.last().map(|p| p.number);
            out.extend(page.parts.into_iter().map(|p| (p.number, p.etag, p.size)));
            let full_page = page.max_parts > 0 && n >= usize::from(page.max_parts);
            match (page.next_part_number_marker, last) {
                (Some(next), Some(last)) if full_page && next >= last => marker = Some(next),
                _ => break,
            }
        }
        out.sort_by_key(|p| p.0);
        Ok(out)
    }

    /// Joins `parts` (`(part number, entity tag)`, ascending) into object `key`.
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(u16, String)],
    ) -> Result<(), S3Error> {
        let full = self.full_key(key);
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (n, etag) in parts {
            let etag = etag.replace('&', "&amp;").replace('<', "&lt;");
            xml.push_str(&format!(
                "<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let body = Bytes::from(xml);
        let resp = self
            .send("CompleteMultipartUpload", &full, || {
                let url = CompleteMultipartUpload::new(
                    &self.inner.bucket,
                    self.creds(),
                    &full,
                    upload_id,
                    std::iter::empty::<&str>(),
                )
                .sign(SIGN_FOR);
                self.inner.http.post(url).body(body.clone())
            })
            .await?;
        Self::success_in_body("CompleteMultipartUpload", full, resp).await
    }

    /// Discards multipart upload `upload_id` and its parts; an unknown upload is no error.
    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        let full = self.full_key(key);
        let resp = self
            .send("AbortMultipartUpload", &full, || {
                let url = self
                    .inner
                    .bucket
                    .abort_multipart_upload(self.creds(), &full, upload_id)
                    .sign(SIGN_FOR);
                self.inner.http.delete(url)
            })
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Self::success("AbortMultipartUpload", &full, resp)
            .await
            .map(drop)
    }

    /// A URL anyone may GET object `key` with, for `expires` (at most 7 days).
    pub fn presign_get(&self, key: &str, expires: Duration) -> Url {
        let full = self.full_key(key);
        self.inner
            .bucket
            .get_object(self.creds(), &full)
            .sign(expires)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_documents_give_code_and_message() {
        let body = "<?xml version=\"1.0\"?><Error><Code>NoSuchUpload</Code>\
                    <Message>upload gone</Message></Error>";
        assert_eq!(xml_field(body, "Code"), "NoSuchUpload");
        assert_eq!(xml_field(body, "Message"), "upload gone");
        assert_eq!(xml_field(body, "Resource"), "");
    }

    #[test]
    fn listed_keys_are_url_decoded() {
        assert_eq!(decode_key("repos/a%2Bb/x%20y"), "repos/a+b/x y");
        assert_eq!(decode_key("a+b"), "a b");
    }
}
