//! One suite every exporter runs: a real build (a Dockerfile solved by the worker on a real
//! store) is exported through each exporter as the session does it — the image made once when
//! an exporter needs it, then `export` — and what was written is read back with real tools:
//! `tar` for tarballs, `skopeo` for OCI and Docker archives, for pushes to a kiln registry
//! started by the test and for the image `--load` put into podman's store. A test-only
//! exporter defined below runs through the same suite, plugged in with no change anywhere
//! else.
//!
//! Needs root (overlayfs snapshots), `tar`, `skopeo` and `podman` (`.ci/install`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kiln_build::export::{
    parse_output, BuildResult, ExportContext, ExportError, ExportReport, Exporter, ImageRecipe,
    PlatformPart,
};
use kiln_oci::{ClientConfig, HostConfig, RegistryClient};
use kiln_store::Store;
use kiln_worker::build::{plan_build, BuildInputs, SolvedBuild};
use kiln_worker::engine::{ContextFilter, ImageProvider};
use kiln_worker::images::LocalImages;

const EPOCH: i64 = 1_700_000_000;

const DOCKERFILE: &str = "\
FROM scratch
COPY hello.txt /hello.txt
COPY data/ /srv/data/
ENV GREETING=hello
LABEL suite=exporters
";

/// A solved build of [`DOCKERFILE`] on a fresh state dir, and what exporting needs.
struct Built {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    solved: SolvedBuild,
    /// The same build for more target platforms, on the same store ([`build_with`]).
    others: Vec<SolvedBuild>,
    /// The target platform of each solve, as requested (the host's when none was).
    platforms: Vec<kiln_oci::Platform>,
    runtime: tokio::runtime::Runtime,
    client: RegistryClient,
    registry: Option<kiln_registry::RunningRegistry>,
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the exporter suite builds on overlayfs snapshots and must run as root"
    );
}

fn build() -> Built {
    build_with(DOCKERFILE, &[])
}

/// A build of [`DOCKERFILE`] for the host's platform.
fn build_with(dockerfile: &str, platforms: &[&str]) -> Built {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(ctx.join("data/nested")).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(ctx.join("hello.txt"), "hello from kiln\n").unwrap();
    std::fs::write(ctx.join("data/a.txt"), "a\n").unwrap();
    std::fs::write(ctx.join("data/nested/b.txt"), "b\n").unwrap();
    for arch in ["amd64", "arm64"] {
        std::fs::write(ctx.join(format!("arch-{arch}.txt")), format!("{arch}\n")).unwrap();
    }
    let store = Arc::new(Store::open(dir.path().join("state")).unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let registry = runtime
        .block_on(
            kiln_registry::Registry::builder()
                .root(dir.path().join("registry"))
                .bind("127.0.0.1:0")
                .fsync(false)
                .start(),
        )
        .expect("the kiln registry starts");
    let host = registry
        .url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut config = ClientConfig::default();
    config.hosts.insert(
        host,
        HostConfig {
            insecure: true,
            ..HostConfig::default()
        },
    );
    let client = RegistryClient::new(config).unwrap();
    let dockerfile = kiln_dockerfile::parse(dockerfile).unwrap();
    // One solve per platform (the host's when none is given), all on the one store.
    let targets: Vec<Option<kiln_oci::Platform>> = if platforms.is_empty() {
        vec![None]
    } else {
        platforms
            .iter()
            .map(|p| Some(kiln_oci::Platform::parse(p).unwrap()))
            .collect()
    };
    let mut solves = Vec::new();
    let requested: Vec<kiln_oci::Platform> = targets
        .iter()
        .map(|t| t.clone().unwrap_or_else(kiln_oci::Platform::host))
        .collect();
    for platform in targets {
        let mut opts = kiln_graph::BuildOptions::for_context(&ctx);
        opts.platforms = platform.into_iter().collect();
        let images: Arc<dyn ImageProvider> = Arc::new(LocalImages::new(store.clone()));
        let inputs = BuildInputs {
            dockerfile: &dockerfile,
            dockerignore: &[],
            images,
            context_filter: Arc::new(|_: &[String]| ContextFilter {
                excluded: Box::new(|_: &str, _: bool| false),
                may_reinclude: Box::new(|_: &str| false),
            }),
            source_date_epoch: Some(EPOCH),
            compression: None,
        };
        let planned = plan_build(store.clone(), &opts, inputs).unwrap();
        solves.push(
            runtime
                .block_on(planned.solve(Arc::new(|_e: kiln_solver::Event| {}), |_| {}))
                .unwrap(),
        );
    }
    let solved = solves.remove(0);
    Built {
        dir,
        store,
        solved,
        others: solves,
        platforms: requested,
        runtime,
        client,
        registry: Some(registry),
    }
}

impl Built {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `host:port` of the registry the test started.
    fn registry_host(&self) -> String {
        self.registry
            .as_ref()
            .unwrap()
            .url()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned()
    }

    /// Runs `exporters` on the build as the session does: the image made once (when one of
    /// them makes images), then each exporter in order.
    fn export(&self, exporters: &[Box<dyn Exporter>]) -> Result<Vec<ExportReport>, ExportError> {
        let rootfs = self.solved.rootfs.as_deref();
        let result = if exporters.iter().any(|e| e.makes_image()) {
            let config = &self.solved.graph.target_stage().config;
            let recipe = ImageRecipe::for_result(&self.solved.worker, rootfs, config, Some(EPOCH))?;
            BuildResult::with_image(rootfs, recipe)
        } else {
            BuildResult::new(rootfs)
        };
        let cx = ExportContext {
            store: &self.store,
            worker: &self.solved.worker,
            client: &self.client,
            runtime: self.runtime.handle(),
            source_date_epoch: Some(EPOCH),
        };
        exporters.iter().map(|e| e.export(&cx, &result)).collect()
    }

    /// The result of every platform's solve as the session hands it to exporters: one part
    /// per platform, in the order built, each with its image recipe.
    fn multi_result(&self) -> BuildResult<'_> {
        let parts = std::iter::once(&self.solved)
            .chain(&self.others)
            .zip(&self.platforms)
            .map(|(s, platform)| {
                let rootfs = s.rootfs.as_deref();
                let config = &s.graph.target_stage().config;
                let recipe =
                    ImageRecipe::for_result(&s.worker, rootfs, config, Some(EPOCH)).unwrap();
                PlatformPart {
                    platform: platform.clone(),
                    rootfs,
                    recipe: Some(recipe),
                }
            })
            .collect();
        BuildResult::for_platforms(parts)
    }

    fn cx(&self) -> ExportContext<'_> {
        ExportContext {
            store: &self.store,
            worker: &self.solved.worker,
            client: &self.client,
            runtime: self.runtime.handle(),
            source_date_epoch: Some(EPOCH),
        }
    }
}

