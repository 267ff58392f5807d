//! Shared test support: the Python oracles, the AST-to-oracle mapping, and a deterministic
//! Dockerfile generator.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use kiln_dockerfile::{Args, Dockerfile, Instruction};
use serde_json::{json, Value};

/// Runs the oracle script on a batch request and returns its answer. A missing python3 or
/// oracle package fails the test, saying how to install it (`.ci/install` does).
pub fn run_oracle(request: &Value) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oracle/oracle.py");
    let child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = child.unwrap_or_else(|e| {
        panic!("python3 is not runnable for the oracle test: {e}; run `bash .ci/install`")
    });
    let body = serde_json::to_vec(request).expect("request serialises");
    let mut stdin = child.stdin.take().expect("stdin piped");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output().expect("oracle runs");
    writer.join().expect("writer thread");
    assert_ne!(
        out.status.code(),
        Some(3),
        "oracle packages are missing (run `bash .ci/install`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("oracle prints JSON")
}

/// BuildKit's node value list for the arguments.
pub fn value_list(inst: &Instruction) -> Vec<String> {
    if inst.kind().is_none() {
        return vec![String::new()];
    }
    match &inst.args {
        // The binding reports the wrapped instruction's values; a wrapped ONBUILD has only
        // an empty value node of its own.
        Args::Onbuild(child) => match &child.args {
            Args::Onbuild(_) => vec![String::new()],
            _ => value_list(child),
        },
        _ => args_values(&inst.args),
    }
}

fn args_values(args: &Args) -> Vec<String> {
    match args {
        Args::Empty => vec![],
        Args::Text(w) => vec![w.text.clone()],
        Args::Words(ws) => ws.iter().map(|w| w.text.clone()).collect(),
        Args::Json(j) => j.values.clone(),
        Args::KeyValues(kvs) => kvs
            .iter()
            .flat_map(|kv| [kv.key.text.clone(), kv.value.text.clone()])
            .collect(),
        Args::Healthcheck { kind, command } => {
            let mut v = vec![kind.text.clone()];
            v.extend(args_values(command));
            v
        }
        Args::Onbuild(_) => vec![String::new()],
    }
}

/// The shape the `dockerfile` package (BuildKit's Go parser) reports.
pub fn to_go_shape(df: &Dockerfile) -> Value {
    let insts: Vec<Value> = df
        .instructions
        .iter()
        .map(|i| {
            let (sub_cmd, json_form, heredocs) = match &i.args {
                // The Python binding reads attributes and heredocs from the wrapped node.
                Args::Onbuild(child) => {
                    (Value::from(child.keyword.clone()), child.is_json(), vec![])
                }
                _ => (
                    Value::Null,
                    i.is_json(),
                    i.heredocs
                        .iter()
                        .map(|h| json!([h.name, h.fd, h.content]))
                        .collect(),
                ),
            };
            let mut original = i.original.clone();
            if !heredocs.is_empty() {
                for h in &i.heredocs {
                    original.push('\n');
                    original.push_str(&h.content);
                    original.push_str(&h.name);
                }
                original.push('\n');
            }
            json!({
                "cmd": i.keyword,
                "sub_cmd": sub_cmd,
                "json": json_form,
                "original": original,
                "start_line": i.span.start.line,
                "end_line": i.span.end.line,
                "flags": i.flags.iter().map(|f| f.text()).collect::<Vec<_>>(),
                "value": value_list(i),
                "heredocs": heredocs,
            })
        })
        .collect();
    json!({ "instructions": insts })
}

/// True when the file uses syntax newer than the BuildKit version embedded in the `dockerfile`
/// package (deviations 6 and 7 in tests/differential.rs): a `# check=` directive in the
/// directive block, or whitespace between `<<` and a heredoc word.
pub fn needs_newer_buildkit(src: &str) -> bool {
    for line in src.lines() {
        let t = line.trim_start();
        if !t.starts_with('#') {
            break;
        }
        let body = t[1..].trim_start();
        if body.len() >= 5 && body[..5].eq_ignore_ascii_case("check") {
            let after = body[5..].trim_start();
            if after.starts_with('=') {
                return true;
            }
        }
    }
    ["<< ", "<<\t", "<<- ", "<<-\t", "<<\r", "<<-\r"]
        .iter()
        .any(|p| src.contains(p))
}

