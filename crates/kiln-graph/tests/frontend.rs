//! Lowering rules: ARG/ENV scoping, pruning, stage references, named contexts, ONBUILD,
//! mounts, copies and the image config, against a resolver with fixed base-image configs.

use std::collections::BTreeMap;

use kiln_graph::graph::*;
use kiln_graph::options::NamedContext;
use kiln_graph::*;
use kiln_oci::{ContainerConfig, History};

/// Base images with fixed configs; anything else fails to resolve.
struct FixedImages(BTreeMap<String, ImageConfig>);

impl FixedImages {
    fn new() -> Self {
        let mut m = BTreeMap::new();
        m.insert(
            "docker.io/library/busybox:latest".to_string(),
            runtime(ContainerConfig {
                env: Some(vec!["PATH=/bin".into(), "HOME=/root".into()]),
                ..Default::default()
            }),
        );
        m.insert(
            "oci-layout:///l:v1".to_string(),
            runtime(ContainerConfig {
                env: Some(vec!["FROM_LAYOUT=1".into()]),
                ..Default::default()
            }),
        );
        m.insert(
            "docker.io/library/onbuild:latest".to_string(),
            ImageConfig {
                history: vec![History {
                    created_by: Some("base layer".into()),
                    ..Default::default()
                }],
                ..runtime(ContainerConfig {
                    env: Some(vec!["PATH=/bin".into()]),
                    working_dir: Some("/base".into()),
                    user: Some("app".into()),
                    shell: Some(vec!["/bin/bash".into(), "-ec".into()]),
                    on_build: Some(vec!["COPY . /src".into(), "RUN make -C /src".into()]),
                    ..Default::default()
                })
            },
        );
        Self(m)
    }
}

/// An image config with only its runtime part set.
fn runtime(c: ContainerConfig) -> ImageConfig {
    ImageConfig {
        config: Some(c),
        ..Default::default()
    }
}

impl ImageConfigResolver for FixedImages {
    fn resolve_image_config(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<ResolvedConfig, ResolveError> {
        match self.0.get(reference) {
            Some(c) => Ok(ResolvedConfig {
                digest: Some(format!("sha256:{}", "1".repeat(64))),
                config: c.clone(),
            }),
            None => Err(ResolveError {
                reference: reference.into(),
                platform: Box::new(platform.clone()),
                reason: "not in the test registry".into(),
            }),
        }
    }
}

fn opts() -> BuildOptions {
    let mut o = BuildOptions::for_context("ctx");
    o.platforms = vec![Platform::parse("linux/amd64").unwrap()];
    o
}

fn lower_src(src: &str, o: &BuildOptions) -> Result<BuildGraph, FrontendError> {
    let df = kiln_dockerfile::parse(src).expect("test Dockerfile parses");
    lower(&df, o, &[], &FixedImages::new())
}

fn graph(src: &str) -> BuildGraph {
    lower_src(src, &opts()).unwrap_or_else(|e| panic!("{e}"))
}

fn execs(g: &BuildGraph) -> Vec<&ExecOp> {
    g.vertices
        .iter()
        .filter_map(|v| {
            if let Op::Exec(e) = &v.op {
                Some(e)
            } else {
                None
            }
        })
        .collect()
}

fn env_of(e: &ExecOp, k: &str) -> Option<String> {
    e.env
        .iter()
        .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(String::from))
}

fn stage_names(g: &BuildGraph) -> Vec<String> {
    g.stages
        .iter()
        .map(|s| {
            s.name
                .clone()
                .unwrap_or_else(|| format!("stage-{}", s.index))
        })
        .collect()
}

