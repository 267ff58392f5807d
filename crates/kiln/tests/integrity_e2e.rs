//! Store and image integrity end to end (root: real containers): steps that make
//! byte-identical layers, imported cache records that repeat a layer or carry wrong fields,
//! exports killed half-way, and `SOURCE_DATE_EPOCH` on layers an earlier build cached.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    get_json, longest_cache_record, put_manifest, require_root, skopeo_inspect, upload_blob, Build,
    Fixture, TestRegistry,
};
use kiln_oci::Digest;

/// podman with this machine's settings.
fn podman(args: &[&str]) -> Output {
    let conf = common::podman_conf();
    Command::new("podman")
        .args(args)
        .env("CONTAINERS_CONF", &conf)
        .output()
        .unwrap()
}

/// Runs `cat PATHS` in `image` (any podman transport) and returns what it printed.
fn podman_cat(image: &str, paths: &[&str]) -> String {
    let mut cmd = vec!["cat"];
    cmd.extend(paths);
    podman_run(image, &cmd)
}

/// Runs the shell script `script` in `image` and returns what it printed.
fn podman_cat_sh(image: &str, script: &str) -> String {
    podman_run(image, &["sh", "-c", script])
}

/// Runs `cmd` in `image` (any podman transport) and returns what it printed.
fn podman_run(image: &str, cmd: &[&str]) -> String {
    // One podman at a time: tests of this binary run side by side.
    static PODMAN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = PODMAN.lock().unwrap_or_else(|p| p.into_inner());
    let pull = podman(&["pull", "-q", "--tls-verify=false", image]);
    assert!(
        pull.status.success(),
        "podman pull {image}: {}",
        String::from_utf8_lossy(&pull.stderr)
    );
    let id = String::from_utf8_lossy(&pull.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    // No network: the commands only read files, and netavark's setup is one more thing to fail.
    let mut args = vec!["run", "--rm", "--network=none", id.as_str()];
    args.extend(cmd);
    let run = podman(&args);
    let _ = podman(&["rmi", "-f", &id]);
    assert!(
        run.status.success(),
        "podman run {image}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    String::from_utf8_lossy(&run.stdout).into_owned()
}

/// Unpacks an OCI archive and checks every blob the manifest names: present, of the size its
/// descriptor says, hashing to its digest. Returns the layer digests in manifest order.
fn check_oci_archive(tar: &Path) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(tar)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success(), "unpacking {}", tar.display());
    let blob = |digest: &str| -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let bytes = std::fs::read(dir.path().join("blobs/sha256").join(hex))
            .unwrap_or_else(|e| panic!("blob {digest} missing from the archive: {e}"));
        assert_eq!(
            Digest::sha256_of(&bytes).to_string(),
            digest,
            "blob {digest} in the archive holds other bytes ({} of them)",
            bytes.len()
        );
        bytes
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let manifest: serde_json::Value = serde_json::from_slice(&blob(&m)).unwrap();
    let mut layers = Vec::new();
    for d in std::iter::once(&manifest["config"]).chain(manifest["layers"].as_array().unwrap()) {
        let digest = d["digest"].as_str().unwrap();
        let bytes = blob(digest);
        assert_eq!(bytes.len() as u64, d["size"].as_u64().unwrap(), "{digest}");
        if d != &manifest["config"] {
            layers.push(digest.to_owned());
        }
    }
    layers
}

/// The steps a build ran, leaving out the `FROM` steps (a resolved base counts as run).
fn steps_run(b: &Build) -> Vec<String> {
    b.ran()
        .into_iter()
        .filter(|s| !s.contains("] FROM "))
        .collect()
}

/// A build context `name` in the fixture with these files.
fn context(f: &Fixture, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = f.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (n, body) in files {
        std::fs::write(dir.join(n), body).unwrap();
    }
    dir
}