/// Compares kiln's parse with the Go oracle's answer; returns the differences.
pub fn diff_go(
    src: &str,
    ours: &Result<Dockerfile, kiln_dockerfile::ParseError>,
    go: &Value,
) -> Vec<String> {
    let mut diffs = Vec::new();
    if needs_newer_buildkit(src) {
        return diffs;
    }
    match (ours, go.get("error")) {
        (Err(e), Some(g)) => {
            if g.as_str() != Some(e.message.as_str()) {
                diffs.push(format!("error text: ours {:?} go {g}", e.message));
            }
        }
        (Err(e), None) => diffs.push(format!("we fail ({}) but BuildKit parses", e.message)),
        (Ok(_), Some(g)) => diffs.push(format!("BuildKit fails ({g}) but we parse")),
        (Ok(df), None) => {
            let ours = to_go_shape(df);
            let a = ours["instructions"].as_array().cloned().unwrap_or_default();
            let b = go["instructions"].as_array().cloned().unwrap_or_default();
            if a.len() != b.len() {
                diffs.push(format!(
                    "instruction count: ours {} go {}",
                    a.len(),
                    b.len()
                ));
            }
            for (x, y) in a.iter().zip(b.iter()) {
                if x != y {
                    diffs.push(format!("instruction differs:\n  ours {x}\n  go   {y}"));
                    break;
                }
            }
        }
    }
    if !diffs.is_empty() {
        diffs.insert(0, format!("source: {src:?}"));
    }
    diffs
}

