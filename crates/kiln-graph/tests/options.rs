//! Every `kiln build` flag parses into `BuildOptions`, and bad values name the flag.

use std::path::PathBuf;

use kiln_graph::options::*;
use kiln_graph::{BuildOptions, Platform, RawBuildFlags};

fn base() -> RawBuildFlags {
    RawBuildFlags {
        context: Some("ctx".into()),
        ..Default::default()
    }
}

fn ok(raw: RawBuildFlags) -> BuildOptions {
    BuildOptions::from_flags(&raw).unwrap_or_else(|e| panic!("{e}"))
}

fn err(raw: RawBuildFlags) -> OptionError {
    BuildOptions::from_flags(&raw).expect_err("should fail")
}

#[test]
fn context_defaults_dockerfile_to_context_dockerfile() {
    let o = ok(base());
    assert_eq!(o.context, PathBuf::from("ctx"));
    assert_eq!(o.dockerfile, PathBuf::from("ctx/Dockerfile"));
    assert_eq!(o.target, None);
    assert_eq!(o.progress, ProgressMode::Auto);
}

#[test]
fn missing_context_is_an_error_naming_context() {
    let e = err(RawBuildFlags::default());
    assert_eq!(e.flag, "CONTEXT");
    assert!(e.to_string().contains("--local context=DIR"));
}

#[test]
fn buildctl_locals_and_filename_locate_the_dockerfile() {
    let o = ok(RawBuildFlags {
        frontend: Some("dockerfile.v0".into()),
        locals: vec![
            "context=/src".into(),
            "dockerfile=/df".into(),
            "assets=/a".into(),
        ],
        opts: vec!["filename=Dockerfile.ci".into()],
        ..Default::default()
    });
    assert_eq!(o.context, PathBuf::from("/src"));
    assert_eq!(o.dockerfile, PathBuf::from("/df/Dockerfile.ci"));
    assert_eq!(o.locals["assets"], PathBuf::from("/a"));
}

#[test]
fn unknown_frontend_is_rejected() {
    let e = err(RawBuildFlags {
        frontend: Some("gateway.v0".into()),
        ..base()
    });
    assert_eq!(
        (e.flag.as_str(), e.value.as_str()),
        ("--frontend", "gateway.v0")
    );
}

#[test]
fn bad_local_values_are_rejected() {
    assert_eq!(
        err(RawBuildFlags {
            locals: vec!["context".into()],
            ..base()
        })
        .flag,
        "--local"
    );
    assert_eq!(
        err(RawBuildFlags {
            locals: vec!["context=".into()],
            ..base()
        })
        .flag,
        "--local"
    );
    let e = err(RawBuildFlags {
        locals: vec!["context=/other".into()],
        ..base()
    });
    assert!(e.reason.contains("twice"));
}

#[test]
fn file_flag_and_dockerfile_local_conflict() {
    let e = err(RawBuildFlags {
        file: Some("x".into()),
        locals: vec!["dockerfile=/d".into()],
        ..base()
    });
    assert_eq!(e.flag, "--file");
    let o = ok(RawBuildFlags {
        file: Some("build/Dockerfile".into()),
        ..base()
    });
    assert_eq!(o.dockerfile, PathBuf::from("build/Dockerfile"));
}

#[test]
fn target_from_opt_or_flag_and_empty_target_is_an_error() {
    assert_eq!(
        ok(RawBuildFlags {
            opts: vec!["target=test".into()],
            ..base()
        })
        .target
        .as_deref(),
        Some("test")
    );
    assert_eq!(
        ok(RawBuildFlags {
            target: Some("release".into()),
            ..base()
        })
        .target
        .as_deref(),
        Some("release")
    );
    assert_eq!(
        err(RawBuildFlags {
            target: Some(String::new()),
            ..base()
        })
        .flag,
        "--target"
    );
}

#[test]
fn build_args_from_both_spellings_merge() {
    let o = ok(RawBuildFlags {
        opts: vec!["build-arg:A=1".into(), "label:team=core".into()],
        build_args: vec!["B=two=2".into(), "C".into()],
        ..base()
    });
    assert_eq!(o.build_args["A"], "1");
    assert_eq!(o.build_args["B"], "two=2");
    assert_eq!(o.build_args["C"], "");
    assert_eq!(o.labels["team"], "core");
    assert_eq!(
        err(RawBuildFlags {
            build_args: vec!["=x".into()],
            ..base()
        })
        .flag,
        "--build-arg"
    );
    assert_eq!(
        err(RawBuildFlags {
            opts: vec!["build-arg:=x".into()],
            ..base()
        })
        .flag,
        "--opt"
    );
}

