//! Platforms (`linux/amd64`, `linux/arm/v7`): parsing, normalisation, matching, and the
//! platform of the machine kiln runs on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The platform an image runs on, as written in an index entry and an image config.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture in Go's spelling: `amd64`, `arm64`, `arm`, `386`, `ppc64le`, `s390x`.
    pub architecture: String,
    /// Operating system in Go's spelling: `linux`, `windows`.
    pub os: String,
    /// OS version (Windows images).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// Required OS features (Windows images).
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    /// CPU variant: `v7` for arm, `v8` for arm64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Reserved by the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// Why a platform string is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid platform {0:?}: expected OS/ARCH or OS/ARCH/VARIANT, e.g. linux/amd64 or linux/arm/v7"
)]
pub struct PlatformError(pub String);

impl Platform {
    /// A platform from its parts, normalised.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        let (architecture, variant) = normalize_arch(architecture, variant);
        Platform {
            architecture,
            os: os.to_ascii_lowercase(),
            os_version: None,
            os_features: Vec::new(),
            variant,
            features: Vec::new(),
        }
    }

    /// The platform of the machine kiln runs on (always `linux/<arch>`).
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "arm" => "arm",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "powerpc64" => "ppc64",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform::new("linux", arch, None)
    }

    /// Whether an image of platform `candidate` runs where `self` is wanted: same OS and
    /// architecture, and the same variant once both are normalised (`arm64` ≡ `arm64/v8`).
    pub fn matches(&self, candidate: &Platform) -> bool {
        let c = Platform::new(
            &candidate.os,
            &candidate.architecture,
            candidate.variant.as_deref(),
        );
        let w = Platform::new(&self.os, &self.architecture, self.variant.as_deref());
        c.os == w.os
            && c.architecture == w.architecture
            && (w.variant.is_none() || c.variant.is_none() || c.variant == w.variant)
    }
}

fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant
        .filter(|v| !v.is_empty())
        .map(|v| v.to_ascii_lowercase());
    match arch.as_str() {
        "x86_64" | "x86-64" | "amd64" => ("amd64".into(), variant.filter(|v| v != "v1")),
        "i386" | "386" => ("386".into(), None),
        "aarch64" | "arm64" => match variant.as_deref() {
            None | Some("8") | Some("v8") => ("arm64".into(), Some("v8".into())),
            _ => ("arm64".into(), variant),
        },
        "armhf" => ("arm".into(), Some("v7".into())),
        "armel" => ("arm".into(), Some("v6".into())),
        "arm" => match variant.as_deref() {
            None | Some("7") | Some("v7") => ("arm".into(), Some("v7".into())),
            Some("5") | Some("6") | Some("8") => ("arm".into(), variant.map(|v| format!("v{v}"))),
            _ => ("arm".into(), variant),
        },
        _ => (arch, variant),
    }
}

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if parts.iter().any(|p| !valid(p)) {
            return Err(PlatformError(s.to_owned()));
        }
        match parts.as_slice() {
            [os, arch] => Ok(Platform::new(os, arch, None)),
            [os, arch, variant] => Ok(Platform::new(os, arch, Some(variant))),
            // A lone architecture means linux, as docker's --platform does.
            [arch] if *arch != "linux" && *arch != "windows" => {
                Ok(Platform::new("linux", arch, None))
            }
            _ => Err(PlatformError(s.to_owned())),
        }
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

    #[test]
    fn parses_and_normalises_common_spellings() {
        let p: Platform = "linux/amd64".parse().unwrap();
        assert_eq!(p.to_string(), "linux/amd64");
        assert_eq!(
            "linux/aarch64".parse::<Platform>().unwrap().to_string(),
            "linux/arm64/v8"
        );
        assert_eq!(
            "linux/arm".parse::<Platform>().unwrap().to_string(),
            "linux/arm/v7"
        );
        assert_eq!(
            "linux/arm/6".parse::<Platform>().unwrap().to_string(),
            "linux/arm/v6"
        );
        assert!("linux/".parse::<Platform>().is_err());
        assert!("linux/amd64/v2/x".parse::<Platform>().is_err());
        assert!("linux/am d64".parse::<Platform>().is_err());
    }

    #[test]
    fn matching_treats_default_variants_as_equal_and_others_as_different() {
        let want: Platform = "linux/arm64".parse().unwrap();
        let cand = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            os_version: None,
            os_features: vec![],
            variant: None,
            features: vec![],
        };
        assert!(want.matches(&cand));
        let v7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(!v7.matches(&"linux/arm/v6".parse().unwrap()));
        assert!(!v7.matches(&"linux/arm64".parse().unwrap()));
        assert!(!"windows/amd64"
            .parse::<Platform>()
            .unwrap()
            .matches(&"linux/amd64".parse().unwrap()));
    }

    #[test]
    fn serializes_os_version_with_dotted_key() {
        let mut p: Platform = "windows/amd64".parse().unwrap();
        p.os_version = Some("10.0.17763.1".into());
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(
            j,
            r#"{"architecture":"amd64","os":"windows","os.version":"10.0.17763.1"}"#
        );
    }

    #[test]
    fn host_platform_is_linux() {
        assert_eq!(Platform::host().os, "linux");
    }
}
