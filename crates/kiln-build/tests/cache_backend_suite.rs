//! One suite every cache backend runs: a real build's cache is exported, imported into a
//! fresh state dir, and the same build there is all cache hits whose blobs arrive; a cache
//! that is not there yet is a warning, not an error; a cache whose records were altered at
//! rest is refused. The registry, local and inline backends run it; a directory backend
//! defined here runs the same checks through a `BuildRequest` and `kiln_build::run`, which
//! shows that a backend plugs into a build through the `CacheBackend` trait alone.
//!
//! Builds run real containers: the suite needs root (as CI runs it). The registry is
//! kiln's own server (`kiln_registry`, what `kiln registry serve` runs), started in-process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kiln_build::cache::{
    cache_backend_from_attrs, export_graph, CacheBackend, CacheContext, CacheError, CacheExport,
    CacheExportSummary, CacheImport, ImportedCache, ImportedCacheRef,
};
use kiln_build::{BuildEvent, BuildFailure, BuildRequest};
use kiln_graph::graph::Op;
use kiln_graph::BuildOptions;
use kiln_oci::RegistryClient;
use kiln_solver::{CacheSource, Event};
use kiln_store::Store;
use kiln_worker::build::{plan_build, BuildInputs, SolvedBuild};
use kiln_worker::engine::{ContextFilter, ImageProvider, RemoteCache};
use kiln_worker::registry::RegistryImages;
use kiln_worker::remote::LayoutBlobs;

const DOCKERFILE: &str = "FROM busybox:latest
RUN echo one > /one
COPY f.txt /f.txt
RUN cat /one /f.txt > /both
";

/// Where one suite run keeps its state dirs, context, registry and runtime.
struct Harness {
    tmp: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    client: RegistryClient,
    registry: kiln_registry::RunningRegistry,
    registry_root: PathBuf,
    warnings: Arc<Mutex<Vec<String>>>,
}

impl Harness {
    fn new() -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        assert!(
            euid == 0,
            "the cache backend suite runs real containers: run it as root (CI does)"
        );
        let tmp = tempfile::tempdir().unwrap();
        busybox_rootfs(&tmp.path().join("busybox"));
        let context = tmp.path().join("context");
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(context.join("Dockerfile"), DOCKERFILE).unwrap();
        std::fs::write(context.join("f.txt"), "from the context\n").unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let registry_root = tmp.path().join("registry");
        let registry = runtime
            .block_on(
                kiln_registry::Registry::builder()
                    .root(&registry_root)
                    .bind("127.0.0.1:0")
                    .fsync(false)
                    .start(),
            )
            .unwrap();
        let client = RegistryClient::new(kiln_oci::ClientConfig::default()).unwrap();
        Harness {
            tmp,
            runtime,
            client,
            registry,
            registry_root,
            warnings: Arc::default(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// A ref in the test's registry.
    fn registry_ref(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.registry.host())
    }

    /// A state dir holding only the base image (the same bytes in every state dir).
    fn fresh_state(&self, name: &str) -> Arc<Store> {
        let store = Arc::new(Store::open(self.path(name)).unwrap());
        kiln_worker::images::import_rootfs(
            &store,
            &self.path("busybox"),
            &["busybox:latest".to_owned()],
            &kiln_graph::Platform::host(),
            &kiln_worker::image::created_timestamp(Some(1_700_000_000)),
            Some(1_700_000_000),
        )
        .unwrap();
        store
    }

    fn context(&self, store: &Arc<Store>) -> CacheContext {
        let warnings = self.warnings.clone();
        CacheContext {
            client: self.client.clone(),
            store: store.clone(),
            runtime: self.runtime.handle().clone(),
            platform: kiln_graph::Platform::host(),
            makes_image: true,
            warn: Arc::new(move |m| warnings.lock().unwrap().push(m.to_owned())),
        }
    }

    /// Builds the suite's Dockerfile on `store` with `imported` caches; the solver's events.
    fn build(&self, store: &Arc<Store>, imported: &[Arc<ImportedCache>]) -> Built {
        let opts = BuildOptions::for_context(self.path("context"));
        let dockerfile = kiln_dockerfile::parse(DOCKERFILE).unwrap();
        let images: Arc<dyn ImageProvider> = Arc::new(RegistryImages::new(
            self.client.clone(),
            self.runtime.handle().clone(),
            store.clone(),
        ));
        let inputs = BuildInputs {
            dockerfile: &dockerfile,
            dockerignore: &[],
            images,
            context_filter: Arc::new(|_: &[String]| ContextFilter {
                excluded: Box::new(|_: &str, _: bool| false),
                may_reinclude: Box::new(|_: &str| false),
            }),
            source_date_epoch: Some(1_700_000_000),
            compression: None,
        };
        let planned = plan_build(store.clone(), &opts, inputs).unwrap();
        planned.worker().add_imports(
            imported
                .iter()
                .map(|c| c.clone() as Arc<dyn RemoteCache>)
                .collect(),
            Default::default(),
        );
        let events: Arc<Mutex<Vec<Event>>> = Arc::default();
        let sink = events.clone();
        let solved = self
            .runtime
            .block_on(planned.solve(
                Arc::new(move |e: Event| sink.lock().unwrap().push(e)),
                |_| {},
            ))
            .unwrap();
        let events = std::mem::take(&mut *events.lock().unwrap());
        Built { solved, events }
    }
}

struct Built {
    solved: SolvedBuild,
    events: Vec<Event>,
}

impl Built {
    /// The vertices that run something (not sources).
    fn steps(&self) -> Vec<usize> {
        self.solved
            .graph
            .vertices
            .iter()
            .enumerate()
            .filter(|(_, v)| {
                !matches!(
                    v.op,
                    Op::Local(_) | Op::Image(_) | Op::OciLayout(_) | Op::Http(_)
                )
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// The steps that ran (sources are read in every build), in vertex order.
    fn ran(&self) -> Vec<usize> {
        let steps = self.steps();
        let mut ran: Vec<usize> = self
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Started { node, .. } if steps.contains(node) => Some(*node),
                _ => None,
            })
            .collect();
        ran.sort();
        ran
    }

    fn remote_hits(&self) -> Vec<usize> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Cached {
                    node,
                    source: CacheSource::Remote(_),
                    ..
                } => Some(*node),
                _ => None,
            })
            .collect()
    }
}

