//! Three `kiln registry serve` processes on one bucket of a 3-node Garage cluster
//! (replication factor 3), each talking to a different Garage node. At once: skopeo copies
//! from A to B, podman pulls from B and pushes to A, `kiln build` pulls its base from B,
//! pushes to B and exports its cache to A, and a large layer is pushed through C, which is
//! killed once the layer's multipart upload is under way. Afterwards every
//! image is whole through every surviving process (skopeo copies check every digest), the
//! cache exported through one process gives a new runner every step as a hit through
//! another, and a GC run from a fourth process leaves all of it intact.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{podman_conf, require_program, require_root, Fixture};
use kiln_test_env::garage::GarageCluster;

const BUCKET: &str = "kiln-fleet";
const STORAGE: &str = "s3://kiln-fleet/registry";

/// One `kiln registry serve --storage s3://...` process.
struct FleetRegistry {
    addr: String,
    child: Child,
}

impl Drop for FleetRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The AWS variables that point kiln at the cluster's key.
fn aws_env(cluster: &GarageCluster) -> Vec<(&'static str, String)> {
    let (key, secret) = cluster.key();
    vec![
        ("AWS_ACCESS_KEY_ID", key),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_REGION", cluster.region().to_owned()),
    ]
}

impl FleetRegistry {
    /// Serves the shared bucket through Garage node `node`.
    fn start(cluster: &GarageCluster, node: usize) -> FleetRegistry {
        let state = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(state.path())
            .args([
                "registry",
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--storage",
                STORAGE,
            ])
            .args(["--s3-endpoint", &cluster.endpoint_of(node)])
            .envs(aws_env(cluster))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("kiln registry exited before listening")
                .unwrap();
            if let Some(a) = line.split("listening on http://").nth(1) {
                break a.trim().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        FleetRegistry { addr, child }
    }
}

fn run(what: &str, mut cmd: impl std::borrow::BorrowMut<Command>) -> String {
    let out = cmd
        .borrow_mut()
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn skopeo(args: &[&str]) -> Command {
    let mut c = Command::new("skopeo");
    c.args(args);
    c
}

/// The manifest digest of `image` as the registry serves it.
fn manifest_digest(image: &str) -> String {
    let raw = run(
        &format!("skopeo inspect --raw {image}"),
        skopeo(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ]),
    );
    kiln_oci::Digest::sha256_of(raw.as_bytes()).to_string()
}

/// Copies `image` out of the registry into an OCI layout (skopeo checks every blob's digest
/// as it reads it) and returns the manifest digest served.
fn pull_whole(image: &str, into: &Path) -> String {
    let dest = into.join(image.replace(['/', ':'], "_"));
    run(
        &format!("skopeo copy {image}"),
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &format!("oci:{}", dest.display()),
        ]),
    );
    manifest_digest(image)
}

/// A `dir:` image for skopeo with one uncompressed layer of `mib` MiB of random bytes.
fn big_image(dir: &Path, mib: usize) -> PathBuf {
    let files = dir.join("big-files");
    std::fs::create_dir_all(&files).unwrap();
    let mut data = vec![0u8; mib << 20];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut data)
        .unwrap();
    std::fs::write(files.join("random.bin"), &data).unwrap();
    let image = dir.join("big-image");
    std::fs::create_dir_all(&image).unwrap();
    let layer = dir.join("layer.tar");
    run(
        "tar",
        Command::new("tar")
            .arg("-cf")
            .arg(&layer)
            .arg("-C")
            .arg(&files)
            .arg("random.bin"),
    );
    let layer_bytes = std::fs::read(&layer).unwrap();
    let ld = kiln_oci::Digest::sha256_of(&layer_bytes);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{ld}"]}}}}"#
    );
    let cd = kiln_oci::Digest::sha256_of(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{}}}]}}"#,
        config.len(),
        layer_bytes.len()
    );
    std::fs::write(image.join(ld.hex()), &layer_bytes).unwrap();
    std::fs::write(image.join(cd.hex()), &config).unwrap();
    std::fs::write(image.join("manifest.json"), &manifest).unwrap();
    std::fs::write(image.join("version"), "Directory Transport Version: 1.1\n").unwrap();
    image
}

/// Whether an upload of the shared bucket has begun its multipart upload (a part of a
/// large blob is being sent).
fn multipart_upload_in_flight(client: &kiln_s3::S3Client, rt: &tokio::runtime::Runtime) -> bool {
    rt.block_on(async {
        let Ok(objects) = client.list("uploads/").await else {
            return false;
        };
        for o in objects.iter().filter(|o| o.key.ends_with("/state")) {
            if let Ok(Some(state)) = client.get(&o.key).await {
                let state: serde_json::Value = serde_json::from_slice(&state).unwrap_or_default();
                if state["multipart"].is_string() {
                    return true;
                }
            }
        }
        false
    })
}

