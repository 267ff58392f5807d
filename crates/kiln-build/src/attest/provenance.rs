//! The SLSA provenance v0.2 predicate of a build, with BuildKit's fields: the builder id, the
//! build type, the invocation (frontend, target, build args, the Dockerfile as entry point,
//! the platform), the materials (base images by digest; a local context is not a material, as
//! in BuildKit), the times, and with `mode=max` every step of the build (`buildConfig`) and the
//! Dockerfile's text (BuildKit's source info).
//! Secret values never appear: a step lists the ids of the secrets it mounts, nothing more.

use std::collections::BTreeMap;

use kiln_graph::graph::Op;
use kiln_graph::BuildGraph;
use kiln_oci::Platform;
use serde_json::{json, Map, Value};

use super::{platform_string, ProvenanceMode, ProvenanceRequest};

/// The predicate type of a SLSA provenance v0.2 statement.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v0.2";
/// The build type BuildKit writes, whose structure this predicate follows.
pub const BUILD_TYPE: &str = "https://mobyproject.org/buildkit@v1";

/// What the provenance of one build is made from.
pub struct ProvenanceInputs<'a> {
    /// The flags' request (mode, builder id).
    pub request: &'a ProvenanceRequest,
    /// The Dockerfile's name in its context (`Dockerfile`), the invocation's entry point.
    pub entry_point: String,
    /// `--target`, when given.
    pub target: Option<&'a str>,
    /// Build args by name (values written with `mode=max` only).
    pub build_args: &'a BTreeMap<String, String>,
    /// Labels added by flags (values written with `mode=max` only).
    pub labels: &'a BTreeMap<String, String>,
    /// The names of the local directories the build read (`context`, `dockerfile`, ...).
    pub locals: Vec<String>,
    /// The platform built for.
    pub platform: Platform,
    /// The build's graph: materials (base images) and steps.
    pub graph: &'a BuildGraph,
    /// When the build began and ended (RFC 3339).
    pub started: String,
    /// See `started`.
    pub finished: String,
    /// An id of this build; `None` when the build is to be reproducible.
    pub invocation_id: Option<String>,
    /// The Dockerfile's text (written with `mode=max` only, as BuildKit's source info).
    pub dockerfile_source: &'a str,
}

/// The base images a graph reads, as SLSA materials (`pkg:docker/NAME@TAG?platform=`, by digest),
/// sorted and without duplicates.
pub fn materials(graph: &BuildGraph) -> Vec<Value> {
    let mut out = BTreeMap::new();
    for v in &graph.vertices {
        if let Op::Image(src) = &v.op {
            let Some(digest) = &src.digest else { continue };
            let (algo, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
            let uri = super::docker_purl(&src.reference, &src.platform);
            out.insert(uri.clone(), json!({"uri": uri, "digest": {algo: hex}}));
        }
    }
    out.into_values().collect()
}

/// The steps of `graph` as `buildConfig.llbDefinition`: each vertex's id (`stepN`), its op
/// (command lines, paths, mounts by id; never a secret's value) and its inputs.
fn build_config(graph: &BuildGraph) -> Value {
    let steps: Vec<Value> = graph
        .vertices
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let inputs: Vec<String> = v
                .inputs
                .iter()
                .map(|x| format!("step{}", x.index()))
                .collect();
            json!({
                "id": format!("step{i}"),
                "description": v.meta.description,
                "op": serde_json::to_value(&v.op).unwrap_or(Value::Null),
                "inputs": inputs,
            })
        })
        .collect();
    json!({ "llbDefinition": steps })
}