/// Compares with the e2b port, skipping its documented deviations from BuildKit (see
/// `E2B_DEVIATIONS` in tests/differential.rs).
pub fn diff_e2b(
    src: &str,
    ours: &Result<Dockerfile, kiln_dockerfile::ParseError>,
    e2b: &Value,
) -> Vec<String> {
    let mut diffs = Vec::new();
    // Deviation 1: e2b ignores ONBUILD arguments (so never reads ONBUILD heredocs).
    // Deviation 2: e2b rejects unknown instructions while parsing; BuildKit does that later.
    if src.to_ascii_lowercase().contains("onbuild") {
        return diffs;
    }
    // Deviation 4 (whole file): with `# escape=`` BuildKit still treats `\` as the escape in
    // flags, e2b uses the backtick; the rest of the line then splits differently.
    if src.contains('\\') && matches!(ours, Ok(df) if df.escape == '`') {
        return diffs;
    }
    if let Ok(df) = ours {
        if df.instructions.iter().any(|i| i.kind().is_none()) {
            return diffs;
        }
        // Deviation 9 (whole file): after a JSON array with trailing text, e2b reads shell
        // form, may find heredocs BuildKit does not, and then reads different lines.
        if df
            .instructions
            .iter()
            .any(|i| i.is_json() && json_has_trailing_text(&i.original))
        {
            return diffs;
        }
    }
    // Deviation 9: a non-string array followed by text is an error in BuildKit (the array is
    // decoded); e2b fails to decode it and takes shell form.
    if matches!(ours, Err(e) if e.message.starts_with("when using JSON array syntax"))
        && e2b.get("error").is_none()
    {
        return diffs;
    }
    if e2b["error"]
        .as_str()
        .is_some_and(|e| e.contains("unknown instruction"))
    {
        return diffs;
    }
    // Deviation 11: e2b accepts a file without instructions; BuildKit rejects it.
    if matches!(ours, Err(e) if e.message == "file with no instructions")
        && e2b["instructions"].as_array().is_some_and(|a| a.is_empty())
    {
        return diffs;
    }
    // Deviation 12: a number beyond float64 range makes Go's decoder fail (shell form);
    // e2b decodes it and rejects the array as not all strings.
    if ours.is_ok()
        && e2b["error"]
            .as_str()
            .is_some_and(|e| e.contains("Only strings are supported"))
        && src.contains("e999")
    {
        return diffs;
    }
    match (ours, e2b.get("error")) {
        (Err(e), Some(g)) => {
            let g = g.as_str().unwrap_or("");
            // Deviation 8: e2b words the non-string JSON array error differently.
            let g = g.replace(
                "Only strings are supported in JSON arrays",
                "when using JSON array syntax, arrays must be comprised of strings only",
            );
            // Deviation 10: e2b quotes the word with plain quotes, BuildKit with Go's %q.
            let same = g.ends_with(e.message.as_str())
                || (e.message.starts_with("Syntax error - can't find = in")
                    && g.contains("Syntax error - can't find = in"));
            if !same {
                diffs.push(format!("error text: ours {:?} e2b {g:?}", e.message));
            }
        }
        (Err(e), None) => diffs.push(format!("we fail ({}) but e2b parses", e.message)),
        (Ok(_), Some(g)) => {
            let g = g.as_str().unwrap_or("");
            diffs.push(format!("e2b fails ({g}) but we parse"));
        }
        (Ok(df), None) => {
            let b = e2b["instructions"].as_array().cloned().unwrap_or_default();
            if df.instructions.len() != b.len() {
                diffs.push(format!(
                    "instruction count: ours {} e2b {}",
                    df.instructions.len(),
                    b.len()
                ));
            }
            for (i, y) in df.instructions.iter().zip(b.iter()) {
                let name = i.name();
                // Deviation 9: Go's JSON decoder stops after the array and ignores trailing
                // text (`RUN ["a"] tail` is exec form); e2b's json.loads rejects it.
                if i.is_json() && y["json"] == json!(false) && json_has_trailing_text(&i.original) {
                    continue;
                }
                let mut checks = vec![
                    ("name", json!(name), y["name"].clone()),
                    ("original", json!(i.original), y["original"].clone()),
                    ("json", json!(i.is_json()), y["json"].clone()),
                    (
                        "start_line",
                        json!(i.span.start.line),
                        y["start_line"].clone(),
                    ),
                    ("end_line", json!(i.span.end.line), y["end_line"].clone()),
                    (
                        "heredocs",
                        json!(i
                            .heredocs
                            .iter()
                            .map(|h| json!([h.name, h.content, h.chomp, h.expand, h.fd]))
                            .collect::<Vec<_>>()),
                        y["heredocs"].clone(),
                    ),
                ];
                // Deviation 3: e2b splits shell-form ADD/COPY with quote awareness; BuildKit
                // splits on whitespace only.
                let shell_copy = matches!(name.as_str(), "ADD" | "COPY") && !i.is_json();
                // Deviation 4: e2b walks flags by character with the active escape token;
                // BuildKit walks bytes with `\` always.
                let ascii_flags = i.original.is_ascii() && df.escape == '\\';
                if ascii_flags {
                    checks.push((
                        "flags",
                        json!(i.flags.iter().map(|f| f.text()).collect::<Vec<_>>()),
                        y["flags"].clone(),
                    ));
                }
                if !shell_copy && i.original.is_ascii() {
                    let ours_args = match &i.args {
                        Args::KeyValues(kvs) => kvs
                            .iter()
                            .flat_map(|kv| {
                                [
                                    kv.key.text.clone(),
                                    kv.value.text.clone(),
                                    if kv.legacy { String::new() } else { "=".into() },
                                ]
                            })
                            .collect(),
                        _ => value_list(i),
                    };
                    checks.push(("args", json!(ours_args), y["args"].clone()));
                }
                for (what, a, b) in checks {
                    if a != b {
                        diffs.push(format!("{what}: ours {a} e2b {b}"));
                    }
                }
                if !diffs.is_empty() {
                    break;
                }
            }
        }
    }
    if !diffs.is_empty() {
        diffs.insert(0, format!("source: {src:?}"));
    }
    diffs
}

