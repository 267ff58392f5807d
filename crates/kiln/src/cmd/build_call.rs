//! `kiln build --call targets|outline|check` (and `--check`), answered without running
//! anything, and the lint a build runs before its first step. The answers are printed in
//! buildx's shape: the text form is the table BuildKit's frontend renders (Go's tabwriter: each cell but a line's last padded
//! to its column's widest cell plus a gap), the JSON form is the frontend's `result.json`
//! (same keys, same order, line-only `location`s, the Dockerfile in `sources`).

use std::process::ExitCode;

use kiln_dockerfile::dockerignore::IgnoreMatcher;
use kiln_dockerfile::lint::{check, LintContext, LintReport, LintStages};
use kiln_graph::options::{CallKind, CallRequest, OutputFormat, ProgressMode};
use kiln_graph::{BuildOptions, OfflineResolver, Outline, TargetInfo};
use serde::Serialize;

use super::print_stdout;

/// Answers a subrequest: prints its answer on stdout (errors on stderr, rendered with their
/// source line) and returns the exit code.
pub fn answer(
    call: CallRequest,
    df: &kiln_dockerfile::Dockerfile,
    source: &str,
    file_label: &str,
    opts: &BuildOptions,
    dockerignore: &[String],
) -> anyhow::Result<ExitCode> {
    let frontend_err = |e: kiln_graph::FrontendError| -> anyhow::Result<ExitCode> {
        eprintln!("{}", e.render(file_label, source));
        Ok(ExitCode::from(1))
    };
    let json = call.format == OutputFormat::Json;
    match call.kind {
        CallKind::Targets => match kiln_graph::targets(df) {
            Ok(t) => {
                print_stdout(&targets_text(&t, source, json)?)?;
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => frontend_err(e),
        },
        CallKind::Outline => {
            match kiln_graph::lower_with_outline(df, opts, dockerignore, &OfflineResolver) {
                Ok((_, outline)) => {
                    // The target's own stage name: `None` for an unnamed stage, which
                    // buildx shows without a TARGET line.
                    let stages = kiln_graph::targets(df).unwrap_or_default();
                    let name = match opts.target.as_deref() {
                        Some(t) => Some(t.to_ascii_lowercase()),
                        None => stages.last().and_then(|s| s.name.clone()),
                    };
                    print_stdout(&outline_text(&outline, name.as_deref(), source, json)?)?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => frontend_err(e),
            }
        }
        CallKind::Check => run_check(df, source, file_label, opts, dockerignore, json),
        CallKind::Build => unreachable_build(),
    }
}

/// Lints the stages a build needs and reports the warnings in the build's progress format.
/// Returns the exit code when the lint stops the build (`# check=error=true`, a bad
/// directive).
pub fn lint_before_build(
    df: &kiln_dockerfile::Dockerfile,
    opts: &BuildOptions,
    dockerignore: &[String],
    file_label: &str,
) -> Option<ExitCode> {
    match lint_for_build(df, opts, dockerignore) {
        Ok(report) => {
            match opts.progress {
                ProgressMode::Quiet => {}
                // Machine-read progress gets one JSON event per warning, like its other events.
                ProgressMode::Rawjson => {
                    for w in &report.warnings {
                        eprintln!(
                            "{}",
                            serde_json::json!({
                                "event": "warning",
                                "rule": w.rule.name,
                                "message": w.message,
                                "url": w.rule.url(),
                                "file": file_label,
                                "line": w.span.start.line,
                            })
                        );
                    }
                }
                _ => eprint!("{}", build_warnings_text(&report, file_label)),
            }
            if report.fails() {
                eprintln!(
                    "error: {file_label}: {} (`# check=error=true` turns warnings into errors)",
                    report.violation_message()
                );
                return Some(ExitCode::from(1));
            }
        }
        Err(e) => {
            eprintln!("error: {file_label}: {e}");
            return Some(ExitCode::from(1));
        }
    }
    None
}

fn unreachable_build() -> anyhow::Result<ExitCode> {
    anyhow::bail!("--call build is a normal build; run without --call")
}

/// The lint report of a build: the stages its target needs, `BUILDKIT_DOCKERFILE_CHECK`
/// replacing the `# check=` directive as in BuildKit.
fn lint_for_build(
    df: &kiln_dockerfile::Dockerfile,
    opts: &BuildOptions,
    dockerignore: &[String],
) -> anyhow::Result<LintReport> {
    let matcher = IgnoreMatcher::from_patterns(dockerignore)
        .map_err(|e| anyhow::anyhow!("{}: {e}", opts.context.join(".dockerignore").display()))?;
    let ctx = LintContext {
        dockerignore: Some(&matcher),
        base_env: None,
        check_override: opts
            .build_args
            .get("BUILDKIT_DOCKERFILE_CHECK")
            .map(String::as_str),
        stages: LintStages::NeededBy(opts.target.as_deref()),
    };
    Ok(check(df, &ctx)?)
}

/// Warnings as a build reports them, BuildKit's short form:
/// ` - Rule: message (line N)` under a count line; empty without warnings.
fn build_warnings_text(report: &LintReport, file: &str) -> String {
    let n = report.warnings.len();
    if n == 0 {
        return String::new();
    }
    let mut out = format!(
        "{n} warning{} found in {file} (`kiln build --call check` shows each with its source):\n",
        if n == 1 { "" } else { "s" }
    );
    for w in &report.warnings {
        out.push_str(&format!(
            " - {}: {} (line {})\n",
            w.rule.name, w.message, w.span.start.line
        ));
    }
    out
}

fn run_check(
    df: &kiln_dockerfile::Dockerfile,
    source: &str,
    file: &str,
    opts: &BuildOptions,
    dockerignore: &[String],
    json: bool,
) -> anyhow::Result<ExitCode> {
    // Like BuildKit's lint subrequest, the warnings found before a build error (an invalid
    // base name, a missing stage, a cycle) are reported with it.
    let lowered = kiln_graph::lower(df, opts, dockerignore, &OfflineResolver);
    let matcher = IgnoreMatcher::from_patterns(dockerignore)
        .map_err(|e| anyhow::anyhow!("{}: {e}", opts.context.join(".dockerignore").display()))?;
    let ctx = LintContext {
        dockerignore: Some(&matcher),
        base_env: None,
        check_override: opts
            .build_args
            .get("BUILDKIT_DOCKERFILE_CHECK")
            .map(String::as_str),
        // Without a target BuildKit's check converts every stage; with one, what it needs.
        stages: match opts.target.as_deref() {
            None => LintStages::All,
            t => LintStages::NeededBy(t),
        },
    };
    let report = match check(df, &ctx) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {file}: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let lines: Vec<&str> = source.lines().collect();
    if json {
        let warnings: Vec<serde_json::Value> = report
            .warnings
            .iter()
            .map(|w| {
                serde_json::json!({
                    "ruleName": w.rule.name,
                    "description": w.rule.description,
                    "url": w.rule.url(),
                    "detail": w.message,
                    "location": {
                        "file": file,
                        "ranges": [{
                            "start": {"line": w.span.start.line, "character": w.span.start.column},
                            "end": {"line": w.span.end.line, "character": w.span.end.column},
                        }],
                    },
                })
            })
            .collect();
        let v = serde_json::json!({ "warnings": warnings, "error": report.fails() });
        print_stdout(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
    } else {
        let mut text = String::new();
        for w in &report.warnings {
            text += &format!("WARNING: {} - {}\n", w.rule.name, w.rule.url());
            text += &format!("{}\n", w.message);
            text += &format!("{file}:{}\n", w.span.start.line);
            text += "--------------------\n";
            let last = w.span.end.line.max(w.span.start.line);
            for n in w.span.start.line..=last.min(w.span.start.line + 4) {
                if let Some(l) = lines.get(n.wrapping_sub(1)) {
                    text += &format!("{n:>4} | {l}\n");
                }
            }
            text += "--------------------\n";
            text.push('\n');
        }
        match report.warnings.len() {
            0 => text += "Check complete, no warnings found.\n",
            1 => text += "Check complete, 1 warning has been found!\n",
            n => text += &format!("Check complete, {n} warnings have been found!\n"),
        }
        print_stdout(&text)?;
    }
    if let Err(e) = lowered {
        eprintln!("{}", e.render(file, source));
        return Ok(ExitCode::from(1));
    }
    Ok(if report.fails() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Where something is in the Dockerfile, as BuildKit's `pb.Location` serializes: line ranges
/// only (BuildKit does not track columns), source index 0 omitted.
#[derive(Serialize)]
struct Location {
    ranges: [Range; 1],
}

#[derive(Serialize)]
struct Range {
    start: LinePos,
    end: LinePos,
}

#[derive(Serialize)]
struct LinePos {
    line: usize,
}

fn location(start: usize, end: usize) -> Location {
    Location {
        ranges: [Range {
            start: LinePos { line: start },
            end: LinePos {
                line: end.max(start),
            },
        }],
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize)]
struct TargetList<'a> {
    targets: Vec<TargetJson<'a>>,
    sources: [String; 1],
}

#[derive(Serialize)]
struct TargetJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "is_false")]
    default: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    base: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<&'a str>,
    location: Location,
}

/// `--call targets`: every stage in Dockerfile order, unnamed ones included.
pub fn targets_text(t: &[TargetInfo], source: &str, json: bool) -> anyhow::Result<String> {
    if json {
        let list = TargetList {
            targets: t
                .iter()
                .map(|x| TargetJson {
                    name: x.name.as_deref(),
                    default: x.default,
                    description: &x.description,
                    base: &x.base,
                    platform: x.platform.as_deref().filter(|p| !p.is_empty()),
                    location: location(x.line, x.end_line),
                })
                .collect(),
            sources: [base64(source.as_bytes())],
        };
        return Ok(serde_json::to_string_pretty(&list)? + "\n");
    }
    let mut rows = vec![vec!["TARGET".to_string(), "DESCRIPTION".to_string()]];
    for x in t {
        let name = match (x.name.as_deref(), x.default) {
            (None, true) => "(default)".to_string(),
            (Some(n), true) => format!("{n} (default)"),
            (n, false) => n.unwrap_or_default().to_string(),
        };
        rows.push(vec![name, x.description.clone()]);
    }
    Ok(tab_table(&rows, 1))
}

fn secrets_json(v: &[kiln_graph::SecretInfo]) -> Vec<SecretJson<'_>> {
    v.iter()
        .map(|s| SecretJson {
            name: &s.id,
            required: s.required,
            location: location(s.line, s.line),
        })
        .collect()
}

