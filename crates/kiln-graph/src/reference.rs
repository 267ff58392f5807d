//! Image reference normalisation (`busybox` → `docker.io/library/busybox:latest`) for the
//! frontend: kiln-oci's [`Reference`] parses (the one parser of the reference grammar), this
//! module words its errors as the frontend reports them.

use kiln_oci::{Reference, ReferenceErrorKind};

/// Normalises an image reference: default registry `docker.io`, `library/` for official
/// images, `:latest` when neither tag nor digest is given. Errors say what is malformed.
pub fn normalize_reference(raw: &str) -> Result<String, String> {
    raw.parse::<Reference>()
        .map(|r| r.to_string())
        .map_err(|e| match e.kind {
            ReferenceErrorKind::Empty => "empty image reference".to_owned(),
            ReferenceErrorKind::Digest(d) => format!("invalid digest `{d}` in `{raw}`"),
            ReferenceErrorKind::Tag(t) => format!("invalid tag `{t}` in `{raw}`"),
            ReferenceErrorKind::Uppercase => {
                format!("invalid reference format: `{raw}`: repository name must be lowercase")
            }
            _ => format!("invalid reference format: `{raw}`"),
        })
}

#[cfg(test)]
mod tests {
    use super::normalize_reference as n;

    #[test]
    fn official_image_gets_registry_library_and_latest() {
        assert_eq!(n("busybox").unwrap(), "docker.io/library/busybox:latest");
        assert_eq!(n("busybox:1.36").unwrap(), "docker.io/library/busybox:1.36");
        assert_eq!(n("user/app").unwrap(), "docker.io/user/app:latest");
    }

    #[test]
    fn registry_with_port_keeps_host_and_tag() {
        assert_eq!(
            n("reg.local:5000/app:test").unwrap(),
            "reg.local:5000/app:test"
        );
        assert_eq!(n("localhost/app").unwrap(), "localhost/app:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            n(&format!("alpine@{d}")).unwrap(),
            format!("docker.io/library/alpine@{d}")
        );
    }

    #[test]
    fn uppercase_or_empty_references_are_rejected() {
        assert!(n("Busybox").unwrap_err().contains("lowercase"));
        assert!(n("").is_err());
        assert!(n("a//b").is_err());
        assert!(n("alpine:").is_err());
        assert!(n("alpine@sha256:zz").is_err());
    }
}
