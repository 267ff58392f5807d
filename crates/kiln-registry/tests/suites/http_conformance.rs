// The HTTP conformance suite, included once per storage driver by `conformance.rs`: each
// including module defines `start()` on its driver.

use std::io::{Read, Write};

use super::common::*;
use kiln_oci::{Algorithm, Digest};
use reqwest::StatusCode;
use serde_json::{json, Value};

// ------------------------------------------------------------------------------ base

#[tokio::test]
async fn base_endpoint_answers_200_with_api_version_header() {
    let r = start().await;
    let resp = r.get("/v2/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "Docker-Distribution-API-Version"),
        "registry/2.0"
    );
}

#[tokio::test]
async fn unknown_endpoint_is_404() {
    let r = start().await;
    assert_eq!(
        r.get("/v2/a/nonsense/x/y").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(r.get("/v3/").await.status(), StatusCode::NOT_FOUND);
}

// ------------------------------------------------------------------------------ pull

#[tokio::test]
async fn pull_manifest_by_tag_returns_body_media_type_and_digest() {
    let r = start().await;
    let (m, d) = r.push_image("a/b", "v1", b"layer").await;
    let resp = r.get("/v2/a/b/manifests/v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "Content-Type"), OCI_MANIFEST);
    assert_eq!(header(&resp, "Docker-Content-Digest"), d.to_string());
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &m[..]);
}

#[tokio::test]
async fn pull_manifest_by_digest_returns_the_same_bytes() {
    let r = start().await;
    let (m, d) = r.push_image("a", "v1", b"layer").await;
    let resp = r.get(&format!("/v2/a/manifests/{d}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &m[..]);
}

#[tokio::test]
async fn head_manifest_returns_length_and_digest_without_body() {
    let r = start().await;
    let (m, d) = r.push_image("a", "v1", b"layer").await;
    let resp = r.head("/v2/a/manifests/v1").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "Content-Length"), m.len().to_string());
    assert_eq!(header(&resp, "Docker-Content-Digest"), d.to_string());
    assert!(resp.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn manifest_content_negotiation_follows_the_accept_header() {
    let r = start().await;
    r.push_image("a", "v1", b"layer").await;
    let get = |accept: Vec<&'static str>| {
        let mut req = r.c.get(r.u("/v2/a/manifests/v1"));
        for a in accept {
            req = req.header("Accept", a);
        }
        req.send()
    };
    let docker = "application/vnd.docker.distribution.manifest.v2+json";
    assert_eq!(get(vec![]).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        get(vec![docker, OCI_MANIFEST]).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(get(vec!["application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json;q=0.9"]).await.unwrap().status(), StatusCode::OK);
    assert_eq!(get(vec!["*/*"]).await.unwrap().status(), StatusCode::OK);
    assert_error(
        get(vec![docker]).await.unwrap(),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn pull_unknown_manifest_is_404_manifest_unknown() {
    let r = start().await;
    r.push_image("a", "v1", b"layer").await;
    assert_error(
        r.get("/v2/a/manifests/nope").await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
    let d = Digest::sha256_of(b"nothing");
    assert_error(
        r.get(&format!("/v2/a/manifests/{d}")).await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
    assert_error(
        r.get("/v2/unknown/repo/manifests/v1").await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
    assert_eq!(
        r.head("/v2/a/manifests/nope").await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn pull_blob_returns_content_and_digest_header() {
    let r = start().await;
    let d = r.push_blob("a", b"hello blob").await;
    let resp = r.get(&format!("/v2/a/blobs/{d}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "Docker-Content-Digest"), d.to_string());
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"hello blob");
}

#[tokio::test]
async fn head_blob_returns_length_without_body() {
    let r = start().await;
    let d = r.push_blob("a", b"hello blob").await;
    let resp = r.head(&format!("/v2/a/blobs/{d}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "Content-Length"), "10");
    assert_eq!(header(&resp, "Docker-Content-Digest"), d.to_string());
}

#[tokio::test]
async fn pull_unknown_blob_is_404_blob_unknown() {
    let r = start().await;
    let d = Digest::sha256_of(b"absent");
    assert_error(
        r.get(&format!("/v2/a/blobs/{d}")).await,
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    )
    .await;
    assert_eq!(
        r.head(&format!("/v2/a/blobs/{d}")).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn pull_blob_with_malformed_digest_is_400_digest_invalid() {
    let r = start().await;
    assert_error(
        r.get("/v2/a/blobs/sha256:xyz").await,
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    )
    .await;
    assert_error(
        r.get("/v2/a/blobs/md5:abcd").await,
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    )
    .await;
}

#[tokio::test]
async fn blob_is_invisible_in_repositories_it_was_not_pushed_to() {
    let r = start().await;
    let d = r.push_blob("a", b"private").await;
    assert_error(
        r.get(&format!("/v2/b/blobs/{d}")).await,
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn blob_range_requests_return_206_with_content_range() {
    let r = start().await;
    let data: Vec<u8> = (0..100u8).collect();
    let d = r.push_blob("a", &data).await;
    for (range, want, cr) in [
        ("bytes=0-9", &data[0..10], "bytes 0-9/100"),
        ("bytes=90-", &data[90..], "bytes 90-99/100"),
        ("bytes=-5", &data[95..], "bytes 95-99/100"),
        ("bytes=50-1000", &data[50..], "bytes 50-99/100"),
    ] {
        let resp =
            r.c.get(r.u(&format!("/v2/a/blobs/{d}")))
                .header("Range", range)
                .send()
                .await
                .unwrap();
        assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(header(&resp, "Content-Range"), cr, "{range}");
        assert_eq!(resp.bytes().await.unwrap().as_ref(), want, "{range}");
    }
}

#[tokio::test]
async fn large_blobs_stream_whole_and_in_ranges() {
    let r = start().await;
    let data: Vec<u8> = (0..(3 << 20) + 17)
        .map(|i: u32| (i * 31 % 251) as u8)
        .collect();
    let d = r.push_blob("a", &data).await;
    let whole = r.get(&format!("/v2/a/blobs/{d}")).await;
    assert_eq!(header(&whole, "Content-Length"), data.len().to_string());
    assert_eq!(Digest::sha256_of(&whole.bytes().await.unwrap()), d);
    let resp =
        r.c.get(r.u(&format!("/v2/a/blobs/{d}")))
            .header("Range", "bytes=100000-2999999")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &data[100000..3000000]);
}

#[tokio::test]
async fn unsatisfiable_blob_range_is_416() {
    let r = start().await;
    let d = r.push_blob("a", b"0123456789").await;
    for range in ["bytes=10-", "bytes=5-2", "lines=1-2"] {
        let resp =
            r.c.get(r.u(&format!("/v2/a/blobs/{d}")))
                .header("Range", range)
                .send()
                .await
                .unwrap();
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(header(&resp, "Content-Range"), "bytes */10");
    }
}

// ------------------------------------------------------------------------------ push: blobs

#[tokio::test]
async fn monolithic_post_with_digest_creates_blob_201() {
    let r = start().await;
    let d = Digest::sha256_of(b"mono");
    let resp =
        r.c.post(r.u(&format!("/v2/a/blobs/uploads/?digest={d}")))
            .body("mono")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(header(&resp, "Location"), format!("/v2/a/blobs/{d}"));
    assert_eq!(header(&resp, "Docker-Content-Digest"), d.to_string());
    assert_eq!(
        r.get(&format!("/v2/a/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap()
            .as_ref(),
        b"mono"
    );
    assert_eq!(staged_uploads(&r.root()), 0);
}

#[tokio::test]
async fn post_then_put_creates_blob() {
    let r = start().await;
    let resp = r.c.post(r.u("/v2/a/blobs/uploads/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let loc = header(&resp, "Location");
    assert!(loc.starts_with("/v2/a/blobs/uploads/"), "{loc}");
    assert!(!header(&resp, "Docker-Upload-UUID").is_empty());
    let d = Digest::sha256_of(b"two step");
    let resp =
        r.c.put(r.u(&format!("{loc}?digest={d}")))
            .body("two step")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(header(&resp, "Location"), format!("/v2/a/blobs/{d}"));
    assert_eq!(
        r.head(&format!("/v2/a/blobs/{d}")).await.status(),
        StatusCode::OK
    );
    assert_eq!(staged_uploads(&r.root()), 0);
}

#[tokio::test]
async fn upload_path_without_trailing_slash_also_starts_an_upload() {
    let r = start().await;
    let resp = r.c.post(r.u("/v2/a/blobs/uploads")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn chunked_upload_with_patch_then_put_assembles_the_blob() {
    let r = start().await;
    let loc = header(
        &r.c.post(r.u("/v2/a/blobs/uploads/")).send().await.unwrap(),
        "Location",
    );
    let mut loc = loc;
    let chunks: [&[u8]; 3] = [b"first-", b"second-", b"third"];
    let mut off = 0;
    for c in chunks {
        let resp =
            r.c.patch(r.u(&loc))
                .header("Content-Type", "application/octet-stream")
                .header("Content-Range", format!("{}-{}", off, off + c.len() - 1))
                .body(c.to_vec())
                .send()
                .await
                .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        off += c.len();
        assert_eq!(header(&resp, "Range"), format!("0-{}", off - 1));
        loc = header(&resp, "Location");
    }
    let status = r.get(&loc).await;
    assert_eq!(status.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&status, "Range"), format!("0-{}", off - 1));
    let d = Digest::sha256_of(b"first-second-third");
    let resp =
        r.c.put(r.u(&format!("{loc}?digest={d}")))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        r.get(&format!("/v2/a/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap()
            .as_ref(),
        b"first-second-third"
    );
}

#[tokio::test]
async fn streamed_patch_without_content_range_is_accepted() {
    let r = start().await;
    let loc = header(
        &r.c.post(r.u("/v2/a/blobs/uploads/")).send().await.unwrap(),
        "Location",
    );
    let resp = r.c.patch(r.u(&loc)).body("streamed").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let d = Digest::sha256_of(b"streamed!");
    let resp =
        r.c.put(r.u(&format!("{}?digest={d}", header(&resp, "Location"))))
            .body("!")
            .send()
            .await
            .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "final chunk in PUT is appended"
    );
}

#[tokio::test]
async fn upload_status_of_fresh_upload_is_204_with_range_0_0() {
    let r = start().await;
    let loc = header(
        &r.c.post(r.u("/v2/a/blobs/uploads/")).send().await.unwrap(),
        "Location",
    );
    let resp = r.get(&loc).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&resp, "Range"), "0-0");
    assert_eq!(header(&resp, "Location"), loc);
}

#[tokio::test]
async fn out_of_order_chunk_is_416_and_leaves_the_upload_unchanged() {
    let r = start().await;
    let loc = header(
        &r.c.post(r.u("/v2/a/blobs/uploads/")).send().await.unwrap(),
        "Location",
    );
    let resp =
        r.c.patch(r.u(&loc))
            .header("Content-Range", "0-3")
            .body("abcd")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    for cr in ["10-13", "0-3", "2-5"] {
        let resp =
            r.c.patch(r.u(&loc))
                .header("Content-Range", cr)
                .body("efgh")
                .send()
                .await
                .unwrap();
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{cr}");
    }
    assert_eq!(header(&r.get(&loc).await, "Range"), "0-3");
    let d = Digest::sha256_of(b"abcdefgh");
    let resp =
        r.c.patch(r.u(&loc))
            .header("Content-Range", "4-7")
            .body("efgh")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp =
        r.c.put(r.u(&format!("{loc}?digest={d}")))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn put_with_wrong_digest_is_400_digest_invalid_and_stores_nothing() {
    let r = start().await;
    let loc = header(
        &r.c.post(r.u("/v2/a/blobs/uploads/")).send().await.unwrap(),
        "Location",
    );
    let wrong = Digest::sha256_of(b"something else");
    let resp =
        r.c.put(r.u(&format!("{loc}?digest={wrong}")))
            .body("content")
            .send()
            .await
            .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    assert_eq!(
        r.head(&format!("/v2/a/blobs/{wrong}")).await.status(),
        StatusCode::NOT_FOUND
    );
    let real = Digest::sha256_of(b"content");
    assert_eq!(
        r.head(&format!("/v2/a/blobs/{real}")).await.status(),
        StatusCode::NOT_FOUND
    );
    assert!(!r
        .root()
        .join("blobs/sha256")
        .join(&wrong.hex()[..2])
        .join(wrong.hex())
        .exists());
}

#[tokio::test]
async fn monolithic_post_with_wrong_digest_stores_nothing() {
    let r = start().await;
    let wrong = Digest::sha256_of(b"x");
    let resp =
        r.c.post(r.u(&format!("/v2/a/blobs/uploads/?digest={wrong}")))
            .body("y")
            .send()
            .await
            .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    assert_eq!(
        r.head(&format!("/v2/a/blobs/{wrong}")).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(staged_uploads(&r.root()), 0);
}

#[tokio::test]
async fn put_without_or_with_malformed_digest_is_400_digest_invalid() {
    let r = start().await;
    let loc = header(
        &r.c.post(r.u("/v2/a/blobs/uploads/")).send().await.unwrap(),
        "Location",
    );
    assert_error(
        r.c.put(r.u(&loc)).body("x").send().await.unwrap(),
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    )
    .await;
    let resp =
        r.c.put(r.u(&format!("{loc}?digest=sha256:123")))
            .body("x")
            .send()
            .await
            .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
}

#[tokio::test]
async fn unknown_upload_id_is_404_blob_upload_unknown_for_every_method() {
    let r = start().await;
    let loc = "/v2/a/blobs/uploads/0123456789abcdef0123456789abcdef";
    let d = Digest::sha256_of(b"x");
    assert_error(
        r.get(loc).await,
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
    assert_error(
        r.c.patch(r.u(loc)).body("x").send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
    let put =
        r.c.put(r.u(&format!("{loc}?digest={d}")))
            .body("x")
            .send()
            .await
            .unwrap();
    assert_error(put, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    assert_error(
        r.delete(loc).await,
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
    assert_error(
        r.get("/v2/a/blobs/uploads/..%2f..%2fetc").await,
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn upload_id_is_unknown_in_another_repository() {
    let r = start().await;
    let resp = r.c.post(r.u("/v2/a/blobs/uploads/")).send().await.unwrap();
    let id = header(&resp, "Docker-Upload-UUID");
    assert_error(
        r.get(&format!("/v2/b/blobs/uploads/{id}")).await,
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn cancelled_upload_is_gone() {
    let r = start().await;
    let loc = header(
        &r.c.post(r.u("/v2/a/blobs/uploads/")).send().await.unwrap(),
        "Location",
    );
    r.c.patch(r.u(&loc)).body("data").send().await.unwrap();
    assert_eq!(r.delete(&loc).await.status(), StatusCode::NO_CONTENT);
    assert_error(
        r.get(&loc).await,
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
    assert_eq!(staged_uploads(&r.root()), 0);
}

#[tokio::test]
async fn cross_repository_mount_links_the_blob_201() {
    let r = start().await;
    let d = r.push_blob("src/repo", b"shared layer").await;
    let resp =
        r.c.post(r.u(&format!("/v2/dst/blobs/uploads/?mount={d}&from=src/repo")))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(header(&resp, "Location"), format!("/v2/dst/blobs/{d}"));
    assert_eq!(header(&resp, "Docker-Content-Digest"), d.to_string());
    assert_eq!(
        r.get(&format!("/v2/dst/blobs/{d}"))
            .await
            .bytes()
            .await
            .unwrap()
            .as_ref(),
        b"shared layer"
    );
}

#[tokio::test]
async fn mount_from_a_repository_without_the_blob_falls_back_to_an_upload_202() {
    let r = start().await;
    let d = r.push_blob("other", b"elsewhere").await;
    let resp =
        r.c.post(r.u(&format!("/v2/dst/blobs/uploads/?mount={d}&from=src")))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let loc = header(&resp, "Location");
    assert!(loc.starts_with("/v2/dst/blobs/uploads/"));
    assert_eq!(
        r.head(&format!("/v2/dst/blobs/{d}")).await.status(),
        StatusCode::NOT_FOUND
    );
    let resp =
        r.c.put(r.u(&format!("{loc}?digest={d}")))
            .body("elsewhere")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn mount_without_from_links_a_blob_the_registry_holds_else_starts_an_upload() {
    let r = start().await;
    let d = r.push_blob("somewhere", b"anonymous mount").await;
    let resp =
        r.c.post(r.u(&format!("/v2/dst/blobs/uploads/?mount={d}")))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        r.get(&format!("/v2/dst/blobs/{d}")).await.status(),
        StatusCode::OK
    );
    let absent = Digest::sha256_of(b"not here");
    let resp =
        r.c.post(r.u(&format!("/v2/dst/blobs/uploads/?mount={absent}")))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
}

#[tokio::test]
async fn sha512_blobs_keep_their_digest() {
    let r = start().await;
    let d = Digest::of(Algorithm::Sha512, b"sha512 content");
    let resp =
        r.c.post(r.u(&format!("/v2/a/blobs/uploads/?digest={d}")))
            .body("sha512 content")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(header(&resp, "Docker-Content-Digest"), d.to_string());
    let resp = r.get(&format!("/v2/a/blobs/{d}")).await;
    assert_eq!(header(&resp, "Docker-Content-Digest"), d.to_string());
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"sha512 content");
    // Chunked with a sha512 finish.
    let loc = header(
        &r.c.post(r.u("/v2/a/blobs/uploads/")).send().await.unwrap(),
        "Location",
    );
    let loc = header(
        &r.c.patch(r.u(&loc)).body("chunk").send().await.unwrap(),
        "Location",
    );
    let d = Digest::of(Algorithm::Sha512, b"chunk");
    assert_eq!(
        r.c.put(r.u(&format!("{loc}?digest={d}")))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
}

/// Sends a request whose body is shorter than its Content-Length, then closes the socket.
fn send_truncated(url: &str, method: &str, path: &str, extra: &str, declared: usize, sent: &[u8]) {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {declared}\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(sent).unwrap();
    s.flush().unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

#[tokio::test]
async fn truncated_monolithic_upload_stores_nothing() {
    let r = start().await;
    let full = vec![7u8; 100_000];
    let d = Digest::sha256_of(&full);
    let (url, path) = (r.url.clone(), format!("/v2/a/blobs/uploads/?digest={d}"));
    tokio::task::spawn_blocking(move || {
        send_truncated(&url, "POST", &path, "", 100_000, &full[..50_000])
    })
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        r.head(&format!("/v2/a/blobs/{d}")).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(staged_uploads(&r.root()), 0);
}

#[tokio::test]
async fn truncated_chunk_is_rolled_back_so_the_upload_resumes() {
    let r = start().await;
    let loc = header(
        &r.c.post(r.u("/v2/a/blobs/uploads/")).send().await.unwrap(),
        "Location",
    );
    r.c.patch(r.u(&loc))
        .header("Content-Range", "0-2")
        .body("abc")
        .send()
        .await
        .unwrap();
    let (url, l2) = (r.url.clone(), loc.clone());
    tokio::task::spawn_blocking(move || {
        send_truncated(&url, "PATCH", &l2, "Content-Range: 3-12\r\n", 10, b"defg")
    })
    .await
    .unwrap();
    // The server sees the broken body asynchronously; poll its view of the upload.
    let mut range = String::new();
    for _ in 0..50 {
        range = header(&r.get(&loc).await, "Range");
        if range == "0-2" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(range, "0-2");
    let d = Digest::sha256_of(b"abcdefghijklm");
    let resp =
        r.c.put(r.u(&format!("{loc}?digest={d}")))
            .header("Content-Range", "3-12")
            .body("defghijklm")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

// ------------------------------------------------------------------------------ push: manifests

#[tokio::test]
async fn manifest_put_returns_201_with_location_and_digest() {
    let r = start().await;
    let c = r.push_blob("a", b"{}").await;
    let m = image_manifest(&c, 2, &[], None);
    let resp = r.put_manifest("a", "v1", OCI_MANIFEST, &m).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let d = Digest::sha256_of(&m);
    assert_eq!(header(&resp, "Location"), format!("/v2/a/manifests/{d}"));
    assert_eq!(header(&resp, "Docker-Content-Digest"), d.to_string());
    assert!(header(&resp, "OCI-Subject").is_empty());
}

#[tokio::test]
async fn manifest_put_by_digest_stores_it_untagged() {
    let r = start().await;
    let c = r.push_blob("a", b"{}").await;
    let m = image_manifest(&c, 2, &[], None);
    let d = Digest::sha256_of(&m);
    assert_eq!(
        r.put_manifest("a", &d.to_string(), OCI_MANIFEST, &m)
            .await
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        r.get(&format!("/v2/a/manifests/{d}")).await.status(),
        StatusCode::OK
    );
    let tags: Value = r.get("/v2/a/tags/list").await.json().await.unwrap();
    assert_eq!(tags["tags"], json!([]));
}

#[tokio::test]
async fn manifest_put_by_sha512_digest_keeps_that_digest() {
    let r = start().await;
    let c = r.push_blob("a", b"{}").await;
    let m = image_manifest(&c, 2, &[], None);
    let d = Digest::of(Algorithm::Sha512, &m);
    let resp = r.put_manifest("a", &d.to_string(), OCI_MANIFEST, &m).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(header(&resp, "Docker-Content-Digest"), d.to_string());
    let resp = r.get(&format!("/v2/a/manifests/{d}")).await;
    assert_eq!(header(&resp, "Docker-Content-Digest"), d.to_string());
}

#[tokio::test]
async fn manifest_put_by_digest_with_tag_parameters_applies_each_tag() {
    let r = start().await;
    let c = r.push_blob("a", b"{}").await;
    let m = image_manifest(&c, 2, &[], None);
    let d = Digest::sha256_of(&m);
    let resp =
        r.c.put(r.u(&format!("/v2/a/manifests/{d}?tag=one&tag=two")))
            .header("Content-Type", OCI_MANIFEST)
            .body(m.clone())
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let applied: Vec<_> = resp
        .headers()
        .get_all("OCI-Tag")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(applied, ["one", "two"]);
    let v: Value = r.get("/v2/a/tags/list").await.json().await.unwrap();
    assert_eq!(v["tags"], json!(["one", "two"]));
    let bad =
        r.c.put(r.u(&format!("/v2/a/manifests/{d}?tag=-bad")))
            .header("Content-Type", OCI_MANIFEST)
            .body(m)
            .send()
            .await
            .unwrap();
    assert_error(bad, StatusCode::BAD_REQUEST, "TAG_INVALID").await;
}

#[tokio::test]
async fn manifest_naming_a_missing_blob_is_400_manifest_blob_unknown_and_not_stored() {
    let r = start().await;
    let c = r.push_blob("a", b"{}").await;
    let missing = Digest::sha256_of(b"never pushed");
    let m = image_manifest(&c, 2, &[(missing.clone(), 12)], None);
    let resp = r.put_manifest("a", "v1", OCI_MANIFEST, &m).await;
    let v: Value = {
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        resp.json().await.unwrap()
    };
    assert_eq!(v["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(v["errors"][0]["detail"]["digest"], missing.to_string());
    assert_eq!(
        r.get("/v2/a/manifests/v1").await.status(),
        StatusCode::NOT_FOUND
    );
    let d = Digest::sha256_of(&m);
    assert_eq!(
        r.get(&format!("/v2/a/manifests/{d}")).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn manifest_naming_a_blob_of_another_repository_is_rejected() {
    let r = start().await;
    let c = r.push_blob("a", b"{}").await;
    let other = r.push_blob("other", b"layer").await;
    let m = image_manifest(&c, 2, &[(other, 5)], None);
    assert_error(
        r.put_manifest("a", "v1", OCI_MANIFEST, &m).await,
        StatusCode::BAD_REQUEST,
        "MANIFEST_BLOB_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn malformed_manifest_json_is_400_manifest_invalid() {
    let r = start().await;
    for body in [
        &b"{not json"[..],
        b"[]",
        b"{\"schemaVersion\":2}",
        b"{\"schemaVersion\":1,\"layers\":[]}",
    ] {
        let resp = r.put_manifest("a", "v1", OCI_MANIFEST, body).await;
        assert_error(resp, StatusCode::BAD_REQUEST, "MANIFEST_INVALID").await;
    }
    assert_eq!(
        r.get("/v2/a/manifests/v1").await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn manifest_whose_media_type_differs_from_content_type_is_rejected() {
    let r = start().await;
    let c = r.push_blob("a", b"{}").await;
    let m = image_manifest(&c, 2, &[], None);
    assert_error(
        r.put_manifest("a", "v1", OCI_INDEX, &m).await,
        StatusCode::BAD_REQUEST,
        "MANIFEST_INVALID",
    )
    .await;
}

#[tokio::test]
async fn oversized_manifest_is_413_and_not_stored() {
    let r = start().await;
    let c = r.push_blob("a", b"{}").await;
    let big = "x".repeat(5 << 20);
    let m = image_manifest(&c, 2, &[], Some(json!({"annotations": {"big": big}})));
    let resp = r.put_manifest("a", "v1", OCI_MANIFEST, &m).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        r.get("/v2/a/manifests/v1").await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn manifest_put_with_mismatching_digest_reference_is_400_digest_invalid() {
    let r = start().await;
    let c = r.push_blob("a", b"{}").await;
    let m = image_manifest(&c, 2, &[], None);
    let wrong = Digest::sha256_of(b"other");
    assert_error(
        r.put_manifest("a", &wrong.to_string(), OCI_MANIFEST, &m)
            .await,
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    )
    .await;
    assert_eq!(
        r.get(&format!("/v2/a/manifests/{}", Digest::sha256_of(&m)))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn invalid_tag_is_400_tag_invalid() {
    let r = start().await;
    let c = r.push_blob("a", b"{}").await;
    let m = image_manifest(&c, 2, &[], None);
    assert_error(
        r.put_manifest("a", ".bad", OCI_MANIFEST, &m).await,
        StatusCode::BAD_REQUEST,
        "TAG_INVALID",
    )
    .await;
    let long = "t".repeat(129);
    assert_error(
        r.put_manifest("a", &long, OCI_MANIFEST, &m).await,
        StatusCode::BAD_REQUEST,
        "TAG_INVALID",
    )
    .await;
}

#[tokio::test]
async fn index_with_a_missing_child_manifest_is_rejected_and_with_children_accepted() {
    let r = start().await;
    let (child, cd) = r.push_image("a", "child", b"l").await;
    let missing = Digest::sha256_of(b"no such manifest");
    let index = |ds: &[(Digest, usize)]| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": ds.iter().map(|(d, n)| json!({"mediaType": OCI_MANIFEST, "digest": d.to_string(), "size": n,
                "platform": {"architecture": "amd64", "os": "linux"}})).collect::<Vec<_>>()
        }))
        .unwrap()
    };
    let bad = index(&[(cd.clone(), child.len()), (missing, 10)]);
    assert_error(
        r.put_manifest("a", "multi", OCI_INDEX, &bad).await,
        StatusCode::BAD_REQUEST,
        "MANIFEST_BLOB_UNKNOWN",
    )
    .await;
    let good = index(&[(cd, child.len())]);
    let resp = r.put_manifest("a", "multi", OCI_INDEX, &good).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = r.get("/v2/a/manifests/multi").await;
    assert_eq!(header(&resp, "Content-Type"), OCI_INDEX);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &good[..]);
}

#[tokio::test]
async fn docker_schema2_manifest_and_manifest_list_round_trip() {
    let r = start().await;
    let c = r.push_blob("d", b"{\"os\":\"linux\"}").await;
    let l = r.push_blob("d", b"layer").await;
    let dm = "application/vnd.docker.distribution.manifest.v2+json";
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": dm,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": c.to_string(), "size": 14},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": l.to_string(), "size": 5}]
    }))
    .unwrap();
    assert_eq!(
        r.put_manifest("d", "v2", dm, &m).await.status(),
        StatusCode::CREATED
    );
    let md = Digest::sha256_of(&m);
    let ml = "application/vnd.docker.distribution.manifest.list.v2+json";
    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": ml,
        "manifests": [{"mediaType": dm, "digest": md.to_string(), "size": m.len(), "platform": {"architecture": "amd64", "os": "linux"}}]
    }))
    .unwrap();
    assert_eq!(
        r.put_manifest("d", "list", ml, &list).await.status(),
        StatusCode::CREATED
    );
    let resp = r.get("/v2/d/manifests/v2").await;
    assert_eq!(header(&resp, "Content-Type"), dm);
    let resp = r.get("/v2/d/manifests/list").await;
    assert_eq!(header(&resp, "Content-Type"), ml);
    assert_eq!(
        header(&resp, "Docker-Content-Digest"),
        Digest::sha256_of(&list).to_string()
    );
}

#[tokio::test]
async fn retagging_moves_the_tag_to_the_new_manifest() {
    let r = start().await;
    r.push_image("a", "v", b"one").await;
    let (_, d2) = r.push_image("a", "v", b"two").await;
    assert_eq!(
        header(&r.head("/v2/a/manifests/v").await, "Docker-Content-Digest"),
        d2.to_string()
    );
}

// ------------------------------------------------------------------------------ names

#[tokio::test]
async fn invalid_repository_names_are_400_name_invalid() {
    let r = start().await;
    for name in ["UPPER", "a//b", "-a", "a__-b", "a%20b"] {
        assert_error(
            r.get(&format!("/v2/{name}/tags/list")).await,
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        )
        .await;
        let resp =
            r.c.post(r.u(&format!("/v2/{name}/blobs/uploads/")))
                .send()
                .await
                .unwrap();
        assert_error(resp, StatusCode::BAD_REQUEST, "NAME_INVALID").await;
    }
}

/// Sends a raw request line (no client-side path normalisation) and returns the reply.
fn raw_request(url: &str, method: &str, path: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[tokio::test]
async fn path_traversal_names_are_rejected_and_write_nothing_outside_the_root() {
    let r = start().await;
    for path in [
        "/v2/../../escape/blobs/uploads/",
        "/v2/..%2f..%2fescape/blobs/uploads/",
        "/v2/a/%2e%2e/%2e%2e/escape/blobs/uploads/",
        "/v2/a/.%2e/b/blobs/uploads/",
        "/v2/a/../../../escape/manifests/v1",
    ] {
        let url = r.url.clone();
        let p = path.to_owned();
        let reply = tokio::task::spawn_blocking(move || raw_request(&url, "POST", &p))
            .await
            .unwrap();
        assert!(reply.starts_with("HTTP/1.1 400"), "{path}: {reply}");
        assert!(reply.contains("NAME_INVALID"), "{path}: {reply}");
    }
    assert!(!r.dir.path().join("escape").exists());
    assert!(!r.root().join("escape").exists());
    assert!(!r.root().join("repos/escape").exists());
}

#[tokio::test]
async fn nested_repository_names_work() {
    let r = start().await;
    r.push_image("org/team/app", "v1", b"x").await;
    assert_eq!(
        r.get("/v2/org/team/app/manifests/v1").await.status(),
        StatusCode::OK
    );
    // A repository may be named like an endpoint keyword.
    r.push_image("org/blobs/manifests", "v1", b"y").await;
    assert_eq!(
        r.get("/v2/org/blobs/manifests/manifests/v1").await.status(),
        StatusCode::OK
    );
}

// ------------------------------------------------------------------------------ discovery

#[tokio::test]
async fn tags_list_is_sorted() {
    let r = start().await;
    for t in ["c", "a", "b"] {
        r.push_image("t", t, b"l").await;
    }
    let v: Value = r.get("/v2/t/tags/list").await.json().await.unwrap();
    assert_eq!(v, json!({"name": "t", "tags": ["a", "b", "c"]}));
}

#[tokio::test]
async fn tags_list_paginates_with_n_last_and_link_header() {
    let r = start().await;
    for t in ["t1", "t2", "t3", "t4", "t5"] {
        r.push_image("p", t, b"l").await;
    }
    let resp = r.get("/v2/p/tags/list?n=2").await;
    assert_eq!(
        header(&resp, "Link"),
        "</v2/p/tags/list?n=2&last=t2>; rel=\"next\""
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["tags"], json!(["t1", "t2"]));
    let resp = r.get("/v2/p/tags/list?n=2&last=t2").await;
    assert!(!header(&resp, "Link").is_empty());
    assert_eq!(
        resp.json::<Value>().await.unwrap()["tags"],
        json!(["t3", "t4"])
    );
    let resp = r.get("/v2/p/tags/list?n=2&last=t4").await;
    assert!(header(&resp, "Link").is_empty(), "last page has no Link");
    assert_eq!(resp.json::<Value>().await.unwrap()["tags"], json!(["t5"]));
    let v: Value = r.get("/v2/p/tags/list?last=t3").await.json().await.unwrap();
    assert_eq!(v["tags"], json!(["t4", "t5"]));
    let v: Value = r.get("/v2/p/tags/list?n=0").await.json().await.unwrap();
    assert_eq!(v["tags"], json!([]));
}

#[tokio::test]
async fn tags_list_of_unknown_repository_is_404_name_unknown() {
    let r = start().await;
    assert_error(
        r.get("/v2/nobody/tags/list").await,
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn catalog_lists_nested_repositories_with_pagination() {
    let r = start().await;
    for repo in ["b", "a/x", "a/y/z"] {
        r.push_image(repo, "v", b"l").await;
    }
    let v: Value = r.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["a/x", "a/y/z", "b"]));
    let resp = r.get("/v2/_catalog?n=1").await;
    assert_eq!(
        header(&resp, "Link"),
        "</v2/_catalog?n=1&last=a/x>; rel=\"next\""
    );
    let v: Value = r
        .get("/v2/_catalog?n=5&last=a/x")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["repositories"], json!(["a/y/z", "b"]));
}

// ------------------------------------------------------------------------------ referrers

async fn push_referrer(
    r: &Reg,
    repo: &str,
    subject: &Digest,
    subject_len: usize,
    artifact_type: &str,
) -> (reqwest::Response, Digest) {
    let empty = r.push_blob(repo, b"{}").await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": subject_len},
        "annotations": {"org.example.kind": artifact_type}
    }))
    .unwrap();
    let d = Digest::sha256_of(&m);
    (
        r.put_manifest(repo, &d.to_string(), OCI_MANIFEST, &m).await,
        d,
    )
}

#[tokio::test]
async fn referrers_of_a_manifest_without_referrers_is_an_empty_index() {
    let r = start().await;
    let (_, d) = r.push_image("a", "v", b"l").await;
    let resp = r.get(&format!("/v2/a/referrers/{d}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "Content-Type"), OCI_INDEX);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["manifests"], json!([]));
    assert_eq!(v["schemaVersion"], 2);
}

#[tokio::test]
async fn manifest_with_subject_gets_oci_subject_header_and_is_listed() {
    let r = start().await;
    let (m, d) = r.push_image("a", "v", b"l").await;
    let (resp, rd) = push_referrer(&r, "a", &d, m.len(), "application/vnd.example.sbom").await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(header(&resp, "OCI-Subject"), d.to_string());
    let v: Value = r
        .get(&format!("/v2/a/referrers/{d}"))
        .await
        .json()
        .await
        .unwrap();
    let ms = v["manifests"].as_array().unwrap();
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0]["digest"], rd.to_string());
    assert_eq!(ms[0]["artifactType"], "application/vnd.example.sbom");
    assert_eq!(ms[0]["mediaType"], OCI_MANIFEST);
    assert_eq!(
        ms[0]["annotations"]["org.example.kind"],
        "application/vnd.example.sbom"
    );
}

#[tokio::test]
async fn referrers_filter_by_artifact_type_sets_oci_filters_applied() {
    let r = start().await;
    let (m, d) = r.push_image("a", "v", b"l").await;
    push_referrer(&r, "a", &d, m.len(), "application/vnd.example.sbom").await;
    push_referrer(&r, "a", &d, m.len(), "application/vnd.example.sig").await;
    let resp = r
        .get(&format!(
            "/v2/a/referrers/{d}?artifactType=application/vnd.example.sig"
        ))
        .await;
    assert_eq!(header(&resp, "OCI-Filters-Applied"), "artifactType");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.sig"
    );
    let all: Value = r
        .get(&format!("/v2/a/referrers/{d}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(all["manifests"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn referrer_may_be_pushed_before_its_subject() {
    let r = start().await;
    let future = Digest::sha256_of(b"subject not pushed yet");
    let (resp, _) = push_referrer(&r, "a", &future, 10, "application/x").await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v: Value = r
        .get(&format!("/v2/a/referrers/{future}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn referrers_with_malformed_digest_is_400() {
    let r = start().await;
    assert_error(
        r.get("/v2/a/referrers/sha256:bad").await,
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    )
    .await;
}

#[tokio::test]
async fn deleted_referrer_disappears_from_the_list() {
    let r = start().await;
    let (m, d) = r.push_image("a", "v", b"l").await;
    let (_, rd) = push_referrer(&r, "a", &d, m.len(), "application/x").await;
    assert_eq!(
        r.delete(&format!("/v2/a/manifests/{rd}")).await.status(),
        StatusCode::ACCEPTED
    );
    let v: Value = r
        .get(&format!("/v2/a/referrers/{d}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["manifests"], json!([]));
}

// ------------------------------------------------------------------------------ management

#[tokio::test]
async fn delete_manifest_by_digest_is_202_then_404_and_drops_its_tags() {
    let r = start().await;
    let (_, d) = r.push_image("a", "v", b"l").await;
    assert_eq!(
        r.delete(&format!("/v2/a/manifests/{d}")).await.status(),
        StatusCode::ACCEPTED
    );
    assert_error(
        r.get(&format!("/v2/a/manifests/{d}")).await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
    assert_error(
        r.get("/v2/a/manifests/v").await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
    let v: Value = r.get("/v2/a/tags/list").await.json().await.unwrap();
    assert_eq!(v["tags"], json!([]));
}

#[tokio::test]
async fn delete_tag_removes_only_the_tag() {
    let r = start().await;
    let (_, d) = r.push_image("a", "v", b"l").await;
    assert_eq!(
        r.delete("/v2/a/manifests/v").await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        r.get("/v2/a/manifests/v").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        r.get(&format!("/v2/a/manifests/{d}")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn delete_unknown_manifest_is_404_manifest_unknown() {
    let r = start().await;
    assert_error(
        r.delete("/v2/a/manifests/nope").await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
    let d = Digest::sha256_of(b"x");
    assert_error(
        r.delete(&format!("/v2/a/manifests/{d}")).await,
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn delete_blob_is_202_then_404() {
    let r = start().await;
    let d = r.push_blob("a", b"bye").await;
    assert_eq!(
        r.delete(&format!("/v2/a/blobs/{d}")).await.status(),
        StatusCode::ACCEPTED
    );
    assert_error(
        r.get(&format!("/v2/a/blobs/{d}")).await,
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    )
    .await;
    assert_error(
        r.delete(&format!("/v2/a/blobs/{d}")).await,
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn unsupported_method_is_405() {
    let r = start().await;
    let resp = r.c.post(r.u("/v2/a/manifests/v1")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
}
