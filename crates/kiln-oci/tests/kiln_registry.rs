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
