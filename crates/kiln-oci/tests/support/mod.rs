//! Real parts for the registry tests: Debian's `docker-registry` on a free 127.0.0.1 port, a
//! token server, a fault-injecting TCP proxy, and a busybox image built from `/bin/busybox`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use kiln_oci::{
    media_type, Descriptor, Digest, ImageConfig, ImageManifest, OciLayout, RawManifest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// podman's settings for this machine (for `CONTAINERS_CONF`), written into the tests' temp
/// dir; fails the calling test when podman is not installed.
#[track_caller]
pub fn podman_conf() -> PathBuf {
    kiln_test_env::podman_conf(Path::new(env!("CARGO_TARGET_TMPDIR")))
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How the registry authenticates.
pub enum RegistryAuth {
    None,
    Htpasswd { user: String, password: String },
    Token { realm: String, cert_pem: String },
}

/// A `docker-registry serve` process with filesystem storage in a temp dir.
pub struct Registry {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    pub fn start(auth: RegistryAuth) -> Registry {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let storage = dir.path().join("storage");
            let auth_yaml = match &auth {
                RegistryAuth::None => String::new(),
                RegistryAuth::Htpasswd { user, password } => {
                    let hash = bcrypt::hash_with_result(password, 4)
                        .unwrap()
                        .format_for_version(bcrypt::Version::TwoY);
                    let file = dir.path().join("htpasswd");
                    std::fs::write(&file, format!("{user}:{hash}\n")).unwrap();
                    format!(
                        "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                        file.display()
                    )
                }
                RegistryAuth::Token { realm, cert_pem } => {
                    let file = dir.path().join("token-ca.pem");
                    std::fs::write(&file, cert_pem).unwrap();
                    format!(
                        "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                        file.display()
                    )
                }
            };
            let yaml = format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth_yaml}",
                storage.display()
            );
            let cfg = dir.path().join("config.yml");
            std::fs::write(&cfg, yaml).unwrap();
            let mut child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start docker-registry");
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken meanwhile: try another
                }
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Registry { addr, dir, child };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start");
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Path of a blob's data file in the registry's filesystem storage.
    pub fn blob_data_path(&self, d: &Digest) -> PathBuf {
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs")
            .join(d.algorithm().name())
            .join(&d.hex()[..2])
            .join(d.hex())
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const TOKEN_SERVICE: &str = "kiln-test-registry";
pub const TOKEN_ISSUER: &str = "kiln-test-issuer";

/// A token server: checks basic credentials, answers an ES256 JWT carrying the requested
/// scopes, signed by a self-signed certificate the registry trusts.
pub struct TokenServer {
    pub addr: SocketAddr,
    pub cert_pem: String,
    pub requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenServer {
    pub async fn start(user: &str, password: &str) -> TokenServer {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["kiln-test-token".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_pem = cert.pem();
        let cert_der = cert.der().to_vec();
        let pkcs8 = key.serialize_der();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let expected = format!("Basic {}", b64std(format!("{user}:{password}").as_bytes()));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            let rng = ring::rand::SystemRandom::new();
            let signer = Arc::new(
                ring::signature::EcdsaKeyPair::from_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &pkcs8,
                    &rng,
                )
                .unwrap(),
            );
            let x5c = b64std(&cert_der);
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let signer = signer.clone();
                let expected = expected.clone();
                let x5c = x5c.clone();
                tokio::spawn(async move {
                    let Some(head) = read_head(&mut sock).await else {
                        return;
                    };
                    let authorized = head.lines().any(|l| {
                        l.to_ascii_lowercase().starts_with("authorization:")
                            && l[14..].trim() == expected
                    });
                    if !authorized {
                        let body =
                            r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
                        let _ = sock.write_all(response(401, body).as_bytes()).await;
                        return;
                    }
                    let target = head.split_whitespace().nth(1).unwrap_or("/");
                    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
                    let mut access = Vec::new();
                    for (k, v) in url_pairs(query) {
                        if k != "scope" {
                            continue;
                        }
                        for scope in v.split(' ') {
                            let parts: Vec<&str> = scope.splitn(3, ':').collect();
                            if let [kind, name, actions] = parts.as_slice() {
                                let actions: Vec<&str> = actions.split(',').collect();
                                access.push(serde_json::json!({"type": kind, "name": name, "actions": actions}));
                            }
                        }
                    }
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs();
                    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
                    let claims = serde_json::json!({
                        "iss": TOKEN_ISSUER, "sub": "tester", "aud": TOKEN_SERVICE,
                        "exp": now + 300, "nbf": now - 10, "iat": now - 10,
                        "jti": format!("{now}-{}", rand_id()), "access": access,
                    });
                    let signing_input = format!(
                        "{}.{}",
                        b64url(header.to_string().as_bytes()),
                        b64url(claims.to_string().as_bytes())
                    );
                    let rng = ring::rand::SystemRandom::new();
                    let sig = signer.sign(&rng, signing_input.as_bytes()).unwrap();
                    let jwt = format!("{signing_input}.{}", b64url(sig.as_ref()));
                    let body = serde_json::json!({"token": jwt, "expires_in": 300}).to_string();
                    let _ = sock.write_all(response(200, &body).as_bytes()).await;
                });
            }
        });
        TokenServer {
            addr,
            cert_pem,
            requests,
            task,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn rand_id() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn b64std(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn url_pairs(q: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{q}"))
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn response(status: u16, body: &str) -> String {
    let reason = if status == 200 { "OK" } else { "Error" };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn read_head(sock: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut b).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    }
    String::from_utf8(buf).ok()
}

/// A TCP proxy in front of a registry that counts request bytes and injects faults.
pub struct FaultProxy {
    pub addr: SocketAddr,
    /// Bytes sent by clients towards the registry.
    pub sent: Arc<AtomicU64>,
    /// New connections whose first request uses one of `fail_methods` get a 500 while > 0.
    pub fail_budget: Arc<AtomicU32>,
    /// Close the first connection that sends more than this many bytes (0 = off, one shot).
    pub drop_after: Arc<AtomicU64>,
    pub dropped: Arc<AtomicBool>,
    /// Close the first connection that receives more than this many bytes (0 = off, one shot).
    pub drop_download_after: Arc<AtomicU64>,
    pub download_dropped: Arc<AtomicBool>,
    /// Hold every response after this many bytes until it is set back to 0 (0 = off): a
    /// download stays in flight for as long as a test needs.
    pub stall_download_after: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr, fail_methods: &'static [&'static str]) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let fail_budget = Arc::new(AtomicU32::new(0));
        let drop_after = Arc::new(AtomicU64::new(0));
        let dropped = Arc::new(AtomicBool::new(false));
        let drop_download_after = Arc::new(AtomicU64::new(0));
        let download_dropped = Arc::new(AtomicBool::new(false));
        let stall_download_after = Arc::new(AtomicU64::new(0));
        let (s, f, d, dd) = (
            sent.clone(),
            fail_budget.clone(),
            drop_after.clone(),
            dropped.clone(),
        );
        let (dl, dld) = (drop_download_after.clone(), download_dropped.clone());
        let stall = stall_download_after.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (s, f, d, dd) = (s.clone(), f.clone(), d.clone(), dd.clone());
                let down_fault = (dl.clone(), dld.clone(), stall.clone());
                tokio::spawn(async move {
                    let _ =
                        proxy_conn(client, upstream, fail_methods, s, f, d, dd, down_fault).await;
                });
            }
        });
        FaultProxy {
            addr,
            sent,
            fail_budget,
            drop_after,
            dropped,
            drop_download_after,
            download_dropped,
            stall_download_after,
            task,
        }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[allow(clippy::too_many_arguments)]