/// True when the JSON array in `original` is followed by more text.
fn json_has_trailing_text(original: &str) -> bool {
    let Some(start) = original.find('[') else {
        return false;
    };
    let mut it = serde_json::Deserializer::from_str(&original[start..]).into_iter::<Value>();
    match it.next() {
        Some(Ok(_)) => !original[start + it.byte_offset()..].trim().is_empty(),
        _ => true,
    }
}

/// A small deterministic PRNG (xorshift64*), so generated inputs are the same on every run.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next raw value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// True with probability 1/n.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    /// A random element.
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const WORDS: &[&str] = &[
    "a",
    "b",
    "foo",
    "bar",
    "/app",
    "./src",
    "x.txt",
    "$V",
    "${V}",
    "${V:-d}",
    "\"q w\"",
    "'s q'",
    "a\\ b",
    "1",
    "--x",
    "-y",
    "é",
    "\\\"",
    "=",
    "k=v",
    "\"k=v w\"",
    "*.go",
    "[a]",
    "{b}",
    "\\$V",
    "<<",
    "<",
    ">",
    "/x",
    "alpine:3",
    "AS",
    "as",
    "\\",
    "'",
    "\"",
    "#",
    "# c",
    "\t",
    "a\tb",
];

const FLAGS: &[&str] = &[
    "--from=build",
    "--chown=1:1",
    "--chmod=755",
    "--link",
    "--mount=type=cache,target=/c",
    "--mount=type=secret,id=s",
    "--network=none",
    "--platform=$BUILDPLATFORM",
    "--x=\"a b\"",
    "--y='c'",
    "--z=a\\ b",
    "--",
    "--interval=5s",
    "--keep-git-dir",
    "--exclude=*.md",
    "--parents",
    "--=x",
    "---a",
    "--q=\"",
    "--é=ü",
];

const KEYWORDS: &[&str] = &[
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
    "MAINTAINER",
    "from",
    "Run",
    "copy",
    "FOO",
];

fn random_word(r: &mut Rng) -> String {
    let mut w = r.pick(WORDS).to_string();
    if r.one_in(4) {
        w.push_str(r.pick(WORDS));
    }
    w
}

fn random_json(r: &mut Rng) -> String {
    match r.below(8) {
        0 => "[]".into(),
        1 => "[\"a\", 1]".into(),
        2 => "[\"a\",]".into(),
        3 => "[\"a\"] trailing".into(),
        4 => "[\"\\u00e9\", \"\\ud800\", \"\\n\"]".into(),
        5 => "[ \"sh\" , \"-c\" , \"echo $V\" ]".into(),
        6 => "[\"unterminated".into(),
        _ => format!(
            "[\"{}\", \"{}\"]",
            r.pick(&["a", "b c", "/x"]),
            r.pick(&["1", "d", ""])
        ),
    }
}

fn random_heredoc_marker(r: &mut Rng, names: &mut Vec<(String, bool)>) -> String {
    let name = r.pick(&["EOF", "END", "E2", "FILE", "x"]).to_string();
    let chomp = r.one_in(3);
    let quoted = match r.below(4) {
        0 => format!("\"{name}\""),
        1 => format!("'{name}'"),
        _ => name.clone(),
    };
    let fd = if r.one_in(6) { "3" } else { "" };
    let sp = if r.one_in(5) { " " } else { "" };
    names.push((name, chomp));
    format!("{fd}<<{}{sp}{quoted}", if chomp { "-" } else { "" })
}

