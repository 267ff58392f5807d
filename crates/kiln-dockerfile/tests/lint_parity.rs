//! Lint parity with BuildKit: each `tests/lint/NAME.Dockerfile` has beside it `NAME.buildkit`,
//! the rule names and lines BuildKit v0.24's own Dockerfile frontend reported for it (written
//! by `bench/lint/buildkit_parity.sh --update` against a real buildkitd). kiln's `check` must
//! report exactly those, over every stage as `--call check` without a target does.

use std::path::Path;

use kiln_dockerfile::lint::{check, LintContext};

#[test]
fn lint_matches_buildkit_rule_names_and_lines() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lint");
    let mut cases = 0;
    let mut mismatches = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/lint exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "Dockerfile"))
        .collect();
    entries.sort();
    for path in entries {
        let expected_path = path.with_extension("buildkit");
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        let src = std::fs::read_to_string(&path).expect("case is readable");
        let df = kiln_dockerfile::parse(&src).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let report = check(&df, &LintContext::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut got: Vec<String> = report
            .warnings
            .iter()
            .map(|w| format!("{} {}", w.rule.name, w.span.start.line))
            .collect();
        got.sort();
        let mut want: Vec<String> = expected.lines().map(str::to_string).collect();
        want.sort();
        if got != want {
            mismatches.push(format!(
                "{}:\n  BuildKit: {want:?}\n  kiln:     {got:?}",
                path.display()
            ));
        }
        cases += 1;
    }
    assert!(cases >= 10, "only {cases} lint parity cases found");
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