/// One backend under test: how to make it for export, for import, and for an import of a
/// cache that does not exist; `image_ref` for a cache carried in a pushed image.
struct Case {
    export: Box<dyn CacheBackend>,
    import: Box<dyn CacheBackend>,
    missing: Box<dyn CacheBackend>,
    /// Where the exported records rest, to alter them.
    at_rest: PathBuf,
    /// Alters the exported records where they rest when they are not files under `at_rest`
    /// (objects in a bucket); how many it altered.
    alter: Option<Box<dyn Fn() -> usize>>,
    /// The cache travels in this image: it is made with the backend's config fields and
    /// pushed here after the build.
    image_ref: Option<String>,
}

fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn run_suite(h: &Harness, case: Case) {
    // A first runner builds everything and exports its cache.
    let first = h.fresh_state("state-first");
    let cx = h.context(&first);
    let built = h.build(&first, &[]);
    let steps = built.steps();
    assert_eq!(steps.len(), 3, "RUN, COPY, RUN");
    assert_eq!(built.ran(), steps, "a first build runs every step");
    if let Some(image_ref) = &case.image_ref {
        push_image_with_cache(h, &cx, &first, &built, &*case.export, image_ref);
    }
    let summary: CacheExportSummary = h
        .runtime
        .block_on(case.export.export(&cx, &built.solved, &[]))
        .unwrap();
    assert_eq!(summary.records, 3, "{summary}");

    // A second runner with nothing but the base image imports it: every step is a hit, and
    // the image's blobs come from the cache.
    let second = h.fresh_state("state-second");
    let cx2 = h.context(&second);
    let imported = h
        .runtime
        .block_on(case.import.import(&cx2))
        .unwrap()
        .expect("the exported cache is found");
    let rebuilt = h.build(&second, &[imported]);
    assert_eq!(rebuilt.ran(), Vec::<usize>::new(), "no step runs again");
    // The solver asks from the target down: the last step's hit makes the others moot.
    let target = rebuilt.solved.graph.target_stage().root.unwrap().index();
    assert_eq!(
        rebuilt.remote_hits(),
        vec![target],
        "the target step is a hit of the imported cache"
    );
    let rootfs = rebuilt.solved.rootfs.as_deref().unwrap();
    rebuilt.solved.worker.fetch_blobs(rootfs).unwrap();

    // A cache that is not there yet: a warning, and the build goes on without it.
    h.warnings.lock().unwrap().clear();
    let none = h.runtime.block_on(case.missing.import(&cx2)).unwrap();
    assert!(none.is_none());
    let warned = h.warnings.lock().unwrap().join("\n");
    assert!(
        warned.contains(&case.missing.name()),
        "warned about {}: {warned}",
        case.missing.name()
    );

    // The records altered at rest: the import is refused, not trusted.
    let altered = match &case.alter {
        Some(alter) => alter(),
        None => alter_records(&case.at_rest),
    };
    assert!(
        altered > 0,
        "found the records under {}",
        case.at_rest.display()
    );
    let refused = h.runtime.block_on(case.import.import(&cx2));
    assert!(
        refused.is_err(),
        "an altered cache is refused (got {:?})",
        refused.map(|c| c.map(|c| c.graph().len()))
    );
}