/// `kiln build` of `dir` with extra environment variables; must succeed.
fn build_env(f: &Fixture, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Build {
    let (out, meta) = f.build_dir_raw_env(dir, extra, env);
    Build::from(out, &meta)
}

const TWICE: &str =
    "FROM busybox:latest\nCOPY a.txt /a.txt\nRUN echo between > /b\nCOPY a.txt /a.txt\n";

fn identical_layers_stay_whole(dockerfile: &str) {
    let f = Fixture::new();
    let ctx = context(
        &f,
        "twice",
        &[("a.txt", "hello\n"), ("Dockerfile", dockerfile)],
    );
    let tar = f.path("img.tar");
    f.build_dir(
        &ctx,
        &["--output", &format!("type=oci,dest={}", tar.display())],
    );
    f.assert_store_clean("after exporting an image with a layer listed twice");
    let layers = check_oci_archive(&tar);
    assert_eq!(layers.len(), 4, "{layers:?}");
    assert_eq!(
        layers[1], layers[3],
        "the two COPY steps made the same layer"
    );
    let want = "hello\nbetween\n";
    assert_eq!(
        podman_cat(&format!("oci-archive:{}", tar.display()), &["/a.txt", "/b"]),
        want
    );
    let docker = f.path("img-docker.tar");
    f.build_dir(
        &ctx,
        &[
            "--output",
            &format!("type=docker,dest={}", docker.display()),
        ],
    );
    f.assert_store_clean("after the docker archive");
    assert_eq!(
        podman_cat(
            &format!("docker-archive:{}", docker.display()),
            &["/a.txt", "/b"]
        ),
        want
    );
    for reg in [TestRegistry::kiln(), TestRegistry::distribution()] {
        let image = format!("{}/twice/app:1", reg.addr);
        f.build_dir(
            &ctx,
            &[
                "--output",
                &format!("type=image,name={image},push=true"),
                "--export-cache",
                &format!("type=registry,ref={}/twice/app:cache,mode=max", reg.addr),
            ],
        );
        f.assert_store_clean("after the push and the cache export");
        let pushed = skopeo_inspect(&image, &[]);
        assert_eq!(pushed["Layers"].as_array().unwrap().len(), 4, "{pushed}");
        assert_eq!(
            podman_cat(&format!("docker://{image}"), &["/a.txt", "/b"]),
            want
        );
    }
}

#[test]
fn steps_that_make_identical_layers_keep_store_archives_and_pushes_whole() {
    require_root("steps_that_make_identical_layers...");
    identical_layers_stay_whole(TWICE);
}

#[test]
fn copy_link_steps_that_make_identical_layers_keep_everything_whole() {
    require_root("copy_link_steps...");
    identical_layers_stay_whole(&TWICE.replace("COPY ", "COPY --link "));
}

/// The config and manifest of the cache at `reg`/`repo`:`tag`.
fn cache_of(reg: &TestRegistry, repo: &str, tag: &str) -> (serde_json::Value, serde_json::Value) {
    let manifest = get_json(&format!("http://{}/v2/{repo}/manifests/{tag}", reg.addr));
    let cfg = get_json(&format!(
        "http://{}/v2/{repo}/blobs/{}",
        reg.addr,
        manifest["config"]["digest"].as_str().unwrap()
    ));
    (manifest, cfg)
}

/// Replaces the cache at `reg`/`repo`:`tag` with this manifest and config.
fn put_cache(
    reg: &TestRegistry,
    repo: &str,
    tag: &str,
    mut manifest: serde_json::Value,
    cfg: &serde_json::Value,
) {
    let bytes = serde_json::to_vec(cfg).unwrap();
    let digest = upload_blob(&reg.addr, repo, &bytes);
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = bytes.len().into();
    put_manifest(
        &reg.addr,
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
}

const THREE: &str = "FROM busybox:latest\nCOPY a.txt /a.txt\nRUN echo x > /b\n";

/// A runner exports the cache of [`THREE`] to a fresh kiln registry; returns it and the
/// context (a second runner builds the same context in its own state dir).
fn exported_cache(f: &Fixture) -> (TestRegistry, PathBuf) {
    let reg = TestRegistry::kiln();
    let ctx = context(f, "three", &[("a.txt", "hi\n"), ("Dockerfile", THREE)]);
    f.build_dir(
        &ctx,
        &[
            "--export-cache",
            &format!("type=registry,ref={}/app:cache,mode=max", reg.addr),
        ],
    );
    (reg, ctx)
}

#[test]
fn an_imported_record_whose_chain_repeats_a_layer_leaves_the_importers_blobs_whole() {
    require_root("an_imported_record...");
    let f = Fixture::new();
    let (reg, ctx) = exported_cache(&f);
    let (manifest, mut cfg) = cache_of(&reg, "app", "cache");
    let longest = longest_cache_record(&cfg);
    for r in cfg["records"].as_array_mut().unwrap() {
        if r["key"] == longest["key"] {
            let mut chain = r["chain"].as_array().unwrap().clone();
            chain.insert(0, chain[0].clone());
            r["chain"] = chain.into();
        }
    }
    put_cache(&reg, "app", "cache", manifest, &cfg);
    // A second runner, whose own store holds the base layer the record repeats.
    let runner = Fixture::new();
    let tar = runner.path("img.tar");
    runner.build_dir(
        &ctx,
        &[
            "--import-cache",
            &format!("type=registry,ref={}/app:cache", reg.addr),
            "--output",
            &format!("type=oci,dest={}", tar.display()),
        ],
    );
    runner.assert_store_clean("after importing a record that repeats its base layer");
    let layers = check_oci_archive(&tar);
    assert_eq!(layers[0], layers[1], "{layers:?}");
    assert_eq!(
        podman_cat(&format!("oci-archive:{}", tar.display()), &["/a.txt", "/b"]),
        "hi\nx\n"
    );
}

#[test]
fn imported_layers_with_a_made_up_media_type_are_dropped_with_a_warning() {
    require_root("imported_layers_with_a_made_up...");
    let f = Fixture::new();
    let (reg, ctx) = exported_cache(&f);
    let (mut manifest, cfg) = cache_of(&reg, "app", "cache");
    let longest = longest_cache_record(&cfg);
    let top = longest["chain"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .as_u64()
        .unwrap() as usize;
    manifest["layers"][top]["mediaType"] = "application/vnd.example.made-up+tar".into();
    put_cache(&reg, "app", "cache", manifest, &cfg);
    let runner = Fixture::new();
    let tar = runner.path("img.tar");
    let b = runner.build_dir(
        &ctx,
        &[
            "--import-cache",
            &format!("type=registry,ref={}/app:cache", reg.addr),
            "--output",
            &format!("type=oci,dest={}", tar.display()),
        ],
    );
    assert!(
        b.stderr().contains("application/vnd.example.made-up+tar"),
        "no warning names the bad media type:\n{}",
        b.stderr()
    );
    assert_eq!(steps_run(&b), ["[stage-0 3/3] RUN echo x > /b"]);
    check_oci_archive(&tar);
    assert_eq!(
        podman_cat(&format!("oci-archive:{}", tar.display()), &["/a.txt", "/b"]),
        "hi\nx\n"
    );
}

#[test]
fn an_imported_layer_whose_diff_id_is_wrong_never_reaches_an_image() {
    require_root("an_imported_layer_whose_diff_id...");
    let f = Fixture::new();
    let (reg, ctx) = exported_cache(&f);
    let (manifest, mut cfg) = cache_of(&reg, "app", "cache");
    let chain = longest_cache_record(&cfg)["chain"].clone();
    let chain: Vec<usize> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as usize)
        .collect();
    let bogus = Digest::sha256_of(b"not this layer").to_string();
    // The COPY layer (below the RUN step's own) and the RUN layer both lie.
    cfg["layers"][chain[1]]["diff_id"] = bogus.clone().into();
    cfg["layers"][chain[2]]["diff_id"] = bogus.clone().into();
    put_cache(&reg, "app", "cache", manifest, &cfg);
    let import = format!("type=registry,ref={}/app:cache", reg.addr);
    // The last step is a hit: its layers are exported without being unpacked.
    let runner = Fixture::new();
    let tar = runner.path("img.tar");
    let (out, _) = runner.build_dir_raw(
        &ctx,
        &[
            "--import-cache",
            &import,
            "--output",
            &format!("type=oci,dest={}", tar.display()),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // Accepted only if the image is right: its config's diff ids match its layers.
        let layers = check_oci_archive(&tar);
        assert_eq!(layers.len(), 3);
        assert!(
            stderr.contains(&bogus),
            "a wrong diff id went by unremarked:\n{stderr}"
        );
        assert_eq!(
            podman_cat(&format!("oci-archive:{}", tar.display()), &["/a.txt", "/b"]),
            "hi\nx\n"
        );
    } else {
        assert!(
            stderr.contains("diff id") && stderr.contains(&bogus),
            "the error does not say what is wrong:\n{stderr}"
        );
        assert!(!tar.exists(), "a failed export left {}", tar.display());
    }
    runner.assert_store_clean("after the refused layer");
    // A step on top needs the chain unpacked: the COPY layer's content shows the lie.
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("{THREE}RUN cat /a.txt /b > /c\n"),
    )
    .unwrap();
    let (out, _) = runner.build_dir_raw(
        &ctx,
        &[
            "--import-cache",
            &import,
            "--output",
            &format!("type=oci,dest={}", tar.display()),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        check_oci_archive(&tar);
        assert_eq!(
            podman_cat(&format!("oci-archive:{}", tar.display()), &["/c"]),
            "hi\nx\n"
        );
    } else {
        assert!(
            stderr.contains("diff id") && stderr.contains(&bogus),
            "the error does not say what is wrong:\n{stderr}"
        );
    }
    runner.assert_store_clean("after the unpack");
}

/// Bytes that do not compress, so an export of them takes a while.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Starts a build of `ctx` exporting to `dest`, kills it with SIGKILL as soon as the export
/// has started writing (a temporary file beside `dest` appears, or `dest` itself changes), and
/// checks that `dest` still holds `before`.
fn killed_export_keeps_the_old_file(f: &Fixture, ctx: &Path, output: &str, dest: &Path) {
    let before = std::fs::read(dest).unwrap();
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let old = stamp(dest);
    let d = ctx.to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(f.root())
        .args([
            "build",
            "--frontend",
            "dockerfile.v0",
            "--progress",
            "quiet",
        ])
        .args(["--local", &format!("context={d}")])
        .args(["--local", &format!("dockerfile={d}")])
        .args(["--output", output])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dir = dest.parent().unwrap();
    let name = dest.file_name().unwrap().to_string_lossy().into_owned();
    let started = loop {
        let temp = std::fs::read_dir(dir).unwrap().any(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n != name && n.contains(&name)
        });
        if temp || stamp(dest) != old {
            break true;
        }
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        started,
        "the build ended before its export was seen starting"
    );
    let after = std::fs::read(dest).unwrap_or_default();
    assert!(
        after == before,
        "{output}: a killed export left {} bytes where {} were",
        after.len(),
        before.len()
    );
}

#[test]
fn a_killed_export_leaves_the_previous_file_whole() {
    require_root("a_killed_export...");
    let f = Fixture::new();
    let ctx = context(
        &f,
        "big",
        &[("Dockerfile", "FROM busybox:latest\nCOPY big.bin /big.bin\n")],
    );
    for (i, kind) in ["oci", "docker", "tar"].iter().enumerate() {
        std::fs::write(ctx.join("big.bin"), noise(48 << 20, 2 * i as u64)).unwrap();
        let dest = f.path(&format!("out-{kind}.tar"));
        let output = format!("type={kind},dest={}", dest.display());
        f.build_dir(&ctx, &["--output", &output]);
        // New content: the next build runs the COPY and exports again.
        std::fs::write(ctx.join("big.bin"), noise(48 << 20, 2 * i as u64 + 1)).unwrap();
        killed_export_keeps_the_old_file(&f, &ctx, &output, &dest);
    }
}

#[test]
fn a_killed_local_export_leaves_no_half_written_directory() {
    require_root("a_killed_local_export...");
    let f = Fixture::new();
    let ctx = context(
        &f,
        "big",
        &[("Dockerfile", "FROM busybox:latest\nCOPY big.bin /big.bin\n")],
    );
    let big = noise(48 << 20, 7);
    std::fs::write(ctx.join("big.bin"), &big).unwrap();
    // The steps are cached first, so the build killed below is killed in its export.
    f.build_dir(&ctx, &[]);
    let dest = f.path("out-local");
    let d = ctx.to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(f.root())
        .args([
            "build",
            "--frontend",
            "dockerfile.v0",
            "--progress",
            "quiet",
        ])
        .args(["--local", &format!("context={d}")])
        .args(["--local", &format!("dockerfile={d}")])
        .args(["--output", &format!("type=local,dest={}", dest.display())])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = loop {
        let temp = std::fs::read_dir(f.path("")).unwrap().any(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with(".out-local.tmp")
        });
        if temp || dest.exists() {
            break true;
        }
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        started,
        "the build ended before its export was seen starting"
    );
    if dest.exists() {
        let got = std::fs::read(dest.join("big.bin")).unwrap_or_default();
        assert!(
            got == big,
            "a killed export left {} with big.bin of {} bytes (want {})",
            dest.display(),
            got.len(),
            big.len()
        );
    }
}

#[test]
fn source_date_epoch_applies_to_layers_cached_without_it() {
    require_root("source_date_epoch_applies...");
    let sde = [("SOURCE_DATE_EPOCH", "1700000000")];
    let files = [("a.txt", "epoch\n"), ("Dockerfile", THREE)];
    // This state dir cached the steps in a build without the variable.
    let warm = Fixture::new();
    let ctx = context(&warm, "ctx", &files);
    build_env(&warm, &ctx, &[], &[]);
    let tar = warm.path("img.tar");
    let out = format!("type=oci,dest={}", tar.display());
    let cached = build_env(&warm, &ctx, &["--output", &out], &sde);
    assert!(steps_run(&cached).is_empty(), "{:?}", cached.ran());
    check_oci_archive(&tar);
    // A fresh state dir runs every step with it.
    let fresh = Fixture::new();
    let ctx2 = context(&fresh, "ctx", &files);
    let filetime = std::fs::metadata(ctx.join("a.txt"))
        .unwrap()
        .modified()
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(ctx2.join("a.txt"))
        .unwrap()
        .set_modified(filetime)
        .unwrap();
    let tar2 = fresh.path("img.tar");
    let out2 = format!("type=oci,dest={}", tar2.display());
    let ran = build_env(&fresh, &ctx2, &["--output", &out2], &sde);
    assert_eq!(steps_run(&ran).len(), 2, "{:?}", ran.ran());
    assert_eq!(
        cached.digest(),
        ran.digest(),
        "the image depends on what the cache held"
    );
}

/// One step of a generated Dockerfile: `COPY fN.txt /dK` (maybe `--link`) or
/// `RUN echo TEXT > /dK`. Few files, texts and destinations, so steps repeat content.
#[derive(Debug, Clone)]
enum GenStep {
    Copy {
        file: usize,
        dest: usize,
        link: bool,
    },
    Run {
        text: usize,
        dest: usize,
    },
}

const GEN_FILES: [&str; 2] = ["alpha\n", "beta\n"];
const GEN_TEXTS: [&str; 2] = ["gamma", "alpha"];

fn gen_steps() -> impl proptest::strategy::Strategy<Value = Vec<GenStep>> {
    use proptest::prelude::*;
    let step = prop_oneof![
        (0..2usize, 0..2usize, any::<bool>()).prop_map(|(file, dest, link)| GenStep::Copy {
            file,
            dest,
            link
        }),
        (0..2usize, 0..2usize).prop_map(|(text, dest)| GenStep::Run { text, dest }),
    ];
    // Every sequence is followed by itself again: each of its layers is made twice.
    proptest::collection::vec(step, 1..4).prop_map(|v| {
        let mut twice = v.clone();
        twice.extend(v);
        twice
    })
}

#[test]
fn generated_builds_with_repeated_content_pass_fsck_export_push_and_run() {
    require_root("generated_builds...");
    use proptest::test_runner::{Config, TestRunner};
    let f = Fixture::new();
    let reg = TestRegistry::kiln();
    let case = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        // Each case builds, exports, pushes and runs a container: a handful is enough.
        cases: 5,
        max_shrink_iters: 16,
        failure_persistence: None,
        ..Config::default()
    });
    let show = "for f in /d0 /d1; do if [ -f $f ]; then cat $f; else echo -; fi; done";
    runner
        .run(&gen_steps(), |steps| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut dockerfile = String::from("FROM busybox:latest\n");
            let mut model: [Option<String>; 2] = [None, None];
            for s in &steps {
                match s {
                    GenStep::Copy { file, dest, link } => {
                        let flag = if *link { "--link " } else { "" };
                        dockerfile.push_str(&format!("COPY {flag}f{file}.txt /d{dest}\n"));
                        model[*dest] = Some(GEN_FILES[*file].to_owned());
                    }
                    GenStep::Run { text, dest } => {
                        dockerfile.push_str(&format!("RUN echo {} > /d{dest}\n", GEN_TEXTS[*text]));
                        model[*dest] = Some(format!("{}\n", GEN_TEXTS[*text]));
                    }
                }
            }
            let want: String = model
                .iter()
                .map(|m| m.clone().unwrap_or_else(|| "-\n".into()))
                .collect();
            let ctx = context(
                &f,
                &format!("gen{n}"),
                &[
                    ("f0.txt", GEN_FILES[0]),
                    ("f1.txt", GEN_FILES[1]),
                    ("Dockerfile", &dockerfile),
                ],
            );
            let tar = f.path(&format!("gen{n}.tar"));
            let image = format!("{}/gen/app:{n}", reg.addr);
            build_env(
                &f,
                &ctx,
                &[
                    "--output",
                    &format!("type=oci,dest={}", tar.display()),
                    "--output",
                    &format!("type=image,name={image},push=true"),
                    "--export-cache",
                    &format!("type=registry,ref={}/gen/app:cache,mode=max", reg.addr),
                ],
                // Clamped times make repeated RUN steps byte-identical layers too.
                &[("SOURCE_DATE_EPOCH", "1700000000")],
            );
            f.assert_store_clean(&format!("after building\n{dockerfile}"));
            let layers = check_oci_archive(&tar);
            assert_eq!(layers.len(), steps.len() + 1, "{dockerfile}");
            let pushed = skopeo_inspect(&image, &[]);
            assert_eq!(
                pushed["Layers"].as_array().unwrap().len(),
                layers.len(),
                "{dockerfile}"
            );
            assert_eq!(
                podman_cat_sh(&format!("docker://{image}"), show),
                want,
                "{dockerfile}"
            );
            Ok(())
        })
        .unwrap();
}
