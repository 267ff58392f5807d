//! Several target platforms in one solve: the Dockerfile is lowered once per platform and
//! the graphs are joined into one, so a step that is the same for every platform (a
//! `FROM --platform=$BUILDPLATFORM` stage, the build context) is one vertex, computed once.
//!
//! Two vertices are the same when their ops' bytes and their (joined) inputs are: exactly
//! what makes their cache keys equal, so the join never merges steps the solver would keep
//! apart, and each platform's stages still reach every step they had.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_graph::graph::{Op, StageResult, Vertex, VertexId};
use kiln_graph::{BuildGraph, Platform};

/// One target platform's view of a joined graph: its stages, whose vertex ids point into the
/// joined vertices.
#[derive(Debug, Clone)]
pub struct PlatformView {
    /// The target platform.
    pub platform: Platform,
    /// The joined vertices with this platform's stages and target.
    pub graph: Arc<BuildGraph>,
}

/// The lowered graphs of every target platform as one graph.
#[derive(Debug, Clone)]
pub struct JoinedGraph {
    /// Every platform's view, in request order (the first one's `graph` is the solver's).
    pub platforms: Vec<PlatformView>,
    /// By vertex index: the platform the step builds for (its stage's platform, or the
    /// platform an image source pulls); `None` for shared sources such as the build context.
    pub step_platforms: Vec<Option<Platform>>,
}

impl JoinedGraph {
    /// The joined vertices (those of the first platform's view; every view has the same).
    pub fn vertices(&self) -> &[Vertex] {
        &self.platforms[0].graph.vertices
    }
}

/// Joins the graphs lowered for each target platform, in request order (at least one). With
/// more than one platform, each step's description names its platform, as
/// `[linux/arm64 builder 3/5] RUN make`.
pub fn join_platform_graphs(lowered: Vec<(Platform, BuildGraph)>) -> JoinedGraph {
    let several = lowered.len() > 1;
    let mut vertices: Vec<Vertex> = Vec::new();
    let mut step_platforms: Vec<Option<Platform>> = Vec::new();
    let mut seen: HashMap<(Vec<u8>, Vec<VertexId>), VertexId> = HashMap::new();
    let mut views: Vec<(Platform, Vec<StageResult>, usize)> = Vec::new();
    for (platform, g) in lowered {
        // Vertex of `g` → vertex of the joined graph. Inputs precede their users in `g`, so
        // every input is mapped before it is looked up.
        let mut joined: Vec<VertexId> = Vec::with_capacity(g.vertices.len());
        for v in &g.vertices {
            let inputs: Vec<VertexId> = v
                .inputs
                .iter()
                .map(|i| joined.get(i.index()).copied().unwrap_or(*i))
                .collect();
            let key = (v.canonical_op(), inputs.clone());
            if let Some(&id) = seen.get(&key) {
                if v.meta.ignore_cache {
                    vertices[id.index()].meta.ignore_cache = true;
                }
                joined.push(id);
                continue;
            }
            let step_platform = step_platform(&g, v);
            let mut meta = v.meta.clone();
            if let (true, Some(p)) = (several, &step_platform) {
                meta.description = label_with_platform(&meta.description, p);
            }
            let id = VertexId(vertices.len() as u32);
            vertices.push(Vertex {
                op: v.op.clone(),
                inputs,
                meta,
            });
            step_platforms.push(step_platform);
            seen.insert(key, id);
            joined.push(id);
        }
        let stages = g
            .stages
            .into_iter()
            .map(|mut s| {
                s.root = s.root.and_then(|r| joined.get(r.index()).copied());
                s
            })
            .collect();
        views.push((platform, stages, g.target));
    }
    let platforms = views
        .into_iter()
        .map(|(platform, stages, target)| PlatformView {
            platform,
            graph: Arc::new(BuildGraph {
                vertices: vertices.clone(),
                stages,
                target,
            }),
        })
        .collect();
    JoinedGraph {
        platforms,
        step_platforms,
    }
}

