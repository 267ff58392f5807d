//! Image reference normalisation (`busybox` → `docker.io/library/busybox:latest`), following
//! the distribution reference grammar closely enough to reject what Docker rejects.

/// Normalises an image reference: default registry `docker.io`, `library/` for official
/// images, `:latest` when neither tag nor digest is given. Errors say what is malformed.
pub fn normalize_reference(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("empty image reference".into());
    }
    let (name_tag, digest) = match raw.split_once('@') {
        Some((n, d)) => {
            let hex = d
                .strip_prefix("sha256:")
                .ok_or_else(|| format!("invalid digest `{d}` in `{raw}`"))?;
            if hex.len() != 64
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return Err(format!("invalid digest `{d}` in `{raw}`"));
            }
            (n, Some(d))
        }
        None => (raw, None),
    };
    // A `:` after the last `/` starts the tag.
    let last_slash = name_tag.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(t) = tag {
        let ok = !t.is_empty()
            && t.len() <= 128
            && t.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
        if !ok {
            return Err(format!("invalid tag `{t}` in `{raw}`"));
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    let domain = if parts.len() > 1
        && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost")
    {
        let d = parts.remove(0);
        if d.chars().any(|c| c.is_ascii_uppercase()) {
            // Upper-case domains are allowed by the grammar only as hostnames; Docker accepts them.
        }
        d.to_string()
    } else {
        "docker.io".to_string()
    };
    if parts.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(format!("invalid reference format: `{raw}`"));
    }
    for p in &parts {
        let ok = p
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            && p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && p.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
        if !ok {
            let hint = if p.chars().any(|c| c.is_ascii_uppercase()) {
                ": repository name must be lowercase"
            } else {
                ""
            };
            return Err(format!("invalid reference format: `{raw}`{hint}"));
        }
    }
    let mut path = parts.join("/");
    if domain == "docker.io" && parts.len() == 1 {
        path = format!("library/{path}");
    }
    let mut out = format!("{domain}/{path}");
    match (tag, digest) {
        (Some(t), Some(d)) => out.push_str(&format!(":{t}@{d}")),
        (Some(t), None) => out.push_str(&format!(":{t}")),
        (None, Some(d)) => out.push_str(&format!("@{d}")),
        (None, None) => out.push_str(":latest"),
    }
    Ok(out)
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
