//! Corpus of Dockerfiles with their expected targets, stage set per target, expanded image
//! config, steps and RUN environments, or the exact error. Each `NAME.Dockerfile` under
//! `tests/corpus/` has a `NAME.expected.json`; run with `KILN_BLESS=1` to rewrite them after
//! a deliberate change (and review the diff).
//!
//! A first-line comment `# corpus-args: K=V @platform=linux/arm64` sets build args and the
//! platform; `# corpus-target: NAME` picks the target whose result is recorded.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_graph::graph::{ImageConfig, Op};
use kiln_graph::*;
use serde_json::{json, Value};

fn options_for(text: &str) -> (BuildOptions, Option<String>) {
    let mut o = BuildOptions::for_context("ctx");
    o.platforms = vec![Platform::parse("linux/amd64").expect("valid platform")];
    let mut target = None;
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        if let Some(args) = line.strip_prefix("# corpus-args:") {
            for a in args.split_whitespace() {
                let (k, v) = a.split_once('=').expect("K=V");
                if k == "@platform" {
                    o.platforms = vec![Platform::parse(v).expect("valid platform")];
                } else {
                    o.build_args.insert(k.to_string(), v.to_string());
                }
            }
        }
        if let Some(t) = line.strip_prefix("# corpus-target:") {
            target = Some(t.trim().to_string());
        }
    }
    (o, target)
}

/// The stage config in the corpus's own JSON shape (empty fields written as empty, health
/// check durations as nanoseconds with 0 for the default).
fn config_json(config: &ImageConfig) -> Value {
    let c = config.runtime();
    let keys = |m: &Option<BTreeMap<String, kiln_oci::config::EmptyObject>>| {
        m.iter()
            .flatten()
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>()
    };
    let healthcheck = c.healthcheck.as_ref().map(|h| {
        json!({
            "test": h.test.clone().unwrap_or_default(),
            "interval": h.interval.unwrap_or(0),
            "timeout": h.timeout.unwrap_or(0),
            "start_period": h.start_period.unwrap_or(0),
            "start_interval": h.start_interval.unwrap_or(0),
            "retries": h.retries.unwrap_or(0),
        })
    });
    json!({
        "env": c.env(), "working_dir": c.working_dir(), "user": c.user(), "cmd": c.cmd,
        "entrypoint": c.entrypoint, "labels": c.labels.clone().unwrap_or_default(),
        "exposed_ports": keys(&c.exposed_ports), "volumes": keys(&c.volumes),
        "healthcheck": healthcheck, "stop_signal": c.stop_signal,
        "shell": c.shell, "on_build": c.on_build(),
    })
}

fn evaluate(text: &str) -> Value {
    let df = match kiln_dockerfile::parse(text) {
        Ok(df) => df,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let (opts, target) = options_for(text);
    let targets = match kiln_graph::targets(&df) {
        Ok(t) => t,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let label = |t: &TargetInfo| {
        t.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", t.index))
    };
    let mut stage_sets = BTreeMap::new();
    for t in targets.iter().filter(|t| t.name.is_some()) {
        let mut o = opts.clone();
        o.target = t.name.clone();
        if let Ok(g) = lower(&df, &o, &[], &OfflineResolver) {
            let names: Vec<String> = g
                .stages
                .iter()
                .map(|s| {
                    s.name
                        .clone()
                        .unwrap_or_else(|| format!("stage-{}", s.index))
                })
                .collect();
            stage_sets.insert(label(t), names);
        }
    }
    let mut o = opts.clone();
    o.target = target;
    let result = match lower(&df, &o, &[], &OfflineResolver) {
        Err(e) => json!({ "error": e.to_string() }),
        Ok(g) => {
            let runs: Vec<Value> = g
                .vertices
                .iter()
                .filter_map(|v| match &v.op {
                    Op::Exec(e) => Some(json!({ "args": e.args, "env": e.env, "cwd": e.cwd, "user": e.user, "mounts": e.mounts })),
                    _ => None,
                })
                .collect();
            let copies: Vec<Value> = g
                .vertices
                .iter()
                .filter_map(|v| match &v.op {
                    Op::Copy(c) => Some(serde_json::to_value(c).expect("serialisable")),
                    _ => None,
                })
                .collect();
            json!({
                "target": plan(&g).target,
                "steps": g.vertices.iter().map(|v| v.meta.description.clone()).collect::<Vec<_>>(),
                "config": config_json(&g.target_stage().config),
                "runs": runs,
                "copies": copies,
            })
        }
    };
    json!({
        "targets": targets.iter().map(label).collect::<Vec<_>>(),
        "default": targets.iter().find(|t| t.default).map(label),
        "stage_sets": stage_sets,
        "result": result,
    })
}

#[test]
fn corpus_matches_expected_results() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let bless = std::env::var_os("KILN_BLESS").is_some();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    let mut checked = 0;
    let mut failures = Vec::new();
    for path in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "Dockerfile"))
    {
        let text = std::fs::read_to_string(path).expect("read corpus file");
        let got = evaluate(&text);
        let expected_path = path.with_extension("expected.json");
        if bless {
            std::fs::write(
                &expected_path,
                serde_json::to_string_pretty(&got).expect("json") + "\n",
            )
            .expect("write expected");
        } else {
            let expected: Value = serde_json::from_str(
                &std::fs::read_to_string(&expected_path)
                    .unwrap_or_else(|_| panic!("missing {}", expected_path.display())),
            )
            .expect("expected is JSON");
            if expected != got {
                failures.push(format!(
                    "{}:\nexpected {expected:#}\n     got {got:#}",
                    path.display()
                ));
            }
        }
        checked += 1;
    }
    assert!(checked >= 50, "corpus has only {checked} files");
    assert!(
        failures.is_empty(),
        "{} corpus mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