/// Makes the image of `built` with the backend's image-config fields and pushes it.
fn push_image_with_cache(
    h: &Harness,
    cx: &CacheContext,
    store: &Arc<Store>,
    built: &Built,
    backend: &dyn CacheBackend,
    image_ref: &str,
) {
    let rootfs = built.solved.rootfs.as_deref().unwrap();
    let fields = h
        .runtime
        .block_on(backend.image_config_fields(cx, &built.solved, &rootfs.layers))
        .unwrap()
        .expect("an image-carried cache gives config fields");
    let image = kiln_worker::images::store_image_with_fields(
        store,
        &built.solved.graph.target_stage().config,
        &rootfs.layers,
        &kiln_worker::image::created_timestamp(Some(1_700_000_000)),
        true,
        &fields,
    )
    .unwrap();
    built.solved.worker.fetch_blobs(rootfs).unwrap();
    let content = store.content();
    let mut blobs = vec![(
        image.config.clone(),
        kiln_oci::BlobSource::File(content.blob_path(&image.config.digest)),
    )];
    for l in &image.layers {
        if !blobs.iter().any(|(d, _)| d.digest == l.blob.digest) {
            blobs.push((
                l.blob.clone(),
                kiln_oci::BlobSource::File(content.blob_path(&l.blob.digest)),
            ));
        }
    }
    let target: kiln_oci::Reference = image_ref.parse().unwrap();
    h.runtime
        .block_on(
            h.client
                .push_image(&[target], &image.manifest, &blobs, None),
        )
        .unwrap();
}

/// Appends a byte to every file under `root` that holds cache records (a cache graph, or an
/// image config carrying an inline cache), so that its bytes no longer match their digest.
fn alter_records(root: &Path) -> usize {
    let mut altered = 0;
    let files = walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file());
    for entry in files {
        let entry = entry.path();
        let Ok(bytes) = std::fs::read(entry) else {
            continue;
        };
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(&bytes) else {
            continue;
        };
        if map.contains_key("records") || map.contains_key(kiln_cache::INLINE_CONFIG_KEY) {
            let mut changed = bytes;
            changed.push(b' ');
            std::fs::write(entry, changed).unwrap();
            altered += 1;
        }
    }
    altered
}

#[test]
fn registry_backend_passes_the_suite() {
    let h = Harness::new();
    let cache = h.registry_ref("suite/app:cache");
    let missing = h.registry_ref("suite/app:never-exported");
    let flag = "--export-cache";
    run_suite(
        &h,
        Case {
            export: cache_backend_from_attrs(
                "registry",
                &attrs(&[("ref", &cache), ("mode", "max")]),
                flag,
            )
            .unwrap(),
            import: cache_backend_from_attrs(
                "registry",
                &attrs(&[("ref", &cache)]),
                "--import-cache",
            )
            .unwrap(),
            missing: cache_backend_from_attrs(
                "registry",
                &attrs(&[("ref", &missing)]),
                "--import-cache",
            )
            .unwrap(),
            at_rest: h.registry_root.clone(),
            alter: None,
            image_ref: None,
        },
    );
}

