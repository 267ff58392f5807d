//! The checked-in corpus: every `tests/corpus/*.Dockerfile` is parsed, lowered and expanded,
//! and the result must equal the `.expected.json` beside it.
//!
//! Regenerate with `KILN_BLESS=1 cargo test -p kiln-dockerfile --test corpus`: blessing first
//! checks every corpus file against BuildKit's parser (the `dockerfile` PyPI package) and
//! refuses to write anything if kiln disagrees, so expected files are never blessed blindly.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_dockerfile::instructions::{lower, Command};
use kiln_dockerfile::shell::Lexer;
use kiln_dockerfile::{parse, Args, Dockerfile, Keyword};
use serde_json::{json, Value};

fn corpus_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("Dockerfile"))
        .collect();
    v.sort();
    v
}

/// Expands the expandable arguments in order, with `V=value`, `EMPTY=` and the ENV/ARG
/// values seen so far (a simple flat scope; stage scoping is the frontend's job).
fn expansions(df: &Dockerfile) -> Vec<Value> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("V".into(), "value".into());
    env.insert("EMPTY".into(), String::new());
    let mut out = Vec::new();
    for inst in &df.instructions {
        let Some(kind) = inst.kind() else { continue };
        if kiln_dockerfile::shell::expands_words(kind).is_none() {
            continue;
        }
        let lex = Lexer::new(df.escape);
        let words: Vec<String> = match &inst.args {
            Args::KeyValues(kvs) => kvs
                .iter()
                .flat_map(|kv| [kv.key.text.clone(), kv.value.text.clone()])
                .collect(),
            Args::Words(ws) => ws.iter().map(|w| w.text.clone()).collect(),
            Args::Text(w) => vec![w.text.clone()],
            Args::Json(j) => j.values.clone(),
            _ => vec![],
        };
        let mut results = Vec::new();
        let mut new_vars = Vec::new();
        for w in &words {
            let snapshot = env.clone();
            let lookup = move |n: &str| snapshot.get(n).cloned();
            match lex.expand(w, &lookup) {
                Ok(e) => results.push(json!({
                    "word": w,
                    "value": e.value,
                    "words": e.words,
                    "used": e.used,
                    "unset": e.unset,
                })),
                Err(err) => results.push(json!({ "word": w, "error": err.to_string() })),
            }
        }
        match &inst.args {
            Args::KeyValues(kvs) if kind == Keyword::Env => {
                for kv in kvs {
                    let snapshot = env.clone();
                    let lookup = move |n: &str| snapshot.get(n).cloned();
                    if let (Ok(k), Ok(v)) = (
                        lex.process_word(&kv.key.text, &lookup),
                        lex.process_word(&kv.value.text, &lookup),
                    ) {
                        new_vars.push((k, v));
                    }
                }
            }
            Args::Words(ws) if kind == Keyword::Arg => {
                for w in ws {
                    if let Some((k, v)) = w.text.split_once('=') {
                        let snapshot = env.clone();
                        let lookup = move |n: &str| snapshot.get(n).cloned();
                        if let Ok(v) = lex.process_word(v, &lookup) {
                            new_vars.push((k.to_string(), v));
                        }
                    }
                }
            }
            _ => {}
        }
        env.extend(new_vars);
        out.push(
            json!({ "line": inst.span.start.line, "keyword": inst.keyword, "results": results }),
        );
    }
    out
}

fn summarize(name: &str, src: &str) -> Value {
    let df = match parse(src) {
        Ok(df) => df,
        Err(e) => return json!({ "error": e.render(name, src) }),
    };
    let instructions: Vec<Value> = df
        .instructions
        .iter()
        .map(|i| {
            json!({
                "keyword": i.keyword,
                "span": [i.span.start.line, i.span.start.column, i.span.end.line, i.span.end.column],
                "flags": i.flags.iter().map(|f| f.text()).collect::<Vec<_>>(),
                "args": common::value_list(i),
                "json": i.is_json(),
                "heredocs": i.heredocs.iter().map(|h| json!({
                    "name": h.name, "chomp": h.chomp, "expand": h.expand, "fd": h.fd, "body": h.body(),
                })).collect::<Vec<_>>(),
                "comments": i.comments,
            })
        })
        .collect();
    let lowered: Vec<Value> = df
        .instructions
        .iter()
        .map(|i| match lower(i) {
            Ok(t) => json!(describe(&t.command)),
            Err(e) => json!({ "error": e.render(name, src) }),
        })
        .collect();
    json!({
        "escape": df.escape.to_string(),
        "directives": df.directives.iter().map(|d| json!([d.name, d.value])).collect::<Vec<_>>(),
        "warnings": df.warnings.iter().map(|w| json!([w.span.start.line, w.message])).collect::<Vec<_>>(),
        "instructions": instructions,
        "typed": lowered,
        "expanded": expansions(&df),
    })
}

fn describe(c: &Command) -> String {
    format!("{c:?}")
}

#[test]
fn corpus_matches_expected_results() {
    let files = corpus_files();
    assert!(files.len() >= 150, "corpus has only {} files", files.len());
    let bless = std::env::var("KILN_BLESS").is_ok_and(|v| v == "1");
    if bless {
        // Never bless what BuildKit's parser disagrees with.
        let sources: Vec<String> = files
            .iter()
            .map(|p| std::fs::read_to_string(p).expect("read corpus file"))
            .collect();
        let answer = common::run_oracle(&json!({ "files": sources }));
        let mut bad = Vec::new();
        for ((p, src), a) in files
            .iter()
            .zip(&sources)
            .zip(answer["files"].as_array().expect("files"))
        {
            let d = common::diff_go(src, &parse(src), &a["go"]);
            if !d.is_empty() {
                bad.push(format!("{}: {}", p.display(), d.join("\n")));
            }
        }
        assert!(
            bad.is_empty(),
            "refusing to bless, kiln disagrees with BuildKit:\n{}",
            bad.join("\n\n")
        );
    }
    let mut failures = Vec::new();
    for path in &files {
        let src = std::fs::read_to_string(path).expect("read corpus file");
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("Dockerfile");
        let actual = summarize(name, &src);
        let expected_path = path.with_extension("expected.json");
        if bless {
            let text = serde_json::to_string_pretty(&actual).expect("json") + "\n";
            std::fs::write(&expected_path, text).expect("write expected");
            continue;
        }
        let expected: Value = match std::fs::read_to_string(&expected_path) {
            Ok(t) => serde_json::from_str(&t).expect("expected file is JSON"),
            Err(_) => {
                failures.push(format!("{name}: missing {}", expected_path.display()));
                continue;
            }
        };
        if expected != actual {
            failures.push(format!(
                "{name}:\n  expected {}\n  actual   {}",
                serde_json::to_string(&expected).unwrap_or_default(),
                serde_json::to_string(&actual).unwrap_or_default()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus files differ (KILN_BLESS=1 regenerates after an oracle check):\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
