//! Crash safety: the registry runs in a child process (this test binary re-executed), is
//! SIGKILLed in the middle of a large upload and of tag writes, and restarted; everything
//! committed before is intact and no partial blob is ever served. Also: SIGTERM lets an
//! in-flight upload finish.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use kiln_oci::Digest;
use reqwest::StatusCode;

const CHILD_ENV: &str = "KILN_REGISTRY_TEST_CHILD_ROOT";

/// Not a test of its own: the body of the child process the other tests start.
#[test]
fn child_registry_process() {
    let Some(root) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let root = PathBuf::from(root);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reg = kiln_registry::Registry::builder()
            .root(&root)
            .bind("127.0.0.1:0")
            .start()
            .await
            .unwrap();
        let addr_file = root.with_extension("addr");
        std::fs::write(addr_file.with_extension("tmp"), reg.url()).unwrap();
        std::fs::rename(addr_file.with_extension("tmp"), &addr_file).unwrap();
        reg.serve_until_signal().await.unwrap();
    });
    std::process::exit(0);
}

struct ChildRegistry {
    child: Child,
    url: String,
}

impl Drop for ChildRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_child(root: &Path) -> ChildRegistry {
    let addr_file = root.with_extension("addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_registry_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if let Ok(url) = std::fs::read_to_string(&addr_file) {
            return ChildRegistry { child, url };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("child registry did not start");
}

fn sigkill(c: &mut ChildRegistry) {
    c.child.kill().unwrap(); // SIGKILL
    c.child.wait().unwrap();
}

/// Every file in the blob store hashes to its name: nothing partial is visible.
fn assert_blob_store_consistent(root: &Path) {
    for alg in ["sha256", "sha512"] {
        let Ok(prefixes) = std::fs::read_dir(root.join("blobs").join(alg)) else {
            continue;
        };
        for p in prefixes.flatten() {
            for f in std::fs::read_dir(p.path()).unwrap().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with(".tmp-") {
                    continue; // never read by the server
                }
                let d: Digest = format!("{alg}:{name}")
                    .parse()
                    .expect("blob file named by digest");
                let data = std::fs::read(f.path()).unwrap();
                assert_eq!(
                    Digest::of(d.algorithm(), &data),
                    d,
                    "blob {d} content matches its name"
                );
            }
        }
    }
}

async fn push_blob_to(c: &reqwest::Client, url: &str, repo: &str, data: Vec<u8>) -> Digest {
    let d = Digest::sha256_of(&data);
    let r = c
        .post(format!("{url}/v2/{repo}/blobs/uploads/?digest={d}"))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    d
}