impl Drop for Built {
    fn drop(&mut self) {
        if let Some(r) = self.registry.take() {
            self.runtime.block_on(r.shutdown());
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn skopeo_inspect(transport: &str) -> serde_json::Value {
    let text = run(Command::new("skopeo").args(["inspect", "--tls-verify=false", transport]));
    serde_json::from_str(&text).unwrap()
}

fn skopeo_raw(transport: &str) -> serde_json::Value {
    let text =
        run(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", transport]));
    serde_json::from_str(&text).unwrap()
}

/// The files of a tarball, without a leading `./`, directories ending in `/`.
fn tar_entries(file: &Path) -> Vec<String> {
    run(Command::new("tar").arg("-tf").arg(file))
        .lines()
        .map(|l| l.trim_start_matches("./").to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// What the image an exporter wrote must hold: the Dockerfile's config and its two layers.
fn assert_is_the_built_image(inspect: &serde_json::Value) {
    assert_eq!(inspect["Labels"]["suite"], "exporters", "{inspect:#}");
    let env = inspect["Env"].as_array().unwrap();
    assert!(env.iter().any(|e| e == "GREETING=hello"), "{inspect:#}");
    assert_eq!(
        inspect["Layers"].as_array().unwrap().len(),
        2,
        "{inspect:#}"
    );
}

/// The root filesystem an exporter wrote, unpacked or copied to `root`.
fn assert_is_the_built_rootfs(root: &Path) {
    assert_eq!(
        std::fs::read_to_string(root.join("hello.txt")).unwrap(),
        "hello from kiln\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("srv/data/nested/b.txt")).unwrap(),
        "b\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("srv/data/a.txt")).unwrap(),
        "a\n"
    );
}

fn exporter(value: &str) -> Box<dyn Exporter> {
    parse_output("--output", value).unwrap_or_else(|e| panic!("{e}"))
}

/// One exporter type's case: its `--output` value and how to check what it wrote.
struct Case {
    value: String,
    check: Check,
}

/// Checks what an exporter wrote, given the files that were there before it ran.
type Check = Box<dyn Fn(&Built, &ExportReport, &Files)>;

/// Every path under a directory, with its size: what an export changed.
type Files = BTreeMap<PathBuf, u64>;

fn files_under(dir: &Path) -> Files {
    let mut out = Files::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                todo.push(e.path());
            }
            out.insert(e.path(), if meta.is_dir() { 0 } else { meta.len() });
        }
    }
    out
}

/// Every exporter type kiln has, with the check of what it writes.
fn cases(b: &Built) -> Vec<Case> {
    let host = b.registry_host();
    let oci = b.path("out/image-oci.tar");
    let docker = b.path("out/image-docker.tar");
    let local = b.path("out/rootfs-dir");
    let tar = b.path("out/rootfs.tar");
    vec![
        Case {
            value: "type=image,name=suite/app:stored".into(),
            check: Box::new(|b, report, _| {
                let image = report
                    .image
                    .as_ref()
                    .expect("image exporter reports its image");
                let name = kiln_worker::images::normalize("suite/app:stored").unwrap();
                assert_eq!(
                    b.store.get_ref(&name).unwrap(),
                    Some(image.manifest.digest.clone())
                );
            }),
        },
        Case {
            value: format!("type=image,name={host}/suite/app:pushed,push=true"),
            check: Box::new(move |b, report, _| {
                let image = report.image.as_ref().unwrap();
                let remote = format!("docker://{}/suite/app:pushed", b.registry_host());
                assert_is_the_built_image(&skopeo_inspect(&remote));
                let raw = skopeo_raw(&remote);
                assert_eq!(raw["config"]["digest"], image.config.digest.to_string());
            }),
        },
        Case {
            value: format!("type=registry,name={host}/suite/reg:1"),
            check: Box::new(|b, _, _| {
                let remote = format!("docker://{}/suite/reg:1", b.registry_host());
                assert_is_the_built_image(&skopeo_inspect(&remote));
            }),
        },
        Case {
            value: format!("type=oci,dest={},name=suite/app:oci", oci.display()),
            check: Box::new(move |_, report, _| {
                let entries = tar_entries(&oci);
                for f in ["oci-layout", "index.json"] {
                    assert!(entries.iter().any(|e| e == f), "{f} in {entries:?}");
                }
                let transport = format!("oci-archive:{}", oci.display());
                assert_is_the_built_image(&skopeo_inspect(&transport));
                let raw = skopeo_raw(&transport);
                assert_eq!(
                    raw["mediaType"],
                    "application/vnd.oci.image.manifest.v1+json"
                );
                let image = report.image.as_ref().unwrap();
                assert_eq!(raw["config"]["digest"], image.config.digest.to_string());
            }),
        },
        Case {
            value: format!(
                "type=docker,dest={},name=suite/app:docker",
                docker.display()
            ),
            check: Box::new(move |_, _, _| {
                let entries = tar_entries(&docker);
                assert!(entries.iter().any(|e| e == "manifest.json"), "{entries:?}");
                let transport = format!("docker-archive:{}", docker.display());
                assert_is_the_built_image(&skopeo_inspect(&transport));
                let raw = skopeo_raw(&transport);
                assert_eq!(
                    raw["mediaType"],
                    "application/vnd.docker.distribution.manifest.v2+json"
                );
            }),
        },
        Case {
            // `--load`: the local image store. Where the suite runs (no DOCKER_HOST, nothing
            // on Docker's default socket) that is podman's, through `podman load`.
            value: "type=docker,name=localhost/suite/app:loaded".into(),
            check: Box::new(|_, report, _| {
                let transport = "containers-storage:localhost/suite/app:loaded";
                assert_is_the_built_image(&skopeo_inspect(transport));
                let raw = skopeo_raw(transport);
                let image = report.image.as_ref().unwrap();
                assert_eq!(raw["config"]["digest"], image.config.digest.to_string());
                run(Command::new("podman").args(["rmi", "localhost/suite/app:loaded"]));
            }),
        },
        Case {
            value: format!("type=local,dest={}", local.display()),
            check: Box::new(move |_, report, _| {
                assert!(report.image.is_none());
                assert_is_the_built_rootfs(&local);
            }),
        },
        Case {
            value: format!("type=tar,dest={}", tar.display()),
            check: Box::new(move |b, _, _| {
                let entries = tar_entries(&tar);
                assert!(entries.iter().any(|e| e == "hello.txt"), "{entries:?}");
                let unpacked = b.path("out/rootfs-unpacked");
                std::fs::create_dir_all(&unpacked).unwrap();
                run(Command::new("tar")
                    .arg("-xf")
                    .arg(&tar)
                    .arg("-C")
                    .arg(&unpacked));
                assert_is_the_built_rootfs(&unpacked);
            }),
        },
        Case {
            value: "type=cacheonly".into(),
            check: Box::new(|b, report, before| {
                assert!(report.image.is_none());
                // Nothing is written: neither in the state dir nor anywhere else.
                assert_eq!(&files_under(b.dir.path()), before);
            }),
        },
    ]
}

#[test]
fn every_exporter_writes_what_reads_back_as_the_built_result() {
    let b = build();
    let cases = cases(&b);
    for case in &cases {
        let e = exporter(&case.value);
        let before = files_under(b.dir.path());
        let reports = b
            .export(std::slice::from_ref(&e))
            .unwrap_or_else(|err| panic!("{}: {err}", case.value));
        assert_eq!(reports[0].kind, e.kind(), "{}", case.value);
        assert_eq!(
            reports[0].image.is_some(),
            e.makes_image(),
            "{}: an exporter reports an image exactly when it makes one",
            case.value
        );
        (case.check)(&b, &reports[0], &before);
    }
}

#[test]
fn exporters_of_one_build_share_the_image_made_once() {
    let b = build();
    let host = b.registry_host();
    let exporters = vec![
        exporter("type=image,name=suite/app:one"),
        exporter(&format!(
            "type=oci,dest={},name=suite/app:oci",
            b.path("one.tar").display()
        )),
        exporter(&format!("type=registry,name={host}/suite/one:1")),
        exporter(&format!(
            "type=docker,dest={},name=suite/app:docker",
            b.path("docker.tar").display()
        )),
    ];
    let reports = b.export(&exporters).unwrap();
    let digest = |i: usize| reports[i].image.as_ref().unwrap().manifest.digest.clone();
    // OCI media types: one image for the first three; Docker's make a second one.
    assert_eq!(digest(0), digest(1));
    assert_eq!(digest(0), digest(2));
    assert_ne!(digest(0), digest(3));
    let raw = skopeo_raw(&format!("docker://{host}/suite/one:1"));
    assert_eq!(
        raw["config"]["digest"],
        reports[0].image.as_ref().unwrap().config.digest.to_string()
    );
}

#[test]
fn a_local_export_into_a_directory_with_files_keeps_them() {
    let b = build();
    let dest = b.path("keep");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join("mine.txt"), "mine\n").unwrap();
    b.export(&[exporter(&format!("type=local,dest={}", dest.display()))])
        .unwrap();
    assert_is_the_built_rootfs(&dest);
    assert_eq!(
        std::fs::read_to_string(dest.join("mine.txt")).unwrap(),
        "mine\n"
    );
}

#[test]
fn a_failed_push_names_the_image_and_leaves_the_stored_image() {
    let b = build();
    // Nothing listens on port 9 of the loopback.
    let e = exporter("type=image,name=127.0.0.1:9/suite/app:1,push=true,registry.insecure=true");
    let err = match b.export(&[e]) {
        Ok(_) => panic!("a push to a closed port fails"),
        Err(err) => err,
    };
    assert!(
        err.to_string()
            .starts_with("image 127.0.0.1:9/suite/app:1: "),
        "{err}"
    );
    let name = kiln_worker::images::normalize("127.0.0.1:9/suite/app:1").unwrap();
    assert!(b.store.get_ref(&name).unwrap().is_some());
}

/// A test-only exporter: writes the image's manifest digest and the rootfs's file list to a
/// file. It reaches the session through the trait alone.
struct DigestFileExporter {
    dest: PathBuf,
}

impl DigestFileExporter {
    fn from_attrs(attrs: &BTreeMap<String, String>) -> Self {
        DigestFileExporter {
            dest: PathBuf::from(&attrs["dest"]),
        }
    }
}

impl Exporter for DigestFileExporter {
    fn kind(&self) -> &str {
        "digest-file"
    }

    fn makes_image(&self) -> bool {
        true
    }

    fn export(
        &self,
        cx: &ExportContext<'_>,
        result: &BuildResult<'_>,
    ) -> Result<ExportReport, ExportError> {
        let image = result.image(cx.store, true)?;
        kiln_build::export::write_file_atomic(
            &self.dest,
            format!("{}\n", image.manifest.digest).as_bytes(),
        )?;
        Ok(ExportReport {
            kind: self.kind().to_owned(),
            image: Some(image),
        })
    }
}

#[test]
fn a_test_only_exporter_plugs_in_and_sees_the_same_image() {
    let b = build();
    let dest = b.path("digest.txt");
    let attrs = BTreeMap::from([("dest".to_owned(), dest.display().to_string())]);
    let exporters: Vec<Box<dyn Exporter>> = vec![
        Box::new(DigestFileExporter::from_attrs(&attrs)),
        exporter("type=image,name=suite/app:plugged"),
    ];
    let reports = b.export(&exporters).unwrap();
    let made = reports[1]
        .image
        .as_ref()
        .unwrap()
        .manifest
        .digest
        .to_string();
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), format!("{made}\n"));
    assert_eq!(reports[0].kind, "digest-file");
}