/// One generated instruction (possibly several physical lines).
fn random_instruction(r: &mut Rng, escape: char) -> String {
    let kw = r.pick(KEYWORDS);
    let mut parts: Vec<String> = vec![kw.to_string()];
    if r.one_in(3) {
        for _ in 0..r.below(3) + 1 {
            parts.push(r.pick(FLAGS).to_string());
        }
    }
    let mut heredocs = Vec::new();
    let upper = kw.to_uppercase();
    match upper.as_str() {
        "ENV" | "LABEL" => match r.below(4) {
            0 => parts.push(format!("K{} {}", r.below(3), random_word(r))),
            1 => parts.push(format!("K=v K2=\"{} x\"", random_word(r))),
            2 => parts.push(random_word(r)),
            _ => parts.push(format!("A=1 B={} C", random_word(r))),
        },
        "ARG" => {
            for _ in 0..r.below(3) + 1 {
                parts.push(format!("A{}={}", r.below(5), random_word(r)));
            }
        }
        "HEALTHCHECK" => match r.below(3) {
            0 => parts.push("NONE".into()),
            1 => parts.push(format!("CMD {}", random_json(r))),
            _ => parts.push(format!("CMD {}", random_word(r))),
        },
        "ONBUILD" => parts.push(random_instruction(r, escape).replace('\n', " ")),
        _ => {
            if matches!(upper.as_str(), "RUN" | "COPY" | "ADD") && r.one_in(3) {
                if r.one_in(3) {
                    parts.push("cat".into());
                }
                parts.push(random_heredoc_marker(r, &mut heredocs));
                if r.one_in(3) {
                    parts.push(random_heredoc_marker(r, &mut heredocs));
                }
                if r.one_in(2) {
                    parts.push("> /x".into());
                }
            } else if r.one_in(3) {
                parts.push(random_json(r));
            } else {
                for _ in 0..r.below(4) {
                    parts.push(random_word(r));
                }
            }
        }
    }
    // Join with spaces, sometimes turning a space into a continuation.
    let mut line = String::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            if r.one_in(4) {
                line.push(' ');
                line.push(escape);
                if r.one_in(5) {
                    line.push_str("  ");
                }
                line.push('\n');
                if r.one_in(4) {
                    line.push_str("# inside\n");
                }
                if r.one_in(6) {
                    line.push('\n');
                }
                if r.one_in(3) {
                    line.push_str("  ");
                }
            } else {
                line.push(if r.one_in(8) { '\t' } else { ' ' });
            }
        }
        line.push_str(p);
    }
    if r.one_in(12) {
        line.push(escape);
    }
    line.push('\n');
    for (name, chomp) in heredocs {
        if r.one_in(20) {
            break; // unterminated heredoc
        }
        for _ in 0..r.below(3) {
            if chomp {
                line.push('\t');
            }
            line.push_str(&random_word(r));
            line.push('\n');
        }
        if chomp {
            line.push('\t');
        }
        line.push_str(&name);
        line.push('\n');
    }
    line
}

/// A deterministic random Dockerfile.
pub fn random_dockerfile(r: &mut Rng) -> String {
    let mut s = String::new();
    let mut escape = '\\';
    if r.one_in(3) {
        for _ in 0..r.below(3) + 1 {
            match r.below(6) {
                0 => s.push_str("# syntax=docker/dockerfile:1\n"),
                1 => {
                    s.push_str("# escape=`\n");
                    escape = '`';
                }
                2 => s.push_str("#ESCAPE = \\\n"),
                3 => s.push_str("# check=skip=JSONArgsRecommended;error=true\n"),
                4 => s.push_str("# escape=x\n"),
                _ => s.push_str("# just a comment\n"),
            }
        }
    }
    if r.one_in(2) {
        s.push_str("FROM alpine AS base\n");
    }
    for _ in 0..r.below(6) + 1 {
        if r.one_in(6) {
            s.push_str("# comment\n");
        }
        if r.one_in(8) {
            s.push('\n');
        }
        s.push_str(&random_instruction(r, escape));
    }
    if r.one_in(10) {
        s = s.replace('\n', "\r\n");
    }
    if r.one_in(15) && s.ends_with('\n') {
        s.pop();
    }
    s
}