#[test]
fn unknown_opt_key_names_the_key() {
    let e = err(RawBuildFlags {
        opts: vec!["colour=blue".into()],
        ..base()
    });
    assert_eq!(e.flag, "--opt");
    assert!(e.reason.contains("unknown frontend option `colour`"));
    assert_eq!(
        err(RawBuildFlags {
            opts: vec!["novalue".into()],
            ..base()
        })
        .flag,
        "--opt"
    );
}

#[test]
fn platforms_are_normalised_and_deduplicated() {
    let o = ok(RawBuildFlags {
        platforms: vec!["linux/amd64,linux/arm64".into(), "x86_64".into()],
        opts: vec!["platform=linux/arm/v7".into()],
        ..base()
    });
    let s: Vec<String> = o.platforms.iter().map(Platform::to_string).collect();
    assert_eq!(s, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);
    let e = err(RawBuildFlags {
        platforms: vec!["linux/amd64/v2/extra".into()],
        ..base()
    });
    assert_eq!(
        (e.flag.as_str(), e.value.as_str()),
        ("--platform", "linux/amd64/v2/extra")
    );
    assert_eq!(
        err(RawBuildFlags {
            opts: vec!["platform=plan9/mips".into()],
            ..base()
        })
        .flag,
        "--opt"
    );
}

#[test]
fn no_cache_all_and_filters() {
    assert_eq!(
        ok(RawBuildFlags {
            no_cache: true,
            ..base()
        })
        .no_cache,
        NoCache::All
    );
    assert_eq!(
        ok(RawBuildFlags {
            opts: vec!["no-cache=".into()],
            ..base()
        })
        .no_cache,
        NoCache::All
    );
    assert_eq!(
        ok(RawBuildFlags {
            no_cache_filter: vec!["app,dev".into(), "test".into()],
            ..base()
        })
        .no_cache,
        NoCache::Stages(vec!["app".into(), "dev".into(), "test".into()])
    );
    assert_eq!(
        ok(RawBuildFlags {
            opts: vec!["no-cache=app".into()],
            ..base()
        })
        .no_cache,
        NoCache::Stages(vec!["app".into()])
    );
    assert_eq!(
        err(RawBuildFlags {
            no_cache_filter: vec![",".into()],
            ..base()
        })
        .flag,
        "--no-cache-filter"
    );
}

#[test]
fn named_contexts_parse_every_source_kind() {
    let o = ok(RawBuildFlags {
        build_contexts: vec![
            "base=docker-image://alpine:3.19".into(),
            "assets=../assets".into(),
            "layout=oci-layout:///srv/layout:v1".into(),
            "pinned=oci-layout://./l@sha256:".to_string() + &"a".repeat(64),
            "repo=https://example.com/repo.git".into(),
        ],
        opts: vec!["context:tools=docker-image://busybox".into()],
        ..base()
    });
    assert_eq!(
        o.named_contexts["base"],
        NamedContext::Image {
            reference: "alpine:3.19".into()
        }
    );
    assert_eq!(
        o.named_contexts["assets"],
        NamedContext::Local {
            path: "../assets".into()
        }
    );
    assert_eq!(
        o.named_contexts["layout"],
        NamedContext::OciLayout {
            path: "/srv/layout".into(),
            reference: "v1".into()
        }
    );
    assert!(
        matches!(&o.named_contexts["pinned"], NamedContext::OciLayout { reference, .. } if reference.starts_with("sha256:"))
    );
    assert!(matches!(o.named_contexts["repo"], NamedContext::Url { .. }));
    assert!(matches!(
        o.named_contexts["tools"],
        NamedContext::Image { .. }
    ));
    for bad in [
        "x",
        "x=",
        "x=docker-image://",
        "x=s3://bucket",
        "x=oci-layout://p@sha256:12",
    ] {
        let e = err(RawBuildFlags {
            build_contexts: vec![bad.into()],
            ..base()
        });
        assert_eq!(
            (e.flag.as_str(), e.value.as_str()),
            ("--build-context", bad)
        );
    }
}