#[derive(Serialize)]
struct OutlineJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    args: Vec<ArgJson<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    secrets: Vec<SecretJson<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ssh: Vec<SecretJson<'a>>,
    sources: [String; 1],
}

#[derive(Serialize)]
struct ArgJson<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    value: &'a str,
    location: Location,
}

#[derive(Serialize)]
struct SecretJson<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "is_false")]
    required: bool,
    location: Location,
}

/// `--call outline` for the target whose stage name is `name` (`None`: an unnamed stage).
pub fn outline_text(
    o: &Outline,
    name: Option<&str>,
    source: &str,
    json: bool,
) -> anyhow::Result<String> {
    if json {
        let out = OutlineJson {
            name,
            description: &o.description,
            args: o
                .args
                .iter()
                .map(|a| ArgJson {
                    name: &a.name,
                    description: &a.description,
                    value: a.value.as_deref().unwrap_or_default(),
                    location: location(a.line, a.line),
                })
                .collect(),
            secrets: secrets_json(&o.secrets),
            ssh: secrets_json(&o.ssh),
            sources: [base64(source.as_bytes())],
        };
        return Ok(serde_json::to_string_pretty(&out)? + "\n");
    }
    let mut out = String::new();
    if name.is_some() || !o.description.is_empty() {
        let mut rows = vec![vec![
            "TARGET:".to_string(),
            name.unwrap_or("(default)").to_string(),
        ]];
        if !o.description.is_empty() {
            rows.push(vec!["DESCRIPTION:".to_string(), o.description.clone()]);
        }
        out.push_str(&tab_table(&rows, 1));
        out.push('\n');
    }
    if !o.args.is_empty() {
        let mut rows = vec![vec![
            "BUILD ARG".into(),
            "VALUE".into(),
            "DESCRIPTION".into(),
        ]];
        for a in &o.args {
            rows.push(vec![
                a.name.clone(),
                a.value.clone().unwrap_or_default(),
                a.description.clone(),
            ]);
        }
        out.push_str(&tab_table(&rows, 3));
        out.push('\n');
    }
    for (header, list) in [("SECRET", &o.secrets), ("SSH", &o.ssh)] {
        if list.is_empty() {
            continue;
        }
        let mut rows = vec![vec![header.to_string(), "REQUIRED".to_string()]];
        for s in list {
            let required = if s.required { "true" } else { "" };
            rows.push(vec![s.id.clone(), required.to_string()]);
        }
        out.push_str(&tab_table(&rows, 3));
        out.push('\n');
    }
    Ok(out)
}

/// Go's `text/tabwriter` with padding `padding` and no flags: every cell except a line's last
/// is padded to its column's widest cell plus `padding` spaces (so a row with an empty last
/// cell keeps its trailing spaces, as buildx prints it).
fn tab_table(rows: &[Vec<String>], padding: usize) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(r.len().saturating_sub(1)) {
            if widths.len() <= i {
                widths.resize(i + 1, 0);
            }
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            out.push_str(c);
            if i + 1 < r.len() {
                let pad = widths[i] + padding - c.chars().count();
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    }
    out
}

/// Standard base64 with padding: how Go's encoding/json writes the `[]byte` Dockerfile in
/// `sources`.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tab_table_pads_all_but_the_last_cell() {
        let rows = vec![
            vec!["TARGET".to_string(), "DESCRIPTION".to_string()],
            vec!["base".to_string(), String::new()],
            vec!["(default)".to_string(), "the app".to_string()],
        ];
        assert_eq!(
            tab_table(&rows, 1),
            "TARGET    DESCRIPTION\nbase      \n(default) the app\n"
        );
    }

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"FROM x\n"), "RlJPTSB4Cg==");
    }
}
