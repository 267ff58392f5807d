//! The tests read nothing outside the repository: a fresh clone, with `.ci/install` run,
//! is everything they need. A read of a file beside the checkout (`../shared/...`) or of one
//! machine's layout (`/work/...`) makes a test that passes here and skips or fails elsewhere.
//!
//! Scanned: the code under `crates/*/tests` and `crates/*/src` (unit tests live beside the
//! code) and `examples/`. `bench/` is exempt: it compares kiln with BuildKit, whose binaries
//! `.ci/install` cannot install, and records which machine its numbers come from.

use std::path::{Path, PathBuf};

/// What a line must not contain, and why.
const OUTSIDE_READS: &[(&str, &str)] = &[
    (
        "../shared",
        "a directory beside the checkout, absent from a fresh clone",
    ),
    ("\"/work/", "an absolute path of one machine's layout"),
    (
        ".join(\"../../..",
        "climbs past the workspace root from a crate's directory",
    ),
    ("workspace().join(\"..", "climbs out of the workspace root"),
];

/// Files of code (not test data such as Dockerfile corpora) that tests run or read.
const CODE_EXTENSIONS: &[&str] = &["rs", "py", "sh"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root exists")
}

/// Every code file under `dir`, recursively, in a stable order.
fn code_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.expect("readable dir").path()).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            code_files(&path, out);
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CODE_EXTENSIONS.contains(&e))
        {
            out.push(path);
        }
    }
}

/// `file:line: reason: text` for each line of `text` that reads outside the repository.
fn outside_reads(name: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        for (needle, why) in OUTSIDE_READS {
            if line.contains(needle) {
                found.push(format!("{name}:{}: {why}: {}", n + 1, line.trim()));
            }
        }
    }
    found
}

#[test]
fn test_code_reads_nothing_outside_the_repository() {
    let root = workspace();
    // This file names what it looks for; cargo gives `file!()` relative to the workspace root.
    let this_file = root.join(file!());
    assert!(this_file.is_file(), "{}", this_file.display());
    let mut files = Vec::new();
    let crates = std::fs::read_dir(root.join("crates")).expect("crates/ is readable");
    for krate in crates {
        let krate = krate.expect("crates/ is readable").path();
        code_files(&krate.join("tests"), &mut files);
        code_files(&krate.join("src"), &mut files);
    }
    code_files(&root.join("examples"), &mut files);
    assert!(
        files.len() > 50,
        "found only {} files under {}",
        files.len(),
        root.display()
    );
    let mut found = Vec::new();
    for file in files {
        if file == this_file {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("code is UTF-8");
        let name = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        found.extend(outside_reads(&name, &text));
    }
    assert!(
        found.is_empty(),
        "tests must carry what they read (see crates/kiln-test-env):\n{}",
        found.join("\n")
    );
}

#[test]
fn reads_beside_the_checkout_or_of_one_machine_are_found() {
    let code = r#"let conf = common::workspace().join("../shared/podman/containers.conf");
let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../tools/buildctl");
let t = "/work/shared/tools/buildctl";
let inside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
let tar_entry = format!("../../..{c}/secret");
"#;
    let found = outside_reads("t.rs", code);
    assert_eq!(found.len(), 4, "{found:#?}");
    assert!(
        found[0].starts_with("t.rs:1: a directory beside the checkout"),
        "{found:#?}"
    );
    assert!(
        found
            .iter()
            .all(|f| !f.contains("examples") && !f.contains("secret")),
        "{found:#?}"
    );
}