#[test]
fn secrets_parse_file_and_env_sources() {
    assert_eq!(
        SecretSpec::parse("--secret", "id=npm,src=/run/npmrc")
            .unwrap()
            .source,
        SecretSource::File("/run/npmrc".into())
    );
    assert_eq!(
        SecretSpec::parse("--secret", "id=tok,env=GH_TOKEN")
            .unwrap()
            .source,
        SecretSource::Env("GH_TOKEN".into())
    );
    assert_eq!(
        SecretSpec::parse("--secret", "id=TOKEN").unwrap().source,
        SecretSource::Env("TOKEN".into())
    );
    assert_eq!(
        SecretSpec::parse("--secret", "type=file,id=a")
            .unwrap()
            .source,
        SecretSource::File("a".into())
    );
    for (bad, needle) in [
        ("src=/x", "missing id="),
        ("id=a,src=/x,env=Y", "not both"),
        ("id=a,colour=red", "unknown key `colour`"),
        ("id=a,type=vault", "type=`vault`"),
    ] {
        let e = SecretSpec::parse("--secret", bad).unwrap_err();
        assert_eq!(e.flag, "--secret");
        assert!(e.reason.contains(needle), "{bad}: {}", e.reason);
    }
}

#[test]
fn call_and_check_select_a_subrequest() {
    let c = |s: &str| CallRequest::parse("--call", s);
    assert_eq!(
        c("targets").unwrap(),
        CallRequest {
            kind: CallKind::Targets,
            format: OutputFormat::Text
        }
    );
    assert_eq!(
        c("outline,format=json").unwrap(),
        CallRequest {
            kind: CallKind::Outline,
            format: OutputFormat::Json
        }
    );
    assert_eq!(c("check,format=json").unwrap().kind, CallKind::Check);
    assert!(c("targets,format=yaml")
        .unwrap_err()
        .reason
        .contains("format=json"));
    assert!(c("bogus")
        .unwrap_err()
        .reason
        .contains("unknown subrequest"));
    let o = ok(RawBuildFlags {
        check: true,
        ..base()
    });
    assert_eq!(
        o.call,
        Some(CallRequest {
            kind: CallKind::Check,
            format: OutputFormat::Text
        })
    );
    assert_eq!(
        ok(RawBuildFlags {
            call: Some("build".into()),
            ..base()
        })
        .call,
        None
    );
    assert_eq!(
        err(RawBuildFlags {
            check: true,
            call: Some("targets".into()),
            ..base()
        })
        .flag,
        "--check"
    );
}

#[test]
fn dry_run_progress_metadata_and_parallelism() {
    let o = ok(RawBuildFlags {
        dry_run: Some("json".into()),
        progress: Some("rawjson".into()),
        metadata_file: Some("meta.json".into()),
        max_parallelism: Some("4".into()),
        ..base()
    });
    assert_eq!(o.dry_run, Some(OutputFormat::Json));
    assert_eq!(o.progress, ProgressMode::Rawjson);
    assert_eq!(o.metadata_file, Some(PathBuf::from("meta.json")));
    assert_eq!(o.max_parallelism, Some(4));
    assert_eq!(
        ok(RawBuildFlags {
            dry_run: Some("text".into()),
            ..base()
        })
        .dry_run,
        Some(OutputFormat::Text)
    );
    for p in ["auto", "tty", "plain", "quiet"] {
        ok(RawBuildFlags {
            progress: Some(p.into()),
            ..base()
        });
    }
    assert_eq!(
        err(RawBuildFlags {
            dry_run: Some("xml".into()),
            ..base()
        })
        .flag,
        "--dry-run"
    );
    assert_eq!(
        err(RawBuildFlags {
            progress: Some("fancy".into()),
            ..base()
        })
        .flag,
        "--progress"
    );
    assert_eq!(
        err(RawBuildFlags {
            metadata_file: Some(String::new()),
            ..base()
        })
        .flag,
        "--metadata-file"
    );
    assert_eq!(
        err(RawBuildFlags {
            max_parallelism: Some("-1".into()),
            ..base()
        })
        .flag,
        "--max-parallelism"
    );
}

#[test]
fn pull_comes_from_buildx_pull_or_buildctl_image_resolve_mode() {
    assert!(!ok(base()).pull);
    assert!(
        ok(RawBuildFlags {
            pull: true,
            ..base()
        })
        .pull
    );
    assert!(
        ok(RawBuildFlags {
            opts: vec!["image-resolve-mode=pull".into()],
            ..base()
        })
        .pull
    );
    assert!(
        !ok(RawBuildFlags {
            opts: vec!["image-resolve-mode=local".into()],
            ..base()
        })
        .pull
    );
    let e = err(RawBuildFlags {
        opts: vec!["image-resolve-mode=always".into()],
        ..base()
    });
    assert!(e.to_string().contains("image-resolve-mode=always"), "{e}");
    assert!(e.to_string().contains("--opt"), "{e}");
}
