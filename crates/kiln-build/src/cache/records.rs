//! The records a cache export holds: the build's steps (all of them, or the chain of the
//! image's own layers) and, when asked, its cache mounts' contents.

use kiln_cache::CacheGraph;
use kiln_graph::graph::Op;
use kiln_oci::Descriptor;
use kiln_worker::build::SolvedBuild;
use kiln_worker::engine::WorkerError;
use kiln_worker::image::Layer;

/// Which steps a cache export covers: `max` every step of the build (of every target
/// platform), `min` only those whose layers make up the exported image (each platform's).
pub async fn export_graph(solved: &SolvedBuild, max: bool) -> Result<CacheGraph, WorkerError> {
    let graph = &solved.graph;
    let mut nodes: Vec<usize> = Vec::new();
    if max {
        nodes.extend(
            graph
                .vertices
                .iter()
                .enumerate()
                .filter(|(_, v)| {
                    !matches!(
                        v.op,
                        Op::Local(_) | Op::Image(_) | Op::OciLayout(_) | Op::Http(_)
                    )
                })
                .map(|(i, _)| i),
        );
    } else {
        // Follow each target platform's root filesystem down its chain of steps.
        let roots = solved
            .platforms
            .iter()
            .filter_map(|p| p.graph.target_stage().root.map(|r| r.index()));
        for root in roots {
            image_chain(graph, root, &mut nodes);
        }
    }
    let mut seen = std::collections::HashSet::new();
    nodes.retain(|n| seen.insert(*n));
    let mut out = CacheGraph::new();
    for n in nodes {
        let key = solved
            .solver
            .key(n)
            .await
            .map_err(|e| WorkerError::Internal(e.to_string()))?;
        if let Some(layers) = solved.worker.record_of(&key) {
            out.add(&key.to_string(), &layers);
        }
    }
    Ok(out)
}

/// Adds the steps whose layers make up the image whose root filesystem is vertex `root`.
fn image_chain(graph: &kiln_graph::BuildGraph, root: usize, nodes: &mut Vec<usize>) {
    let mut cur = Some(root);
    while let Some(n) = cur {
        let v = &graph.vertices[n];
        let base = match (&v.op, v.op.layer_base()) {
            (_, Some(base)) => base,
            // `COPY --link`: the stage below, and the copy's own record, which is what a
            // runner with a changed base hits.
            (Op::Merge(_), None) => {
                nodes.extend(v.inputs.iter().skip(1).map(|id| id.index()));
                Some(0)
            }
            _ => break,
        };
        nodes.push(n);
        cur = base
            .and_then(|i| v.inputs.get(i as usize))
            .map(|id| id.index());
    }
}

/// Adds the contents of the build's cache mounts (`RUN --mount=type=cache`) to `out`, each as
/// one compressed tar blob in the local content store; a mount larger than `max_bytes` is
/// left out with a warning through `warn`.
pub fn export_cache_mounts(
    solved: &SolvedBuild,
    out: &mut CacheGraph,
    max_bytes: u64,
    warn: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), WorkerError> {
    use std::io::Write;
    let mut ids = std::collections::BTreeSet::new();
    for v in &solved.graph.vertices {
        if let Op::Exec(e) = &v.op {
            for m in &e.mounts {
                if let kiln_graph::graph::MountKind::Cache { id, .. } = &m.kind {
                    ids.insert(id.clone());
                }
            }
        }
    }
    let store = solved.worker.store();
    for id in ids {
        let guard = solved.worker.cache_mount_dir(&id)?;
        let dir = guard.path().to_owned();
        let size: u64 = walkdir::WalkDir::new(&dir)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum();
        if size == 0 {
            continue;
        }
        if size > max_bytes {
            warn(&format!(
                "cache mount {id} holds {size} bytes, over the {max_bytes}-byte bound; not exported"
            ));
            continue;
        }
        let io_err = |source| WorkerError::Io {
            what: "archiving cache mount",
            path: dir.clone(),
            source,
        };
        let blob = store.content().writer()?;
        let opts = kiln_oci::compression::CompressOptions::default();
        let gz = kiln_oci::compression::Compressor::new(
            blob,
            kiln_oci::compression::Compression::Gzip,
            &opts,
        )
        .map_err(io_err)?;
        let mut tar_out = kiln_oci::DigestWriter::new(gz, kiln_oci::Algorithm::Sha256);
        {
            let mut b = tar::Builder::new(&mut tar_out);
            b.follow_symlinks(false);
            b.mode(tar::HeaderMode::Deterministic);
            b.append_dir_all(".", &dir).map_err(io_err)?;
            b.finish().map_err(io_err)?;
        }
        tar_out.flush().map_err(io_err)?;
        let (gz, diff_id, _) = tar_out.finish();
        let blob = gz.finish().map_err(io_err)?;
        let info = blob.commit_computed()?;
        let layer = Layer {
            blob: Descriptor::new(kiln_oci::media_type::OCI_LAYER_GZIP, info.digest, info.size),
            diff_id,
            created: None,
        };
        out.add_mount(&id, &layer);
    }
    Ok(())
}
