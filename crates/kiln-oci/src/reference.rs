//! Image references (`busybox`, `host:5000/ns/app:tag@sha256:…`), parsed and normalised the way
//! Docker does: a name without a registry is on `docker.io`, a one-part name there is under
//! `library/`, and a reference without tag or digest means `:latest`.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// The registry a reference without a host name points at.
pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";
const MAX_NAME_LEN: usize = 255;

/// A normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why a string is not a valid image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    /// The text as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
    /// Which rule it breaks (callers with their own wording match on it).
    pub kind: ReferenceErrorKind,
}

/// The rule of the reference grammar a rejected reference breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceErrorKind {
    /// The reference is empty.
    Empty,
    /// The text after `@` (given) is not a digest.
    Digest(String),
    /// The tag (given) is not 1-128 of `[A-Za-z0-9_.-]` starting with a letter, digit or `_`.
    Tag(String),
    /// The registry host is not a valid `host[:port]`.
    Registry,
    /// The repository path has upper-case letters.
    Uppercase,
    /// A path component is empty or uses separators the grammar does not allow.
    PathComponent,
    /// The name is longer than 255 characters.
    TooLong,
    /// The reference is a bare 64-hex image id, which Docker refuses as a name.
    ImageId,
}

impl Reference {
    /// A reference from its parts, validated. With neither `tag` nor `digest`, the tag is
    /// `latest`.
    pub fn new(
        registry: &str,
        repository: &str,
        tag: Option<&str>,
        digest: Option<Digest>,
    ) -> Result<Self, ReferenceError> {
        let mut s = format!("{registry}/{repository}");
        if let Some(t) = tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &digest {
            s.push('@');
            s.push_str(&d.to_string());
        }
        s.parse()
    }

    /// The registry host (with port), `docker.io` for Docker Hub.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host to send API requests to (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        api_host(&self.registry)
    }

    /// The repository path, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` when neither tag nor digest was given).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry for: the digest if pinned, else the tag.
    pub fn api_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// The same repository with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Self, ReferenceError> {
        Reference::new(&self.registry, &self.repository, Some(tag), None)
    }

    /// The same repository pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The same image in another repository of the same registry.
    pub fn with_repository(&self, repository: &str) -> Result<Self, ReferenceError> {
        Reference::new(
            &self.registry,
            repository,
            self.tag.as_deref(),
            self.digest.clone(),
        )
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The shortest form Docker would print (`busybox:latest`, `ghcr.io/a/b:1`).
    pub fn familiar(&self) -> String {
        let name = if self.registry == DOCKER_HUB {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
                .to_owned()
        } else {
            self.name()
        };
        let mut s = name;
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(&d.to_string());
        }
        s
    }
}

/// The host API requests for `registry` go to.
pub(crate) fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_API
    } else {
        registry
    }
}

/// Normalises a registry host name as given to `kiln login` or found in config.json keys:
/// strips a scheme and path, maps Docker Hub aliases to `docker.io`.
pub fn normalize_registry(host: &str) -> String {
    let h = host.trim();
    let h = h
        .strip_prefix("https://")
        .or_else(|| h.strip_prefix("http://"))
        .unwrap_or(h);
    let h = h.split('/').next().unwrap_or(h);
    match h {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_owned()
        }
        _ => h.to_ascii_lowercase(),
    }
}

fn err(input: &str, kind: ReferenceErrorKind, reason: impl Into<String>) -> ReferenceError {
    ReferenceError {
        input: input.to_owned(),
        reason: reason.into(),
        kind,
    }
}

/// A bare 64-hex string, the form of an image id.
fn is_image_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let ch = b[i];
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if sep.is_empty() || !ok {
            return false;
        }
    }
    true
}

