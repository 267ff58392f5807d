//! Running a build: the part of `kiln build` after the Dockerfile is parsed and the options
//! validated — plan, solve with live progress, export, write metadata, summarise.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use kiln_dockerfile::dockerignore::IgnoreMatcher;
use kiln_dockerfile::Dockerfile;
use kiln_graph::options::{OutputKind, OutputSpec};
use kiln_graph::BuildOptions;
use kiln_store::Store;
use kiln_worker::build::{plan_build, BuildError, BuildInputs, SolvedBuild};
use kiln_worker::engine::{ContextFilter, ImageProvider};
use kiln_oci::{ClientConfig, HostConfig, RegistryClient};
use kiln_worker::images::{self, StoredImage};
use kiln_worker::registry::RegistryImages;
use serde_json::json;

use crate::progress::Progress;
use crate::Globals;

/// `.dockerignore` patterns as a context filter.
fn context_filter(patterns: &[String]) -> ContextFilter {
    let m = Arc::new(IgnoreMatcher::from_patterns(patterns).unwrap_or_default());
    let m2 = m.clone();
    ContextFilter {
        excluded: Box::new(move |p: &str, _dir: bool| m.matches(p)),
        may_reinclude: Box::new(move |d: &str| m2.may_match_under(d)),
    }
}

/// `SOURCE_DATE_EPOCH` from the environment or a build arg, as BuildKit reads it.
fn source_date_epoch(opts: &BuildOptions) -> anyhow::Result<Option<i64>> {
    let raw = opts
        .build_args
        .get("SOURCE_DATE_EPOCH")
        .cloned()
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok());
    match raw.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => s
            .parse::<i64>()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds")),
    }
}

