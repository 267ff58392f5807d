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