fn valid_domain(d: &str) -> bool {
    let (host, port) = if let Some(rest) = d.strip_prefix('[') {
        // [ipv6]:port
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(p) => return !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()),
                None => return false,
            },
        }
    } else {
        match d.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (d, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        use ReferenceErrorKind as K;
        if input.is_empty() {
            return Err(err(input, K::Empty, "it is empty"));
        }
        if is_image_id(input) {
            return Err(err(
                input,
                K::ImageId,
                "a 64-byte hexadecimal string is an image id, not a name",
            ));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => {
                let d: Digest = d
                    .parse()
                    .map_err(|e| err(input, K::Digest(d.to_owned()), format!("bad digest: {e}")))?;
                (r, Some(d))
            }
            None => (input, None),
        };
        // A ':' after the last '/' starts the tag; one before it is a port.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(err(
                    input,
                    K::Tag(t.to_owned()),
                    format!(
                        "tag {t:?} must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
                    ),
                ));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                if !valid_domain(first) {
                    return Err(err(
                        input,
                        K::Registry,
                        format!("registry host {first:?} is not a valid host[:port]"),
                    ));
                }
                (normalize_registry(first), remainder.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(err(
                input,
                K::Uppercase,
                "repository name must be lowercase",
            ));
        }
        if let Some(bad) = repository.split('/').find(|c| !valid_component(c)) {
            return Err(err(
                input,
                K::PathComponent,
                format!(
                    "path component {bad:?} must be lowercase letters and digits separated by '.', '_', '__' or '-'"
                ),
            ));
        }
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(err(
                input,
                K::TooLong,
                format!("name is longer than {MAX_NAME_LEN} characters"),
            ));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn norm(s: &str) -> String {
        s.parse::<Reference>().unwrap().to_string()
    }

    #[test]
    fn short_names_normalise_like_docker() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            norm("index.docker.io/library/alpine"),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(norm("docker.io/alpine"), "docker.io/library/alpine:latest");
        assert_eq!(
            "busybox".parse::<Reference>().unwrap().api_host(),
            "registry-1.docker.io"
        );
        assert_eq!(
            "busybox".parse::<Reference>().unwrap().familiar(),
            "busybox:latest"
        );
    }

    #[test]
    fn hosts_ports_localhost_and_digests_parse() {
        let r: Reference = format!("127.0.0.1:5000/ns/app:v1@{D}").parse().unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "ns/app");
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.digest().unwrap().to_string(), D);
        assert_eq!(r.api_reference(), D);
        let l: Reference = "localhost/app".parse().unwrap();
        assert_eq!(l.registry(), "localhost");
        let p: Reference = "localhost:5000/app".parse().unwrap();
        assert_eq!((p.registry(), p.tag()), ("localhost:5000", Some("latest")));
        let d: Reference = format!("app@{D}").parse().unwrap();
        assert_eq!(d.tag(), None);
        assert_eq!(d.to_string(), format!("docker.io/library/app@{D}"));
        let v6: Reference = "[::1]:5000/app:x".parse().unwrap();
        assert_eq!(v6.registry(), "[::1]:5000");
    }

    #[test]
    fn invalid_references_are_rejected_with_a_reason() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "a//b",
            "app@sha256:123",
            "app:tag with space",
            "host:port/app",
            "-app",
            "app-",
            "a..b",
        ] {
            let e = bad.parse::<Reference>().expect_err(bad);
            assert!(e.to_string().contains("invalid image reference"), "{e}");
        }
        let e = "ns/App".parse::<Reference>().unwrap_err();
        assert!(e.reason.contains("lowercase"), "{e}");
        let long = format!("reg.example/{}", "a".repeat(300));
        assert_eq!(
            long.parse::<Reference>().unwrap_err().kind,
            ReferenceErrorKind::TooLong
        );
        let id = "0123456789abcdef".repeat(4);
        assert_eq!(
            id.parse::<Reference>().unwrap_err().kind,
            ReferenceErrorKind::ImageId
        );
        assert_eq!(
            "app:-x".parse::<Reference>().unwrap_err().kind,
            ReferenceErrorKind::Tag("-x".into())
        );
    }
}
