//! The registry client against a real registry (Debian's `docker-registry`, CNCF distribution)
//! started on 127.0.0.1, checked with real clients (`skopeo`, `podman`).

mod support;

use std::process::Command;
use std::time::Duration;

use kiln_oci::{
    media_type, BlobPush, BlobSource, ClientConfig, Credential, Descriptor, DockerConfig,
    ImageIndex, OciLayout, Platform, RawManifest, Reference, RegistryClient, RegistryError,
    RetryPolicy,
};
use kiln_test_env::require_program;
use support::*;

fn client_with(tweak: impl FnOnce(&mut ClientConfig)) -> RegistryClient {
    let mut cfg = ClientConfig {
        // Never read the machine's own ~/.docker/config.json in tests.
        docker_config: DockerConfig::at("/nonexistent/kiln-test/config.json"),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
        },
        ..ClientConfig::default()
    };
    tweak(&mut cfg);
    RegistryClient::new(cfg).unwrap()
}

fn client() -> RegistryClient {
    client_with(|_| {})
}

fn reference(s: &str) -> Reference {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pushed_busybox_resolves_and_pulls_with_verified_layers() {
    require_program(REGISTRY_BIN);
    let reg = Registry::start(RegistryAuth::None);
    let img = busybox_image(0);
    skopeo_push(
        img.layout.root(),
        "latest",
        &format!("{}/library/busybox:1.36", reg.host()),
    );

    let c = client();
    c.ping(&reg.host()).await.unwrap();
    let r = reference(&format!("{}/library/busybox:1.36", reg.host()));
    let resolved = c.resolve(&r, &Platform::host()).await.unwrap();
    assert_eq!(resolved.config.rootfs.diff_ids, img.config.rootfs.diff_ids);
    assert_eq!(resolved.image.layers.len(), 1);
    assert_eq!(resolved.reference.digest(), Some(&resolved.manifest.digest));

    // Pull into a fresh layout: every layer arrives byte for byte.
    let out = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(out.path()).unwrap();
    c.pull_to_layout(&r, &Platform::host(), &layout, "pulled")
        .await
        .unwrap();
    let pulled = read_all(&layout.blob_path(&img.layer.digest));
    assert_eq!(pulled, img.layer_bytes);
    let m = layout.manifest("pulled").unwrap();
    assert_eq!(m.digest, resolved.manifest.digest);
    assert!(c.stats().bytes_received >= img.layer.size);

    // An index over it resolves to it for the host platform and refuses other platforms.
    let mut index = ImageIndex::new();
    let mut d = resolved.manifest.descriptor();
    d.platform = Some(Platform::host());
    index.manifests.push(d);
    let raw_index = RawManifest::from_index(&index);
    let multi = reference(&format!("{}/library/busybox:multi", reg.host()));
    c.push_manifest(&multi, &raw_index).await.unwrap();
    let via_index = c.resolve(&multi, &Platform::host()).await.unwrap();
    assert_eq!(via_index.manifest.digest, resolved.manifest.digest);
    assert_eq!(via_index.index.as_ref().unwrap().digest, raw_index.digest);
    let err = c
        .resolve(&multi, &"linux/s390x".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::NoMatchingPlatform { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&Platform::host().to_string()),
        "{err}"
    );

    // A missing tag is a clear 404 naming the repository.
    let err = c
        .pull_manifest(&r.with_tag("nope").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("library/busybox"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_pushed_image_is_read_by_skopeo_and_runs_under_podman() {
    require_program(REGISTRY_BIN);
    let reg = Registry::start(RegistryAuth::None);
    let img = busybox_image(0);
    let c = client();
    let a = reference(&format!("{}/kiln/app:a", reg.host()));
    let b = reference(&format!("{}/kiln/app:b", reg.host()));
    let digest = c
        .push_from_layout(&img.layout, "latest", &[a.clone(), b.clone()])
        .await
        .unwrap();
    assert_eq!(digest, img.manifest.digest);
    let st = c.stats();
    assert_eq!(st.blobs_uploaded, 2, "{st:?}");
    assert!(st.bytes_sent >= img.layer.size, "{st:?}");

    for tag in ["a", "b"] {
        let out = run(Command::new("skopeo").args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{}/kiln/app:{tag}", reg.host()),
        ]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["Digest"], digest.to_string());
        assert_eq!(v["Layers"][0], img.layer.digest.to_string());
    }
    // Pushing again sends no blob bytes: every HEAD finds them.
    let before = c.stats();
    c.push_from_layout(&img.layout, "latest", std::slice::from_ref(&a))
        .await
        .unwrap();
    let after = c.stats();
    assert_eq!(after.blobs_existing - before.blobs_existing, 2);
    assert_eq!(
        after.bytes_sent - before.bytes_sent,
        img.manifest.bytes.len() as u64
    );

    // podman pulls and runs it.
    let conf = podman_conf();
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", &conf).args(args);
        cmd
    };
    let name = format!("{}/kiln/app:a", reg.host());
    run(&mut podman(&[
        "pull",
        "--quiet",
        "--tls-verify=false",
        &name,
    ]));
    let out = run(&mut podman(&[
        "run",
        "--rm",
        "--network=none",
        &name,
        "echo",
        "hello from kiln",
    ]));
    let _ = podman(&["rmi", "-f", &name]).output();
    assert_eq!(out.trim(), "hello from kiln");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry_accepts_right_and_refuses_wrong_credentials() {
    require_program(REGISTRY_BIN);
    let reg = Registry::start(RegistryAuth::Htpasswd {
        user: "alice".into(),
        password: "wonderland".into(),
    });
    let img = busybox_image(0);
    let target = reference(&format!("{}/private/app:1", reg.host()));

    let good = client_with(|c| {
        c.credentials.insert(
            reg.host(),
            Credential::Basic {
                username: "alice".into(),
                password: "wonderland".into(),
            },
        );
    });
    good.push_from_layout(&img.layout, "latest", std::slice::from_ref(&target))
        .await
        .unwrap();
    let resolved = good.resolve(&target, &Platform::host()).await.unwrap();
    assert_eq!(resolved.manifest.digest, img.manifest.digest);

    let wrong = client_with(|c| {
        c.credentials.insert(
            reg.host(),
            Credential::Basic {
                username: "alice".into(),
                password: "oops".into(),
            },
        );
    });
    let err = wrong.pull_manifest(&target).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("401") && msg.contains(&format!("kiln login {}", reg.host())),
        "{msg}"
    );
    assert!(msg.contains("private/app"), "{msg}");

    let anonymous = client();
    let err = anonymous.pull_manifest(&target).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");

    // Credentials stored by `kiln login`'s code path are found through config.json.
    let dir = tempfile::tempdir().unwrap();
    let cfg = DockerConfig::at(dir.path().join("config.json"));
    cfg.store(&reg.host(), "alice", "wonderland").unwrap();
    let from_file = client_with(|c| c.docker_config = cfg.clone());
    from_file.pull_manifest(&target).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_fetches_scoped_tokens_reuses_them_and_refuses_wrong_passwords() {
    require_program(REGISTRY_BIN);
    let tokens = TokenServer::start("bob", "builder").await;
    let reg = Registry::start(RegistryAuth::Token {
        realm: tokens.realm(),
        cert_pem: tokens.cert_pem.clone(),
    });
    let img = busybox_image(0);
    let target = reference(&format!("{}/team/app:1", reg.host()));
    let c = client_with(|c| {
        c.credentials.insert(
            reg.host(),
            Credential::Basic {
                username: "bob".into(),
                password: "builder".into(),
            },
        );
    });
    c.push_from_layout(&img.layout, "latest", std::slice::from_ref(&target))
        .await
        .unwrap();
    let resolved = c.resolve(&target, &Platform::host()).await.unwrap();
    assert_eq!(resolved.manifest.digest, img.manifest.digest);
    let token_requests = tokens.requests.load(std::sync::atomic::Ordering::Relaxed);
    let registry_requests = c.stats().requests;
    // One token per scope set (push, pull), reused across all blob and manifest requests.
    assert!(token_requests <= 3, "{token_requests} token requests");
    assert!(
        registry_requests > 2 * token_requests,
        "{registry_requests} registry requests"
    );

    // Mounting into another repository asks for a token with the source's pull scope too.
    let other = reference(&format!("{}/team/other:1", reg.host()));
    let r = c
        .push_blob(
            &other,
            &img.layer,
            &BlobSource::File(img.layout.blob_path(&img.layer.digest)),
            Some("team/app"),
        )
        .await
        .unwrap();
    assert_eq!(r, BlobPush::Mounted);

    let wrong = client_with(|c| {
        c.credentials.insert(
            reg.host(),
            Credential::Basic {
                username: "bob".into(),
                password: "nope".into(),
            },
        );
    });
    let err = wrong.pull_manifest(&target).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("401") && msg.contains("token server") && msg.contains("kiln login"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_retries_after_500s_and_succeeds() {
    require_program(REGISTRY_BIN);
    let reg = Registry::start(RegistryAuth::None);
    let proxy = FaultProxy::start(reg.addr, &["HEAD", "POST", "PUT", "PATCH"]).await;
    let img = busybox_image(0);
    proxy
        .fail_budget
        .store(3, std::sync::atomic::Ordering::SeqCst);
    let c = client_with(|c| c.concurrency = 1);
    let target = reference(&format!("{}/retry/app:1", proxy.host()));
    c.push_from_layout(&img.layout, "latest", std::slice::from_ref(&target))
        .await
        .unwrap();
    assert_eq!(
        proxy.fail_budget.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(c.stats().retries >= 3, "{:?}", c.stats());
    let direct = reference(&format!("{}/retry/app:1", reg.host()));
    let resolved = client().resolve(&direct, &Platform::host()).await.unwrap();
    assert_eq!(resolved.manifest.digest, img.manifest.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_fails_cleanly_when_the_registry_keeps_failing() {
    require_program(REGISTRY_BIN);
    let reg = Registry::start(RegistryAuth::None);
    let proxy = FaultProxy::start(reg.addr, &["GET", "HEAD", "POST", "PUT", "PATCH"]).await;
    proxy
        .fail_budget
        .store(1000, std::sync::atomic::Ordering::SeqCst);
    let img = busybox_image(0);
    let c = client_with(|c| c.retry.max_attempts = 3);
    let target = reference(&format!("{}/broken/app:1", proxy.host()));
    let err = c
        .push_from_layout(&img.layout, "latest", std::slice::from_ref(&target))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, RegistryError::Status { status: 500, .. }),
        "{msg}"
    );
    assert!(
        msg.contains(&proxy.host()) && msg.contains("broken/app"),
        "{msg}"
    );
    // Nothing was tagged.
    let direct = reference(&format!("{}/broken/app:1", reg.host()));
    assert!(client().head_manifest(&direct).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monolithic_upload_restarts_after_the_connection_drops_mid_body() {
    require_program(REGISTRY_BIN);
    let reg = Registry::start(RegistryAuth::None);
    let proxy = FaultProxy::start(reg.addr, &[]).await;
    let img = busybox_image(3 << 20);
    proxy
        .drop_after
        .store(1 << 20, std::sync::atomic::Ordering::SeqCst);
    let c = client_with(|c| c.concurrency = 1);
    let target = reference(&format!("{}/drop/mono:1", proxy.host()));
    c.push_from_layout(&img.layout, "latest", std::slice::from_ref(&target))
        .await
        .unwrap();
    assert!(
        proxy.dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the fault fired"
    );
    assert!(c.stats().retries >= 1, "{:?}", c.stats());
    check_pull_matches(&reg, "drop/mono:1", &img).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_recovers_after_the_connection_drops_mid_chunk() {
    require_program(REGISTRY_BIN);
    let reg = Registry::start(RegistryAuth::None);
    let proxy = FaultProxy::start(reg.addr, &[]).await;
    let img = busybox_image(3 << 20);
    proxy
        .drop_after
        .store(1 << 20, std::sync::atomic::Ordering::SeqCst);
    let c = client_with(|c| {
        c.concurrency = 1;
        c.monolithic_limit = 256 << 10;
        c.chunk_size = 256 << 10;
    });
    let target = reference(&format!("{}/drop/chunked:1", proxy.host()));
    c.push_from_layout(&img.layout, "latest", std::slice::from_ref(&target))
        .await
        .unwrap();
    assert!(
        proxy.dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the fault fired"
    );
    let st = c.stats();
    assert!(st.retries >= 1, "{st:?}");
    check_pull_matches(&reg, "drop/chunked:1", &img).await;
}

async fn check_pull_matches(reg: &Registry, name: &str, img: &TestImage) {
    let r = reference(&format!("{}/{name}", reg.host()));
    let out = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(out.path()).unwrap();
    let resolved = client()
        .pull_to_layout(&r, &Platform::host(), &layout, "x")
        .await
        .unwrap();
    assert_eq!(resolved.manifest.digest, img.manifest.digest);
    for l in &resolved.image.layers {
        assert_eq!(
            read_all(&layout.blob_path(&l.digest)),
            read_all(&img.layout.blob_path(&l.digest))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_blob_is_refused_on_pull_and_nothing_is_kept() {
    require_program(REGISTRY_BIN);
    let reg = Registry::start(RegistryAuth::None);
    let img = busybox_image(0);
    let c = client();
    let target = reference(&format!("{}/corrupt/app:1", reg.host()));
    c.push_from_layout(&img.layout, "latest", std::slice::from_ref(&target))
        .await
        .unwrap();
    // Flip bytes of the stored layer behind the registry's back (same length).
    let data = reg.blob_data_path(&img.layer.digest);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("layer");
    let err = c
        .pull_blob_to_file(&target, &img.layer, &dest)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&img.layer.digest.to_string()),
        "{err}"
    );
    assert!(!dest.exists(), "an unverified blob was kept");
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "temporary files were left"
    );

    // The same through an OCI layout pull: the layout never gets the blob.
    let layout = OciLayout::create(out.path().join("layout")).unwrap();
    let err = c
        .pull_to_layout(&target, &Platform::host(), &layout, "x")
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert!(!layout.has_blob(&img.layer.digest));
    assert!(layout.manifest("x").is_err());

    // A sink given by the caller gets an error, never an Ok over wrong bytes.
    let mut sink = Vec::new();
    assert!(c.pull_blob(&target, &img.layer, &mut sink).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushing_to_a_second_repository_mounts_and_uploads_no_layer_bytes() {
    require_program(REGISTRY_BIN);
    let reg = Registry::start(RegistryAuth::None);
    let proxy = FaultProxy::start(reg.addr, &[]).await;
    let img = busybox_image(2 << 20);
    let c = client();
    let first = reference(&format!("{}/mount/one:1", proxy.host()));
    c.push_from_layout(&img.layout, "latest", std::slice::from_ref(&first))
        .await
        .unwrap();
    let after_first = proxy.sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        after_first > 2 << 20,
        "the first push uploaded the layers ({after_first} bytes)"
    );

    let second = reference(&format!("{}/mount/two:1", proxy.host()));
    let blobs: Vec<(Descriptor, BlobSource)> = img
        .layout
        .manifest("latest")
        .map(|m| match m.parse().unwrap() {
            kiln_oci::Manifest::Image(i) => std::iter::once(i.config)
                .chain(i.layers)
                .map(|d| {
                    let p = img.layout.blob_path(&d.digest);
                    (d, BlobSource::File(p))
                })
                .collect(),
            _ => unreachable!(),
        })
        .unwrap();
    let before = c.stats();
    c.push_image(
        std::slice::from_ref(&second),
        &img.manifest,
        &blobs,
        Some(&first),
    )
    .await
    .unwrap();
    let sent = proxy.sent.load(std::sync::atomic::Ordering::SeqCst) - after_first;
    let st = c.stats();
    assert_eq!(st.blobs_mounted - before.blobs_mounted, 3, "{st:?}");
    assert_eq!(st.blobs_uploaded, before.blobs_uploaded, "{st:?}");
    // Only request heads and the manifest crossed the proxy.
    assert!(sent < 16 * 1024, "{sent} bytes sent for a mounted push");
    check_pull_matches(&reg, "mount/two:1", &img).await;

    // A mount the registry answers with 202 (source repository unknown) falls back to upload.
    let lone = reference(&format!("{}/mount/three:1", reg.host()));
    let r = c
        .push_blob(
            &lone,
            &img.layer,
            &BlobSource::File(img.layout.blob_path(&img.layer.digest)),
            Some("no/such-repo"),
        )
        .await
        .unwrap();
    assert_eq!(r, BlobPush::Uploaded);
    assert!(c.blob_exists(&lone, &img.layer.digest).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_media_types_and_small_in_memory_blobs_push_and_pull() {
    require_program(REGISTRY_BIN);
    let reg = Registry::start(RegistryAuth::None);
    let c = client();
    let target = reference(&format!("{}/docker/types:1", reg.host()));
    let layer = b"not really a tar, but a blob".to_vec();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let ld = Descriptor::of_bytes(media_type::DOCKER_LAYER_GZIP, &layer);
    let cd = Descriptor::of_bytes(media_type::DOCKER_CONFIG, &config);
    let m = kiln_oci::ImageManifest {
        schema_version: 2,
        media_type: Some(media_type::DOCKER_MANIFEST.into()),
        artifact_type: None,
        config: cd.clone(),
        layers: vec![ld.clone()],
        subject: None,
        annotations: Default::default(),
    };
    let raw = RawManifest::from_image(&m);
    c.push_image(
        std::slice::from_ref(&target),
        &raw,
        &[
            (cd, BlobSource::Bytes(config.into())),
            (ld.clone(), BlobSource::Bytes(layer.clone().into())),
        ],
        None,
    )
    .await
    .unwrap();
    let pulled = c.pull_manifest(&target).await.unwrap();
    assert_eq!(pulled.media_type, media_type::DOCKER_MANIFEST);
    assert_eq!(pulled.bytes, raw.bytes, "the exact pushed bytes come back");
    let mut sink = Vec::new();
    c.pull_blob(&target, &ld, &mut sink).await.unwrap();
    assert_eq!(sink, layer);
    let head = c.head_manifest(&target).await.unwrap().unwrap();
    assert_eq!(head.digest, raw.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_pull_resumes_with_a_range_request_after_the_connection_drops() {
    require_program(REGISTRY_BIN);
    let reg = Registry::start(RegistryAuth::None);
    let img = busybox_image(4 << 20);
    let target = reference(&format!("{}/resume/app:1", reg.host()));
    client()
        .push_from_layout(&img.layout, "latest", std::slice::from_ref(&target))
        .await
        .unwrap();
    let big = match img.manifest.parse().unwrap() {
        kiln_oci::Manifest::Image(m) => m.layers[1].clone(),
        _ => unreachable!(),
    };
    let proxy = FaultProxy::start(reg.addr, &[]).await;
    proxy
        .drop_download_after
        .store(1 << 20, std::sync::atomic::Ordering::SeqCst);
    let c = client();
    let via = reference(&format!("{}/resume/app:1", proxy.host()));
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("blob");
    c.pull_blob_to_file(&via, &big, &dest).await.unwrap();
    assert!(
        proxy
            .download_dropped
            .load(std::sync::atomic::Ordering::SeqCst),
        "the fault fired"
    );
    assert_eq!(
        read_all(&dest),
        read_all(&img.layout.blob_path(&big.digest))
    );
    let st = c.stats();
    assert!(st.retries >= 1, "{st:?}");
    // Resumed from where it broke, not downloaded twice.
    assert!(
        st.bytes_received < big.size + big.size / 2,
        "{st:?} for a {}-byte blob",
        big.size
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_go_to_a_configured_mirror_first_and_fall_back_to_the_registry() {
    require_program(REGISTRY_BIN);
    let upstream = Registry::start(RegistryAuth::None);
    let mirror = Registry::start(RegistryAuth::None);
    let img = busybox_image(0);
    // Only the mirror has the image.
    skopeo_push(
        img.layout.root(),
        "latest",
        &format!("{}/library/busybox:1", mirror.host()),
    );
    let r = reference(&format!("{}/library/busybox:1", upstream.host()));
    let mirrored = client_with(|c| {
        c.hosts.insert(
            upstream.host(),
            kiln_oci::HostConfig {
                insecure: false,
                mirrors: vec![mirror.host()],
            },
        );
    });
    let out = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(out.path()).unwrap();
    let got = mirrored
        .pull_to_layout(&r, &Platform::host(), &layout, "x")
        .await
        .unwrap();
    assert_eq!(got.manifest.digest, img.manifest.digest);
    assert!(
        client().pull_manifest(&r).await.is_err(),
        "upstream itself does not have it"
    );

    // A mirror that is down is skipped: the registry itself answers.
    skopeo_push(
        img.layout.root(),
        "latest",
        &format!("{}/library/busybox:2", upstream.host()),
    );
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let with_dead_mirror = client_with(|c| {
        c.retry.max_attempts = 2;
        c.hosts.insert(
            upstream.host(),
            kiln_oci::HostConfig {
                insecure: false,
                mirrors: vec![dead.to_string()],
            },
        );
    });
    let r2 = reference(&format!("{}/library/busybox:2", upstream.host()));
    let got = with_dead_mirror
        .resolve(&r2, &Platform::host())
        .await
        .unwrap();
    assert_eq!(got.manifest.digest, img.manifest.digest);
}

#[test]
fn docker_and_oci_archives_are_read_by_podman_and_skopeo() {
    let img = busybox_image(0);
    let out = tempfile::tempdir().unwrap();
    let oci_tar = out.path().join("image.oci.tar");
    img.layout
        .write_archive(std::fs::File::create(&oci_tar).unwrap())
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&run(Command::new("skopeo").args([
        "inspect",
        &format!("oci-archive:{}:latest", oci_tar.display()),
    ])))
    .unwrap();
    assert_eq!(v["Digest"], img.manifest.digest.to_string());

    let docker_tar = out.path().join("image.docker.tar");
    let tag = reference("localhost/kiln-test/archive:v1");
    kiln_oci::write_docker_archive(
        std::fs::File::create(&docker_tar).unwrap(),
        &img.manifest,
        std::slice::from_ref(&tag),
        &|d| img.layout.blob_path(d),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&run(Command::new("skopeo").args([
        "inspect",
        &format!("docker-archive:{}", docker_tar.display()),
    ])))
    .unwrap();
    assert_eq!(v["Layers"].as_array().map(|a| a.len()), Some(1), "{v}");

    let conf = podman_conf();
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", &conf).args(args);
        cmd
    };
    let loaded = run(&mut podman(&["load", "-i", docker_tar.to_str().unwrap()]));
    assert!(
        loaded.contains("localhost/kiln-test/archive:v1"),
        "{loaded}"
    );
    let out = run(&mut podman(&[
        "run",
        "--rm",
        "--network=none",
        "localhost/kiln-test/archive:v1",
        "echo",
        "loaded",
    ]));
    let _ = podman(&["rmi", "-f", "localhost/kiln-test/archive:v1"]).output();
    assert_eq!(out.trim(), "loaded");
}