#[test]
fn local_backend_passes_the_suite() {
    let h = Harness::new();
    let dir = h.path("local-cache");
    let dir = dir.to_str().unwrap();
    let nowhere = h.path("no-cache-here");
    run_suite(
        &h,
        Case {
            export: cache_backend_from_attrs(
                "local",
                &attrs(&[("dest", dir), ("mode", "max")]),
                "--export-cache",
            )
            .unwrap(),
            import: cache_backend_from_attrs("local", &attrs(&[("src", dir)]), "--import-cache")
                .unwrap(),
            missing: cache_backend_from_attrs(
                "local",
                &attrs(&[("src", nowhere.to_str().unwrap())]),
                "--import-cache",
            )
            .unwrap(),
            at_rest: PathBuf::from(dir),
            alter: None,
            image_ref: None,
        },
    );
}

#[test]
fn inline_backend_passes_the_suite() {
    let h = Harness::new();
    let image = h.registry_ref("suite/app:latest");
    let missing = h.registry_ref("suite/app:never-pushed");
    run_suite(
        &h,
        Case {
            export: cache_backend_from_attrs("inline", &attrs(&[]), "--export-cache").unwrap(),
            // An inline cache is read through its image's ref.
            import: cache_backend_from_attrs(
                "registry",
                &attrs(&[("ref", &image)]),
                "--import-cache",
            )
            .unwrap(),
            missing: cache_backend_from_attrs(
                "registry",
                &attrs(&[("ref", &missing)]),
                "--import-cache",
            )
            .unwrap(),
            at_rest: h.registry_root.clone(),
            alter: None,
            image_ref: Some(image),
        },
    );
}

#[test]
fn s3_backend_passes_the_suite() {
    let h = Harness::new();
    // A real S3-compatible store: three Garage nodes, replication factor 3.
    let cluster = kiln_test_env::garage::GarageCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let bucket = "suite-cache";
    cluster
        .create_bucket(bucket)
        .unwrap_or_else(|e| panic!("{e}"));
    let (id, secret) = cluster.key();
    let endpoint = cluster.endpoint();
    let with = |extra: &[(&str, &str)], flag: &str| {
        let mut pairs = vec![
            ("bucket", bucket),
            ("region", cluster.region()),
            ("endpoint_url", endpoint.as_str()),
            ("access_key_id", id.as_str()),
            ("secret_access_key", secret.as_str()),
        ];
        pairs.extend_from_slice(extra);
        cache_backend_from_attrs("s3", &attrs(&pairs), flag).unwrap()
    };
    // Altering at rest: the config object the manifest names gets one more byte.
    let client = {
        let env = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some(id.clone()),
            "AWS_SECRET_ACCESS_KEY" => Some(secret.clone()),
            "AWS_REGION" => Some(cluster.region().to_owned()),
            "AWS_ENDPOINT_URL" => Some(endpoint.clone()),
            _ => None,
        };
        let config = kiln_s3::S3Config::from_url_with(&format!("s3://{bucket}"), &env).unwrap();
        kiln_s3::S3Client::new(config).unwrap()
    };
    let handle = h.runtime.handle().clone();
    let alter = move || {
        handle.block_on(async {
            let manifest = client.get("manifests/suite").await.unwrap().unwrap();
            let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
            let key = format!("blobs/{}", manifest["config"]["digest"].as_str().unwrap());
            let mut config = client.get(&key).await.unwrap().unwrap().to_vec();
            config.push(b' ');
            client.put(&key, config.into()).await.unwrap();
        });
        1
    };
    run_suite(
        &h,
        Case {
            export: with(&[("name", "suite"), ("mode", "max")], "--export-cache"),
            import: with(&[("name", "suite")], "--import-cache"),
            missing: with(&[("name", "never-exported")], "--import-cache"),
            at_rest: PathBuf::new(),
            alter: Some(Box::new(alter)),
            image_ref: None,
        },
    );
}

