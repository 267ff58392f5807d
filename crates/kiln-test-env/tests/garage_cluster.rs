//! The Garage test cluster works as the s3 tests need: three nodes with replication factor 3,
//! a bucket the key owns, objects written through one node read through another, and reads
//! and writes still answered with one node stopped. Requests are signed by curl
//! (`--aws-sigv4`), a client independent of kiln.

use std::process::Command;

use kiln_test_env::garage::GarageCluster;

fn curl(cluster: &GarageCluster, endpoint: &str, args: &[&str], url_path: &str) -> (u16, String) {
    let (id, secret) = cluster.key();
    let out = Command::new(kiln_test_env::require_program("curl"))
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}"])
        // Garage wants the payload hash header, which curl then signs.
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg("--aws-sigv4")
        .arg(format!("aws:amz:{}:s3", cluster.region()))
        .arg("--user")
        .arg(format!("{id}:{secret}"))
        .args(args)
        .arg(format!("{endpoint}{url_path}"))
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("http status"), body.to_string())
}

#[test]
fn three_nodes_replicate_and_survive_a_stopped_node() {
    kiln_test_env::require_program("curl");
    let mut cluster = GarageCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    cluster
        .create_bucket("kiln-test")
        .unwrap_or_else(|e| panic!("{e}"));
    let body = std::env::temp_dir().join(format!("kiln-garage-body-{}", std::process::id()));
    std::fs::write(&body, b"hello from node 0").unwrap();
    let upload = format!("@{}", body.display());
    let (code, text) = curl(
        &cluster,
        &cluster.endpoint_of(0),
        &["-X", "PUT", "--data-binary", &upload],
        "/kiln-test/a/object",
    );
    assert_eq!(code, 200, "PUT through node 0: {text}");
    let (code, text) = curl(
        &cluster,
        &cluster.endpoint_of(1),
        &[],
        "/kiln-test/a/object",
    );
    assert_eq!(code, 200, "GET through node 1: {text}");
    assert_eq!(text, "hello from node 0");

    // Replication 3, quorum 2: with node 2 gone both reads and writes still succeed.
    cluster.stop_node(2);
    assert!(!cluster.is_running(2));
    let (code, text) = curl(
        &cluster,
        &cluster.endpoint_of(1),
        &[],
        "/kiln-test/a/object",
    );
    assert_eq!(code, 200, "GET with node 2 stopped: {text}");
    assert_eq!(text, "hello from node 0");
    let (code, text) = curl(
        &cluster,
        &cluster.endpoint_of(0),
        &["-X", "PUT", "--data-binary", &upload],
        "/kiln-test/b/object",
    );
    assert_eq!(code, 200, "PUT with node 2 stopped: {text}");
    let (code, text) = curl(&cluster, &cluster.endpoint_of(0), &[], "/kiln-test/missing");
    assert_eq!(code, 404, "a missing key is a 404: {text}");

    cluster.restart_node(2).unwrap_or_else(|e| panic!("{e}"));
    assert!(cluster.is_running(2));
    let (code, text) = curl(
        &cluster,
        &cluster.endpoint_of(2),
        &[],
        "/kiln-test/b/object",
    );
    assert_eq!(code, 200, "GET through the restarted node: {text}");
    assert_eq!(text, "hello from node 0");
    let _ = std::fs::remove_file(&body);
}
