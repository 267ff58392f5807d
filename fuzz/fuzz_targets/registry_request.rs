//! Fuzzes the registry's request handling: method, path, query, headers and body, sent as
//! raw HTTP/1.1 bytes through hyper into the API handlers of a registry on a tmpfs root.
//!
//! The input is a short sequence of requests (a request may follow the `Location` of the
//! previous response, as an upload's chunks do) against an open registry or one with token
//! auth, whose storage holds a pushed image. Besides no panic (a handler's panic is resumed
//! by `ByteRegistry::exchange`) and no hang: the server never answers 500 (every error a
//! client can cause has a 4xx; storage is on tmpfs, so there are no real I/O errors).
#![no_main]

use std::path::PathBuf;
use std::sync::Mutex;

use kiln_oci::Digest;
use kiln_registry::{issue_token, parse_scope, ByteRegistry, Config};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const LAYER: &[u8] = b"layer bytes of the seed image";
const CONFIG: &[u8] =
    br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
const TOKEN_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const SERVICE: &str = "kiln-fuzz";

/// Registries are recreated after this many exchanges, so staged uploads cannot fill tmpfs.
const EXCHANGES_PER_ROOT: usize = 2000;

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Head,
    Put,
    Post,
    Patch,
    Delete,
    Options,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Segment {
    Repo,
    NestedRepo,
    Manifests,
    Blobs,
    Uploads,
    Tags,
    List,
    Referrers,
    Catalog,
    Token,
    Digest(u8),
    Tag,
    Empty,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum QueryKey {
    Digest,
    Mount,
    From,
    N,
    Last,
    Tag,
    ArtifactType,
    Scope,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum HeaderName {
    ContentType,
    ContentRange,
    Range,
    Accept,
    Authorization,
    Host,
    TransferEncoding,
    Expect,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum HeaderValue {
    ManifestType,
    IndexType,
    ValidToken,
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Framing {
    /// `Content-Length` of the body sent.
    Exact,
    /// `Transfer-Encoding: chunked`, the body in one chunk.
    Chunked,
    /// No length at all.
    None,
    /// A `Content-Length` that lies.
    Claimed(u16),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Bytes(Vec<u8>),
    SeedLayer,
    SeedManifest,
}

#[derive(Arbitrary, Debug)]
struct Request {
    method: Method,
    follow_location: bool,
    path: Vec<Segment>,
    query: Vec<(QueryKey, Segment)>,
    headers: Vec<(HeaderName, HeaderValue)>,
    framing: Framing,
    body: Body,
}

#[derive(Arbitrary, Debug)]
struct Input {
    token_auth: bool,
    requests: Vec<Request>,
}

/// A registry under test and what was pushed to it.
struct Target {
    registry: ByteRegistry,
    _dir: tempfile::TempDir,
    digests: Vec<String>,
    manifest: Vec<u8>,
    token: String,
}

fn seed_manifest(config: &Digest, layer: &Digest) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config.to_string(), "size": CONFIG.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer.to_string(), "size": LAYER.len()}],
    }))
    .expect("json")
}

