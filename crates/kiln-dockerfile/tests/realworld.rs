//! The parser differential of `bench/realworld/run.sh`: every `Dockerfile` under
//! `$KILN_REALWORLD_DIR` (one directory per file, fetched from public projects and kept outside
//! the repository) is parsed by kiln and by BuildKit's parser (the `dockerfile` PyPI package),
//! and every disagreement is written to `$KILN_REALWORLD_DIR/parser-diffs.txt`.
//!
//! Ignored by default because the files are not checked in; run it with
//! `KILN_REALWORLD_DIR=/tmp/realworld cargo test -p kiln-dockerfile --test realworld -- --ignored`.
//! It fails when the directory or the oracle is missing (a check that cannot run is no pass),
//! and when any file differs.

mod common;

use std::path::{Path, PathBuf};

use kiln_dockerfile::parse;
use serde_json::json;

fn dockerfiles(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path().join("Dockerfile"))
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
#[ignore = "needs KILN_REALWORLD_DIR with fetched Dockerfiles (bench/realworld/run.sh sets it)"]
fn realworld_dockerfiles_parse_as_buildkit_parses_them() {
    let dir = PathBuf::from(
        std::env::var("KILN_REALWORLD_DIR").expect("KILN_REALWORLD_DIR must name the corpus"),
    );
    let files = dockerfiles(&dir);
    assert!(!files.is_empty(), "no */Dockerfile under {}", dir.display());
    // Lossy: a file that is not UTF-8 is compared as BuildKit's parser would see it after the
    // same replacement, which keeps one odd byte from hiding the rest of the file.
    let sources: Vec<String> = files
        .iter()
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).expect("read Dockerfile")).into_owned())
        .collect();
    let answer = common::run_oracle(&json!({ "files": sources }));
    let answers = answer["files"].as_array().expect("oracle answers files");
    assert_eq!(answers.len(), sources.len());
    let mut report = String::new();
    let mut differing = 0;
    for ((path, src), a) in files.iter().zip(&sources).zip(answers) {
        let ours = parse(src);
        let d = common::diff_go(src, &ours, &a["go"]);
        let name = path
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .unwrap_or("?");
        let status = match (&ours, a["go"].get("error")) {
            // The embedded BuildKit predates this syntax (see tests/differential.rs, 6 and 7).
            _ if common::needs_newer_buildkit(src) => "not-compared-newer-syntax",
            (Ok(_), None) => "both-parse",
            (Err(_), Some(_)) => "both-reject",
            (Ok(_), Some(_)) => "only-kiln-parses",
            (Err(_), None) => "only-buildkit-parses",
        };
        if d.is_empty() {
            report.push_str(&format!("{name}\t{status}\tsame\n"));
        } else {
            differing += 1;
            // Drop the leading "source:" line; the file is on disk.
            let detail: Vec<&str> = d.iter().skip(1).map(String::as_str).collect();
            report.push_str(&format!(
                "{name}\t{status}\tDIFF\t{}\n",
                detail.join(" | ").replace('\n', " ")
            ));
        }
    }
    std::fs::write(dir.join("parser-diffs.txt"), &report).expect("write parser-diffs.txt");
    assert_eq!(
        differing,
        0,
        "{differing} of {} files parse differently from BuildKit:\n{report}",
        files.len()
    );
}