#[test]
fn a_backend_defined_outside_kiln_build_plugs_into_a_build_request() {
    let h = Harness::new();
    let dir = h.path("dir-cache");
    let dir_cache = || Box::new(DirCache { dir: dir.clone() });

    // A first runner builds everything and its session exports the cache.
    h.fresh_state("state-first");
    let first = h.run(
        "state-first",
        vec![],
        vec![CacheExport {
            backend: dir_cache(),
            ignore_error: false,
        }],
    );
    let first = first.expect("the first build succeeds");
    assert_eq!(first.ran().len(), 3, "a first build runs RUN, COPY, RUN");
    assert!(
        first
            .exported
            .iter()
            .any(|s| s.starts_with("3 records to ")),
        "the session exported the cache: {:?}",
        first.exported
    );

    // A second runner's session imports it: no step runs again, the target is a hit of
    // the imported cache.
    h.fresh_state("state-second");
    let second = h
        .run(
            "state-second",
            vec![CacheImport {
                backend: dir_cache(),
                ignore_error: false,
            }],
            vec![],
        )
        .expect("the second build succeeds");
    assert_eq!(second.imported, [dir.display().to_string()]);
    assert_eq!(second.ran(), Vec::<usize>::new(), "no step runs again");
    assert!(
        !second.remote_hits.is_empty(),
        "a step is a hit of the imported cache"
    );

    // A cache that is not there yet: the session warns and builds without it.
    h.fresh_state("state-third");
    let nowhere = h.path("no-dir-cache");
    let third = h
        .run(
            "state-third",
            vec![CacheImport {
                backend: Box::new(DirCache {
                    dir: nowhere.clone(),
                }),
                ignore_error: false,
            }],
            vec![],
        )
        .expect("a missing cache does not fail the build");
    let warned = third.warnings.join("\n");
    assert!(
        warned.contains(&nowhere.display().to_string()),
        "warned about {}: {warned}",
        nowhere.display()
    );
    assert_eq!(third.ran().len(), 3, "built without the cache");

    // The records altered at rest: the session refuses the import and fails the build.
    assert!(
        alter_records(&dir) > 0,
        "found the records under {}",
        dir.display()
    );
    h.fresh_state("state-fourth");
    let refused = h.run(
        "state-fourth",
        vec![CacheImport {
            backend: dir_cache(),
            ignore_error: false,
        }],
        vec![],
    );
    assert!(
        matches!(&refused, Err(f) if matches!(**f, BuildFailure::Session(_))),
        "an altered cache is refused"
    );
}

/// What one session run reported.
struct SessionRun {
    /// Steps started (vertex indices), sources included.
    started: Vec<usize>,
    /// Steps that were hits of an imported cache.
    remote_hits: Vec<usize>,
    /// Source vertices (read in every build).
    sources: Vec<usize>,
    /// Names of the caches imported.
    imported: Vec<String>,
    /// Summaries of the caches exported.
    exported: Vec<String>,
    /// Warnings.
    warnings: Vec<String>,
}

impl SessionRun {
    /// The steps that ran, sources left out, in vertex order.
    fn ran(&self) -> Vec<usize> {
        let mut ran: Vec<usize> = self
            .started
            .iter()
            .copied()
            .filter(|n| !self.sources.contains(n))
            .collect();
        ran.sort();
        ran
    }
}

impl Harness {
    /// Runs the suite's Dockerfile as a [`BuildRequest`] through [`kiln_build::run`] on the
    /// state dir `state` with these caches and no output; what the session reported.
    fn run(
        &self,
        state: &str,
        cache_imports: Vec<CacheImport>,
        cache_exports: Vec<CacheExport>,
    ) -> Result<SessionRun, Box<BuildFailure>> {
        let options = BuildOptions::for_context(self.path("context"));
        let dockerfile = kiln_dockerfile::parse(DOCKERFILE).unwrap();
        let mut request = BuildRequest::new(options, dockerfile, self.path(state));
        request.cache_imports = cache_imports;
        request.cache_exports = cache_exports;
        request.dockerfile_source = DOCKERFILE.to_owned();
        let events: Mutex<Vec<BuildEvent>> = Mutex::default();
        let sink = |e: BuildEvent| events.lock().unwrap().push(e);
        let outcome = kiln_build::run(request, &sink);
        let events = events.into_inner().unwrap();
        outcome.map_err(Box::new)?;
        let mut run = SessionRun {
            started: Vec::new(),
            remote_hits: Vec::new(),
            sources: Vec::new(),
            imported: Vec::new(),
            exported: Vec::new(),
            warnings: Vec::new(),
        };
        for e in events {
            match e {
                BuildEvent::Planned { steps } => {
                    run.sources = steps
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| {
                            !s.description.contains("RUN") && !s.description.contains("COPY")
                        })
                        .map(|(i, _)| i)
                        .collect()
                }
                BuildEvent::Step(Event::Started { node, .. }) => run.started.push(node),
                BuildEvent::Step(Event::Cached {
                    node,
                    source: CacheSource::Remote(_),
                    ..
                }) => run.remote_hits.push(node),
                BuildEvent::CacheImported { name } => run.imported.push(name),
                BuildEvent::CacheExported { summary, .. } => run.exported.push(summary),
                BuildEvent::Warning(w) => run.warnings.push(w),
                _ => {}
            }
        }
        Ok(run)
    }
}