#[test]
fn image_outputs_publish_annotations_and_attestations_in_one_index() {
    use kiln_build::attest::{parse_annotation_flag, Predicates};
    let b = build();
    let host = b.registry_host();
    let oci = b.path("attested-oci.tar");
    let exporters = [
        exporter(&format!("type=registry,name={host}/suite/attested:1")),
        exporter(&format!(
            "type=oci,dest={},name=suite/app:oci",
            oci.display()
        )),
        exporter(&format!(
            "type=docker,dest={},name=suite/app:docker",
            b.path("plain-docker.tar").display()
        )),
    ];
    let rootfs = b.solved.rootfs.as_deref();
    let config = &b.solved.graph.target_stage().config;
    let recipe = ImageRecipe::for_result(&b.solved.worker, rootfs, config, Some(EPOCH)).unwrap();
    let predicates = Predicates {
        provenance: Some(serde_json::json!({"buildType": "https://mobyproject.org/buildkit@v1"})),
        sbom: None,
    };
    let annotations = parse_annotation_flag("org.example.suite=yes").unwrap();
    let result = BuildResult::with_image(rootfs, recipe).with_attachments(annotations, predicates);
    let cx = ExportContext {
        store: &b.store,
        worker: &b.solved.worker,
        client: &b.client,
        runtime: b.runtime.handle(),
        source_date_epoch: Some(EPOCH),
    };
    let reports: Vec<ExportReport> = exporters
        .iter()
        .map(|e| e.export(&cx, &result).unwrap())
        .collect();
    // The registry holds an index: the annotated image, then its attestation manifest.
    let index = skopeo_raw(&format!("docker://{host}/suite/attested:1"));
    let image = reports[0].image.as_ref().unwrap();
    assert_eq!(
        index["manifests"][0]["digest"],
        image.manifest.digest.to_string()
    );
    assert_eq!(
        index["manifests"][1]["annotations"]["vnd.docker.reference.type"],
        "attestation-manifest"
    );
    let manifest = skopeo_raw(&format!(
        "docker://{host}/suite/attested@{}",
        image.manifest.digest
    ));
    assert_eq!(manifest["annotations"]["org.example.suite"], "yes");
    assert!(result.index().is_some());
    // The OCI layout names an index too, and skopeo still reads the image through it.
    assert_is_the_built_image(&skopeo_inspect(&format!("oci-archive:{}", oci.display())));
    // A Docker archive holds the image alone.
    assert_is_the_built_image(&skopeo_inspect(&format!(
        "docker-archive:{}",
        b.path("plain-docker.tar").display()
    )));
}

