//! Target platforms (`linux/amd64`, `linux/arm/v7`): kiln-oci's [`Platform`], parsed from
//! flags with [`Platform::parse`], and the form in which the graph hashes one into a cache
//! key.

pub use kiln_oci::Platform;

/// Serde for a platform inside an [`Op`](crate::Op) (use with `#[serde(with = ...)]`): the
/// graph's own key order `os`, `architecture`, then `variant` if any — not the OCI order
/// of [`Platform`]'s own serialization, so cache keys stay what they have always been.
/// Only these three fields are kept; a target platform has no others.
pub(crate) mod key_form {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Platform;

    #[derive(Serialize)]
    struct KeyRef<'a> {
        os: &'a str,
        architecture: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        variant: Option<&'a str>,
    }

    #[derive(Deserialize)]
    struct KeyOwned {
        os: String,
        architecture: String,
        #[serde(default)]
        variant: Option<String>,
    }

    pub(crate) fn serialize<S: Serializer>(p: &Platform, s: S) -> Result<S::Ok, S::Error> {
        KeyRef {
            os: &p.os,
            architecture: &p.architecture,
            variant: p.variant.as_deref(),
        }
        .serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Platform, D::Error> {
        let k = KeyOwned::deserialize(d)?;
        Ok(Platform {
            architecture: k.architecture,
            os: k.os,
            os_version: None,
            os_features: Vec::new(),
            variant: k.variant,
            features: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{ImageSource, OciLayoutSource, Op, Vertex, VertexMeta};

    fn image_vertex(platform: &str) -> Vertex {
        Vertex {
            op: Op::Image(ImageSource {
                reference: "docker.io/library/busybox:latest".into(),
                platform: Platform::parse(platform).unwrap(),
                digest: None,
            }),
            inputs: vec![],
            meta: VertexMeta {
                description: String::new(),
                stage: None,
                span: None,
                ignore_cache: false,
            },
        }
    }

    // Cache keys hash these bytes: they must never change.
    #[test]
    fn image_source_key_bytes_are_pinned() {
        let cases = [
            (
                "linux/amd64",
                r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"amd64"},"digest":null}"#,
            ),
            (
                "linux/arm64",
                r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"arm64"},"digest":null}"#,
            ),
            (
                "linux/arm64/v8",
                r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"arm64"},"digest":null}"#,
            ),
            (
                "linux/arm",
                r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"arm","variant":"v7"},"digest":null}"#,
            ),
            (
                "armhf",
                r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"arm","variant":"v7"},"digest":null}"#,
            ),
            (
                "linux/i386/v2",
                r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"386","variant":"v2"},"digest":null}"#,
            ),
        ];
        for (platform, want) in cases {
            let v = image_vertex(platform);
            assert_eq!(
                String::from_utf8(v.canonical_op()).unwrap(),
                want,
                "{platform}"
            );
            let back: Op = serde_json::from_str(want).unwrap();
            assert_eq!(back, v.op, "{platform}");
        }
        let oci = Op::OciLayout(OciLayoutSource {
            path: "/l".into(),
            reference: "t".into(),
            platform: Platform::parse("linux/arm/v6").unwrap(),
        });
        assert_eq!(
            serde_json::to_string(&oci).unwrap(),
            r#"{"op":"oci-layout","path":"/l","reference":"t","platform":{"os":"linux","architecture":"arm","variant":"v6"}}"#
        );
    }

    #[test]
    fn parse_keeps_the_flag_spelling_rules() {
        let p = |s: &str| Platform::parse(s).map(|p| p.to_string());
        assert_eq!(p(" linux/x86_64 ").unwrap(), "linux/amd64");
        assert_eq!(p("linux/amd64/v1").unwrap(), "linux/amd64");
        assert_eq!(p("linux/amd64/v3").unwrap(), "linux/amd64/v3");
        assert_eq!(p("linux/aarch64").unwrap(), "linux/arm64");
        assert_eq!(p("linux/arm64/v9").unwrap(), "linux/arm64/v9");
        assert_eq!(p("armel").unwrap(), "linux/arm/v6");
        assert_eq!(p("Linux/ARM/V5").unwrap(), "linux/arm/v5");
        assert_eq!(p("linux/x86").unwrap(), "linux/386");
        assert_eq!(p("linux/ppc64.le").unwrap(), "linux/ppc64.le");
        assert_eq!(p("local").unwrap(), Platform::host().to_string());
        assert_eq!(
            p("").unwrap_err().to_string(),
            "the platform is empty; expected os/arch[/variant], e.g. linux/amd64"
        );
        assert_eq!(
            p("linux/amd64/v2/x").unwrap_err().to_string(),
            "`linux/amd64/v2/x`: expected os/arch[/variant], e.g. linux/amd64"
        );
        assert_eq!(
            p("linux//v7").unwrap_err().to_string(),
            "`linux//v7`: expected os/arch[/variant], e.g. linux/amd64"
        );
        assert_eq!(
            p("plan9/amd64").unwrap_err().to_string(),
            "unknown operating system `plan9`"
        );
    }

    #[test]
    fn host_is_linux_without_a_default_variant() {
        let h = Platform::host();
        assert_eq!(h.os, "linux");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(h.to_string(), "linux/amd64");
        }
        if cfg!(target_arch = "aarch64") {
            assert_eq!(h.to_string(), "linux/arm64");
        }
    }
}