/// Runs a real build for `opts`. `render` prints a frontend error with file:line:col.
pub fn execute(
    opts: &BuildOptions,
    dockerfile: &Dockerfile,
    dockerignore: &[String],
    globals: &Globals,
    render: &dyn Fn(&kiln_graph::FrontendError) -> String,
) -> anyhow::Result<ExitCode> {
    IgnoreMatcher::from_patterns(dockerignore)
        .map_err(|e| anyhow::anyhow!(".dockerignore: {e}"))?;
    let sde = source_date_epoch(opts)?;
    let store = Arc::new(
        Store::open(&globals.root)
            .with_context(|| format!("opening kiln's state dir {}", globals.root.display()))?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let client = registry_client(opts)?;
    let images: Arc<dyn ImageProvider> = Arc::new(RegistryImages::new(
        client.clone(),
        runtime.handle().clone(),
        store.clone(),
    ));
    let inputs = BuildInputs {
        dockerfile,
        dockerignore,
        images,
        remotes: Vec::new(),
        context_filter: Arc::new(context_filter),
        source_date_epoch: sde,
    };
    let planned = match plan_build(store.clone(), opts, inputs) {
        Ok(p) => p,
        Err(BuildError::Frontend(e)) => {
            eprintln!("{}", render(&e));
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e.into()),
    };
    let progress = Arc::new(Progress::new(opts.progress, &planned.graph));
    let sink = progress.clone();
    let solved = runtime.block_on(async move {
        planned
            .solve(sink, |solver| {
                let s = solver.clone();
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        eprintln!("kiln: cancelling the build (Ctrl-C)");
                        s.cancel();
                    }
                });
            })
            .await
    });
    let solved = match solved {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln: error: {e}");
            eprint!("{}", progress.summary("build failed"));
            return Ok(ExitCode::from(1));
        }
    };
    let image = export(opts, &solved, &store, sde, &runtime, &client)?;
    if let Some(path) = &opts.metadata_file {
        write_metadata(path, image.as_ref(), &progress)?;
    }
    let target = solved
        .graph
        .target_stage()
        .name
        .clone()
        .unwrap_or_else(|| format!("stage-{}", solved.graph.target_stage().index));
    if !matches!(opts.progress, kiln_graph::options::ProgressMode::Quiet) {
        eprint!("{}", progress.summary(&format!("built target {target}")));
        if let Some(img) = &image {
            eprintln!("image {}", img.manifest.digest);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn oci_types(o: &OutputSpec) -> bool {
    o.oci_mediatypes
        .unwrap_or(!matches!(o.kind, OutputKind::Docker))
}

/// Runs every `--output`; returns the image made, if any.
fn export(
    opts: &BuildOptions,
    solved: &SolvedBuild,
    store: &Store,
    sde: Option<i64>,
    runtime: &tokio::runtime::Runtime,
    client: &RegistryClient,
) -> anyhow::Result<Option<StoredImage>> {
    let stage = solved.graph.target_stage();
    let layers = solved
        .rootfs
        .as_ref()
        .map(|r| r.layers.clone())
        .unwrap_or_default();
    let base_created = solved
        .rootfs
        .as_ref()
        .and_then(|r| r.image.as_ref())
        .and_then(|c| c.created.clone());
    let fallback = base_created
        .unwrap_or_else(|| kiln_worker::image::created_timestamp(sde.map(|s| s.max(0) as u64)));
    let created = kiln_worker::image::image_created(&layers, fallback);
    let mut made: Option<StoredImage> = None;
    for o in &opts.outputs {
        let fs = solved.rootfs.as_deref();
        match o.kind {
            OutputKind::Cacheonly => {}
            OutputKind::Local | OutputKind::Tar => {
                let dest = o
                    .dest
                    .as_deref()
                    .ok_or_else(|| anyhow::anyhow!("--output type={:?} needs dest=PATH", o.kind))?;
                if o.kind == OutputKind::Local {
                    kiln_worker::export::local_dir(&solved.worker, fs, dest)?;
                } else {
                    kiln_worker::export::rootfs_tar(&solved.worker, fs, dest)?;
                }
            }
            OutputKind::Image | OutputKind::Registry | OutputKind::Oci | OutputKind::Docker => {
                let image =
                    images::store_image(store, &stage.config, &layers, &created, oci_types(o))?;
                images::tag_image(store, &image, &o.names)?;
                match o.kind {
                    OutputKind::Oci | OutputKind::Docker => {
                        let dest = o.dest.as_deref().ok_or_else(|| {
                            anyhow::anyhow!("--output type={:?} needs dest=FILE", o.kind)
                        })?;
                        if o.kind == OutputKind::Oci {
                            kiln_worker::export::oci_archive(
                                &solved.worker,
                                fs,
                                &image,
                                &o.names,
                                dest,
                            )?;
                        } else {
                            kiln_worker::export::docker_archive(
                                &solved.worker,
                                fs,
                                &image,
                                &o.names,
                                dest,
                            )?;
                        }
                    }
                    _ if o.push || o.kind == OutputKind::Registry => {
                        if let Some(f) = fs {
                            solved.worker.fetch_blobs(f)?;
                        }
                        runtime.block_on(kiln_worker::registry::push_image(
                            client, store, &image, &o.names,
                        ))?;
                    }
                    _ => {}
                }
                made = Some(image);
            }
        }
    }
    Ok(made)
}

fn write_metadata(
    path: &Path,
    image: Option<&StoredImage>,
    progress: &Progress,
) -> anyhow::Result<()> {
    let mut v = json!({ "kiln.steps": progress.outcomes() });
    if let Some(img) = image {
        v["containerimage.digest"] = json!(img.manifest.digest.to_string());
        v["containerimage.config.digest"] = json!(img.config.digest.to_string());
        v["containerimage.descriptor"] = serde_json::to_value(img.manifest.descriptor())?;
    }
    let text = serde_json::to_vec_pretty(&v)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing --metadata-file {}", path.display()))
}

/// A registry client; hosts of outputs with `registry.insecure=true` speak plain HTTP.
fn registry_client(opts: &BuildOptions) -> anyhow::Result<RegistryClient> {
    let mut config = ClientConfig::default();
    for o in opts.outputs.iter().filter(|o| o.registry_insecure) {
        for n in &o.names {
            if let Ok(r) = n.parse::<kiln_oci::Reference>() {
                config.hosts.insert(
                    r.registry().to_owned(),
                    HostConfig { insecure: true, ..HostConfig::default() },
                );
            }
        }
    }
    RegistryClient::new(config).context("setting up the registry client")
}