async fn proxy_conn(
    mut client: TcpStream,
    upstream: SocketAddr,
    fail_methods: &[&str],
    sent: Arc<AtomicU64>,
    fail_budget: Arc<AtomicU32>,
    drop_after: Arc<AtomicU64>,
    dropped: Arc<AtomicBool>,
    (drop_down_after, down_dropped, stall_after): (Arc<AtomicU64>, Arc<AtomicBool>, Arc<AtomicU64>),
) -> std::io::Result<()> {
    let mut first = vec![0u8; 64 * 1024];
    let n = client.read(&mut first).await?;
    first.truncate(n);
    let method = first.split(|b| *b == b' ').next().unwrap_or(b"");
    let method = String::from_utf8_lossy(method).into_owned();
    if fail_methods.contains(&method.as_str())
        && fail_budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_ok()
    {
        let body = r#"{"errors":[{"code":"UNKNOWN","message":"injected failure"}]}"#;
        client.write_all(response(500, body).as_bytes()).await?;
        let _ = client.shutdown().await;
        return Ok(());
    }
    let server = TcpStream::connect(upstream).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let down = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut received = 0u64;
        loop {
            let limit = drop_down_after.load(Ordering::SeqCst);
            if limit > 0 && received > limit && !down_dropped.swap(true, Ordering::SeqCst) {
                return; // drops the client's write half mid-response
            }
            while (1..received).contains(&stall_after.load(Ordering::SeqCst)) {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            received += n as u64;
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    });
    let mut conn_sent = n as u64;
    sent.fetch_add(n as u64, Ordering::Relaxed);
    sw.write_all(&first).await?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let limit = drop_after.load(Ordering::SeqCst);
        if limit > 0 && conn_sent > limit && !dropped.swap(true, Ordering::SeqCst) {
            down.abort();
            return Ok(()); // both halves dropped: the connection breaks mid-request
        }
        let n = cr.read(&mut buf).await?;
        if n == 0 {
            let _ = sw.shutdown().await;
            break;
        }
        conn_sent += n as u64;
        sent.fetch_add(n as u64, Ordering::Relaxed);
        sw.write_all(&buf[..n]).await?;
    }
    let _ = down.await;
    Ok(())
}

