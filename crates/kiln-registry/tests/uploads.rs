//! Upload sessions under hostile clients: made-up upload ids must not touch the server's
//! per-upload hash state, and open sessions are bounded (429 past the bound).

mod common;

use std::time::Duration;

use common::{assert_error, header, staged_uploads, Reg};
use kiln_oci::Digest;
use reqwest::StatusCode;

/// Reads one sample from `/metrics`; a missing metric fails the test.
async fn metric(reg: &Reg, name: &str) -> u64 {
    let text = reg
        .get("/metrics")
        .await
        .text()
        .await
        .expect("metrics body");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"));
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric line {line:?} has no integer value"))
}

/// Starts an upload session in `repo`; returns the response.
async fn post(reg: &Reg, repo: &str) -> reqwest::Response {
    reg.c
        .post(reg.u(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .expect("request")
}

/// Starts an upload session in `repo`, asserting 202; returns its Location path.
async fn open_upload(reg: &Reg, repo: &str) -> String {
    let r = post(reg, repo).await;
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "{}",
        r.text().await.unwrap_or_default()
    );
    header(&r, "location")
}

/// Sends one chunk to an upload at `loc` starting at `start`, asserting 202.
async fn patch(reg: &Reg, loc: &str, start: usize, chunk: &[u8]) {
    let r = reg
        .c
        .patch(reg.u(loc))
        .header("Content-Type", "application/octet-stream")
        .header(
            "Content-Range",
            format!("{start}-{}", start + chunk.len() - 1),
        )
        .body(chunk.to_vec())
        .send()
        .await
        .expect("request");
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "{}",
        r.text().await.unwrap_or_default()
    );
}

/// Finishes the upload at `loc` as `d`, asserting 201.
async fn finish(reg: &Reg, loc: &str, d: &Digest) {
    let r = reg
        .c
        .put(reg.u(&format!("{loc}?digest={d}")))
        .send()
        .await
        .expect("request");
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap_or_default()
    );
}

#[tokio::test]
async fn made_up_upload_ids_leave_hash_state_alone() {
    // A small bound keeps the hash-state map small too: had made-up ids been given
    // entries, they would push the real upload's state out and force a re-hash.
    let reg = common::start_with(|b| b.upload_limits(4, 4)).await;
    let (a, b) = (vec![7u8; 100_000], vec![9u8; 50_000]);
    let loc = open_upload(&reg, "alice/app").await;
    patch(&reg, &loc, 0, &a).await;
    assert_eq!(metric(&reg, "kiln_registry_upload_hash_states").await, 1);

    // Well-formed ids that name no upload, a malformed one, and the real id under another
    // repository: every request is refused and none leaves state behind.
    let real_id = loc.rsplit('/').next().expect("id in location").to_owned();
    let mut targets: Vec<String> = (0..200u32)
        .map(|i| format!("/v2/alice/app/blobs/uploads/{:032x}", 0xdead_0000 + i))
        .collect();
    targets.push("/v2/alice/app/blobs/uploads/not-an-id".into());
    targets.push(format!("/v2/mallory/app/blobs/uploads/{real_id}"));
    let d = Digest::sha256_of(b"x");
    for t in &targets {
        let r = reg
            .c
            .patch(reg.u(t))
            .body(b"x".to_vec())
            .send()
            .await
            .expect("request");
        assert_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
        let r = reg
            .c
            .put(reg.u(&format!("{t}?digest={d}")))
            .body(b"x".to_vec())
            .send()
            .await
            .expect("request");
        assert_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    }
    assert_eq!(
        metric(&reg, "kiln_registry_upload_hash_states").await,
        1,
        "requests for made-up uploads created hash state"
    );
    for t in &targets {
        let r = reg.delete(t).await;
        assert_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    }
    assert_eq!(metric(&reg, "kiln_registry_upload_hash_states").await, 1);

    // The real upload continues on its streaming hash: nothing is re-hashed from disk.
    patch(&reg, &loc, a.len(), &b).await;
    let whole = [a.as_slice(), b.as_slice()].concat();
    let d = Digest::sha256_of(&whole);
    finish(&reg, &loc, &d).await;
    assert_eq!(metric(&reg, "kiln_registry_upload_rehashes_total").await, 0);
    assert_eq!(metric(&reg, "kiln_registry_upload_hash_states").await, 0);
    let got = reg
        .get(&format!("/v2/alice/app/blobs/{d}"))
        .await
        .bytes()
        .await
        .expect("blob body");
    assert_eq!(got.as_ref(), whole.as_slice());
}

