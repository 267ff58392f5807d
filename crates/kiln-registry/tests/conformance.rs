//! Walks every endpoint and error case of the OCI distribution spec v1.1 (pull, push,
//! content discovery, content management, referrers) against an in-process registry, once
//! per storage driver: the filesystem driver (`fs::`) and an in-memory driver defined in
//! `drivers/memory.rs` (`memory::`), which shows a driver needs nothing beyond the
//! `Storage` trait. The suite itself is `suites/http_conformance.rs`.

mod common;
#[path = "drivers/memory.rs"]
mod memory_storage;

use common::*;
use kiln_oci::Digest;
use reqwest::StatusCode;

/// The suite on the filesystem driver, as `kiln registry serve --root` runs it.
mod fs {
    include!("suites/http_conformance.rs");
}

/// The suite on the in-memory driver of the tests.
mod memory {
    /// A registry serving from a fresh in-memory storage.
    async fn start() -> Reg {
        let store = std::sync::Arc::new(super::memory_storage::MemoryStorage::default());
        start_with(|b| b.storage(store)).await
    }

    include!("suites/http_conformance.rs");
}

// ------------------------------------------------------------------------------ restart

#[tokio::test]
async fn restart_serves_everything_committed() {
    let mut r = start().await;
    let (m, _) = r.push_image("keep/me", "v1", b"persist").await;
    let loc = header(
        &r.c.post(r.u("/v2/keep/me/blobs/uploads/"))
            .send()
            .await
            .unwrap(),
        "Location",
    );
    r.c.patch(r.u(&loc)).body("half-").send().await.unwrap();
    r.stop().await;
    let reg = kiln_registry::Registry::builder()
        .root(r.root())
        .bind("127.0.0.1:0")
        .start()
        .await
        .unwrap();
    let url = reg.url();
    let c = client();
    let got = c
        .get(format!("{url}/v2/keep/me/manifests/v1"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.as_ref(), &m[..]);
    // The open upload survives the restart; the hash state is rebuilt from the staged data.
    let resp = c
        .patch(format!("{url}{loc}"))
        .body("done")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let d = Digest::sha256_of(b"half-done");
    let resp = c
        .put(format!("{url}{loc}?digest={d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    reg.shutdown().await;
}
