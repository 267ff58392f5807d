//! The HTTP conformance suite (`suites/http_conformance.rs`, as `conformance.rs` runs it on
//! the filesystem and memory drivers) on the `s3` driver, against a real 3-node Garage
//! cluster with replication factor 3. One cluster serves the whole test binary; each test
//! gets a prefix of its own in one bucket. Then what only object storage has: chunks of
//! one upload taken by different registry processes, redirects to presigned URLs, and GC
//! while another process pushes.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use kiln_oci::Digest;
use kiln_registry::{RegistryBuilder, S3Storage};
use kiln_test_env::garage::GarageCluster;
use reqwest::StatusCode;

const BUCKET: &str = "kiln-conformance";

/// The cluster of this test binary, started on first use and stopped at exit.
static CLUSTER: OnceLock<Mutex<Option<GarageCluster>>> = OnceLock::new();

extern "C" fn stop_cluster() {
    if let Some(m) = CLUSTER.get() {
        let cluster = m.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(cluster);
    }
}

/// `(endpoint, region, key id, secret)` of the shared cluster.
fn cluster() -> (String, String, String, String) {
    let m = CLUSTER.get_or_init(|| {
        let c = GarageCluster::start(3).unwrap_or_else(|e| panic!("Garage cluster: {e}"));
        c.create_bucket(BUCKET)
            .unwrap_or_else(|e| panic!("creating bucket {BUCKET}: {e}"));
        // The test harness leaves through `exit`, which runs this: no node outlives the tests.
        // SAFETY: registering a function without arguments that only touches a static.
        unsafe { libc::atexit(stop_cluster) };
        Mutex::new(Some(c))
    });
    let g = m.lock().unwrap_or_else(|e| e.into_inner());
    let c = g.as_ref().expect("cluster runs until exit");
    let (key, secret) = c.key();
    (c.endpoint(), c.region().to_owned(), key, secret)
}

/// A client for a fresh prefix of the shared bucket.
fn s3_client(prefix: &str) -> kiln_s3::S3Client {
    let (endpoint, region, key, secret) = cluster();
    kiln_s3::S3Client::new(kiln_s3::S3Config {
        endpoint: endpoint.parse().expect("endpoint URL"),
        region,
        bucket: BUCKET.into(),
        path_style: true,
        credentials: kiln_s3::Credentials {
            key,
            secret,
            session_token: None,
        },
        prefix: format!("{prefix}/"),
    })
    .expect("S3 client")
}

fn fresh_prefix() -> String {
    let mut b = [0u8; 8];
    rand::fill(&mut b);
    format!("t-{}", hex::encode(b))
}

async fn start_s3(prefix: &str, f: impl FnOnce(RegistryBuilder) -> RegistryBuilder) -> Reg {
    let store = Arc::new(S3Storage::new(s3_client(prefix)).with_delete_grace(Duration::ZERO));
    start_with(|b| f(b.storage(store))).await
}

/// The suite on the s3 driver.
mod s3 {
    /// A registry serving from a fresh prefix of the Garage bucket.
    async fn start() -> Reg {
        super::start_s3(&super::fresh_prefix(), |b| b).await
    }

    include!("suites/http_conformance.rs");
}

// ------------------------------------------------------------------------------ fleet