#[tokio::test]
async fn open_uploads_are_bounded_per_repository_and_in_total() {
    let reg = common::start_with(|b| {
        b.upload_limits(5, 3)
            .empty_upload_max_age(Duration::from_secs(3600))
    })
    .await;
    let mut r1 = Vec::new();
    for _ in 0..3 {
        r1.push(open_upload(&reg, "r1").await);
    }
    assert_error(
        post(&reg, "r1").await,
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
    )
    .await;
    let mut r2 = Vec::new();
    for _ in 0..2 {
        r2.push(open_upload(&reg, "r2").await);
    }
    // Five open in total: a third repository is refused too.
    assert_error(
        post(&reg, "r3").await,
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
    )
    .await;
    assert_eq!(
        staged_uploads(&reg.root()),
        5,
        "refused starts staged nothing"
    );

    // Cancelling frees a slot.
    let r = reg.delete(&r2.pop().expect("r2 upload")).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r3 = open_upload(&reg, "r3").await;
    assert_error(
        post(&reg, "r3").await,
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
    )
    .await;

    // Completing frees a slot.
    let data = b"layer bytes".to_vec();
    let loc = r1.pop().expect("r1 upload");
    patch(&reg, &loc, 0, &data).await;
    finish(&reg, &loc, &Digest::sha256_of(&data)).await;
    r1.push(open_upload(&reg, "r1").await);
    assert_error(
        post(&reg, "r1").await,
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
    )
    .await;

    // A normal push still works at the bound (monolithic blobs hold no session) and, once
    // a session is freed, through a chunked upload too.
    reg.push_image("r4", "v1", b"monolithic layer").await;
    let r = reg.delete(&r3).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let loc = open_upload(&reg, "r4").await;
    let big = vec![3u8; 300_000];
    patch(&reg, &loc, 0, &big[..200_000]).await;
    patch(&reg, &loc, 200_000, &big[200_000..]).await;
    let d = Digest::sha256_of(&big);
    finish(&reg, &loc, &d).await;
    let r = reg.head(&format!("/v2/r4/blobs/{d}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(staged_uploads(&reg.root()), 4);
}

#[tokio::test]
async fn abandoned_empty_uploads_are_reclaimed_at_the_bound() {
    // Age 0: every upload still holding no data counts as abandoned.
    let reg =
        common::start_with(|b| b.upload_limits(0, 2).empty_upload_max_age(Duration::ZERO)).await;
    let used = open_upload(&reg, "r").await;
    let data = vec![5u8; 1000];
    patch(&reg, &used, 0, &data).await;
    let empty = open_upload(&reg, "r").await;

    // At the bound, the empty one is reclaimed to make room; the one with data stays.
    let third = open_upload(&reg, "r").await;
    assert_error(
        reg.get(&empty).await,
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
    let r = reg.get(&used).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "range"), "0-999");

    // Two uploads with data: nothing to reclaim, so the bound holds.
    patch(&reg, &third, 0, &data).await;
    assert_error(
        post(&reg, "r").await,
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
    )
    .await;
    finish(&reg, &used, &Digest::sha256_of(&data)).await;
    open_upload(&reg, "r").await;
}

#[tokio::test]
async fn an_empty_upload_being_written_is_not_reclaimed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let reg =
        common::start_with(|b| b.upload_limits(0, 1).empty_upload_max_age(Duration::ZERO)).await;
    let loc = open_upload(&reg, "r").await;
    // A slow client: the chunk's head and 3 of its 10 bytes, far less than one write batch,
    // so the staged file is still empty while the request runs.
    let addr = reg.reg.as_ref().expect("running").addr;
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PATCH {loc} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: 10\r\nConnection: close\r\n\r\nabc"
    );
    s.write_all(head.as_bytes()).await.expect("send head");
    // The request holds the upload's hash state once the server is working on it.
    let mut seen = false;
    for _ in 0..500 {
        if metric(&reg, "kiln_registry_upload_hash_states").await == 1 {
            seen = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(seen, "the server never picked up the chunk");
    assert_eq!(staged_uploads(&reg.root()), 1);

    // At the bound, the upload being written is not taken for abandoned.
    assert_error(
        post(&reg, "r").await,
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
    )
    .await;
    s.write_all(b"defghij").await.expect("send rest");
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.expect("response");
    assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
    finish(&reg, &loc, &Digest::sha256_of(b"abcdefghij")).await;
}

#[test]
fn upload_bounds_come_from_the_config_file_with_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("registry.json");
    std::fs::write(&p, "{}").expect("write config");
    let c = kiln_registry::Config::from_file(&p).expect("empty config parses");
    assert!(c.max_open_uploads > 0 && c.max_open_uploads_per_repository > 0);
    assert!(c.max_open_uploads_per_repository <= c.max_open_uploads);
    std::fs::write(
        &p,
        r#"{"max_open_uploads": 7, "max_open_uploads_per_repository": 2,
            "empty_upload_max_age_secs": 30}"#,
    )
    .expect("write config");
    let c = kiln_registry::Config::from_file(&p).expect("config parses");
    assert_eq!(
        (
            c.max_open_uploads,
            c.max_open_uploads_per_repository,
            c.empty_upload_max_age_secs
        ),
        (7, 2, 30)
    );
}
