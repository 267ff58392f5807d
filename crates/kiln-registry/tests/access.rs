//! Access control and operations: read-only mode, htpasswd basic auth, token auth, TLS,
//! metrics, configuration files, graceful shutdown.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use kiln_oci::Digest;
use kiln_registry::Config;
use reqwest::StatusCode;
use serde_json::Value;

fn write_htpasswd(dir: &Path) -> std::path::PathBuf {
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let p = dir.join("htpasswd");
    std::fs::write(&p, format!("# users\nci:{hash}\n")).unwrap();
    p
}

#[tokio::test]
async fn read_only_registry_refuses_writes_with_405_and_serves_reads() {
    let mut r = start().await;
    let (_, d) = r.push_image("a", "v1", b"layer").await;
    r.stop().await;
    let root = r.root();
    let ro = start_with(|b| b.root(root).read_only(true)).await;
    assert_eq!(ro.get("/v2/a/manifests/v1").await.status(), StatusCode::OK);
    let resp =
        ro.c.post(ro.u("/v2/a/blobs/uploads/"))
            .send()
            .await
            .unwrap();
    assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED").await;
    assert_error(
        ro.delete(&format!("/v2/a/manifests/{d}")).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "UNSUPPORTED",
    )
    .await;
    assert_eq!(
        ro.get(&format!("/v2/a/manifests/{d}")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn htpasswd_rejects_wrong_credentials_with_401_challenge_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ht = write_htpasswd(dir.path());
    let r = start_with(|b| b.htpasswd(ht)).await;
    let resp = r.get("/v2/").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header(&resp, "WWW-Authenticate"),
        "Basic realm=\"kiln-registry\""
    );
    let d = Digest::sha256_of(b"x");
    for (user, pass) in [("ci", "wrong"), ("nobody", "s3cret")] {
        let resp =
            r.c.post(r.u(&format!("/v2/a/blobs/uploads/?digest={d}")))
                .basic_auth(user, Some(pass))
                .body("x")
                .send()
                .await
                .unwrap();
        assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    }
    assert_eq!(staged_uploads(&r.root()), 0);
    let ok =
        r.c.get(r.u(&format!("/v2/a/blobs/{d}")))
            .basic_auth("ci", Some("s3cret"))
            .send()
            .await
            .unwrap();
    assert_error(ok, StatusCode::NOT_FOUND, "BLOB_UNKNOWN").await;
    let resp =
        r.c.post(r.u(&format!("/v2/a/blobs/uploads/?digest={d}")))
            .basic_auth("ci", Some("s3cret"))
            .body("x")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn token_auth_challenges_issues_scoped_tokens_and_enforces_them() {
    let dir = tempfile::tempdir().unwrap();
    let ht = write_htpasswd(dir.path());
    let key = dir.path().join("token.key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef").unwrap();
    let cfg = Config {
        addr: "127.0.0.1:0".into(),
        root: dir.path().join("root"),
        htpasswd: Some(ht),
        token_realm: Some("http://registry.invalid/token".into()),
        token_service: Some("kiln-test".into()),
        token_key: Some(key.clone()),
        fsync: false,
        ..Config::default()
    };
    let r = start_with(|b| b.config(cfg)).await;
    let resp =
        r.c.post(r.u("/v2/app/blobs/uploads/"))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        header(&resp, "WWW-Authenticate"),
        "Bearer realm=\"http://registry.invalid/token\",service=\"kiln-test\",scope=\"repository:app:pull,push\""
    );
    // The built-in token endpoint wants valid basic credentials.
    let bad =
        r.c.get(r.u("/token?service=kiln-test&scope=repository:app:pull,push"))
            .basic_auth("ci", Some("no"))
            .send()
            .await
            .unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let tok: Value =
        r.c.get(r.u("/token?service=kiln-test&scope=repository:app:pull,push"))
            .basic_auth("ci", Some("s3cret"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let token = tok["token"].as_str().unwrap().to_owned();
    let d = Digest::sha256_of(b"tok");
    let ok =
        r.c.post(r.u(&format!("/v2/app/blobs/uploads/?digest={d}")))
            .bearer_auth(&token)
            .body("tok")
            .send()
            .await
            .unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
    // Scope is enforced: no push to another repository, no delete.
    let other =
        r.c.post(r.u(&format!("/v2/other/blobs/uploads/?digest={d}")))
            .bearer_auth(&token)
            .body("tok")
            .send()
            .await
            .unwrap();
    assert_error(other, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    let del =
        r.c.delete(r.u(&format!("/v2/app/blobs/{d}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
    assert_error(del, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    // A token signed with another key is refused.
    let forged = kiln_registry::issue_token(
        b"another key entirely!!",
        "kiln-test",
        "x",
        vec![kiln_registry::parse_scope("repository:app:pull").unwrap()],
        60,
    );
    let resp =
        r.c.get(r.u(&format!("/v2/app/blobs/{d}")))
            .bearer_auth(forged)
            .send()
            .await
            .unwrap();
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    // A token from the issuer API (as `kiln registry token` prints) works.
    let issued = kiln_registry::issue_token(
        &std::fs::read(&key).unwrap(),
        "kiln-test",
        "ci",
        vec![kiln_registry::parse_scope("repository:app:pull").unwrap()],
        60,
    );
    let resp =
        r.c.get(r.u(&format!("/v2/app/blobs/{d}")))
            .bearer_auth(issued)
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// A self-signed server certificate for 127.0.0.1 and its key, made with the openssl CLI.
fn self_signed_cert(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new(kiln_test_env::require_program("openssl"))
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ])
        // A leaf, not a CA: webpki refuses a CA certificate as the server's end entity.
        .args([
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// An OCI layout with one small image tagged `latest`; returns its path and manifest digest.
fn tiny_layout(dir: &Path) -> (std::path::PathBuf, Digest) {
    let layout = dir.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let put = |data: &[u8]| {
        let d = Digest::sha256_of(data);
        std::fs::write(layout.join("blobs/sha256").join(d.hex()), data).unwrap();
        d
    };
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let cd = put(config);
    let m = image_manifest(&cd, config.len(), &[], None);
    let md = put(&m);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": md.to_string(), "size": m.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    (layout, md)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pushes_through_token_auth_with_the_builtin_token_endpoint() {
    kiln_test_env::require_program("skopeo");
    let dir = tempfile::tempdir().unwrap();
    let ht = write_htpasswd(dir.path());
    let key = dir.path().join("token.key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef").unwrap();
    let root = dir.path().join("root");
    let cfg = Config {
        addr: "127.0.0.1:0".into(),
        root: root.clone(),
        htpasswd: Some(ht),
        token_realm: Some("/token".into()),
        token_key: Some(key),
        fsync: false,
        ..Config::default()
    };
    let r = start_with(|b| b.config(cfg)).await;
    let host = r.reg.as_ref().unwrap().host();
    let resp = r.get("/v2/").await;
    assert_eq!(
        header(&resp, "WWW-Authenticate"),
        format!("Bearer realm=\"http://{host}/token\",service=\"kiln-registry\"")
    );
    let (layout, md) = tiny_layout(dir.path());
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || Command::new("skopeo").args(args).output().unwrap())
    };
    let bad = run(vec![
        "copy".into(),
        "--dest-tls-verify=false".into(),
        "--dest-creds".into(),
        "ci:wrong".into(),
        format!("oci:{}:latest", layout.display()),
        format!("docker://{host}/tok/img:1"),
    ])
    .await
    .unwrap();
    assert!(!bad.status.success(), "wrong credentials are refused");
    assert!(
        !root.join("repos/tok").exists(),
        "nothing stored for a refused push"
    );
    let ok = run(vec![
        "copy".into(),
        "--dest-tls-verify=false".into(),
        "--dest-creds".into(),
        "ci:s3cret".into(),
        format!("oci:{}:latest", layout.display()),
        format!("docker://{host}/tok/img:1"),
    ])
    .await
    .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let inspect = run(vec![
        "inspect".into(),
        "--raw".into(),
        "--tls-verify=false".into(),
        "--creds".into(),
        "ci:s3cret".into(),
        format!("docker://{host}/tok/img:1"),
    ])
    .await
    .unwrap();
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert_eq!(Digest::sha256_of(&inspect.stdout), md);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_basic_auth_serves_https_to_reqwest_and_skopeo() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_cert(dir.path());
    let ht = write_htpasswd(dir.path());
    let r = start_with(|b| b.tls(&cert, &key).htpasswd(ht)).await;
    assert!(r.url.starts_with("https://"));
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let c = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let resp = c
        .get(format!("{}/v2/", r.url))
        .basic_auth("ci", Some("s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.version(),
        reqwest::Version::HTTP_2,
        "ALPN negotiates h2"
    );
    if Command::new("skopeo").arg("--version").output().is_err() {
        return;
    }
    // skopeo pushes an OCI layout over TLS with credentials.
    let (layout, md) = tiny_layout(dir.path());
    let dest = format!("docker://{}/tls/img:1", r.reg.as_ref().unwrap().host());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("skopeo")
            .args([
                "copy",
                "--dest-tls-verify=false",
                "--dest-creds",
                "ci:s3cret",
            ])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(dest)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resp = c
        .head(format!("{}/v2/tls/img/manifests/1", r.url))
        .basic_auth("ci", Some("s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&resp, "Docker-Content-Digest"), md.to_string());
}

#[tokio::test]
async fn metrics_report_requests_bytes_latency_and_storage_size() {
    let r = start().await;
    r.push_image("a", "v1", b"some layer bytes").await;
    r.get("/v2/a/manifests/v1").await;
    r.get("/v2/a/manifests/missing").await;
    let text = r.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("kiln_registry_requests_total{method=\"GET\",status=\"200\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kiln_registry_requests_total{method=\"GET\",status=\"404\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kiln_registry_requests_total{method=\"PUT\",status=\"201\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("kiln_registry_request_duration_seconds_count "),
        "{text}"
    );
    let line = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in {text}"))
    };
    assert!(line("kiln_registry_received_bytes_total") >= 16);
    assert!(line("kiln_registry_sent_bytes_total") > 0);
    assert!(line("kiln_registry_storage_bytes ") >= 16);
}

#[test]
fn config_file_is_json_with_the_flag_names_and_rejects_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("registry.json");
    std::fs::write(&p, r#"{"addr": "127.0.0.1:5999", "root": "/srv/reg", "read_only": true, "gc_interval_secs": 3600}"#).unwrap();
    let c = Config::from_file(&p).unwrap();
    assert_eq!(c.addr, "127.0.0.1:5999");
    assert!(c.read_only);
    assert_eq!(c.gc_interval_secs, 3600);
    assert!(c.fsync, "defaults fill the rest");
    std::fs::write(&p, "{\n  \"adress\": \"x\"\n}").unwrap();
    let err = Config::from_file(&p).unwrap_err().to_string();
    assert!(err.contains("registry.json:2:"), "{err}");
    assert!(err.contains("adress"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_uploads() {
    let r = start().await;
    let data = vec![5u8; 1 << 20];
    let d = Digest::sha256_of(&data);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    let req =
        r.c.post(r.u(&format!("/v2/a/blobs/uploads/?digest={d}")))
            .body(reqwest::Body::wrap_stream(stream))
            .send();
    let pending = tokio::spawn(req);
    tx.send(Ok(data[..1000].to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut r = r;
    let reg = r.reg.take().unwrap();
    let stopping = tokio::spawn(reg.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send(Ok(data[1000..].to_vec())).await.unwrap();
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    stopping.await.unwrap();
    assert!(r
        .root()
        .join("blobs/sha256")
        .join(&d.hex()[..2])
        .join(d.hex())
        .exists());
}

/// `kiln_registry_requests_total` lines of a metrics text.
fn request_series(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("kiln_registry_requests_total{"))
        .collect()
}

#[tokio::test]
async fn metrics_need_credentials_when_auth_is_on_and_methods_from_clients_add_no_series() {
    let dir = tempfile::tempdir().unwrap();
    let ht = write_htpasswd(dir.path());
    let r = start_with(|b| b.htpasswd(ht)).await;
    let anonymous = r.get("/metrics").await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(!anonymous.text().await.unwrap().contains("kiln_registry_"));
    // Unauthenticated clients inventing methods: each one used to become a series of its own.
    for i in 0..50 {
        let m = reqwest::Method::from_bytes(format!("FUZZ{i}").as_bytes()).unwrap();
        let resp = r.c.request(m, r.u("/v2/")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp =
        r.c.get(r.u("/metrics"))
            .basic_auth("ci", Some("s3cret"))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("FUZZ"), "{text}");
    assert!(
        request_series(&text)
            .contains(&"kiln_registry_requests_total{method=\"other\",status=\"401\"} 50"),
        "{text}"
    );
    assert!(request_series(&text).len() <= 3, "{text}");
}

#[tokio::test]
async fn metrics_under_token_auth_need_a_token_granting_registry_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("token.key");
    let secret = b"0123456789abcdef0123456789abcdef";
    std::fs::write(&key, secret).unwrap();
    let cfg = Config {
        addr: "127.0.0.1:0".into(),
        root: dir.path().join("root"),
        token_realm: Some("http://registry.invalid/token".into()),
        token_service: Some("kiln-test".into()),
        token_key: Some(key),
        fsync: false,
        ..Config::default()
    };
    let r = start_with(|b| b.config(cfg)).await;
    let resp = r.get("/metrics").await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        header(&resp, "WWW-Authenticate").contains("scope=\"registry:metrics:pull\""),
        "{:?}",
        resp.headers()
    );
    let get = |scope: &str| {
        let access = vec![kiln_registry::parse_scope(scope).unwrap()];
        let tok = kiln_registry::issue_token(secret, "kiln-test", "prometheus", access, 60);
        r.c.get(r.u("/metrics")).bearer_auth(tok).send()
    };
    assert_eq!(
        get("repository:app:pull").await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let ok = get("registry:metrics:pull").await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert!(ok
        .text()
        .await
        .unwrap()
        .contains("kiln_registry_storage_bytes"));
}
