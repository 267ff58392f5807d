//! Shared helpers: an in-process registry in a temp dir and a plain HTTP client.
#![allow(dead_code)]

use kiln_oci::Digest;
use kiln_registry::{Registry, RegistryBuilder, RunningRegistry};
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

pub struct Reg {
    pub reg: Option<RunningRegistry>,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub c: Client,
}

pub fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder().build().expect("http client")
}

pub async fn start() -> Reg {
    start_with(|b| b).await
}

pub async fn start_with(f: impl FnOnce(RegistryBuilder) -> RegistryBuilder) -> Reg {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Registry::builder()
        .root(dir.path().join("root"))
        .bind("127.0.0.1:0")
        .fsync(false);
    let reg = f(b).start().await.expect("registry starts");
    let url = reg.url();
    Reg {
        reg: Some(reg),
        dir,
        url,
        c: client(),
    }
}

impl Reg {
    pub fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.reg.take() {
            r.shutdown().await;
        }
    }

    pub fn u(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.c.get(self.u(path)).send().await.expect("request")
    }

    pub async fn head(&self, path: &str) -> Response {
        self.c.head(self.u(path)).send().await.expect("request")
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.c.delete(self.u(path)).send().await.expect("request")
    }

    /// Monolithic upload; asserts 201.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> Digest {
        let d = Digest::sha256_of(data);
        let r = self
            .c
            .post(self.u(&format!("/v2/{repo}/blobs/uploads/?digest={d}")))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .expect("request");
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "push blob: {}",
            r.text().await.unwrap_or_default()
        );
        d
    }

    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Response {
        self.c
            .put(self.u(&format!("/v2/{repo}/manifests/{reference}")))
            .header("Content-Type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .expect("request")
    }

    /// Pushes config + one layer + manifest tagged `tag`; returns (manifest bytes, digest).
    pub async fn push_image(&self, repo: &str, tag: &str, layer: &[u8]) -> (Vec<u8>, Digest) {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cd = self.push_blob(repo, config).await;
        let ld = self.push_blob(repo, layer).await;
        let m = image_manifest(&cd, config.len(), &[(ld, layer.len())], None);
        let r = self.put_manifest(repo, tag, OCI_MANIFEST, &m).await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}",
            r.text().await.unwrap_or_default()
        );
        let d = Digest::sha256_of(&m);
        (m, d)
    }
}

pub fn image_manifest(
    config: &Digest,
    config_len: usize,
    layers: &[(Digest, usize)],
    extra: Option<Value>,
) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": config_len},
        "layers": layers.iter().map(|(d, n)| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d.to_string(), "size": n
        })).collect::<Vec<_>>(),
    });
    if let Some(Value::Object(x)) = extra {
        for (k, v) in x {
            m[k] = v;
        }
    }
    serde_json::to_vec(&m).expect("json")
}

/// Asserts an OCI error body with `code` and the given status.
pub async fn assert_error(r: Response, status: StatusCode, code: &str) {
    assert_eq!(r.status(), status);
    let v: Value = r.json().await.expect("error body is JSON");
    let got = v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(got, code, "error body {v}");
    assert!(
        v["errors"][0]["message"].is_string(),
        "message present: {v}"
    );
}

pub fn header(r: &Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Files currently staged under `uploads/`.
pub fn staged_uploads(root: &std::path::Path) -> usize {
    std::fs::read_dir(root.join("uploads"))
        .map(|r| r.count())
        .unwrap_or(0)
}