/// `view` without the steps no stage of it needs (other platforms' steps of a joined graph),
/// vertex ids renumbered: one platform's build as if it had been built alone (its provenance
/// names only its own base images and steps).
pub fn own_steps(view: &BuildGraph) -> BuildGraph {
    let mut needed = vec![false; view.vertices.len()];
    let mut stack: Vec<usize> = view
        .stages
        .iter()
        .filter_map(|s| s.root.map(|r| r.index()))
        .collect();
    while let Some(i) = stack.pop() {
        match needed.get_mut(i) {
            Some(seen) if !*seen => *seen = true,
            _ => continue,
        }
        stack.extend(view.vertices[i].inputs.iter().map(|id| id.index()));
    }
    let mut renumbered: Vec<Option<VertexId>> = vec![None; view.vertices.len()];
    let mut vertices = Vec::new();
    for (i, v) in view.vertices.iter().enumerate() {
        if !needed[i] {
            continue;
        }
        renumbered[i] = Some(VertexId(vertices.len() as u32));
        let mut v = v.clone();
        v.inputs = v
            .inputs
            .iter()
            .filter_map(|id| renumbered.get(id.index()).copied().flatten())
            .collect();
        vertices.push(v);
    }
    let stages = view
        .stages
        .iter()
        .cloned()
        .map(|mut s| {
            s.root = s.root.and_then(|r| renumbered[r.index()]);
            s
        })
        .collect();
    BuildGraph {
        vertices,
        stages,
        target: view.target,
    }
}

/// The platform a step of `g` builds for: an image source's own, else its stage's.
fn step_platform(g: &BuildGraph, v: &Vertex) -> Option<Platform> {
    match &v.op {
        Op::Image(s) => Some(s.platform.clone()),
        Op::OciLayout(s) => Some(s.platform.clone()),
        _ => {
            let stage = v.meta.stage.as_deref()?;
            g.stages
                .iter()
                .find(|s| stage_display_name(s) == stage)
                .map(|s| s.platform.clone())
        }
    }
}

/// A stage's name as step descriptions show it (`stage-N` for an unnamed one).
pub fn stage_display_name(s: &StageResult) -> String {
    s.name
        .clone()
        .unwrap_or_else(|| format!("stage-{}", s.index))
}