/// A Dockerfile whose two platforms share their first layer and differ in the second.
const MULTI_DOCKERFILE: &str = "\
FROM scratch
ARG TARGETARCH
COPY hello.txt /hello.txt
COPY arch-${TARGETARCH}.txt /arch.txt
LABEL suite=multi
";

fn build_multi() -> Built {
    build_with(MULTI_DOCKERFILE, &["linux/amd64", "linux/arm64"])
}

/// The platforms of an index's image entries (attestation manifests left out), in order.
fn index_platforms(index: &serde_json::Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["annotations"]["vnd.docker.reference.type"].is_null())
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap(),
                m["platform"]["architecture"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn a_multi_platform_push_is_one_index_of_every_platform_with_shared_layers_once() {
    let b = build_multi();
    let host = b.registry_host();
    let result = b.multi_result();
    assert!(result.is_multi_platform());
    assert_eq!(result.parts().len(), 2);
    let cx = b.cx();
    let report = exporter(&format!("type=registry,name={host}/suite/multi:1"))
        .export(&cx, &result)
        .unwrap();
    // Several platforms: the index stands for them, no single image is reported.
    assert!(report.image.is_none());
    let remote = format!("docker://{host}/suite/multi:1");
    let index = skopeo_raw(&remote);
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(index_platforms(&index), ["linux/amd64", "linux/arm64"]);
    // The metadata file's `containerimage.digest`: the index the tag names.
    let index_digest = result.index().unwrap().digest;
    assert_eq!(
        skopeo_raw(&format!("docker://{host}/suite/multi@{index_digest}")),
        index,
        "the result's index is the one pushed"
    );
    // Each platform's image, pulled by digest, has its own config and the shared layer.
    let mut first_layers = Vec::new();
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let digest = index["manifests"][i]["digest"].as_str().unwrap();
        let by_digest = format!("docker://{host}/suite/multi@{digest}");
        let inspect = skopeo_inspect(&by_digest);
        assert_eq!(inspect["Architecture"], *arch, "{inspect:#}");
        assert_eq!(inspect["Labels"]["suite"], "multi");
        let layers = inspect["Layers"].as_array().unwrap().clone();
        assert_eq!(layers.len(), 2);
        first_layers.push(layers[0].clone());
        assert_eq!(
            index["manifests"][i]["platform"]["architecture"], *arch,
            "the entry's platform is its config's"
        );
    }
    assert_eq!(
        first_layers[0], first_layers[1],
        "the COPY of hello.txt is one blob"
    );
    // skopeo copies the whole index (every platform) out of the registry.
    let layout = b.path("copied");
    run(Command::new("skopeo").args([
        "copy",
        "--all",
        "--src-tls-verify=false",
        &remote,
        &format!("oci:{}:multi", layout.display()),
    ]));
    let arm = skopeo_inspect(&format!("oci:{}:multi", layout.display()));
    assert!(arm["Architecture"].is_string());
}

