//! The part of Go's text/template that `docker buildx imagetools inspect --format` is used
//! with: literal text, `{{.Field.Field}}` and `{{json .Field}}` over JSON data. Field names
//! match JSON keys exactly first, then ignoring case (Go's `.Manifest.Digest` is JSON's
//! `digest`).

use serde_json::Value;

/// Why a template cannot be rendered.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    /// `{{` without its `}}`.
    #[error("--format: unclosed action starting at byte {0}")]
    Unclosed(usize),
    /// An action kiln does not implement.
    #[error("--format: {{{{{0}}}}} is not supported (kiln supports {{{{.Field}}}} and {{{{json .Field}}}})")]
    Unsupported(String),
}

/// Renders `template` over `data`. A missing field renders as Go's `<no value>`; `json` of it
/// as `null`.
pub fn render(template: &str, data: &Value) -> Result<String, TemplateError> {
    let mut out = String::new();
    let mut rest = template;
    let mut offset = 0;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or(TemplateError::Unclosed(offset + start))?;
        let action = after[..end].trim_matches(|c: char| c == '-' || c.is_whitespace());
        out.push_str(&eval(action, data)?);
        let consumed = start + 2 + end + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

fn eval(action: &str, data: &Value) -> Result<String, TemplateError> {
    let unsupported = || TemplateError::Unsupported(action.to_owned());
    if let Some(path) = action.strip_prefix("json ") {
        let v = lookup(path.trim(), data).ok_or_else(unsupported)?;
        return Ok(serde_json::to_string_pretty(&v.unwrap_or(&Value::Null)).unwrap_or_default());
    }
    if let Some(lit) = action.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return Ok(lit.replace("\\n", "\n").replace("\\t", "\t"));
    }
    let v = lookup(action, data).ok_or_else(unsupported)?;
    Ok(match v {
        None => "<no value>".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) => "<nil>".to_owned(),
        Some(other) => other.to_string(),
    })
}

/// `Some(value)` for a path (`.`, `.A.B`); `Some(None)` when a field is missing; `None` when
/// `path` is not a path.
fn lookup<'a>(path: &str, data: &'a Value) -> Option<Option<&'a Value>> {
    if path == "." {
        return Some(Some(data));
    }
    let fields = path.strip_prefix('.')?;
    let mut v = data;
    for f in fields.split('.') {
        if f.is_empty() || !f.chars().all(|c| c.is_alphanumeric() || c == '_') {
            return None;
        }
        let Value::Object(m) = v else {
            return Some(None);
        };
        let next = m.get(f).or_else(|| {
            m.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(f))
                .map(|(_, v)| v)
        });
        match next {
            Some(n) => v = n,
            None => return Some(None),
        }
    }
    Some(Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fields_json_and_text() {
        let data = serde_json::json!({
            "Name": "reg/app:1",
            "Manifest": {"mediaType": "m", "digest": "sha256:ab"},
            "Provenance": {"SLSA": {"buildType": "x"}},
        });
        assert_eq!(
            render("{{.Name}} {{.Manifest.Digest}}\n", &data).unwrap(),
            "reg/app:1 sha256:ab\n"
        );
        assert_eq!(
            render("{{json .Provenance.SLSA}}", &data).unwrap(),
            "{\n  \"buildType\": \"x\"\n}"
        );
        assert_eq!(render("{{ .SBOM }}", &data).unwrap(), "<no value>");
        assert_eq!(render("{{json .SBOM}}", &data).unwrap(), "null");
    }

    #[test]
    fn unsupported_actions_name_themselves() {
        let data = serde_json::json!({});
        assert_eq!(
            render("{{range .Manifest}}", &data),
            Err(TemplateError::Unsupported("range .Manifest".into()))
        );
        assert_eq!(render("x {{.Name", &data), Err(TemplateError::Unclosed(2)));
    }
}