/// The small build every runner does: a base, a step that writes files, a push, and the
/// cache exported and imported through the registry fleet.
fn write_build_context(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "ARG BASE\nFROM $BASE\nRUN echo fleet > /fleet.txt && dd if=/dev/urandom of=/rand bs=1024 count=2048 2>/dev/null\nCOPY note.txt /note.txt\n",
    )
    .unwrap();
    std::fs::write(dir.join("note.txt"), "built by a runner of the fleet\n").unwrap();
}

fn fleet_build(
    f: &Fixture,
    runner: &str,
    ctx: &Path,
    base: &str,
    image: &str,
    cache_out: Option<&str>,
    cache_in: &str,
) -> common::Build {
    let meta = f.path(&format!("{runner}.json"));
    let d = ctx.display();
    let mut args: Vec<String> = vec![
        "--root".into(),
        f.path(runner).display().to_string(),
        "build".into(),
        "--frontend".into(),
        "dockerfile.v0".into(),
        "--local".into(),
        format!("context={d}"),
        "--local".into(),
        format!("dockerfile={d}"),
        "--opt".into(),
        format!("build-arg:BASE={base}"),
        "--metadata-file".into(),
        meta.display().to_string(),
        "--progress".into(),
        "rawjson".into(),
        "--output".into(),
        format!("type=image,name={image},push=true"),
        "--import-cache".into(),
        format!("type=registry,ref={cache_in}"),
    ];
    if let Some(c) = cache_out {
        args.extend([
            "--export-cache".into(),
            format!("type=registry,ref={c},mode=max"),
        ]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .output()
        .unwrap();
    common::Build::from(out, &meta)
}

#[test]
fn three_registries_on_one_bucket_survive_concurrent_pushes_and_a_killed_process() {
    require_root("kiln build runs RUN steps in containers");
    require_program("skopeo");
    let podman = podman_conf();
    let cluster = GarageCluster::start(3).unwrap_or_else(|e| panic!("Garage cluster: {e}"));
    cluster.create_bucket(BUCKET).unwrap();
    let regs: Vec<FleetRegistry> = (0..3).map(|i| FleetRegistry::start(&cluster, i)).collect();
    let [a, b, c] = [&regs[0].addr, &regs[1].addr, &regs[2].addr].map(|s| s.clone());
    let f = Fixture::new();
    let pulls = tempfile::tempdir().unwrap();

    // The base goes in through registry A.
    let base_ctx = f.path("base-ctx");
    std::fs::create_dir_all(&base_ctx).unwrap();
    std::fs::write(base_ctx.join("Dockerfile"), "FROM busybox:latest\n").unwrap();
    let base = format!("{a}/base/busybox:1");
    let out = f.kiln(&[
        "build",
        base_ctx.to_str().unwrap(),
        "--progress",
        "quiet",
        "-o",
        &format!("type=image,name={base},push=true"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ctx = f.path("fleet-ctx");
    write_build_context(&ctx);
    let big = big_image(f.tmp.path(), 64);
    let cache_via_a = format!("{a}/cache/fleet:buildcache");

    // Everything at once, through every process.
    let (built, killed_mid_upload) = std::thread::scope(|s| {
        let copies = s.spawn(|| {
            for i in 0..3 {
                run(
                    "skopeo copy A -> B",
                    skopeo(&[
                        "copy",
                        "--src-tls-verify=false",
                        "--dest-tls-verify=false",
                        &format!("docker://{base}"),
                        &format!("docker://{b}/copies/sk{i}:1"),
                    ]),
                );
            }
        });
        let podman_push = s.spawn(|| {
            let env = [("CONTAINERS_CONF", &podman)];
            run(
                "podman pull via B",
                Command::new("podman")
                    .args(["pull", "--tls-verify=false", &format!("{b}/base/busybox:1")])
                    .envs(env),
            );
            run(
                "podman push via A",
                Command::new("podman")
                    .args([
                        "push",
                        "--tls-verify=false",
                        &format!("{b}/base/busybox:1"),
                        &format!("docker://{a}/podman/busybox:1"),
                    ])
                    .envs(env),
            );
            let _ = Command::new("podman")
                .args(["rmi", "-f", &format!("{b}/base/busybox:1")])
                .envs(env)
                .output();
        });
        let build = s.spawn(|| {
            fleet_build(
                &f,
                "runner1",
                &ctx,
                &format!("{b}/base/busybox:1"),
                &format!("{b}/built/fleet:1"),
                Some(&cache_via_a),
                &cache_via_a,
            )
        });
        // The large layer goes through C, which is killed once its multipart upload runs.
        let big_push = s.spawn(|| {
            let mut push = skopeo(&[
                "copy",
                "--dest-tls-verify=false",
                &format!("dir:{}", big.display()),
                &format!("docker://{c}/big/random:1"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
            let (key, secret) = cluster.key();
            let client = kiln_s3::S3Client::new(kiln_s3::S3Config {
                endpoint: cluster.endpoint_of(0).parse().unwrap(),
                region: cluster.region().to_owned(),
                bucket: BUCKET.into(),
                path_style: true,
                credentials: kiln_s3::Credentials {
                    key,
                    secret,
                    session_token: None,
                },
                prefix: "registry/".into(),
            })
            .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut seen = false;
            while Instant::now() < deadline && push.try_wait().unwrap().is_none() {
                if multipart_upload_in_flight(&client, &rt) {
                    seen = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: a signal to a child this test started and has not reaped.
            unsafe { libc::kill(regs[2].child.id() as libc::pid_t, libc::SIGKILL) };
            let status = push.wait().unwrap();
            eprintln!("push through the killed registry exited with {status}");
            seen
        });
        copies.join().unwrap();
        podman_push.join().unwrap();
        let built = build.join().unwrap();
        (built, big_push.join().unwrap())
    });
    assert!(
        built.out.status.success(),
        "kiln build --push: {}",
        built.stderr()
    );
    assert!(
        killed_mid_upload,
        "registry C was killed before its large upload began a multipart upload"
    );

    // The killed push, done again through B (skopeo compresses the layer on the way, so the
    // digest to expect is the one it reports).
    let digest_file = f.path("big.digest");
    run(
        "skopeo copy of the large image via B",
        skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            "--digestfile",
            digest_file.to_str().unwrap(),
            &format!("dir:{}", big.display()),
            &format!("docker://{b}/big/random:1"),
        ]),
    );
    let big_digest = std::fs::read_to_string(&digest_file)
        .unwrap()
        .trim()
        .to_owned();

    // A new runner, through B: the cache A took gives every step as a hit, the same image.
    let warm = fleet_build(
        &f,
        "runner2",
        &ctx,
        &format!("{b}/base/busybox:1"),
        &format!("{b}/built/fleet:2"),
        None,
        &format!("{b}/cache/fleet:buildcache"),
    );
    assert!(warm.out.status.success(), "{}", warm.stderr());
    assert!(warm.ran().is_empty(), "ran {:?}", warm.ran());
    assert_eq!(warm.digest(), built.digest(), "the same image");

    // Every image, whole, through both surviving processes.
    let check_all = |when: &str| {
        for reg in [&a, &b] {
            let want = [
                (format!("{reg}/base/busybox:1"), None),
                (format!("{reg}/copies/sk0:1"), None),
                (format!("{reg}/copies/sk2:1"), None),
                (format!("{reg}/podman/busybox:1"), None),
                (format!("{reg}/built/fleet:1"), Some(built.digest())),
                (format!("{reg}/built/fleet:2"), Some(built.digest())),
                (format!("{reg}/big/random:1"), Some(big_digest.clone())),
            ];
            for (image, digest) in want {
                let got = pull_whole(&image, pulls.path());
                if let Some(d) = digest {
                    assert_eq!(got, d, "{image} {when}");
                }
            }
        }
        // skopeo and podman copies of the base are the base itself, wherever they were pushed.
        assert_eq!(
            manifest_digest(&format!("{a}/copies/sk1:1")),
            manifest_digest(&format!("{b}/base/busybox:1"))
        );
    };
    check_all("after the kill");

    // GC from another process while A and B still serve: nothing reachable goes.
    let gc = run(
        "kiln registry gc",
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(f.path("gc-state"))
            .args(["registry", "gc", "--storage", STORAGE, "--grace", "0s"])
            .args(["--s3-endpoint", &cluster.endpoint_of(1)])
            .envs(aws_env(&cluster)),
    );
    assert!(gc.contains("deleted"), "{gc}");
    check_all("after GC");
}

#[test]
fn s3_flags_without_s3_storage_and_missing_credentials_are_clear_errors() {
    let home = tempfile::tempdir().unwrap();
    let serve = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--root")
            .arg(home.path().join("state"))
            .args(["registry", "serve", "--addr", "127.0.0.1:0"])
            .args(args)
            .env("HOME", home.path())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap()
    };
    let out = serve(&["--s3-endpoint", "http://127.0.0.1:1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--s3-endpoint needs --storage s3://BUCKET/PREFIX"),
        "{err}"
    );

    let out = serve(&["--storage", "s3://Bad_Bucket/x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--storage") && err.contains("Bad_Bucket"),
        "{err}"
    );

    let out = serve(&["--storage", "s3://kiln-bucket/reg"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("s3://kiln-bucket/reg") && err.contains("AWS_ACCESS_KEY_ID"),
        "{err}"
    );
}
