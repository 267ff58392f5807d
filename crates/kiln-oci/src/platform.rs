//! Platforms (`linux/amd64`, `linux/arm/v7`): parsing, normalisation, matching, and the
//! platform of the machine kiln runs on.
//!
//! Two spellings meet here. A *target* platform is what a user asks for (`--platform`,
//! `FROM --platform`): [`Platform::parse`] keeps it as written once aliases are resolved
//! (`linux/arm64` stays without a variant), because build cache keys hash it. An *index*
//! platform is compared with image index entries: [`Platform::new`], `FromStr` and
//! [`Platform::matches`] normalise fully (`arm64` ≡ `arm64/v8`).

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

/// Why a target platform (`--platform`, `FROM --platform`) is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformFlagError {
    /// Nothing was given.
    #[error("the platform is empty; expected os/arch[/variant], e.g. linux/amd64")]
    Empty,
    /// Not `os/arch[/variant]` (or a bare `arch`) with non-empty, plain parts.
    #[error("`{0}`: expected os/arch[/variant], e.g. linux/amd64")]
    Malformed(String),
    /// An operating system kiln does not build for.
    #[error("unknown operating system `{0}`")]
    UnknownOs(String),
}

impl From<PlatformFlagError> for String {
    fn from(e: PlatformFlagError) -> String {
        e.to_string()
    }
}

impl Platform {
    /// Parses a target platform as a user writes it: `os/arch[/variant]`, a bare `arch`
    /// (meaning linux) or `local` (the host), resolving aliases (`x86_64` → `amd64`,
    /// `aarch64` → `arm64`, `armhf` → `arm/v7`) but keeping a variant the user left out
    /// of `arm64` out. Cache keys hash the result, so these rules must not change.
    pub fn parse(s: &str) -> Result<Self, PlatformFlagError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(PlatformFlagError::Empty);
        }
        if s == "local" {
            return Ok(Self::host());
        }
        let malformed = || PlatformFlagError::Malformed(s.to_owned());
        let parts: Vec<&str> = s.split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [arch] => ("linux", *arch, None),
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => return Err(malformed()),
        };
        let valid = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        };
        if !valid(os) || !valid(arch) || variant.is_some_and(|v| !valid(v)) {
            return Err(malformed());
        }
        let os = os.to_ascii_lowercase();
        if !matches!(os.as_str(), "linux" | "windows" | "darwin" | "freebsd") {
            return Err(PlatformFlagError::UnknownOs(os));
        }
        Ok(Self::target(
            os,
            &arch.to_ascii_lowercase(),
            variant.map(str::to_ascii_lowercase),
        ))
    }

    /// A target platform from lower-cased parts, with aliases resolved as [`Platform::parse`]
    /// does.
    fn target(os: String, arch: &str, variant: Option<String>) -> Self {
        let (architecture, variant) = match arch {
            "x86_64" | "x86-64" | "amd64" => ("amd64".into(), variant.filter(|v| v != "v1")),
            "aarch64" | "arm64" => ("arm64".into(), variant.filter(|v| v != "v8")),
            "armhf" => ("arm".into(), Some("v7".into())),
            "armel" => ("arm".into(), Some("v6".into())),
            "arm" => ("arm".into(), Some(variant.unwrap_or_else(|| "v7".into()))),
            "i386" | "i686" | "x86" => ("386".into(), variant),
            other => (other.to_string(), variant),
        };
        Platform {
            architecture,
            os,
            os_version: None,
            os_features: Vec::new(),
            variant,
            features: Vec::new(),
        }
    }

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

    /// The platform of the machine kiln runs on (always `linux/<arch>`), as a target
    /// platform: `linux/arm64` on a 64-bit ARM host, no variant added.
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
        Platform::target("linux".into(), arch, None)
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
