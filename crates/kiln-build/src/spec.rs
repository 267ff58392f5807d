//! The parse of `type=KIND,key=value,...` flag values (`--output`, `--export-cache`,
//! `--import-cache` and their buildx spellings), with buildx's quoting: commas separate
//! fields, double quotes protect commas inside one.

use std::collections::BTreeMap;

/// A flag value that could not be parsed; names the flag, the whole value and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for {flag}: {reason}")]
pub struct SpecError {
    /// The flag as the user spelled it, e.g. `--output` or `-o`.
    pub flag: String,
    /// The offending value, whole, as the user gave it.
    pub value: String,
    /// What is wrong and what is accepted instead.
    pub reason: String,
}

impl SpecError {
    /// An error for `value` of `flag`.
    pub fn new(flag: &str, value: &str, reason: impl Into<String>) -> Self {
        SpecError {
            flag: flag.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Splits a field list as buildx does: commas separate fields, double quotes protect them.
/// Empty fields are dropped.
pub fn split_fields(flag: &str, value: &str) -> Result<Vec<String>, SpecError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if quoted {
        return Err(SpecError::new(flag, value, "unterminated double quote"));
    }
    out.push(cur);
    Ok(out.into_iter().filter(|f| !f.is_empty()).collect())
}

/// Parses `type=KIND,key=value,...` into its type (empty when no `type=` is given) and its
/// other keys. Every field must be `key=value`; keys are trimmed, values kept as given.
pub fn parse_attrs(
    flag: &str,
    value: &str,
) -> Result<(String, BTreeMap<String, String>), SpecError> {
    let mut attrs = BTreeMap::new();
    for f in split_fields(flag, value)? {
        let (k, v) = f
            .split_once('=')
            .ok_or_else(|| SpecError::new(flag, value, format!("`{f}` is not key=value")))?;
        attrs.insert(k.trim().to_owned(), v.to_owned());
    }
    let kind = attrs.remove("type").unwrap_or_default();
    Ok((kind, attrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_protect_commas_and_type_is_taken_out() {
        let (kind, attrs) = parse_attrs("-o", "type=registry,\"name=a/b:1,a/b:2\"").unwrap();
        assert_eq!(kind, "registry");
        assert_eq!(attrs["name"], "a/b:1,a/b:2");
        assert!(!attrs.contains_key("type"));
    }

    #[test]
    fn a_field_without_equals_is_named() {
        let e = parse_attrs("--output", "type=image,push").unwrap_err();
        assert_eq!(e.reason, "`push` is not key=value");
        assert_eq!(e.value, "type=image,push");
    }
}