/// The provenance predicate of a build.
pub fn predicate(inp: &ProvenanceInputs<'_>) -> Value {
    let max = inp.request.mode == ProvenanceMode::Max;
    let mut args = Map::new();
    if let Some(t) = inp.target {
        args.insert("target".into(), json!(t));
    }
    if max {
        for (k, v) in inp.build_args {
            args.insert(format!("build-arg:{k}"), json!(v));
        }
        for (k, v) in inp.labels {
            args.insert(format!("label:{k}"), json!(v));
        }
    }
    let locals: Vec<Value> = inp.locals.iter().map(|n| json!({"name": n})).collect();
    // With `mode=min` the build args and labels are left out, so the parameters are not
    // complete (as BuildKit says); a build without any is complete in both modes.
    let params_complete = max || (inp.build_args.is_empty() && inp.labels.is_empty());
    let mut metadata = Map::new();
    if let Some(id) = &inp.invocation_id {
        metadata.insert("buildInvocationID".into(), json!(id));
    }
    metadata.insert("buildStartedOn".into(), json!(inp.started));
    metadata.insert("buildFinishedOn".into(), json!(inp.finished));
    metadata.insert(
        "completeness".into(),
        json!({"parameters": params_complete, "environment": true, "materials": false}),
    );
    metadata.insert("reproducible".into(), json!(false));
    if max {
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(inp.dockerfile_source);
        metadata.insert(
            format!("{BUILD_TYPE}#metadata"),
            json!({"source": {"infos": [{
                "filename": inp.entry_point,
                "language": "Dockerfile",
                "data": data,
            }]}}),
        );
    }
    let mut p = Map::new();
    p.insert(
        "builder".into(),
        json!({"id": inp.request.builder_id.clone().unwrap_or_default()}),
    );
    p.insert("buildType".into(), json!(BUILD_TYPE));
    p.insert("materials".into(), Value::Array(materials(inp.graph)));
    p.insert(
        "invocation".into(),
        json!({
            "configSource": {"entryPoint": inp.entry_point},
            "parameters": {
                "frontend": "dockerfile.v0",
                "args": Value::Object(args),
                "locals": locals,
            },
            "environment": {"platform": platform_string(&inp.platform)},
        }),
    );
    if max {
        p.insert("buildConfig".into(), build_config(inp.graph));
    }
    p.insert("metadata".into(), Value::Object(metadata));
    Value::Object(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_dockerfile::parse;
    use kiln_graph::{lower, BuildOptions, OfflineResolver};

    fn graph(df: &str, args: &[(&str, &str)]) -> (BuildGraph, BuildOptions) {
        let df = parse(df).unwrap();
        let mut opts = BuildOptions::for_context(".");
        for (k, v) in args {
            opts.build_args.insert((*k).into(), (*v).into());
        }
        (lower(&df, &opts, &[], &OfflineResolver).unwrap(), opts)
    }

    fn inputs<'a>(
        req: &'a ProvenanceRequest,
        g: &'a BuildGraph,
        o: &'a BuildOptions,
    ) -> ProvenanceInputs<'a> {
        ProvenanceInputs {
            request: req,
            entry_point: "Dockerfile".into(),
            target: Some("app"),
            build_args: &o.build_args,
            labels: &o.labels,
            locals: vec!["context".into(), "dockerfile".into()],
            platform: Platform::new("linux", "amd64", None),
            graph: g,
            started: "2023-11-14T22:13:20Z".into(),
            finished: "2023-11-14T22:13:20Z".into(),
            invocation_id: None,
            dockerfile_source: DF,
        }
    }

    const DF: &str =
        "FROM busybox AS app\nARG GREETING\nRUN --mount=type=secret,id=tok echo $GREETING\n";

    #[test]
    fn min_mode_leaves_build_arg_values_and_steps_out() {
        let (g, o) = graph(DF, &[("GREETING", "hello-there")]);
        let req = ProvenanceRequest {
            mode: ProvenanceMode::Min,
            builder_id: Some("https://ci.example/run/1".into()),
        };
        let p = predicate(&inputs(&req, &g, &o));
        assert_eq!(p["builder"]["id"], "https://ci.example/run/1");
        assert_eq!(p["buildType"], BUILD_TYPE);
        assert_eq!(p["invocation"]["parameters"]["args"]["target"], "app");
        assert_eq!(p["invocation"]["environment"]["platform"], "linux/amd64");
        assert!(p.get("buildConfig").is_none());
        assert!(p["metadata"]
            .get(format!("{BUILD_TYPE}#metadata"))
            .is_none());
        assert!(!p.to_string().contains("hello-there"), "{p}");
        assert_eq!(p["metadata"]["completeness"]["parameters"], false);
    }

    #[test]
    fn max_mode_adds_build_args_and_every_step_but_no_secret_value() {
        let (g, o) = graph(DF, &[("GREETING", "hello-there")]);
        let req = ProvenanceRequest {
            mode: ProvenanceMode::Max,
            builder_id: None,
        };
        let p = predicate(&inputs(&req, &g, &o));
        assert_eq!(
            p["invocation"]["parameters"]["args"]["build-arg:GREETING"],
            "hello-there"
        );
        let steps = p["buildConfig"]["llbDefinition"].as_array().unwrap();
        assert_eq!(steps.len(), g.vertices.len());
        assert!(
            steps.iter().any(|s| s["op"].to_string().contains("echo")),
            "{steps:?}"
        );
        assert_eq!(p["metadata"]["buildStartedOn"], "2023-11-14T22:13:20Z");
        let source = &p["metadata"][format!("{BUILD_TYPE}#metadata")]["source"]["infos"][0];
        assert_eq!(source["filename"], "Dockerfile");
        use base64::Engine as _;
        let text = base64::engine::general_purpose::STANDARD
            .decode(source["data"].as_str().unwrap())
            .unwrap();
        assert_eq!(text, DF.as_bytes());
    }
}