#[test]
fn oci_mediatypes_false_makes_a_docker_manifest_list_and_push_by_digest_tags_nothing() {
    let b = build_multi();
    let host = b.registry_host();
    let cx = b.cx();
    let result = b.multi_result();
    exporter(&format!(
        "type=image,name={host}/suite/list:1,push=true,oci-mediatypes=false"
    ))
    .export(&cx, &result)
    .unwrap();
    let list = skopeo_raw(&format!("docker://{host}/suite/list:1"));
    assert_eq!(
        list["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    assert_eq!(index_platforms(&list), ["linux/amd64", "linux/arm64"]);
    for m in list["manifests"].as_array().unwrap() {
        assert_eq!(
            m["mediaType"],
            "application/vnd.docker.distribution.manifest.v2+json"
        );
    }

    // push-by-digest: the index goes up under its digest; the name's tag is not created.
    let result = b.multi_result();
    exporter(&format!(
        "type=image,name={host}/suite/bydigest:1,push=true,push-by-digest=true"
    ))
    .export(&cx, &result)
    .unwrap();
    let digest = result.index().expect("an index was made").digest;
    let index = skopeo_raw(&format!("docker://{host}/suite/bydigest@{digest}"));
    assert_eq!(index_platforms(&index), ["linux/amd64", "linux/arm64"]);
    let tagged = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{host}/suite/bydigest:1"))
        .output()
        .unwrap();
    assert!(!tagged.status.success(), "push-by-digest made no tag");
}

/// A file of a tarball, read with `tar -xOf`.
fn tar_file(tarball: &Path, name: &str) -> serde_json::Value {
    let text = run(Command::new("tar").arg("-xOf").arg(tarball).arg(name));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn oci_and_docker_tarballs_of_several_platforms_hold_the_index() {
    let b = build_multi();
    let cx = b.cx();
    let result = b.multi_result();
    let oci = b.path("multi-oci.tar");
    let docker = b.path("multi-docker.tar");
    exporter(&format!(
        "type=oci,dest={},name=suite/multi:oci",
        oci.display()
    ))
    .export(&cx, &result)
    .unwrap();
    exporter(&format!(
        "type=docker,dest={},name=suite/multi:docker",
        docker.display()
    ))
    .export(&cx, &result)
    .unwrap();

    // OCI: index.json names the OCI index; skopeo reads each platform through it.
    let top = tar_file(&oci, "index.json");
    assert_eq!(top["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        top["manifests"][0]["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let transport = format!("oci-archive:{}", oci.display());
    let index = skopeo_raw(&transport);
    assert_eq!(index_platforms(&index), ["linux/amd64", "linux/arm64"]);
    for arch in ["amd64", "arm64"] {
        let text = run(Command::new("skopeo")
            .args(["--override-arch", arch, "inspect"])
            .arg(&transport));
        let inspect: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(inspect["Architecture"], arch, "{inspect:#}");
        assert_eq!(inspect["Labels"]["suite"], "multi");
    }

    // Docker: index.json names a Docker manifest list; manifest.json lists both images,
    // the names on one of them; every blob is in the tarball once.
    let top = tar_file(&docker, "index.json");
    assert_eq!(
        top["manifests"][0]["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    let listed = tar_file(&docker, "manifest.json");
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let tagged: Vec<_> = listed
        .iter()
        .filter(|e| !e["RepoTags"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(tagged.len(), 1, "{listed:?}");
    assert_eq!(tagged[0]["RepoTags"][0], "suite/multi:docker");
    let entries = tar_entries(&docker);
    let mut unique = entries.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), entries.len(), "no file twice: {entries:?}");
    for e in listed {
        for l in e["Layers"].as_array().unwrap() {
            assert!(entries.iter().any(|x| x == l.as_str().unwrap()), "{l}");
        }
    }
    let list = skopeo_raw(&format!("oci-archive:{}", docker.display()));
    assert_eq!(index_platforms(&list), ["linux/amd64", "linux/arm64"]);
}

#[test]
fn local_and_tar_outputs_write_one_directory_per_platform() {
    let b = build_multi();
    let cx = b.cx();
    let result = b.multi_result();
    let local = b.path("split");
    let tarball = b.path("split.tar");
    exporter(&format!("type=local,dest={}", local.display()))
        .export(&cx, &result)
        .unwrap();
    exporter(&format!("type=tar,dest={}", tarball.display()))
        .export(&cx, &result)
        .unwrap();
    for arch in ["amd64", "arm64"] {
        let dir = local.join(format!("linux_{arch}"));
        assert_eq!(
            std::fs::read_to_string(dir.join("arch.txt")).unwrap(),
            format!("{arch}\n")
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("hello.txt")).unwrap(),
            "hello from kiln\n"
        );
    }
    let mut top: Vec<_> = std::fs::read_dir(&local)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    top.sort();
    assert_eq!(top, ["linux_amd64", "linux_arm64"]);
    let entries = tar_entries(&tarball);
    for want in [
        "linux_amd64/arch.txt",
        "linux_arm64/arch.txt",
        "linux_arm64/hello.txt",
    ] {
        assert!(entries.iter().any(|e| e == want), "{want} in {entries:?}");
    }

    // platform-split=false: both platforms have /hello.txt, which BuildKit's rule refuses
    // to overwrite; nothing is left at the destination.
    for kind in ["local", "tar"] {
        let dest = b.path(&format!("merged-{kind}"));
        let err = exporter(&format!(
            "type={kind},dest={},platform-split=false",
            dest.display()
        ))
        .export(&cx, &result)
        .err()
        .unwrap_or_else(|| panic!("type={kind} merging clashing platforms fails"));
        let text = err.to_string();
        assert!(
            text.contains("cannot overwrite")
                && text.contains("linux/amd64")
                && text.contains("linux/arm64")
                && text.contains("platform-split=false"),
            "{text}"
        );
        assert!(!dest.exists(), "{kind}: nothing written");
    }
}

#[test]
fn platform_split_false_merges_platforms_whose_files_differ() {
    let b = build_with(
        "FROM scratch\nARG TARGETARCH\nCOPY arch-${TARGETARCH}.txt /${TARGETARCH}/arch.txt\n",
        &["linux/amd64", "linux/arm64"],
    );
    let cx = b.cx();
    let result = b.multi_result();
    let dest = b.path("merged");
    exporter(&format!(
        "type=local,dest={},platform-split=false",
        dest.display()
    ))
    .export(&cx, &result)
    .unwrap();
    for arch in ["amd64", "arm64"] {
        assert_eq!(
            std::fs::read_to_string(dest.join(arch).join("arch.txt")).unwrap(),
            format!("{arch}\n")
        );
    }
    let tarball = b.path("merged.tar");
    exporter(&format!(
        "type=tar,dest={},platform-split=false",
        tarball.display()
    ))
    .export(&cx, &result)
    .unwrap();
    let entries = tar_entries(&tarball);
    for want in ["amd64/arch.txt", "arm64/arch.txt"] {
        assert!(entries.iter().any(|e| e == want), "{want} in {entries:?}");
    }
}

#[test]
fn each_platform_gets_its_attestation_manifest_and_its_own_annotations() {
    use kiln_build::attest::{parse_annotation_flag, Predicates};
    let b = build_multi();
    let host = b.registry_host();
    let cx = b.cx();
    let predicates = Predicates {
        provenance: Some(serde_json::json!({"buildType": "https://mobyproject.org/buildkit@v1"})),
        sbom: None,
    };
    let annotations = parse_annotation_flag("manifest[linux/arm64]:org.example.arch=arm").unwrap();
    let result = b.multi_result().with_attachments(annotations, predicates);
    exporter(&format!(
        "type=registry,name={host}/suite/attested-multi:1,oci-mediatypes=false"
    ))
    .export(&cx, &result)
    .unwrap();
    // Attestations need an OCI index even when Docker media types were asked for.
    let index = skopeo_raw(&format!("docker://{host}/suite/attested-multi:1"));
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let m = index["manifests"].as_array().unwrap();
    assert_eq!(m.len(), 4, "{index:#}");
    // The images first, then their attestation manifests in the same order.
    for i in 0..2 {
        assert!(m[i]["annotations"]["vnd.docker.reference.type"].is_null());
        assert_eq!(
            m[i + 2]["annotations"]["vnd.docker.reference.type"],
            "attestation-manifest"
        );
        assert_eq!(
            m[i + 2]["annotations"]["vnd.docker.reference.digest"],
            m[i]["digest"]
        );
        assert_eq!(m[i + 2]["platform"]["architecture"], "unknown");
    }
    let image = |i: usize| {
        skopeo_raw(&format!(
            "docker://{host}/suite/attested-multi@{}",
            m[i]["digest"].as_str().unwrap()
        ))
    };
    assert!(image(0)["annotations"]["org.example.arch"].is_null());
    assert_eq!(image(1)["annotations"]["org.example.arch"], "arm");
    // The arm64 statement names the arm64 image.
    let att = image(3);
    let statement_digest = att["layers"][0]["digest"].as_str().unwrap();
    let blob = b
        .store
        .content()
        .blob_path(&statement_digest.parse().unwrap());
    let statement: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob).unwrap()).unwrap();
    let subject = &statement["subject"][0];
    assert!(
        subject["name"]
            .as_str()
            .unwrap()
            .ends_with("?platform=linux%2Farm64"),
        "{statement:#}"
    );
    let arm_digest = m[1]["digest"].as_str().unwrap();
    assert_eq!(
        format!("sha256:{}", subject["digest"]["sha256"].as_str().unwrap()),
        arm_digest
    );
    // An unnamed OCI output after it makes another index (its statements name no image);
    // the metadata file's digest stays the one the names point at.
    let pushed = result.index().unwrap().digest;
    let oci = b.path("unnamed.tar");
    exporter(&format!("type=oci,dest={}", oci.display()))
        .export(&cx, &result)
        .unwrap();
    let unnamed = tar_file(&oci, "index.json")["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(unnamed, pushed.to_string());
    assert_eq!(result.index().unwrap().digest, pushed);
    assert_eq!(
        skopeo_raw(&format!("docker://{host}/suite/attested-multi@{pushed}")),
        index
    );
}

#[test]
fn a_multi_platform_result_has_no_single_image_and_load_refuses_it() {
    use kiln_build::export::{exporters_from_flags, refuse_manifest_list};
    let b = build_multi();
    let result = b.multi_result();
    let err = result.image(&b.store, true).unwrap_err();
    assert!(matches!(err, ExportError::MultiPlatform { .. }), "{err}");
    assert!(
        err.to_string().contains("linux/amd64, linux/arm64"),
        "{err}"
    );
    // `--load` (type=docker without dest) keeps buildx's refusal, before any step runs; a
    // Docker archive file holds the index.
    let load = exporters_from_flags(&["type=docker".to_owned()], &[], false).unwrap();
    let text = refuse_manifest_list(&load, 2).unwrap_err().to_string();
    assert!(
        text.starts_with("docker exporter does not currently support exporting manifest lists"),
        "{text}"
    );
    let file = exporters_from_flags(&["type=docker,dest=x.tar".to_owned()], &[], false).unwrap();
    assert!(refuse_manifest_list(&file, 2).is_ok());
}
