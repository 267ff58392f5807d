//! `kiln build --call targets|outline`: the answers printed in buildx's shape. The text form is
//! the table BuildKit's frontend renders (Go's tabwriter: each cell but a line's last padded
//! to its column's widest cell plus a gap), the JSON form is the frontend's `result.json`
//! (same keys, same order, line-only `location`s, the Dockerfile in `sources`).

use serde::Serialize;

use kiln_graph::{Outline, TargetInfo};

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