fn status_of(response: &[u8]) -> Option<u16> {
    let line = response.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

impl Target {
    fn new(token_auth: bool) -> Target {
        let base = PathBuf::from("/dev/shm");
        let dir = tempfile::tempdir_in(if base.is_dir() {
            base
        } else {
            std::env::temp_dir()
        })
        .expect("tempdir");
        let mut config = Config {
            root: dir.path().join("root"),
            fsync: false,
            ..Config::default()
        };
        if token_auth {
            let key = dir.path().join("token.key");
            std::fs::write(&key, TOKEN_KEY).expect("key");
            config.token_realm = Some("/token".into());
            config.token_service = Some(SERVICE.into());
            config.token_key = Some(key);
        }
        let registry = ByteRegistry::open(&config).expect("registry opens");
        let access = [
            "repository:app:pull,push,delete",
            "repository:app/nested:*",
            "registry:catalog:*",
            "registry:metrics:pull",
        ]
        .iter()
        .filter_map(|s| parse_scope(s))
        .collect();
        let token = issue_token(TOKEN_KEY, SERVICE, "fuzz", access, 3600);
        let (cd, ld) = (Digest::sha256_of(CONFIG), Digest::sha256_of(LAYER));
        let manifest = seed_manifest(&cd, &ld);
        let md = Digest::sha256_of(&manifest);
        let t = Target {
            registry,
            _dir: dir,
            digests: vec![
                cd.to_string(),
                ld.to_string(),
                md.to_string(),
                Digest::sha256_of(b"").to_string(),
                format!("sha512:{}", "ab".repeat(64)),
            ],
            manifest,
            token,
        };
        for (data, path) in [
            (CONFIG, format!("/v2/app/blobs/uploads/?digest={cd}")),
            (LAYER, format!("/v2/app/blobs/uploads/?digest={ld}")),
        ] {
            let r = t.raw("POST", &path, "", data);
            assert_eq!(status_of(&r), Some(201), "{}", String::from_utf8_lossy(&r));
        }
        let r = t.raw(
            "PUT",
            "/v2/app/manifests/v1",
            "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n",
            &t.manifest.clone(),
        );
        assert_eq!(status_of(&r), Some(201), "{}", String::from_utf8_lossy(&r));
        t
    }

    fn raw(&self, method: &str, path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: registry\r\nAuthorization: Bearer {}\r\n{headers}Content-Length: {}\r\n\r\n",
            self.token,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.registry.exchange(&req)
    }

    fn segment(&self, s: &Segment) -> String {
        match s {
            Segment::Repo => "app".into(),
            Segment::NestedRepo => "app/nested".into(),
            Segment::Manifests => "manifests".into(),
            Segment::Blobs => "blobs".into(),
            Segment::Uploads => "uploads".into(),
            Segment::Tags => "tags".into(),
            Segment::List => "list".into(),
            Segment::Referrers => "referrers".into(),
            Segment::Catalog => "_catalog".into(),
            Segment::Token => "token".into(),
            Segment::Digest(i) => self.digests[*i as usize % self.digests.len()].clone(),
            Segment::Tag => "v1".into(),
            Segment::Empty => String::new(),
            Segment::Raw(s) => s.clone(),
        }
    }

    fn header(&self, (name, value): &(HeaderName, HeaderValue)) -> String {
        let name = match name {
            HeaderName::ContentType => "Content-Type",
            HeaderName::ContentRange => "Content-Range",
            HeaderName::Range => "Range",
            HeaderName::Accept => "Accept",
            HeaderName::Authorization => "Authorization",
            HeaderName::Host => "Host",
            HeaderName::TransferEncoding => "Transfer-Encoding",
            HeaderName::Expect => "Expect",
            HeaderName::Raw(s) => s,
        };
        let value = match value {
            HeaderValue::ManifestType => "application/vnd.oci.image.manifest.v1+json".into(),
            HeaderValue::IndexType => "application/vnd.oci.image.index.v1+json".into(),
            HeaderValue::ValidToken => format!("Bearer {}", self.token),
            HeaderValue::Text(s) => s.clone(),
        };
        format!("{name}: {value}\r\n")
    }

    /// Builds the request's bytes; `location` is the previous response's `Location`.
    fn encode(&self, r: &Request, location: Option<&str>) -> Vec<u8> {
        let method = match &r.method {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Other(s) => s,
        };
        let mut target = match (r.follow_location, location) {
            (true, Some(l)) => l.to_owned(),
            _ => {
                let segs: Vec<String> = r.path.iter().map(|s| self.segment(s)).collect();
                format!("/v2/{}", segs.join("/"))
            }
        };
        for (i, (k, v)) in r.query.iter().enumerate() {
            let k = match k {
                QueryKey::Digest => "digest",
                QueryKey::Mount => "mount",
                QueryKey::From => "from",
                QueryKey::N => "n",
                QueryKey::Last => "last",
                QueryKey::Tag => "tag",
                QueryKey::ArtifactType => "artifactType",
                QueryKey::Scope => "scope",
                QueryKey::Raw(s) => s,
            };
            let sep = if i == 0 && !target.contains('?') {
                '?'
            } else {
                '&'
            };
            target.push_str(&format!("{sep}{k}={}", self.segment(v)));
        }
        let body: &[u8] = match &r.body {
            Body::Bytes(b) => b,
            Body::SeedLayer => LAYER,
            Body::SeedManifest => &self.manifest,
        };
        let mut head = format!("{method} {target} HTTP/1.1\r\n");
        if !r.headers.iter().any(|(n, _)| matches!(n, HeaderName::Host)) {
            head.push_str("Host: registry\r\n");
        }
        for h in &r.headers {
            head.push_str(&self.header(h));
        }
        let mut out = Vec::new();
        match r.framing {
            Framing::Exact => head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len())),
            Framing::Claimed(n) => head.push_str(&format!("Content-Length: {n}\r\n\r\n")),
            Framing::None => head.push_str("\r\n"),
            Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n\r\n"),
        }
        out.extend_from_slice(head.as_bytes());
        if matches!(r.framing, Framing::Chunked) {
            out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
            out.extend_from_slice(body);
            out.extend_from_slice(b"\r\n0\r\n\r\n");
        } else {
            out.extend_from_slice(body);
        }
        out
    }
}

fn location_of(response: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(response).ok()?;
    let head = text.split("\r\n\r\n").next()?;
    head.lines()
        .find_map(|l| {
            l.strip_prefix("location: ")
                .or_else(|| l.strip_prefix("Location: "))
        })
        .map(str::to_owned)
}

/// Open and token-auth registries, each with a count of exchanges since its root was made.
static TARGETS: Mutex<[Option<(Target, usize)>; 2]> = Mutex::new([None, None]);

fuzz_target!(|input: Input| {
    let mut targets = TARGETS.lock().unwrap_or_else(|e| e.into_inner());
    let slot = &mut targets[usize::from(input.token_auth)];
    if slot.as_ref().is_none_or(|(_, n)| *n >= EXCHANGES_PER_ROOT) {
        *slot = None; // the old root goes first
        *slot = Some((Target::new(input.token_auth), 0));
    }
    let Some((target, count)) = slot.as_mut() else {
        return;
    };
    let mut location = None;
    for r in input.requests.iter().take(4) {
        *count += 1;
        let bytes = target.encode(r, location.as_deref());
        let response = target.registry.exchange(&bytes);
        if let Some(status) = status_of(&response) {
            assert_ne!(
                status,
                500,
                "request:\n{}\nresponse:\n{}",
                String::from_utf8_lossy(&bytes),
                String::from_utf8_lossy(&response)
            );
        }
        location = location_of(&response);
    }
});