/// `[builder 3/5] RUN make` → `[linux/arm64 builder 3/5] RUN make`; `[internal] ...` stays.
fn label_with_platform(description: &str, platform: &Platform) -> String {
    match description.strip_prefix('[') {
        Some(rest) if !rest.starts_with("internal]") => format!("[{platform} {rest}"),
        _ => description.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_graph::graph::{CopyOp, CopySource, ExecOp, ImageSource, LocalSource, VertexMeta};
    use kiln_graph::ImageConfig;

    fn meta(description: &str, stage: Option<&str>) -> VertexMeta {
        VertexMeta {
            description: description.into(),
            stage: stage.map(str::to_owned),
            span: None,
            ignore_cache: false,
        }
    }

    fn run(args: &str, env: &[&str]) -> Op {
        Op::Exec(ExecOp {
            rootfs: Some(0),
            args: vec!["/bin/sh".into(), "-c".into(), args.into()],
            env: env.iter().map(|s| s.to_string()).collect(),
            cwd: "/".into(),
            user: String::new(),
            network: kiln_graph::graph::NetworkMode::Default,
            security: kiln_graph::graph::SecurityMode::Sandbox,
            mounts: vec![],
            extra_hosts: vec![],
            shm_size: None,
            ulimits: vec![],
        })
    }

    /// The graph of
    /// `FROM --platform=$BUILDPLATFORM build AS build` / `RUN make` /
    /// `RUN make ARCH=$TARGETARCH` / `FROM stage-1` / `COPY --from=build ...`, lowered for
    /// `target` on an amd64 machine.
    fn lowered(target: &str) -> BuildGraph {
        let host = Platform::parse("linux/amd64").unwrap();
        let target = Platform::parse(target).unwrap();
        let image = |p: &Platform, stage: &str| Vertex {
            op: Op::Image(ImageSource {
                reference: format!("docker.io/library/{stage}:latest"),
                platform: p.clone(),
                digest: None,
            }),
            inputs: vec![],
            meta: meta(&format!("[{stage} 1/3] FROM {stage}"), Some(stage)),
        };
        let arch = format!("TARGETARCH={}", target.architecture);
        let vertices = vec![
            image(&host, "build"),
            Vertex {
                op: run("make", &[]),
                inputs: vec![VertexId(0)],
                meta: meta("[build 2/3] RUN make", Some("build")),
            },
            Vertex {
                op: run("make install", &[&arch]),
                inputs: vec![VertexId(1)],
                meta: meta("[build 3/3] RUN make install", Some("build")),
            },
            image(&target, "stage-1"),
            Vertex {
                op: Op::Local(LocalSource {
                    name: "context".into(),
                    include: vec![],
                    exclude: vec![],
                }),
                inputs: vec![],
                meta: meta("[internal] load build context", None),
            },
            Vertex {
                op: Op::Copy(CopyOp {
                    dest_base: Some(0),
                    source: CopySource::Input { input: 1 },
                    srcs: vec!["/out".into()],
                    dest: "/out".into(),
                    dest_is_dir: false,
                    chown: None,
                    chmod: None,
                    link: false,
                    parents: false,
                    exclude: vec![],
                    auto_extract: false,
                    keep_git_dir: false,
                    is_add: false,
                }),
                inputs: vec![VertexId(3), VertexId(2)],
                meta: meta("[stage-1 2/2] COPY --from=build /out /out", Some("stage-1")),
            },
        ];
        let stage = |index, name: Option<&str>, root, platform: &Platform| StageResult {
            index,
            name: name.map(str::to_owned),
            root: Some(VertexId(root)),
            config: ImageConfig::default(),
            platform: platform.clone(),
        };
        BuildGraph {
            vertices,
            stages: vec![
                stage(0, Some("build"), 2, &host),
                stage(1, None, 5, &target),
            ],
            target: 1,
        }
    }

    #[test]
    fn a_native_stage_is_one_vertex_for_every_target_platform() {
        let joined = join_platform_graphs(vec![
            (
                Platform::parse("linux/amd64").unwrap(),
                lowered("linux/amd64"),
            ),
            (
                Platform::parse("linux/arm64").unwrap(),
                lowered("linux/arm64"),
            ),
        ]);
        // For amd64 every vertex is new (6); arm64 shares the native image, `RUN make` and the
        // context, and adds its own `make install`, base image and copy.
        let v = joined.vertices();
        assert_eq!(v.len(), 9, "{v:#?}");
        let runs_of_make = v
            .iter()
            .filter(|v| v.meta.description.ends_with("RUN make"))
            .count();
        assert_eq!(runs_of_make, 1);
        assert_eq!(v[1].meta.description, "[linux/amd64 build 2/3] RUN make");
        assert_eq!(v[4].meta.description, "[internal] load build context");
        let arm = &joined.platforms[1];
        assert_eq!(arm.platform.to_string(), "linux/arm64");
        let root = arm.graph.target_stage().root.unwrap();
        assert_eq!(
            arm.graph.vertex(root).meta.description,
            "[linux/arm64 stage-1 2/2] COPY --from=build /out /out"
        );
        // The arm64 copy reads the shared native chain's own `make install` for arm64.
        let install = arm.graph.vertex(root).inputs[1];
        assert_eq!(arm.graph.vertex(install).inputs, vec![VertexId(1)]);
        assert_eq!(
            joined.step_platforms[install.index()]
                .as_ref()
                .map(|p| p.to_string()),
            Some("linux/amd64".into())
        );
        let base = arm.graph.vertex(root).inputs[0];
        assert_eq!(
            joined.step_platforms[base.index()]
                .as_ref()
                .map(|p| p.to_string()),
            Some("linux/arm64".into())
        );
        assert_eq!(joined.step_platforms[4], None);
    }

    #[test]
    fn own_steps_are_one_platforms_build_as_if_alone() {
        let joined = join_platform_graphs(vec![
            (
                Platform::parse("linux/amd64").unwrap(),
                lowered("linux/amd64"),
            ),
            (
                Platform::parse("linux/arm64").unwrap(),
                lowered("linux/arm64"),
            ),
        ]);
        let alone = lowered("linux/arm64");
        let own = own_steps(&joined.platforms[1].graph);
        // The same steps (the shared native ones too), nothing of amd64's own.
        let ops = |g: &BuildGraph| {
            let mut ops: Vec<Vec<u8>> = g.vertices.iter().map(|v| v.canonical_op()).collect();
            ops.sort();
            ops
        };
        // The build context is in no stage's chain here (the copy reads the build stage).
        let mut alone_needed = alone.clone();
        alone_needed
            .vertices
            .retain(|v| !matches!(v.op, Op::Local(_)));
        assert_eq!(ops(&own), ops(&alone_needed));
        for (a, b) in own.stages.iter().zip(&alone.stages) {
            let (ra, rb) = (a.root.unwrap(), b.root.unwrap());
            assert_eq!(own.vertex(ra).op, alone.vertex(rb).op);
            assert_eq!(own.vertex(ra).inputs.len(), alone.vertex(rb).inputs.len());
        }
    }

    #[test]
    fn one_platform_keeps_the_graph_as_lowered() {
        let g = lowered("linux/arm64");
        let joined =
            join_platform_graphs(vec![(Platform::parse("linux/arm64").unwrap(), g.clone())]);
        assert_eq!(*joined.platforms[0].graph, g);
    }
}
