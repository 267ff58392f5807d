//! Target platforms (`linux/amd64`, `linux/arm/v7`), normalised as BuildKit does.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An OS/architecture/variant triple.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture in OCI spelling, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// Architecture variant, e.g. `v7`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform kiln itself runs on.
    pub fn host() -> Self {
        let arch = normalize_arch(std::env::consts::ARCH, None);
        Platform {
            os: "linux".to_string(),
            architecture: arch.0,
            variant: arch.1,
        }
    }

    /// Parses `os/arch[/variant]`, or a bare `arch` (meaning linux), normalising aliases
    /// (`x86_64` → `amd64`, `aarch64` → `arm64`, `armhf` → `arm/v7`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err(
                "the platform is empty; expected os/arch[/variant], e.g. linux/amd64".into(),
            );
        }
        if s == "local" {
            return Ok(Self::host());
        }
        let parts: Vec<&str> = s.split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [arch] => ("linux", *arch, None),
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => {
                return Err(format!(
                    "`{s}`: expected os/arch[/variant], e.g. linux/amd64"
                ))
            }
        };
        let valid = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        };
        if !valid(os) || !valid(arch) || variant.is_some_and(|v| !valid(v)) {
            return Err(format!(
                "`{s}`: expected os/arch[/variant], e.g. linux/amd64"
            ));
        }
        let os = os.to_ascii_lowercase();
        if os != "linux" && os != "windows" && os != "darwin" && os != "freebsd" {
            return Err(format!("unknown operating system `{os}`"));
        }
        let (architecture, variant) = normalize_arch(
            &arch.to_ascii_lowercase(),
            variant.map(str::to_ascii_lowercase),
        );
        Ok(Platform {
            os,
            architecture,
            variant,
        })
    }
}

fn normalize_arch(arch: &str, variant: Option<String>) -> (String, Option<String>) {
    match arch {
        "x86_64" | "x86-64" | "amd64" => ("amd64".into(), variant.filter(|v| v != "v1")),
        "aarch64" | "arm64" => ("arm64".into(), variant.filter(|v| v != "v8")),
        "armhf" => ("arm".into(), Some("v7".into())),
        "armel" => ("arm".into(), Some("v6".into())),
        "arm" => ("arm".into(), Some(variant.unwrap_or_else(|| "v7".into()))),
        "i386" | "i686" | "x86" => ("386".into(), variant),
        other => (other.to_string(), variant),
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
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
            ("linux/amd64", r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"amd64"},"digest":null}"#),
            ("linux/arm64", r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"arm64"},"digest":null}"#),
            ("linux/arm64/v8", r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"arm64"},"digest":null}"#),
            ("linux/arm", r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"arm","variant":"v7"},"digest":null}"#),
            ("armhf", r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"arm","variant":"v7"},"digest":null}"#),
            ("linux/i386/v2", r#"{"op":"image","reference":"docker.io/library/busybox:latest","platform":{"os":"linux","architecture":"386","variant":"v2"},"digest":null}"#),
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
