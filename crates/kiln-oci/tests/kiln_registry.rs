//! The registry client against kiln's own registry (`kiln-registry`, started in-process on
//! 127.0.0.1), with the same checks as against docker-registry: skopeo interop, pull
//! verification, cross-repository mounts, basic auth.

mod support;

use kiln_oci::{
    BlobPush, BlobSource, ClientConfig, Credential, DockerConfig, OciLayout, Platform, Reference,
    RegistryClient, RegistryError,
};
use support::*;

fn client(cred: Option<(&str, &str, &str)>) -> RegistryClient {
    let mut cfg = ClientConfig {
        docker_config: DockerConfig::at("/nonexistent/kiln-test/config.json"),
        ..ClientConfig::default()
    };
    if let Some((host, u, p)) = cred {
        cfg.credentials.insert(
            host.into(),
            Credential::Basic {
                username: u.into(),
                password: p.into(),
            },
        );
    }
    RegistryClient::new(cfg).unwrap()
}

async fn start(
    dir: &std::path::Path,
    htpasswd: Option<std::path::PathBuf>,
) -> kiln_registry::RunningRegistry {
    let mut b = kiln_registry::Registry::builder()
        .root(dir.join("storage"))
        .bind("127.0.0.1:0")
        .fsync(false);
    if let Some(h) = htpasswd {
        b = b.htpasswd(h);
    }
    b.start().await.expect("start kiln-registry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_registry_serves_skopeo_pushes_and_client_pulls_and_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path(), None).await;
    let img = busybox_image(1 << 20);
    skopeo_push(
        img.layout.root(),
        "latest",
        &format!("{}/library/busybox:1", reg.host()),
    );

    let c = client(None);
    let r: Reference = format!("{}/library/busybox:1", reg.host()).parse().unwrap();
    let out = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(out.path()).unwrap();
    let resolved = c
        .pull_to_layout(&r, &Platform::host(), &layout, "x")
        .await
        .unwrap();
    assert_eq!(resolved.manifest.digest, img.manifest.digest);
    assert_eq!(resolved.config.rootfs.diff_ids, img.config.rootfs.diff_ids);
    assert_eq!(
        read_all(&layout.blob_path(&img.layer.digest)),
        img.layer_bytes
    );

    // Push a copy to another repository: every blob is mounted, none uploaded.
    let other: Reference = format!("{}/team/app:v1", reg.host()).parse().unwrap();
    let proxy = FaultProxy::start(reg.addr, &[]).await;
    let via_proxy = client(None);
    let target: Reference = format!("{}/team/app:v1", proxy.host()).parse().unwrap();
    let blobs: Vec<_> = std::iter::once(resolved.image.config.clone())
        .chain(resolved.image.layers.clone())
        .map(|d| {
            let p = layout.blob_path(&d.digest);
            (d, BlobSource::File(p))
        })
        .collect();
    let from: Reference = format!("{}/library/busybox:1", proxy.host())
        .parse()
        .unwrap();
    via_proxy
        .push_image(
            std::slice::from_ref(&target),
            &resolved.manifest,
            &blobs,
            Some(&from),
        )
        .await
        .unwrap();
    let st = via_proxy.stats();
    assert_eq!(st.blobs_uploaded, 0, "{st:?}");
    assert_eq!(st.blobs_mounted + st.blobs_existing, 3, "{st:?}");
    let sent = proxy.sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        sent < 16 * 1024,
        "{sent} bytes crossed the proxy for a mounted push"
    );

    let out = run(std::process::Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{other}"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Digest"], img.manifest.digest.to_string());

    // A fresh upload (no mount source) goes through too.
    let fresh: Reference = format!("{}/fresh/app:1", reg.host()).parse().unwrap();
    let r = c
        .push_blob(
            &fresh,
            &img.layer,
            &BlobSource::File(img.layout.blob_path(&img.layer.digest)),
            None,
        )
        .await
        .unwrap();
    assert!(matches!(r, BlobPush::Uploaded | BlobPush::Mounted), "{r:?}");
    assert!(c.blob_exists(&fresh, &img.layer.digest).await.unwrap());
    reg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_registry_with_htpasswd_refuses_wrong_credentials_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash_with_result("pw", 4)
        .unwrap()
        .format_for_version(bcrypt::Version::TwoY);
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("carol:{hash}\n")).unwrap();
    let reg = start(dir.path(), Some(htpasswd)).await;
    let host = reg.host();
    let img = busybox_image(0);
    let target: Reference = format!("{host}/carol/app:1").parse().unwrap();
    let good = client(Some((&host, "carol", "pw")));
    good.push_from_layout(&img.layout, "latest", std::slice::from_ref(&target))
        .await
        .unwrap();
    assert_eq!(
        good.resolve(&target, &Platform::host())
            .await
            .unwrap()
            .manifest
            .digest,
        img.manifest.digest
    );
    let bad = client(Some((&host, "carol", "nope")));
    let err = bad.pull_manifest(&target).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("kiln login {host}")),
        "{err}"
    );
    reg.shutdown().await;
}