/// A busybox image in an OCI layout: one gzip layer with `/bin/busybox` and applet links.
pub struct TestImage {
    pub layout: OciLayout,
    pub manifest: RawManifest,
    pub layer: Descriptor,
    pub layer_bytes: Vec<u8>,
    pub config: ImageConfig,
    pub _dir: tempfile::TempDir,
}

/// Builds the busybox image, plus `extra_layer_bytes` of random data in a second layer when
/// non-zero (to make uploads big enough to cut).
pub fn busybox_image(extra_layer_bytes: usize) -> TestImage {
    let dir = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(dir.path().join("layout")).unwrap();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    tar.append_data(&mut h, "bin/", std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    tar.append_data(&mut h, "bin/busybox", &busybox[..])
        .unwrap();
    for applet in ["sh", "echo", "ls", "cat", "true"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let raw_tar = tar.into_inner().unwrap();
    layers.push(raw_tar);
    if extra_layer_bytes > 0 {
        let mut data = vec![0u8; extra_layer_bytes];
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, "data.bin", &data[..]).unwrap();
        layers.push(tar.into_inner().unwrap());
    }
    let mut descs = Vec::new();
    let mut first_bytes = Vec::new();
    for raw in &layers {
        diff_ids.push(Digest::sha256_of(raw));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(raw).unwrap();
        let gz = gz.finish().unwrap();
        let d = layout.write_blob(&gz).unwrap();
        descs.push(Descriptor::new(
            media_type::OCI_LAYER_GZIP,
            d,
            gz.len() as u64,
        ));
        if first_bytes.is_empty() {
            first_bytes = gz;
        }
    }
    let config: ImageConfig = serde_json::from_value(serde_json::json!({
        "architecture": kiln_oci::Platform::host().architecture,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "kiln test: busybox"}],
    }))
    .unwrap();
    let config_bytes = config.to_bytes();
    let cd = layout.write_blob(&config_bytes).unwrap();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(media_type::OCI_CONFIG, cd, config_bytes.len() as u64),
        layers: descs.clone(),
        subject: None,
        annotations: Default::default(),
    };
    let raw = RawManifest::from_image(&manifest);
    layout.write_blob(&raw.bytes).unwrap();
    layout.add_manifest(raw.descriptor(), "latest").unwrap();
    TestImage {
        layout,
        manifest: raw,
        layer: descs[0].clone(),
        layer_bytes: first_bytes,
        config,
        _dir: dir,
    }
}

/// Runs a command, panicking with its output on failure; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `skopeo copy` of an OCI layout image to a plain-HTTP registry.
pub fn skopeo_push(layout: &Path, tag: &str, dest: &str) {
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        &format!("oci:{}:{tag}", layout.display()),
        &format!("docker://{dest}"),
    ]));
}

pub fn read_all(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}