#[test]
fn global_args_are_usable_in_from_but_not_inside_a_stage_until_redeclared() {
    let g = graph("ARG TAG=latest\nARG DIR=/x\nFROM busybox:${TAG}\nWORKDIR ${DIR}/a\nARG DIR\nWORKDIR ${DIR}/b\n");
    let Op::Image(img) = &g.vertices[0].op else {
        panic!()
    };
    assert_eq!(img.reference, "docker.io/library/busybox:latest");
    let dirs: Vec<&str> = g
        .vertices
        .iter()
        .filter_map(|v| {
            if let Op::Mkdir(m) = &v.op {
                Some(m.path.as_str())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(dirs, ["/a", "/x/b"]);
}

#[test]
fn build_args_override_defaults_only_after_declaration() {
    let mut o = opts();
    o.build_args.insert("V".into(), "cli".into());
    let g = lower_src(
        "FROM busybox\nENV BEFORE=$V\nARG V=default\nENV AFTER=$V\nRUN true\n",
        &o,
    )
    .unwrap();
    let cfg = &g.target_stage().config;
    assert_eq!(cfg.env_get("BEFORE"), Some(""));
    assert_eq!(cfg.env_get("AFTER"), Some("cli"));
    let e = execs(&g)[0];
    assert_eq!(env_of(e, "V").as_deref(), Some("cli"));
    // Build args never leak into the image config.
    assert_eq!(cfg.env_get("V"), None);
}

#[test]
fn env_shadows_arg_in_expansion_and_run_env() {
    let g = graph("FROM busybox\nARG A=arg\nENV A=env\nENV B=$A\nRUN true\n");
    assert_eq!(g.target_stage().config.env_get("B"), Some("env"));
    assert_eq!(env_of(execs(&g)[0], "A").as_deref(), Some("env"));
}

#[test]
fn env_values_in_one_instruction_see_the_previous_env() {
    let g = graph("FROM busybox\nENV A=1\nENV A=2 B=$A\n");
    assert_eq!(g.target_stage().config.env_get("B"), Some("1"));
}

#[test]
fn builtin_platform_args_need_declaring_in_a_stage() {
    let g = graph("FROM busybox\nRUN echo\nARG TARGETARCH\nARG BUILDPLATFORM\nENV ARCH=$TARGETARCH\nRUN echo\n");
    let e = execs(&g);
    assert_eq!(env_of(e[0], "TARGETARCH"), None);
    assert_eq!(env_of(e[1], "TARGETARCH").as_deref(), Some("amd64"));
    assert!(env_of(e[1], "BUILDPLATFORM").unwrap().starts_with("linux/"));
    assert_eq!(g.target_stage().config.env_get("ARCH"), Some("amd64"));
}

#[test]
fn from_platform_uses_builtins_and_sets_the_image_platform() {
    let g = graph("FROM --platform=$BUILDPLATFORM busybox AS b\nFROM --platform=linux/arm64 busybox\nCOPY --from=b / /\n");
    let plats: Vec<String> = g
        .vertices
        .iter()
        .filter_map(|v| {
            if let Op::Image(i) = &v.op {
                Some(i.platform.to_string())
            } else {
                None
            }
        })
        .collect();
    assert!(plats.contains(&"linux/arm64".to_string()));
    assert_eq!(g.target_stage().platform.architecture, "arm64");
}

#[test]
fn proxy_build_args_reach_run_without_declaration_and_stay_out_of_history() {
    let mut o = opts();
    o.build_args
        .insert("HTTP_PROXY".into(), "http://proxy:3128".into());
    o.build_args.insert("OTHER".into(), "x".into());
    let g = lower_src("FROM busybox\nARG V=1\nRUN make\n", &o).unwrap();
    let e = execs(&g)[0];
    assert_eq!(
        env_of(e, "HTTP_PROXY").as_deref(),
        Some("http://proxy:3128")
    );
    assert_eq!(env_of(e, "OTHER"), None);
    let h = g.target_stage().config.history.last().unwrap();
    assert_eq!(
        h.created_by.as_deref(),
        Some("RUN |1 V=1 /bin/sh -c make # buildkit")
    );
    assert!(!h.empty_layer);
}

#[test]
fn default_target_is_last_stage_and_target_prunes_unneeded_stages() {
    let src = "FROM busybox AS a\nRUN a\nFROM busybox AS b\nRUN b\nFROM busybox AS c\nCOPY --from=a / /\n";
    assert_eq!(stage_names(&graph(src)), ["a", "c"]);
    let mut o = opts();
    o.target = Some("B".into());
    let g = lower_src(src, &o).unwrap();
    assert_eq!(stage_names(&g), ["b"]);
    assert!(g
        .vertices
        .iter()
        .all(|v| v.meta.stage.as_deref() != Some("a")));
}

#[test]
fn copy_from_by_index_and_mount_from_pull_in_stages() {
    let src = "FROM busybox\nRUN one\nFROM busybox AS tools\nRUN two\nFROM busybox\nCOPY --from=0 /x /x\nRUN --mount=from=tools,target=/t ls /t\n";
    let g = graph(src);
    assert_eq!(stage_names(&g), ["stage-0", "tools", "stage-2"]);
    let run = execs(&g).into_iter().last().unwrap();
    let MountKind::Bind {
        input, readonly, ..
    } = &run.mounts[0].kind
    else {
        panic!()
    };
    assert!(readonly);
    let v = g
        .vertices
        .iter()
        .find(|v| matches!(&v.op, Op::Exec(e) if e == run))
        .unwrap();
    let src_vertex = g.vertex(v.inputs[*input as usize]);
    assert_eq!(src_vertex.meta.stage.as_deref(), Some("tools"));
}

#[test]
fn copy_from_an_image_adds_an_image_source() {
    let g = graph("FROM busybox\nCOPY --from=onbuild /etc/x /x\n");
    let refs: Vec<&str> = g
        .vertices
        .iter()
        .filter_map(|v| {
            if let Op::Image(i) = &v.op {
                Some(i.reference.as_str())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        refs,
        [
            "docker.io/library/busybox:latest",
            "docker.io/library/onbuild:latest"
        ]
    );
}

#[test]
fn cycles_between_stages_are_errors_with_spans() {
    let e = lower_src(
        "FROM busybox AS a\nCOPY --from=b /x /x\nFROM busybox AS b\nCOPY --from=a /y /y\n",
        &opts(),
    )
    .unwrap_err();
    assert!(
        e.message.contains("circular dependency detected on stage"),
        "{e}"
    );
    // Reported at the reference that closes the cycle (a -> b, while b is being lowered).
    assert_eq!(e.span.unwrap().start.line, 2);
    let e = lower_src("FROM busybox AS a\nCOPY --from=a /x /x\n", &opts()).unwrap_err();
    assert!(e
        .message
        .contains("circular dependency detected on stage: a"));
}

#[test]
fn missing_stage_index_and_unknown_target_are_errors() {
    let e = lower_src("FROM busybox\nCOPY --from=5 /x /x\n", &opts()).unwrap_err();
    assert!(e.message.contains("refers to stage 5"), "{e}");
    assert_eq!(e.span.unwrap().start.line, 2);
    let mut o = opts();
    o.target = Some("nope".into());
    let e = lower_src("FROM busybox AS a\n", &o).unwrap_err();
    assert_eq!(
        e.message,
        "target stage \"nope\" could not be found; stages are: a"
    );
    let e = lower_src("FROM busybox\nCOPY --from=Missing_Stage /x /x\n", &opts()).unwrap_err();
    assert!(
        e.message
            .contains("neither a stage nor a valid image reference"),
        "{e}"
    );
}

#[test]
fn unresolvable_base_image_is_an_error_at_the_from_line() {
    let e = lower_src("FROM busybox\nFROM nosuch/image:1\n", &opts()).unwrap_err();
    assert!(
        e.message
            .contains("cannot resolve image docker.io/nosuch/image:1"),
        "{e}"
    );
    assert_eq!(e.span.unwrap().start.line, 2);
}

#[test]
fn named_context_replaces_a_stage_and_an_image() {
    let mut o = opts();
    o.named_contexts.insert(
        "deps".into(),
        NamedContext::Local {
            path: "/prebuilt".into(),
        },
    );
    o.named_contexts.insert(
        "alpine".into(),
        NamedContext::Image {
            reference: "busybox".into(),
        },
    );
    let src = "FROM busybox AS deps\nRUN expensive\nFROM alpine\nCOPY --from=deps /out /out\n";
    let g = lower_src(src, &o).unwrap();
    assert!(execs(&g).is_empty(), "the replaced stage must not run");
    assert!(g
        .vertices
        .iter()
        .any(|v| matches!(&v.op, Op::Local(l) if l.name == "deps")));
    let Op::Image(i) = &g
        .vertices
        .iter()
        .find(|v| v.meta.description.contains("FROM alpine"))
        .unwrap()
        .op
    else {
        panic!()
    };
    assert_eq!(i.reference, "docker.io/library/busybox:latest");
}

#[test]
fn named_context_in_copy_from_and_oci_layout() {
    let mut o = opts();
    o.named_contexts.insert(
        "assets".into(),
        NamedContext::OciLayout {
            path: "/l".into(),
            reference: "v1".into(),
        },
    );
    let g = lower_src("FROM busybox\nCOPY --from=assets /a /a\n", &o).unwrap();
    // The tag is resolved at plan time; the op carries the digest it resolved to.
    let digest = format!("sha256:{}", "1".repeat(64));
    assert!(g
        .vertices
        .iter()
        .any(|v| matches!(&v.op, Op::OciLayout(l) if l.reference == digest && l.path == "/l")));
    let g = lower_src("FROM assets\nRUN env\n", &o).unwrap();
    assert!(
        execs(&g)[0].env.contains(&"FROM_LAYOUT=1".to_string()),
        "the layout image's ENV reaches the stage"
    );
    o.named_contexts.insert(
        "missing".into(),
        NamedContext::OciLayout {
            path: "/l".into(),
            reference: "v2".into(),
        },
    );
    let e = lower_src("FROM missing\n", &o).unwrap_err().to_string();
    assert!(
        e.contains("build context missing") && e.contains("--build-context missing="),
        "{e}"
    );
}

#[test]
fn base_image_config_and_onbuild_triggers_are_applied() {
    let g = graph("FROM onbuild\nRUN ls\n");
    let cfg = &g.target_stage().config;
    assert!(
        cfg.runtime().on_build().is_empty(),
        "triggers are not inherited"
    );
    assert_eq!(cfg.runtime().working_dir(), "/base");
    assert_eq!(cfg.history[0].created_by.as_deref(), Some("base layer"));
    let descs: Vec<&str> = g
        .vertices
        .iter()
        .map(|v| v.meta.description.as_str())
        .collect();
    assert!(descs.contains(&"[stage-0 2/4] COPY . /src"), "{descs:?}");
    let e = execs(&g);
    assert_eq!(e[0].args, ["/bin/bash", "-ec", "make -C /src"]);
    assert_eq!(e[0].user, "app");
    assert_eq!(e[1].args, ["/bin/bash", "-ec", "ls"]);
    assert_eq!(e[1].cwd, "/base");
}

#[test]
fn onbuild_in_a_stage_triggers_in_a_child_stage() {
    let g = graph("FROM busybox AS base\nONBUILD RUN echo child\nFROM base\nRUN echo self\n");
    let args: Vec<String> = execs(&g).iter().map(|e| e.args.join(" ")).collect();
    assert_eq!(args, ["/bin/sh -c echo child", "/bin/sh -c echo self"]);
    assert_eq!(g.stages[0].config.runtime().on_build(), ["RUN echo child"]);
}

#[test]
fn run_mounts_carry_all_their_options() {
    let g = graph(concat!(
        "FROM busybox AS src\nFROM busybox\nWORKDIR /w\n",
        "RUN --mount=type=cache,target=/root/.cache,id=c1,sharing=locked,uid=1000,gid=1000,mode=0700 ",
        "--mount=type=tmpfs,target=/tmp,size=64m --mount=type=secret,id=tok,env=TOKEN,required=true ",
        "--mount=type=ssh --mount=type=bind,from=src,source=/etc,target=etc,rw ",
        "--network=none --security=insecure make\n",
    ));
    let e = execs(&g)[0];
    assert_eq!(e.network, NetworkMode::None);
    assert_eq!(e.security, SecurityMode::Insecure);
    assert_eq!(e.cwd, "/w");
    assert_eq!(
        e.mounts[0],
        Mount {
            target: "/root/.cache".into(),
            kind: MountKind::Cache {
                id: "c1".into(),
                sharing: CacheSharing::Locked,
                input: None,
                source: String::new(),
                readonly: false,
                uid: 1000,
                gid: 1000,
                mode: 0o700
            }
        }
    );
    assert_eq!(e.mounts[1].kind, MountKind::Tmpfs { size: 64 << 20 });
    assert_eq!(
        e.mounts[2].kind,
        MountKind::Secret {
            id: "tok".into(),
            env: Some("TOKEN".into()),
            required: true,
            uid: 0,
            gid: 0,
            mode: 0o400
        }
    );
    assert_eq!(
        e.mounts[3],
        Mount {
            target: "/run/buildkit/ssh_agent.0".into(),
            kind: MountKind::Ssh {
                id: "default".into(),
                required: false,
                uid: 0,
                gid: 0,
                mode: 0o600
            }
        }
    );
    assert_eq!(e.mounts[4].target, "/w/etc");
    assert!(
        matches!(e.mounts[4].kind, MountKind::Bind { readonly: false, ref source, .. } if source == "/etc")
    );
}

#[test]
fn bad_mount_and_flag_values_are_errors_with_spans() {
    for (src, needle) in [
        (
            "FROM busybox\nRUN --mount=type=nfs,target=/x true\n",
            "unsupported mount type \"nfs\"",
        ),
        (
            "FROM busybox\nRUN --mount=type=cache,target=/x,sharing=wild true\n",
            "sharing=wild",
        ),
        (
            "FROM busybox\nRUN --mount=type=cache,target=/x,colour=red true\n",
            "unexpected key 'colour'",
        ),
        (
            "FROM busybox\nRUN --network=bridge true\n",
            "unsupported network mode \"bridge\"",
        ),
        ("FROM busybox\nRUN --bogus true\n", "unknown flag: --bogus"),
        (
            "FROM busybox\nCOPY --chmod=999 a /b\n",
            "invalid chmod value",
        ),
        (
            "FROM busybox\nCOPY https://example.com/x /x\n",
            "source can't be a URL for COPY",
        ),
        (
            "FROM busybox\nSHELL /bin/bash -c\n",
            "SHELL requires the arguments to be in JSON form",
        ),
        ("FROM busybox\nEXPOSE 80/foo\n", "invalid proto: foo"),
        (
            "FROM busybox\nHEALTHCHECK --interval=soon CMD true\n",
            "not a duration",
        ),
    ] {
        let e = lower_src(src, &opts()).unwrap_err();
        assert!(e.message.contains(needle), "{src}: {e}");
        assert_eq!(e.span.unwrap().start.line, 2, "{src}");
    }
}

#[test]
fn copy_and_add_lower_with_their_flags() {
    let g = graph(concat!(
        "FROM busybox\nWORKDIR /app\n",
        "COPY --chown=1000:1000 --chmod=0644 --link --parents --exclude=*.md src/ lib/ ./\n",
        "ADD --checksum=sha256:abc https://example.com/a.tar.gz /dl/\n",
        "ADD pkg.tar.gz /opt/\n",
    ));
    let copies: Vec<&CopyOp> = g
        .vertices
        .iter()
        .filter_map(|v| {
            if let Op::Copy(c) = &v.op {
                Some(c)
            } else {
                None
            }
        })
        .collect();
    let c = copies[0];
    assert_eq!(c.srcs, ["src/", "lib/"]);
    assert_eq!(c.dest, "/app/");
    assert!(c.dest_is_dir && c.link && c.parents && !c.is_add);
    assert_eq!(
        c.chown,
        Some(Chown {
            user: "1000".into(),
            group: Some("1000".into())
        })
    );
    assert_eq!(c.chmod.as_deref(), Some("0644"));
    assert_eq!(c.exclude, ["*.md"]);
    assert!(g.vertices.iter().any(|v| matches!(&v.op, Op::Http(h) if h.checksum.as_deref() == Some("sha256:abc") && h.filename == "a.tar.gz")));
    assert!(copies[1].is_add && !copies[1].auto_extract);
    assert!(copies[2].auto_extract);
}

#[test]
fn add_url_file_names_are_the_decoded_last_path_segment_or_unnamed() {
    for (url, name) in [
        ("https://example.com/dl/a%20b.txt?sig=1#x", "a b.txt"),
        ("https://example.com/releases/v1/", "v1"),
        ("https://example.com", "__unnamed__"),
        ("https://example.com/?q=1", "__unnamed__"),
        ("http://example.com/%2e%2e", "__unnamed__"),
    ] {
        let g = graph(&format!("FROM busybox\nADD {url} /dl/\n"));
        let got: Vec<&str> = g
            .vertices
            .iter()
            .filter_map(|v| match &v.op {
                Op::Http(h) => Some(h.filename.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(got, [name], "{url}");
    }
}

#[test]
fn heredocs_become_inline_files_and_run_scripts() {
    let g = graph("FROM busybox\nARG NAME=world\nCOPY <<EOF /hello.txt\nhello $NAME\nEOF\nCOPY <<'RAW' /raw.txt\n$NAME\nRAW\nRUN <<EOF\necho one\necho two\nEOF\nRUN cat <<EOF > /x\nbody\nEOF\n");
    let inline: Vec<&InlineFile> = g
        .vertices
        .iter()
        .filter_map(|v| {
            if let Op::Copy(CopyOp {
                source: CopySource::Inline { files },
                ..
            }) = &v.op
            {
                files.first()
            } else {
                None
            }
        })
        .collect();
    assert_eq!(inline[0].content, "hello world\n");
    assert_eq!(inline[1].content, "$NAME\n");
    let e = execs(&g);
    assert_eq!(e[0].args[2], "echo one\necho two\n");
    assert_eq!(e[1].args[2], "cat <<EOF > /x\nbody\nEOF");
}

#[test]
fn image_config_is_computed_statically() {
    let g = graph(concat!(
        "FROM busybox\nLABEL a=1 \"b c\"=2\nEXPOSE 80 53/udp 8000-8001\nVOLUME /data [\"/logs\"]\n",
        "USER 1000:1000\nSTOPSIGNAL SIGTERM\nHEALTHCHECK --interval=30s --retries=3 CMD curl -f localhost\n",
        "SHELL [\"/bin/ash\", \"-c\"]\nCMD run\nENTRYPOINT [\"/init\"]\nONBUILD RUN echo hi\nWORKDIR rel\n",
    ));
    let config = &g.target_stage().config;
    let c = config.runtime();
    assert_eq!(c.labels.as_ref().unwrap()["b c"], "2");
    assert_eq!(
        c.exposed_ports
            .iter()
            .flatten()
            .map(|(p, _)| p.clone())
            .collect::<Vec<_>>(),
        ["53/udp", "80/tcp", "8000/tcp", "8001/tcp"]
    );
    assert!(c.volumes.as_ref().unwrap().contains_key("/data"));
    assert_eq!(c.user(), "1000:1000");
    assert_eq!(c.stop_signal.as_deref(), Some("SIGTERM"));
    let hc = c.healthcheck.as_ref().unwrap();
    assert_eq!(
        (hc.test.clone(), hc.interval, hc.retries),
        (
            Some(vec!["CMD-SHELL".to_string(), "curl -f localhost".into()]),
            Some(30_000_000_000),
            Some(3)
        )
    );
    assert_eq!(
        c.cmd.as_deref(),
        Some(&["/bin/ash".to_string(), "-c".into(), "run".into()][..]),
        "CMD set in this stage survives ENTRYPOINT"
    );
    assert_eq!(c.entrypoint.as_deref(), Some(&["/init".to_string()][..]));
    assert_eq!(c.on_build(), ["RUN echo hi"]);
    assert_eq!(c.working_dir(), "/rel");
    let created_by = |h: &History| h.created_by.clone().unwrap_or_default();
    assert!(config
        .history
        .iter()
        .any(|h| created_by(h) == "USER 1000:1000" && h.empty_layer));
    assert!(config
        .history
        .iter()
        .any(|h| created_by(h) == "WORKDIR /rel" && !h.empty_layer));
}

#[test]
fn entrypoint_resets_inherited_cmd() {
    let g = graph("FROM busybox AS a\nCMD [\"x\"]\nFROM a\nENTRYPOINT [\"/e\"]\n");
    assert_eq!(g.target_stage().config.runtime().cmd, None);
}

#[test]
fn no_cache_filter_marks_only_that_stage() {
    let mut o = opts();
    o.no_cache = kiln_graph::options::NoCache::Stages(vec!["b".into()]);
    let g = lower_src(
        "FROM busybox AS a\nRUN a\nFROM busybox AS b\nCOPY --from=a /x /x\nRUN b\n",
        &o,
    )
    .unwrap();
    for v in &g.vertices {
        assert_eq!(
            v.meta.ignore_cache,
            v.meta.stage.as_deref() == Some("b"),
            "{}",
            v.meta.description
        );
    }
}

#[test]
fn descriptions_and_spans_name_stage_step_and_line() {
    let g = graph("FROM busybox AS app\nWORKDIR /srv\nRUN composer   install\n");
    let d: Vec<&str> = g
        .vertices
        .iter()
        .map(|v| v.meta.description.as_str())
        .collect();
    assert_eq!(
        d,
        [
            "[app 1/3] FROM docker.io/library/busybox:latest",
            "[app 2/3] WORKDIR /srv",
            "[app 3/3] RUN composer install"
        ]
    );
    assert_eq!(g.vertices[2].meta.span.unwrap().start_line, 3);
}

#[test]
fn canonical_op_is_stable_and_independent_of_metadata() {
    let a = graph("FROM busybox AS x\nRUN make\n");
    let b = graph("# comment\nFROM busybox AS y\n\nRUN make\n");
    assert_eq!(a.vertices[1].canonical_op(), b.vertices[1].canonical_op());
    assert_ne!(a.vertices[1].meta, b.vertices[1].meta);
    let c = graph("FROM busybox AS x\nRUN make all\n");
    assert_ne!(a.vertices[1].canonical_op(), c.vertices[1].canonical_op());
}

#[test]
fn dockerignore_patterns_go_to_the_context_source() {
    let df = kiln_dockerfile::parse("FROM busybox\nCOPY . /\n").unwrap();
    let g = lower(
        &df,
        &opts(),
        &["*.log".into(), "!keep.log".into()],
        &FixedImages::new(),
    )
    .unwrap();
    let local = g
        .vertices
        .iter()
        .find_map(|v| {
            if let Op::Local(l) = &v.op {
                Some(l)
            } else {
                None
            }
        })
        .unwrap();
    assert_eq!(
        (local.name.as_str(), local.exclude.clone()),
        (
            "context",
            vec!["*.log".to_string(), "!keep.log".to_string()]
        )
    );
}

#[test]
fn instructions_before_from_other_than_arg_are_errors() {
    let e = lower_src("ENV A=1\nFROM busybox\n", &opts()).unwrap_err();
    assert!(e.message.contains("only ARG may come before FROM"));
    let e = lower_src("ARG A\n", &opts()).unwrap_err();
    assert!(e.message.contains("no FROM"));
    let e = lower_src("FROM busybox AS 1abc\n", &opts()).unwrap_err();
    assert!(e.message.contains("invalid name for build stage"));
}

#[test]
fn outline_lists_used_args_with_defaults_descriptions_and_secrets() {
    let src = "# BASE is the base image to use.\nARG BASE=busybox\nARG UNUSED=1\nFROM ${BASE} AS a\n# Version of the app.\nARG VERSION=1.0\nRUN --mount=type=secret,id=npm,required=true true\n";
    let df = kiln_dockerfile::parse(src).unwrap();
    let (_, o) = lower_with_outline(&df, &opts(), &[], &FixedImages::new()).unwrap();
    let names: Vec<&str> = o.args.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["BASE", "VERSION"]);
    // BuildKit's description convention: the comment line that starts with the ARG's name.
    assert_eq!(o.args[0].description, "is the base image to use.");
    assert_eq!(o.args[1].description, "");
    assert_eq!(o.args[1].default.as_deref(), Some("1.0"));
    assert_eq!(
        o.secrets,
        [SecretInfo {
            id: "npm".into(),
            required: true,
            line: 7
        }]
    );
}

#[test]
fn a_long_chain_of_stages_lowers_without_deep_recursion() {
    let mut src = String::from("FROM busybox AS s0\nRUN echo 0\n");
    for i in 1..1000 {
        src.push_str(&format!(
            "FROM s{} AS s{i}\nCOPY --from=s{} /x /x{i}\n",
            i - 1,
            i / 2
        ));
    }
    let g = graph(&src);
    assert_eq!(g.stages.len(), 1000);
    for (i, v) in g.vertices.iter().enumerate() {
        assert!(v.inputs.iter().all(|x| x.index() < i));
    }
}

#[test]
fn global_arg_redeclaring_a_builtin_keeps_its_value() {
    let g = graph("ARG TARGETARCH\nFROM --platform=linux/${TARGETARCH} busybox\nARG TARGETARCH\nENV A=$TARGETARCH\n");
    assert_eq!(g.target_stage().platform.to_string(), "linux/amd64");
    assert_eq!(g.target_stage().config.env_get("A"), Some("amd64"));
}

#[test]
fn a_later_arg_overrides_env_in_the_build_state_but_not_in_the_image() {
    let g = graph("FROM busybox\nENV MODE=env\nARG MODE=arg\nENV SEEN=$MODE\nRUN true\n");
    let cfg = &g.target_stage().config;
    assert_eq!(cfg.env_get("MODE"), Some("env"));
    assert_eq!(cfg.env_get("SEEN"), Some("arg"));
    let e = execs(&g)[0];
    assert_eq!(env_of(e, "MODE").as_deref(), Some("arg"));
    // BuildKit's order: image env first, later keys appended, replaced keys keep their place.
    assert_eq!(e.env, ["PATH=/bin", "HOME=/root", "MODE=arg", "SEEN=arg"]);
}

#[test]
fn args_on_one_line_see_the_previous_ones() {
    let g = graph("FROM busybox\nARG A=1 B=$A\nENV B=$B\n");
    assert_eq!(g.target_stage().config.env_get("B"), Some("1"));
}