async fn push_image_to(
    c: &reqwest::Client,
    url: &str,
    repo: &str,
    tag: &str,
    layer: Vec<u8>,
) -> (Vec<u8>, Digest) {
    let config = format!("{{\"layer\":{}}}", layer.len()).into_bytes();
    let cl = config.len();
    let cd = push_blob_to(c, url, repo, config).await;
    let ll = layer.len();
    let ld = push_blob_to(c, url, repo, layer).await;
    let m = image_manifest(&cd, cl, &[(ld, ll)], None);
    let r = c
        .put(format!("{url}/v2/{repo}/manifests/{tag}"))
        .header("Content-Type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let d = Digest::sha256_of(&m);
    (m, d)
}

/// A request body that sends `total` bytes slowly enough to be interrupted.
fn slow_body(total: usize, chunk: usize) -> reqwest::Body {
    let stream = futures::stream::unfold(0usize, move |sent| async move {
        if sent >= total {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = chunk.min(total - sent);
        Some((Ok::<_, std::io::Error>(vec![0xab; n]), sent + n))
    });
    reqwest::Body::wrap_stream(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_large_upload_keeps_earlier_content_and_serves_no_partial_blob() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("reg");
    let c = client();
    let mut reg = spawn_child(&root);
    let (m1, d1) = push_image_to(&c, &reg.url, "app", "v1", vec![1u8; 300_000]).await;

    // A monolithic upload and a chunked upload, both cut off by SIGKILL mid-stream.
    let total = 64 << 20;
    let big = Digest::sha256_of(&vec![0xab; total]);
    let (url, c2, big2) = (reg.url.clone(), c.clone(), big.clone());
    let mono = tokio::spawn(async move {
        let big = big2;
        c2.post(format!("{url}/v2/app/blobs/uploads/?digest={big}"))
            .body(slow_body(total, 256 << 10))
            .send()
            .await
    });
    let loc = header(
        &c.post(format!("{}/v2/app/blobs/uploads/", reg.url))
            .send()
            .await
            .unwrap(),
        "Location",
    );
    let (url, c3, l2) = (reg.url.clone(), c.clone(), loc.clone());
    let chunked = tokio::spawn(async move {
        c3.patch(format!("{url}{l2}"))
            .body(slow_body(total, 256 << 10))
            .send()
            .await
    });
    // Wait until both uploads have staged real data, then kill.
    for _ in 0..400 {
        let staged: u64 = std::fs::read_dir(root.join("uploads"))
            .unwrap()
            .flatten()
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        if staged > 4 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    sigkill(&mut reg);
    let _ = mono.await;
    let _ = chunked.await;

    let reg = spawn_child(&root);
    let got = c
        .get(format!("{}/v2/app/manifests/v1", reg.url))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&got, "Docker-Content-Digest"), d1.to_string());
    assert_eq!(got.bytes().await.unwrap().as_ref(), &m1[..]);
    let head = c
        .head(format!("{}/v2/app/blobs/{big}", reg.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.status(),
        StatusCode::NOT_FOUND,
        "the interrupted blob is not served"
    );
    assert_blob_store_consistent(&root);
    // The interrupted chunked upload resumes from what reached the disk.
    let status = c.get(format!("{}{loc}", reg.url)).send().await.unwrap();
    assert_eq!(status.status(), StatusCode::NO_CONTENT);
    let range = header(&status, "Range");
    let have: usize = range.split('-').nth(1).unwrap().parse::<usize>().unwrap() + 1;
    assert!(have > 0 && have < total, "partial upload kept: {range}");
    let rest = vec![0xab; total - have];
    let resp = c
        .put(format!("{}{loc}?digest={big}", reg.url))
        .header("Content-Range", format!("{}-{}", have, total - 1))
        .body(rest)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::CREATED,
        "resumed upload completes with the right digest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_tag_writes_leaves_every_tag_on_a_complete_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("reg");
    let c = client();
    let mut reg = spawn_child(&root);
    let (_, stable) = push_image_to(&c, &reg.url, "app", "stable", vec![9u8; 1000]).await;
    // Manifests the writers flip tags between.
    let mut candidates = Vec::new();
    for i in 0..4u8 {
        candidates.push(push_image_to(&c, &reg.url, "app", &format!("c{i}"), vec![i; 5000]).await);
    }
    let candidates = std::sync::Arc::new(candidates);
    let mut writers = Vec::new();
    for w in 0..8usize {
        let (c, url, cands) = (c.clone(), reg.url.clone(), candidates.clone());
        writers.push(tokio::spawn(async move {
            let mut i = w;
            loop {
                let (m, _) = &cands[i % cands.len()];
                let tag = format!("hot{}", i % 3);
                let r = c
                    .put(format!("{url}/v2/app/manifests/{tag}"))
                    .header("Content-Type", OCI_MANIFEST)
                    .body(m.clone())
                    .send()
                    .await;
                if r.is_err() {
                    return;
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    sigkill(&mut reg);
    for w in writers {
        let _ = w.await;
    }

    let reg = spawn_child(&root);
    let head = c
        .head(format!("{}/v2/app/manifests/stable", reg.url))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&head, "Docker-Content-Digest"), stable.to_string());
    let tags: serde_json::Value = c
        .get(format!("{}/v2/app/tags/list", reg.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for t in tags["tags"].as_array().unwrap() {
        let t = t.as_str().unwrap();
        assert!(
            ["stable", "c0", "c1", "c2", "c3", "hot0", "hot1", "hot2"].contains(&t),
            "unexpected tag {t} (a temporary file must never look like a tag)"
        );
        let resp = c
            .get(format!("{}/v2/app/manifests/{t}", reg.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "tag {t} resolves");
        let d = header(&resp, "Docker-Content-Digest");
        let body = resp.bytes().await.unwrap();
        assert_eq!(
            Digest::sha256_of(&body).to_string(),
            d,
            "tag {t} serves complete bytes"
        );
        assert!(candidates.iter().any(|(_, cd)| cd.to_string() == d) || d == stable.to_string());
    }
    assert_blob_store_consistent(&root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_upload_finish_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("reg");
    let c = client();
    let mut reg = spawn_child(&root);
    let total = 2 << 20;
    let d = Digest::sha256_of(&vec![0xab; total]);
    let (url, c2, d2) = (reg.url.clone(), c.clone(), d.clone());
    let upload = tokio::spawn(async move {
        let d = d2;
        c2.post(format!("{url}/v2/app/blobs/uploads/?digest={d}"))
            .body(slow_body(total, 64 << 10))
            .send()
            .await
    });
    for _ in 0..400 {
        let staged: u64 = std::fs::read_dir(root.join("uploads"))
            .unwrap()
            .flatten()
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        if staged > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(reg.child.id() as i32, libc::SIGTERM) };
    let resp = upload.await.unwrap().expect("in-flight upload completes");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let mut status = None;
    for _ in 0..600 {
        status = reg.child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("registry exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(root
        .join("blobs/sha256")
        .join(&d.hex()[..2])
        .join(d.hex())
        .exists());
}