/// Pushes `data` as one blob through `regs`, one chunk per registry in turn, and returns
/// its digest.
async fn push_chunks_round_robin(regs: &[&Reg], repo: &str, data: &[u8], chunk: usize) -> Digest {
    let first = regs[0];
    let resp = first
        .c
        .post(first.u(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let mut loc = header(&resp, "Location");
    let mut offset = 0usize;
    for (i, piece) in data.chunks(chunk).enumerate() {
        let r = regs[i % regs.len()];
        let resp =
            r.c.patch(r.u(&loc))
                .header("Content-Type", "application/octet-stream")
                .header(
                    "Content-Range",
                    format!("{}-{}", offset, offset + piece.len() - 1),
                )
                .body(piece.to_vec())
                .send()
                .await
                .unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::ACCEPTED,
            "chunk {i} via registry {}",
            i % regs.len()
        );
        offset += piece.len();
        assert_eq!(header(&resp, "Range"), format!("0-{}", offset - 1));
        loc = header(&resp, "Location");
    }
    let d = Digest::sha256_of(data);
    let last = regs[data.len().div_ceil(chunk) % regs.len()];
    let sep = if loc.contains('?') { '&' } else { '?' };
    let resp = last
        .c
        .put(last.u(&format!("{loc}{sep}digest={d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    d
}

#[tokio::test]
async fn chunks_of_one_upload_go_through_three_registries_sharing_the_bucket() {
    let prefix = fresh_prefix();
    let a = start_s3(&prefix, |b| b).await;
    let b = start_s3(&prefix, |b| b).await;
    let c = start_s3(&prefix, |b| b).await;
    // 20 MiB in 3 MiB chunks: parts of 8 MiB cut across chunks sent to different processes,
    // and a tail that moves between them.
    let data: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
        .collect();
    let d = push_chunks_round_robin(&[&a, &b, &c], "fleet/big", &data, 3 << 20).await;
    for r in [&a, &b, &c] {
        let got =
            r.c.get(r.u(&format!("/v2/fleet/big/blobs/{d}")))
                .send()
                .await
                .unwrap();
        assert_eq!(got.status(), StatusCode::OK);
        let got = got.bytes().await.unwrap();
        assert_eq!(got.len(), data.len());
        assert_eq!(Digest::sha256_of(&got), d);
    }
    // Small chunks only ever make a tail: the blob is written by one PUT.
    let small = b"a small blob in five chunks".to_vec();
    let d = push_chunks_round_robin(&[&c, &a], "fleet/small", &small, 6).await;
    let got =
        b.c.get(b.u(&format!("/v2/fleet/small/blobs/{d}")))
            .send()
            .await
            .unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), &small[..]);
    // Nothing of either upload is left in the bucket.
    let left = s3_client(&prefix).list("uploads/").await.unwrap();
    assert!(left.is_empty(), "upload objects left: {left:?}");
}

#[tokio::test]
async fn a_chunk_cut_short_leaves_the_upload_resumable_from_another_registry() {
    let prefix = fresh_prefix();
    let a = start_s3(&prefix, |b| b).await;
    let b = start_s3(&prefix, |b| b).await;
    let data: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 253) as u8).collect();
    let resp =
        a.c.post(a.u("/v2/cut/blobs/uploads/"))
            .send()
            .await
            .unwrap();
    let loc = header(&resp, "Location");
    let resp =
        a.c.patch(a.u(&loc))
            .body(data[..(5 << 20)].to_vec())
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let loc = header(&resp, "Location");
    // A body that fails half-way (after a whole part's worth) through registry b.
    let failing = futures::stream::iter(vec![
        Ok::<_, std::io::Error>(bytes::Bytes::from(data[(5 << 20)..(9 << 20)].to_vec())),
        Err(std::io::Error::other("client went away")),
    ]);
    let _ =
        b.c.patch(b.u(&loc))
            .body(reqwest::Body::wrap_stream(failing))
            .send()
            .await;
    // The upload is still at 5 MiB, wherever one asks.
    for r in [&a, &b] {
        let resp = r.c.get(r.u(&loc)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(header(&resp, "Range"), format!("0-{}", (5 << 20) - 1));
    }
    let resp =
        a.c.patch(a.u(&loc))
            .header("Content-Range", format!("{}-{}", 5 << 20, data.len() - 1))
            .body(data[(5 << 20)..].to_vec())
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let loc = header(&resp, "Location");
    let d = Digest::sha256_of(&data);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let resp =
        b.c.put(b.u(&format!("{loc}{sep}digest={d}")))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let got =
        a.c.get(a.u(&format!("/v2/cut/blobs/{d}")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    assert_eq!(Digest::sha256_of(&got), d);
}

#[tokio::test]
async fn blob_pulls_redirect_to_a_presigned_url_when_asked() {
    let prefix = fresh_prefix();
    let store =
        Arc::new(S3Storage::new(s3_client(&prefix)).with_redirects(Duration::from_secs(600)));
    let r = start_with(|b| b.storage(store)).await;
    r.push_image("redir/app", "v1", b"layer bytes").await;
    let d = &Digest::sha256_of(b"layer bytes");
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = no_follow
        .get(r.u(&format!("/v2/redir/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TEMPORARY_REDIRECT);
    let to = header(&resp, "Location");
    assert!(to.contains("X-Amz-Signature="), "{to}");
    // The presigned URL serves the blob without the registry, and a following client
    // gets the bytes through one GET.
    let direct = no_follow.get(&to).send().await.unwrap();
    assert_eq!(direct.status(), StatusCode::OK);
    assert_eq!(Digest::sha256_of(&direct.bytes().await.unwrap()), *d);
    let followed =
        r.c.get(r.u(&format!("/v2/redir/app/blobs/{d}")))
            .send()
            .await
            .unwrap();
    assert_eq!(Digest::sha256_of(&followed.bytes().await.unwrap()), *d);
    // HEAD and ranged GETs are still answered by the registry itself.
    let head = no_follow
        .head(r.u(&format!("/v2/redir/app/blobs/{d}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
}

#[tokio::test]
async fn gc_in_one_registry_keeps_what_another_just_pushed() {
    let prefix = fresh_prefix();
    let pusher = start_s3(&prefix, |b| b).await;
    // A tagged image: its manifest, config and layer are reachable.
    pusher.push_image("gc/app", "v1", b"kept layer").await;
    let kept = [Digest::sha256_of(b"kept layer")];
    // A blob nobody references, pushed right now.
    let fresh = pusher.push_blob("gc/app", b"orphan, but young").await;
    // GC from a second process with a grace period: nothing young goes.
    let other = S3Storage::new(s3_client(&prefix)).with_delete_grace(Duration::from_secs(600));
    let report = kiln_registry::collect_garbage_in(
        &other,
        &kiln_registry::GcOptions {
            grace: Duration::from_secs(600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(report.blobs_deleted.is_empty(), "{report:?}");
    // Without grace the orphan goes, the tagged image stays whole.
    let now = S3Storage::new(s3_client(&prefix)).with_delete_grace(Duration::ZERO);
    let report = kiln_registry::collect_garbage_in(
        &now,
        &kiln_registry::GcOptions {
            grace: Duration::ZERO,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(report.blobs_deleted, vec![fresh.clone()], "{report:?}");
    for d in &kept {
        let resp = pusher.get(&format!("/v2/gc/app/blobs/{d}")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{d} kept");
    }
    let resp = pusher.get(&format!("/v2/gc/app/blobs/{fresh}")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}