/// A cache in a plain directory: `manifest.json` beside `blobs/<alg>/<hex>`. Defined only
/// here, to show that a backend needs nothing but the trait.
struct DirCache {
    dir: PathBuf,
}

impl DirCache {
    fn fail(&self, e: impl std::error::Error + Send + Sync + 'static) -> CacheError {
        CacheError::Backend {
            name: self.name(),
            source: Box::new(e),
        }
    }

    fn blob_path(&self, d: &kiln_oci::Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(d.algorithm().name())
            .join(d.hex())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the records do not match their digest {0}")]
struct Altered(kiln_oci::Digest);

#[async_trait]
impl CacheBackend for DirCache {
    fn name(&self) -> String {
        self.dir.display().to_string()
    }

    async fn import(&self, cx: &CacheContext) -> Result<Option<Arc<ImportedCache>>, CacheError> {
        let manifest = match std::fs::read(self.dir.join("manifest.json")) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (cx.warn)(&format!("no cache in {}; building without it", self.name()));
                return Ok(None);
            }
            Err(e) => return Err(self.fail(e)),
        };
        let manifest: kiln_oci::ImageManifest =
            serde_json::from_slice(&manifest).map_err(|e| self.fail(e))?;
        let digest = &manifest.config.digest;
        let config = std::fs::read(self.blob_path(digest)).map_err(|e| self.fail(e))?;
        if kiln_oci::Digest::of(digest.algorithm(), &config) != *digest {
            return Err(self.fail(Altered(digest.clone())));
        }
        let graph =
            kiln_cache::CacheGraph::from_manifest(&manifest, &config).map_err(|e| self.fail(e))?;
        Ok(Some(Arc::new(ImportedCache::new(
            graph,
            Arc::new(LayoutBlobs::new(self.dir.clone())),
        ))))
    }

    async fn export(
        &self,
        cx: &CacheContext,
        build: &SolvedBuild,
        _imported: &[ImportedCacheRef],
    ) -> Result<CacheExportSummary, CacheError> {
        let graph = export_graph(build, true).await?;
        let (manifest, config) = graph.to_manifest();
        let write = |path: PathBuf, bytes: &[u8]| {
            std::fs::create_dir_all(path.parent().unwrap())?;
            std::fs::write(path, bytes)
        };
        for l in &manifest.layers {
            let from = cx.store.content().blob_path(&l.digest);
            let bytes = std::fs::read(from).map_err(|e| self.fail(e))?;
            write(self.blob_path(&l.digest), &bytes).map_err(|e| self.fail(e))?;
        }
        write(self.blob_path(&manifest.config.digest), &config).map_err(|e| self.fail(e))?;
        let manifest_json = serde_json::to_vec(&manifest).map_err(|e| self.fail(e))?;
        write(self.dir.join("manifest.json"), &manifest_json).map_err(|e| self.fail(e))?;
        Ok(CacheExportSummary {
            records: graph.len(),
            blobs: manifest.layers.len(),
            expired: 0,
            description: format!("{} records to {}", graph.len(), self.name()),
        })
    }
}

/// A root filesystem with Debian's static busybox and its applets (as the `kiln` crate's
/// e2e tests make one; copied, as test crates cannot share a module).
fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("busybox-static is installed (.ci/install)");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}