/// The download's temporary file, once it holds bytes (waiting at most a minute).
async fn partial_download(dir: &std::path::Path) -> std::path::PathBuf {
    for _ in 0..3000 {
        let found = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.metadata().map(|m| m.len() > 0).unwrap_or(false));
        if let Some(p) = found {
            return p;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no partial download appeared in {}", dir.display());
}

/// A blob download in flight holds an exclusive lock on its temporary file, as the content
/// store's ingests do: another process's start-of-build reclaim (`stale_ingests`) takes only
/// files it can lock, so it must not be able to lock this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_download_in_flight_is_locked_against_reclaim() {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path(), None).await;
    let img = busybox_image(6 << 20);
    let r: Reference = format!("{}/lock/app:1", reg.host()).parse().unwrap();
    client(None)
        .push_from_layout(&img.layout, "latest", std::slice::from_ref(&r))
        .await
        .unwrap();
    let big = match img.manifest.parse().unwrap() {
        kiln_oci::Manifest::Image(m) => m.layers[1].clone(),
        _ => unreachable!(),
    };
    let proxy = FaultProxy::start(reg.addr, &[]).await;
    proxy.stall_download_after.store(3 << 20, SeqCst);
    let via: Reference = format!("{}/lock/app:1", proxy.host()).parse().unwrap();
    let ingest = tempfile::tempdir().unwrap();
    let dest = ingest.path().join("pull-blob");
    let pull = {
        let (big, dest) = (big.clone(), dest.clone());
        tokio::spawn(async move { client(None).pull_blob_to_file(&via, &big, &dest).await })
    };
    let partial = partial_download(ingest.path()).await;
    assert!(!pull.is_finished(), "the download is held in flight");
    let f = std::fs::File::open(&partial).unwrap();
    // SAFETY: flock on a descriptor open for the call.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(
        rc,
        -1,
        "a reclaim could lock (and delete) {} while its download is in flight",
        partial.display()
    );
    drop(f);
    proxy.stall_download_after.store(0, SeqCst);
    pull.await.unwrap().unwrap();
    let got = read_all(&dest);
    assert_eq!(got.len() as u64, big.size);
    assert_eq!(kiln_oci::Digest::sha256_of(&got), big.digest);
}

/// An image listing one layer twice (a build whose two steps made identical layers) is pushed
/// and pulled with one transfer of that layer, never two at once to one path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_listed_twice_is_pushed_and_pulled_once() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path(), None).await;
    let img = busybox_image(2 << 20);
    let mut m = match img.manifest.parse().unwrap() {
        kiln_oci::Manifest::Image(m) => m,
        _ => unreachable!(),
    };
    let big = m.layers[1].clone();
    m.layers.push(big.clone());
    let mut config = img.config.clone();
    let last = config.rootfs.diff_ids[1].clone();
    config.rootfs.diff_ids.push(last);
    let config_bytes = serde_json::to_vec(&config).unwrap();
    m.config = kiln_oci::Descriptor::new(
        m.config.media_type.clone(),
        img.layout.write_blob(&config_bytes).unwrap(),
        config_bytes.len() as u64,
    );
    let raw = kiln_oci::RawManifest::from_image(&m);
    img.layout.write_blob(&raw.bytes).unwrap();
    img.layout.add_manifest(raw.descriptor(), "dup").unwrap();

    let r: Reference = format!("{}/dup/app:1", reg.host()).parse().unwrap();
    let pusher = client(None);
    pusher
        .push_from_layout(&img.layout, "dup", std::slice::from_ref(&r))
        .await
        .unwrap();
    let s = pusher.stats();
    assert_eq!(
        s.blobs_uploaded + s.blobs_existing + s.blobs_mounted,
        3,
        "config and two distinct layers, each pushed once: {s:?}"
    );

    let puller = client(None);
    let out = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(out.path()).unwrap();
    let resolved = puller
        .pull_to_layout(&r, &Platform::host(), &layout, "x")
        .await
        .unwrap();
    assert_eq!(resolved.manifest.digest, raw.digest);
    let distinct: u64 = m.layers[..2].iter().map(|l| l.size).sum();
    let received = puller.stats().bytes_received;
    let expected = raw.bytes.len() as u64 + config_bytes.len() as u64 + distinct;
    assert_eq!(
        received, expected,
        "manifest, config and each distinct layer received once (the repeated layer is {} bytes)",
        big.size
    );
    assert_eq!(
        read_all(&layout.blob_path(&big.digest)).len() as u64,
        big.size
    );
}
