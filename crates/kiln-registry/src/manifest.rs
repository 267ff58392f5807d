//! Just enough manifest parsing for a registry: the descriptors a manifest references, its
//! subject and artifact type. Unknown fields are ignored, as the spec requires.

use kiln_oci::Digest;
use serde_json::Value;

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What a manifest refers to, split by how the registry checks each kind.
#[derive(Debug, Default)]
pub(crate) struct References {
    /// Config and layers: must exist as blobs in the repository.
    pub(crate) blobs: Vec<Digest>,
    /// Index / manifest list entries: must exist as manifests in the repository.
    pub(crate) manifests: Vec<Digest>,
    /// The `subject` descriptor (may not exist yet).
    pub(crate) subject: Option<Digest>,
    /// `artifactType`, else the config media type (referrers API rule).
    pub(crate) artifact_type: Option<String>,
    pub(crate) annotations: Option<Value>,
    /// The `mediaType` field of the body, if any.
    pub(crate) media_type: Option<String>,
}

/// Parses the manifest `bytes`. The error says what is malformed.
pub(crate) fn parse(bytes: &[u8]) -> Result<References, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v.as_object().ok_or("manifest is not a JSON object")?;
    let mut r = References {
        media_type: match obj.get("mediaType") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("mediaType is not a string".into()),
        },
        ..References::default()
    };
    if let Some(sv) = obj.get("schemaVersion") {
        if sv.as_u64() != Some(2) {
            return Err(format!(
                "unsupported schemaVersion {sv} (only 2 is supported)"
            ));
        }
    }
    let descriptor = |d: &Value, field: &str| -> Result<Option<Digest>, String> {
        let o = d
            .as_object()
            .ok_or_else(|| format!("{field} is not a descriptor object"))?;
        let digest = o
            .get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{field} has no digest"))?
            .parse::<Digest>()
            .map_err(|e| format!("{field}: {e}"))?;
        if let Some(sz) = o.get("size") {
            if !sz.is_u64() {
                return Err(format!("{field}.size is not a non-negative integer"));
            }
        }
        // Foreign (non-distributable) layers live at their URLs, not in this registry.
        let foreign = o
            .get("urls")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        Ok(if foreign { None } else { Some(digest) })
    };
    let mut config_type = None;
    if let Some(c) = obj.get("config") {
        if let Some(d) = descriptor(c, "config")? {
            r.blobs.push(d);
        }
        config_type = c
            .get("mediaType")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    for field in ["layers", "blobs"] {
        if let Some(ls) = obj.get(field) {
            let arr = ls
                .as_array()
                .ok_or_else(|| format!("{field} is not an array"))?;
            for (i, l) in arr.iter().enumerate() {
                if let Some(d) = descriptor(l, &format!("{field}[{i}]"))? {
                    r.blobs.push(d);
                }
            }
        }
    }
    if let Some(ms) = obj.get("manifests") {
        let arr = ms.as_array().ok_or("manifests is not an array")?;
        for (i, m) in arr.iter().enumerate() {
            if let Some(d) = descriptor(m, &format!("manifests[{i}]"))? {
                r.manifests.push(d);
            }
        }
    }
    if let Some(s) = obj.get("subject") {
        r.subject = descriptor(s, "subject")?;
    }
    r.artifact_type = obj
        .get("artifactType")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or(config_type);
    r.annotations = obj.get("annotations").filter(|a| a.is_object()).cloned();
    let kind_ok = obj.contains_key("config")
        || obj.contains_key("manifests")
        || obj.contains_key("layers")
        || obj.contains_key("blobs");
    if !kind_ok {
        return Err("manifest has neither config/layers nor manifests".into());
    }
    Ok(r)
}

/// The subject digest of a stored manifest, if it has one (used when deleting).
pub(crate) fn subject_of(bytes: &[u8]) -> Option<Digest> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    v.get("subject")?.get("digest")?.as_str()?.parse().ok()
}

/// Every digest a stored manifest references (blobs and child manifests), for GC marking.
pub(crate) fn references_of(bytes: &[u8]) -> References {
    parse(bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_manifest_references_config_and_layers_and_subject() {
        let d = Digest::sha256_of(b"x");
        let m = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": d, "size": 2},
            "layers": [{"mediaType": "l", "digest": d, "size": 1},
                       {"mediaType": "l", "digest": d, "size": 1, "urls": ["http://x"]}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": d, "size": 3},
            "unknownField": 1
        });
        let r = parse(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(r.blobs.len(), 2, "foreign layer skipped");
        assert_eq!(r.subject, Some(d));
        assert_eq!(r.artifact_type.as_deref(), Some("application/x"));
    }

    #[test]
    fn malformed_manifests_are_rejected_with_a_reason() {
        for bad in [
            &b"{"[..],
            b"[]",
            b"{\"schemaVersion\":2}",
            b"{\"layers\":[{\"digest\":\"sha256:zz\"}]}",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
