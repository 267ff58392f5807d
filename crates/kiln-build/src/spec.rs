//! The one parse of `type=KIND,key=value,...` flag values: `--output`/`-o`,
//! `--export-cache`/`--cache-to` and `--import-cache`/`--cache-from`. Values are split on
//! commas outside double quotes, as buildx reads them (`"name=a/b:1,a/b:2"` is one field).

use std::collections::BTreeMap;

/// A flag value that is not `type=KIND,key=value,...`; names the flag and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for {flag}: {reason}")]
pub struct SpecError {
    /// The flag as the user spelled it (`--output`, `--cache-to`, ...).
    pub flag: String,
    /// The whole value given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

impl SpecError {
    /// An error about `value` of `flag`.
    pub fn new(flag: &str, value: &str, reason: impl Into<String>) -> Self {
        SpecError {
            flag: flag.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Whether `flag` names an output (`--output`, `-o`) rather than a cache flag.
fn is_output_flag(flag: &str) -> bool {
    matches!(flag, "--output" | "-o")
}

/// Parses `value` of `flag` into its type and its other attributes (`type` removed).
///
/// The shorthands of each flag family are kept: for an output, a bare value is a directory
/// (`type=local,dest=VALUE`) and `-` is a tar stream on stdout (`type=tar,dest=-`); for a
/// cache flag, a bare value is a registry ref (`type=registry,ref=VALUE`), and a missing
/// `type=` means `registry`. An output without `type=` has the type `""`.
pub fn parse_attrs(
    flag: &str,
    value: &str,
) -> Result<(String, BTreeMap<String, String>), SpecError> {
    let output = is_output_flag(flag);
    if value.is_empty() {
        let expected = if output {
            "expected type=KIND,key=value,..."
        } else {
            "expected type=registry,ref=REF or a registry ref"
        };
        return Err(SpecError::new(flag, value, expected));
    }
    let fields = split_fields(flag, value)?;
    let mut attrs = BTreeMap::new();
    if !fields.iter().any(|f| f.contains('=')) && (output || fields.len() == 1) {
        let (kind, key, v) = match (output, value) {
            (true, "-") => ("tar", "dest", "-"),
            (true, _) => ("local", "dest", value),
            (false, _) => ("registry", "ref", fields[0].as_str()),
        };
        attrs.insert(key.to_owned(), v.to_owned());
        return Ok((kind.to_owned(), attrs));
    }
    for f in &fields {
        let (k, v) = f
            .split_once('=')
            .ok_or_else(|| SpecError::new(flag, value, format!("`{f}` is not key=value")))?;
        attrs.insert(k.trim().to_owned(), v.to_owned());
    }
    let default_type = if output { "" } else { "registry" };
    let kind = attrs
        .remove("type")
        .unwrap_or_else(|| default_type.to_owned());
    Ok((kind, attrs))
}

/// Splits on commas outside double quotes (buildx's CSV reading, kiln-graph's one split).
fn split_fields(flag: &str, s: &str) -> Result<Vec<String>, SpecError> {
    kiln_graph::options::split_csv(flag, s).map_err(|e| SpecError::new(&e.flag, &e.value, e.reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn type_and_attributes_are_split_with_buildx_quoting() {
        let (kind, a) = parse_attrs("--output", "type=registry,\"name=a/b:1,a/b:2\",push=true")
            .expect("valid output");
        assert_eq!(kind, "registry");
        assert_eq!(a, attrs(&[("name", "a/b:1,a/b:2"), ("push", "true")]));
    }

    #[test]
    fn bare_output_values_are_a_directory_or_stdout() {
        assert_eq!(
            parse_attrs("-o", "./out").expect("dir"),
            ("local".to_owned(), attrs(&[("dest", "./out")]))
        );
        assert_eq!(
            parse_attrs("-o", "-").expect("stdout"),
            ("tar".to_owned(), attrs(&[("dest", "-")]))
        );
    }

    #[test]
    fn bare_cache_value_is_a_registry_ref_and_type_defaults_to_registry() {
        assert_eq!(
            parse_attrs("--cache-from", "reg/app:cache").expect("ref"),
            ("registry".to_owned(), attrs(&[("ref", "reg/app:cache")]))
        );
        assert_eq!(
            parse_attrs("--export-cache", "ref=reg/app:cache,mode=max").expect("attrs"),
            (
                "registry".to_owned(),
                attrs(&[("ref", "reg/app:cache"), ("mode", "max")])
            )
        );
    }

    #[test]
    fn errors_name_the_flag_and_the_value() {
        let e = parse_attrs("--cache-to", "type=local,dest").expect_err("not key=value");
        assert_eq!(
            e.to_string(),
            "invalid value \"type=local,dest\" for --cache-to: `dest` is not key=value"
        );
        let e = parse_attrs("--output", "type=image,\"name=a").expect_err("open quote");
        assert_eq!(e.flag, "--output");
        assert_eq!(e.reason, "unterminated double quote");
        let e = parse_attrs("--import-cache", "").expect_err("empty");
        assert_eq!(e.reason, "expected type=registry,ref=REF or a registry ref");
    }
}
