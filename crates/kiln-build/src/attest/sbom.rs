//! The SBOM of an image: kiln's own scanners read the package databases and manifests left
//! in the image's root filesystem, and [`document`] writes them as an SPDX 2.3 JSON document.
//! No scanner image is run.
//!
//! What is read: the dpkg status file (`/var/lib/dpkg/status`), the apk installed database
//! (`/lib/apk/db/installed`), Python `*.dist-info/METADATA` and `*.egg-info/PKG-INFO`, npm
//! `package-lock.json` and `node_modules/**/package.json`, composer
//! `vendor/composer/installed.json`, `Cargo.lock`, and in ELF executables Go's build info
//! (Go 1.18 and later) and cargo-auditable's `.dep-v0` section. The document is the same for
//! the same files: packages are sorted, ids derive from the packages, the creation time is
//! given (`SOURCE_DATE_EPOCH` when set).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// The predicate type of an SPDX statement.
pub const PREDICATE_TYPE: &str = "https://spdx.dev/Document";

/// Executables bigger than this are not read for Go or Rust build data.
const MAX_BINARY: u64 = 512 << 20;

/// One package found in the image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    /// Its package URL (`pkg:deb/debian/bash@5.2?arch=amd64`), the sort key.
    pub purl: String,
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The database or file it was read from, as an absolute path in the image.
    pub found_in: String,
    /// The declared license, when the source gives one.
    pub license: Option<String>,
}

fn pkg(purl: String, name: &str, version: &str, found_in: &str, license: Option<&str>) -> Package {
    Package {
        purl,
        name: name.to_owned(),
        version: version.to_owned(),
        found_in: found_in.to_owned(),
        license: license.map(str::to_owned).filter(|l| !l.is_empty()),
    }
}

/// Percent-encodes what a purl's name or version may not hold as is.
fn purl_part(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every package the scanners find under `root` (an image's root filesystem), sorted, each
/// package URL once (the first place it was found in path order).
pub fn scan(root: &Path) -> Vec<Package> {
    let mut found = Vec::new();
    let distro = os_release_id(root);
    if let Ok(text) = std::fs::read_to_string(root.join("var/lib/dpkg/status")) {
        found.extend(dpkg_status(&text, &distro, "/var/lib/dpkg/status"));
    }
    if let Ok(text) = std::fs::read_to_string(root.join("lib/apk/db/installed")) {
        found.extend(apk_installed(&text, &distro, "/lib/apk/db/installed"));
    }
    let walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let rel = e.path().strip_prefix(root).unwrap_or(e.path());
            !matches!(rel.to_str(), Some("proc" | "sys" | "dev"))
        });
    for e in walker.flatten() {
        if !e.file_type().is_file() {
            continue;
        }
        let path = e.path();
        let shown = format!(
            "/{}",
            path.strip_prefix(root).unwrap_or(path).to_string_lossy()
        );
        let name = e.file_name().to_string_lossy();
        let parent = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let read = || std::fs::read_to_string(path).ok();
        match name.as_ref() {
            "METADATA" if parent.ends_with(".dist-info") => {
                found.extend(read().and_then(|t| python_metadata(&t, &shown)));
            }
            "PKG-INFO" if parent.ends_with(".egg-info") => {
                found.extend(read().and_then(|t| python_metadata(&t, &shown)));
            }
            n if n.ends_with(".egg-info") => {
                found.extend(read().and_then(|t| python_metadata(&t, &shown)));
            }
            "package-lock.json" => {
                found.extend(read().map_or(Vec::new(), |t| npm_lock(&t, &shown)))
            }
            "package.json" if in_node_modules(path) => {
                found.extend(read().and_then(|t| npm_package_json(&t, &shown)));
            }
            "installed.json" if parent == "composer" => {
                found.extend(read().map_or(Vec::new(), |t| composer_installed(&t, &shown)));
            }
            "Cargo.lock" => found.extend(read().map_or(Vec::new(), |t| cargo_lock(&t, &shown))),
            _ => {
                if e.metadata()
                    .is_ok_and(|m| m.len() <= MAX_BINARY && m.len() > 64)
                {
                    found.extend(binary_packages(path, &shown));
                }
            }
        }
    }
    found.sort();
    found.dedup_by(|a, b| a.purl == b.purl);
    found
}

/// `ID=` of `/etc/os-release` (`debian`, `alpine`, ...), `debian` when absent.
fn os_release_id(root: &Path) -> String {
    let text = std::fs::read_to_string(root.join("etc/os-release"))
        .or_else(|_| std::fs::read_to_string(root.join("usr/lib/os-release")))
        .unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("ID="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "debian".to_owned())
}

/// The `Key: value` fields of each blank-line-separated paragraph (continuation lines, which
/// start with a space, are skipped).
fn paragraphs(text: &str, sep: char) -> Vec<BTreeMap<String, String>> {
    let mut out = Vec::new();
    let mut cur = BTreeMap::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            continue;
        }
        if let Some((k, v)) = line.split_once(sep) {
            cur.entry(k.trim().to_owned())
                .or_insert_with(|| v.trim().to_owned());
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Installed packages of a dpkg status file.
pub fn dpkg_status(text: &str, distro: &str, found_in: &str) -> Vec<Package> {
    paragraphs(text, ':')
        .into_iter()
        .filter(|p| {
            p.get("Status")
                .is_some_and(|s| s.split_whitespace().last() == Some("installed"))
        })
        .filter_map(|p| {
            let name = p.get("Package")?;
            let version = p.get("Version")?;
            let arch = p.get("Architecture").map(String::as_str).unwrap_or("all");
            let purl = format!(
                "pkg:deb/{distro}/{}@{}?arch={arch}",
                purl_part(name),
                purl_part(version)
            );
            Some(pkg(purl, name, version, found_in, None))
        })
        .collect()
}

/// Installed packages of an apk database (`P:` name, `V:` version, `A:` arch, `L:` license).
pub fn apk_installed(text: &str, distro: &str, found_in: &str) -> Vec<Package> {
    paragraphs(text, ':')
        .into_iter()
        .filter_map(|p| {
            let name = p.get("P")?;
            let version = p.get("V")?;
            let arch = p.get("A").map(String::as_str).unwrap_or("noarch");
            let purl = format!(
                "pkg:apk/{distro}/{}@{}?arch={arch}",
                purl_part(name),
                purl_part(version)
            );
            Some(pkg(
                purl,
                name,
                version,
                found_in,
                p.get("L").map(String::as_str),
            ))
        })
        .collect()
}

/// The package of a Python `METADATA`/`PKG-INFO` file (its header: `Name:`, `Version:`,
/// `License:`).
pub fn python_metadata(text: &str, found_in: &str) -> Option<Package> {
    let header = text.split("\n\n").next().unwrap_or("");
    let fields = paragraphs(header, ':').into_iter().next()?;
    let name = fields.get("Name")?;
    let version = fields.get("Version")?;
    let purl = format!(
        "pkg:pypi/{}@{}",
        purl_part(&name.to_lowercase().replace('_', "-")),
        purl_part(version)
    );
    let license = fields
        .get("License-Expression")
        .or_else(|| fields.get("License"))
        .map(String::as_str);
    Some(pkg(purl, name, version, found_in, license))
}

fn npm_purl(name: &str, version: &str) -> String {
    match name.strip_prefix('@').and_then(|n| n.split_once('/')) {
        Some((scope, n)) => format!(
            "pkg:npm/%40{}/{}@{}",
            purl_part(scope),
            purl_part(n),
            purl_part(version)
        ),
        None => format!("pkg:npm/{}@{}", purl_part(name), purl_part(version)),
    }
}

fn license_of(v: &Value) -> Option<String> {
    match v.get("license")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => {
            let all: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
            (!all.is_empty()).then(|| all.join(" OR "))
        }
        Value::Object(o) => o.get("type").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// The packages of an npm lockfile: `packages` (lockfile v2, v3) or `dependencies` (v1,
/// nested). The project itself (the `""` entry) is not one of them.
pub fn npm_lock(text: &str, found_in: &str) -> Vec<Package> {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(pkgs) = v.get("packages").and_then(Value::as_object) {
        for (path, p) in pkgs {
            let Some(idx) = path.rfind("node_modules/") else {
                continue;
            };
            let name = p
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or(&path[idx + "node_modules/".len()..]);
            let Some(version) = p.get("version").and_then(Value::as_str) else {
                continue;
            };
            let license = license_of(p);
            out.push(pkg(
                npm_purl(name, version),
                name,
                version,
                found_in,
                license.as_deref(),
            ));
        }
        return out;
    }
    fn walk(deps: &serde_json::Map<String, Value>, found_in: &str, out: &mut Vec<Package>) {
        for (name, d) in deps {
            if let Some(version) = d.get("version").and_then(Value::as_str) {
                out.push(pkg(npm_purl(name, version), name, version, found_in, None));
            }
            if let Some(nested) = d.get("dependencies").and_then(Value::as_object) {
                walk(nested, found_in, out);
            }
        }
    }
    if let Some(deps) = v.get("dependencies").and_then(Value::as_object) {
        walk(deps, found_in, &mut out);
    }
    out
}

/// Whether `path` is `.../node_modules/NAME/package.json` or
/// `.../node_modules/@SCOPE/NAME/package.json`.
fn in_node_modules(path: &Path) -> bool {
    let mut up = path.ancestors().skip(2);
    match (up.next(), up.next()) {
        (Some(a), Some(b)) => {
            let is_nm = |p: &Path| p.file_name().is_some_and(|n| n == "node_modules");
            let scoped = a
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('@'));
            is_nm(a) || (scoped && is_nm(b))
        }
        (Some(a), None) => a.file_name().is_some_and(|n| n == "node_modules"),
        _ => false,
    }
}

/// The package of an installed npm module's `package.json`.
pub fn npm_package_json(text: &str, found_in: &str) -> Option<Package> {
    let v: Value = serde_json::from_str(text).ok()?;
    let name = v.get("name")?.as_str()?;
    let version = v.get("version")?.as_str()?;
    let license = license_of(&v);
    Some(pkg(
        npm_purl(name, version),
        name,
        version,
        found_in,
        license.as_deref(),
    ))
}

/// The packages of composer's `vendor/composer/installed.json` (v1: a list; v2: `packages`).
pub fn composer_installed(text: &str, found_in: &str) -> Vec<Package> {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Vec::new();
    };
    let list = v
        .get("packages")
        .and_then(Value::as_array)
        .or_else(|| v.as_array());
    list.into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p.get("name")?.as_str()?;
            let version = p.get("version")?.as_str()?;
            let (vendor, n) = name.split_once('/').unwrap_or(("", name));
            let purl = format!(
                "pkg:composer/{}/{}@{}",
                purl_part(vendor),
                purl_part(n),
                purl_part(version)
            );
            let license = license_of(p);
            Some(pkg(purl, name, version, found_in, license.as_deref()))
        })
        .collect()
}

/// The packages of a `Cargo.lock` (`[[package]]` tables' `name` and `version`).
pub fn cargo_lock(text: &str, found_in: &str) -> Vec<Package> {
    let mut out = Vec::new();
    let mut cur: Option<(Option<String>, Option<String>)> = None;
    let mut flush = |cur: &mut Option<(Option<String>, Option<String>)>| {
        if let Some((Some(n), Some(v))) = cur.take() {
            let purl = format!("pkg:cargo/{}@{}", purl_part(&n), purl_part(&v));
            out.push(pkg(purl, &n, &v, found_in, None));
        }
    };
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            flush(&mut cur);
            if line == "[[package]]" {
                cur = Some((None, None));
            }
            continue;
        }
        let Some(c) = cur.as_mut() else { continue };
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().trim_matches('"').to_owned();
            match k.trim() {
                "name" => c.0 = Some(v),
                "version" => c.1 = Some(v),
                _ => {}
            }
        }
    }
    flush(&mut cur);
    out
}

/// The Go modules and cargo-auditable crates an ELF executable says it was built from.
fn binary_packages(path: &Path, shown: &str) -> Vec<Package> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(_) => return Vec::new(),
    };
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
        return Vec::new();
    }
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    // The linker's own section when there is one: a binary that embeds Go's build info
    // reader also holds the magic as a string elsewhere.
    let mut out = go_buildinfo(elf_section(&data, ".go.buildinfo").unwrap_or(&data), shown);
    if let Some(section) = elf_section(&data, ".dep-v0") {
        out.extend(cargo_auditable(section, shown));
    }
    out
}

const GO_MAGIC: &[u8] = b"\xff Go buildinf:";

/// Reads an unsigned varint (Go's `binary.Uvarint`).
fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut x = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        x |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((x, i + 1));
        }
    }
    None
}

/// The Go toolchain, main module and dependencies of a Go binary's build info blob (the
/// Go 1.18+ layout: magic, pointer size, flags with bit 2 set, then the version and module
/// strings, each length-prefixed).
pub fn go_buildinfo(data: &[u8], found_in: &str) -> Vec<Package> {
    let Some(start) = data
        .windows(GO_MAGIC.len())
        .enumerate()
        .find(|(i, w)| i % 16 == 0 && *w == GO_MAGIC)
        .map(|(i, _)| i)
    else {
        return Vec::new();
    };
    let header = &data[start..];
    if header.len() < 32 || header[15] & 2 == 0 {
        return Vec::new();
    }
    let mut rest = &header[32..];
    let mut read_string = || -> Option<String> {
        let (n, used) = uvarint(rest)?;
        let n = usize::try_from(n).ok()?;
        let s = rest.get(used..used + n)?;
        rest = &rest[used + n..];
        Some(String::from_utf8_lossy(s).into_owned())
    };
    let Some(go_version) = read_string() else {
        return Vec::new();
    };
    let mut modinfo = read_string().unwrap_or_default();
    // The module text is framed by 16-byte sentinels.
    if modinfo.len() >= 33 && modinfo.as_bytes()[modinfo.len() - 17] == b'\n' {
        modinfo = modinfo[16..modinfo.len() - 16].to_owned();
    }
    let mut out = vec![pkg(
        format!("pkg:golang/stdlib@{}", purl_part(&go_version)),
        "stdlib",
        &go_version,
        found_in,
        None,
    )];
    for line in modinfo.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["mod" | "dep", path, version, ..] => {
                let purl = format!("pkg:golang/{path}@{}", purl_part(version));
                out.push(pkg(purl, path, version, found_in, None));
            }
            // A replacement applies to the dependency just before it.
            ["=>", path, version, ..] => {
                if let Some(last) = out.last_mut() {
                    *last = pkg(
                        format!("pkg:golang/{path}@{}", purl_part(version)),
                        path,
                        version,
                        found_in,
                        None,
                    );
                }
            }
            _ => {}
        }
    }
    out
}

/// The bytes of the ELF section `name` (32- or 64-bit, little-endian).
fn elf_section<'a>(data: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let is64 = *data.get(4)? == 2;
    if *data.get(5)? != 1 {
        return None;
    }
    let u16_at = |o: usize| -> Option<u64> {
        Some(u64::from(u16::from_le_bytes(
            data.get(o..o + 2)?.try_into().ok()?,
        )))
    };
    let u32_at = |o: usize| -> Option<u64> {
        Some(u64::from(u32::from_le_bytes(
            data.get(o..o + 4)?.try_into().ok()?,
        )))
    };
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?))
    };
    let word = |o: usize| if is64 { u64_at(o) } else { u32_at(o) };
    let (shoff, shentsize, shnum, shstrndx) = if is64 {
        (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?)
    } else {
        (u32_at(0x20)?, u16_at(0x2e)?, u16_at(0x30)?, u16_at(0x32)?)
    };
    let header = |i: u64| -> Option<(u64, u64, u64)> {
        let base = usize::try_from(shoff + i * shentsize).ok()?;
        let name = u32_at(base)?;
        let (off, size) = if is64 {
            (word(base + 0x18)?, word(base + 0x20)?)
        } else {
            (word(base + 0x10)?, word(base + 0x14)?)
        };
        Some((name, off, size))
    };
    let bytes = |off: u64, size: u64| -> Option<&'a [u8]> {
        data.get(usize::try_from(off).ok()?..usize::try_from(off + size).ok()?)
    };
    let (_, str_off, str_size) = header(shstrndx)?;
    let names = bytes(str_off, str_size)?;
    for i in 0..shnum {
        let (n, off, size) = header(i)?;
        let n = names.get(usize::try_from(n).ok()?..)?;
        let end = n.iter().position(|b| *b == 0)?;
        if &n[..end] == name.as_bytes() {
            return bytes(off, size);
        }
    }
    None
}

/// The crates of a cargo-auditable `.dep-v0` section (zlib-compressed JSON).
pub fn cargo_auditable(section: &[u8], found_in: &str) -> Vec<Package> {
    let mut json = Vec::new();
    let limited = flate2::read::ZlibDecoder::new(section).take(64 << 20);
    let mut reader = limited;
    if reader.read_to_end(&mut json).is_err() {
        return Vec::new();
    }
    let Ok(v) = serde_json::from_slice::<Value>(&json) else {
        return Vec::new();
    };
    v.get("packages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p.get("name")?.as_str()?;
            let version = p.get("version")?.as_str()?;
            let purl = format!("pkg:cargo/{}@{}", purl_part(name), purl_part(version));
            Some(pkg(purl, name, version, found_in, None))
        })
        .collect()
}

/// Whether `l` reads as an SPDX license expression (ids joined by AND/OR/WITH); other text
/// is left out of the document as `NOASSERTION`.
fn spdx_expression(l: &str) -> bool {
    !l.is_empty()
        && l.split_whitespace().all(|w| {
            matches!(w, "AND" | "OR" | "WITH")
                || w.trim_matches(|c| c == '(' || c == ')')
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".+-".contains(c))
        })
}

/// The SPDX 2.3 document of `packages` in the image `name`, created at `created`.
/// Ids and the namespace derive from the packages, so the same packages give the same bytes.
pub fn document(packages: &[Package], name: &str, created: &str) -> Value {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    for p in packages {
        hasher.update(p.purl.as_bytes());
        hasher.update(b"\n");
    }
    let doc_hash = hex::encode(hasher.finalize());
    let mut ids = Vec::new();
    let spdx_packages: Vec<Value> = packages
        .iter()
        .map(|p| {
            let h = hex::encode(Sha256::digest(p.purl.as_bytes()));
            let id = format!("SPDXRef-Package-{}", &h[..16]);
            ids.push(id.clone());
            let license = p
                .license
                .as_deref()
                .filter(|l| spdx_expression(l))
                .unwrap_or("NOASSERTION");
            json!({
                "name": p.name,
                "SPDXID": id,
                "versionInfo": p.version,
                "downloadLocation": "NOASSERTION",
                "filesAnalyzed": false,
                "licenseConcluded": "NOASSERTION",
                "licenseDeclared": license,
                "sourceInfo": format!("acquired package info from {}", p.found_in),
                "externalRefs": [{
                    "referenceCategory": "PACKAGE-MANAGER",
                    "referenceType": "purl",
                    "referenceLocator": p.purl,
                }],
            })
        })
        .collect();
    let relationships: Vec<Value> = ids
        .iter()
        .map(|id| {
            json!({
                "spdxElementId": "SPDXRef-DOCUMENT",
                "relationshipType": "DESCRIBES",
                "relatedSpdxElement": id,
            })
        })
        .collect();
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": if name.is_empty() { "image" } else { name },
        "documentNamespace": format!("https://spdx.org/spdxdocs/kiln-{doc_hash}"),
        "creationInfo": {
            "created": created,
            "creators": [format!("Tool: kiln-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": spdx_packages,
        "relationships": relationships,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape of this machine's /var/lib/dpkg/status (two real entries, one removed
    // package whose configuration files remain).
    const DPKG: &str = "Package: bash\nEssential: yes\nStatus: install ok installed\n\
Priority: required\nSection: shells\nInstalled-Size: 7164\nMaintainer: Matthias Klose <doko@debian.org>\n\
Architecture: amd64\nMulti-Arch: foreign\nVersion: 5.2.15-2+b7\nReplaces: bash-completion (<< 20060301-0)\n\
Depends: base-files (>= 2.1.12), debianutils (>= 5.6-0.1)\nDescription: GNU Bourne Again SHell\n \
Bash is an sh-compatible command language interpreter.\n .\n Bash also has features.\n\n\
Package: ca-certificates\nStatus: install ok installed\nArchitecture: all\nVersion: 20230311\n\
Description: Common CA certificates\n\n\
Package: oldpkg\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1.0\n";

    #[test]
    fn dpkg_status_lists_installed_packages_only() {
        let p = dpkg_status(DPKG, "debian", "/var/lib/dpkg/status");
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].name, "bash");
        assert_eq!(p[0].version, "5.2.15-2+b7");
        assert_eq!(p[0].purl, "pkg:deb/debian/bash@5.2.15-2%2Bb7?arch=amd64");
        assert_eq!(
            p[1].purl,
            "pkg:deb/debian/ca-certificates@20230311?arch=all"
        );
    }

    #[test]
    fn this_machines_dpkg_status_reads() {
        // Debian runners have one; the parse must find at least dpkg itself.
        if let Ok(text) = std::fs::read_to_string("/var/lib/dpkg/status") {
            let p = dpkg_status(&text, "debian", "/var/lib/dpkg/status");
            assert!(p.iter().any(|x| x.name == "dpkg"), "{} packages", p.len());
        }
    }

    #[test]
    fn apk_installed_db() {
        let db =
            "C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\nS:383152\nL:MIT\nT:the musl c library\n\n\
C:Q1def=\nP:busybox\nV:1.36.1-r5\nA:x86_64\nL:GPL-2.0-only\n";
        let p = apk_installed(db, "alpine", "/lib/apk/db/installed");
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].purl, "pkg:apk/alpine/musl@1.2.4-r2?arch=x86_64");
        assert_eq!(p[1].license.as_deref(), Some("GPL-2.0-only"));
    }

    #[test]
    fn python_dist_info_metadata() {
        let m = "Metadata-Version: 2.1\nName: Flask_Login\nVersion: 0.6.3\nSummary: x\n\
License: MIT\nRequires-Dist: Flask>=1.0.4\n\nLong description: Name: other\n";
        let p = python_metadata(m, "/usr/lib/python3/dist-packages/x.dist-info/METADATA").unwrap();
        assert_eq!(p.purl, "pkg:pypi/flask-login@0.6.3");
        assert_eq!(p.license.as_deref(), Some("MIT"));
    }

    // Written by `npm install is-number@7.0.0` (lockfile v3), and the package's own file.
    const NPM_LOCK: &str = include_str!("testdata/package-lock.json");
    const IS_NUMBER: &str = include_str!("testdata/is-number.package.json");

    #[test]
    fn npm_lockfile_v3_and_v1() {
        let p = npm_lock(NPM_LOCK, "/app/package-lock.json");
        let purls: Vec<&str> = p.iter().map(|x| x.purl.as_str()).collect();
        assert_eq!(purls, ["pkg:npm/is-number@7.0.0"]);
        assert_eq!(p[0].license.as_deref(), Some("MIT"));
        let scoped =
            r#"{"lockfileVersion":3,"packages":{"node_modules/@types/node":{"version":"20.1.0"}}}"#;
        assert_eq!(
            npm_lock(scoped, "/x")[0].purl,
            "pkg:npm/%40types/node@20.1.0"
        );
        let v1 = r#"{"lockfileVersion":1,"dependencies":{"a":{"version":"1.0.0","dependencies":{"b":{"version":"2.0.0"}}}}}"#;
        assert_eq!(npm_lock(v1, "/x").len(), 2);
    }

    #[test]
    fn npm_node_modules_package_json() {
        let p = npm_package_json(IS_NUMBER, "/app/node_modules/is-number/package.json").unwrap();
        assert_eq!(p.purl, "pkg:npm/is-number@7.0.0");
        assert!(in_node_modules(Path::new(
            "/app/node_modules/is-number/package.json"
        )));
        assert!(in_node_modules(Path::new(
            "/app/node_modules/@types/node/package.json"
        )));
        assert!(!in_node_modules(Path::new("/app/package.json")));
    }

    #[test]
    fn composer_installed_v2() {
        let j = r#"{"packages":[{"name":"monolog/monolog","version":"3.5.0","license":["MIT"]}],"dev":true}"#;
        let p = composer_installed(j, "/app/vendor/composer/installed.json");
        assert_eq!(p[0].purl, "pkg:composer/monolog/monolog@3.5.0");
        assert_eq!(p[0].license.as_deref(), Some("MIT"));
    }

    #[test]
    fn cargo_lock_packages() {
        let lock = "version = 3\n\n[[package]]\nname = \"anyhow\"\nversion = \"1.0.86\"\n\
source = \"registry+https://github.com/rust-lang/crates.io-index\"\n\n[[package]]\nname = \"app\"\nversion = \"0.1.0\"\n\
dependencies = [\n \"anyhow\",\n]\n";
        let p = cargo_lock(lock, "/src/Cargo.lock");
        assert_eq!(
            p.iter().map(|x| x.purl.as_str()).collect::<Vec<_>>(),
            ["pkg:cargo/anyhow@1.0.86", "pkg:cargo/app@0.1.0"]
        );
    }

    /// A Go 1.18+ build info blob as the linker lays it out, at a 16-byte boundary.
    fn go_blob() -> Vec<u8> {
        let mut b = vec![0u8; 48];
        let mut header = GO_MAGIC.to_vec();
        header.push(8); // pointer size
        header.push(2); // flags: strings inline
        header.resize(32, 0);
        b.extend(header);
        let version = b"go1.21.5";
        b.push(version.len() as u8);
        b.extend(version);
        let sentinel = [0x30u8; 16];
        let mods = "path\texample.com/app\nmod\texample.com/app\t(devel)\t\n\
dep\tgithub.com/pkg/errors\tv0.9.1\th1:abc=\n\
dep\tgolang.org/x/text\tv0.3.0\th1:def=\n=>\tgolang.org/x/text\tv0.14.0\th1:ghi=\n\
build\t-compiler=gc\n";
        let mut m = sentinel.to_vec();
        m.extend(mods.as_bytes());
        m.extend(sentinel);
        b.push((m.len() & 0x7f) as u8 | 0x80);
        b.push((m.len() >> 7) as u8);
        b.extend(m);
        b
    }

    #[test]
    fn go_build_info_lists_toolchain_modules_and_replacements() {
        let p = go_buildinfo(&go_blob(), "/usr/bin/app");
        let purls: Vec<&str> = p.iter().map(|x| x.purl.as_str()).collect();
        assert_eq!(
            purls,
            [
                "pkg:golang/stdlib@go1.21.5",
                "pkg:golang/example.com/app@%28devel%29",
                "pkg:golang/github.com/pkg/errors@v0.9.1",
                "pkg:golang/golang.org/x/text@v0.14.0",
            ]
        );
        assert!(go_buildinfo(b"no build info here", "/x").is_empty());
    }

    #[test]
    fn cargo_auditable_section() {
        use std::io::Write;
        let json = br#"{"packages":[{"name":"serde","version":"1.0.200","source":"crates.io"},{"name":"app","version":"0.1.0","source":"local","root":true}]}"#;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(json).unwrap();
        let p = cargo_auditable(&z.finish().unwrap(), "/usr/bin/app");
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].purl, "pkg:cargo/serde@1.0.200");
    }

    #[test]
    fn the_elf_section_reader_finds_a_section_by_name() {
        // This test binary is an ELF file with a `.text` section.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(elf_section(&me, ".text").is_some_and(|s| !s.is_empty()));
        assert!(elf_section(&me, ".dep-v0").is_none());
    }

    #[test]
    fn a_scan_of_a_root_filesystem_and_its_document_are_reproducible() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("var/lib/dpkg")).unwrap();
        std::fs::write(r.join("var/lib/dpkg/status"), DPKG).unwrap();
        std::fs::create_dir_all(r.join("app/node_modules/is-number")).unwrap();
        std::fs::write(r.join("app/package-lock.json"), NPM_LOCK).unwrap();
        std::fs::write(r.join("app/node_modules/is-number/package.json"), IS_NUMBER).unwrap();
        std::fs::write(r.join("usr-bin-app"), {
            let mut elf = b"\x7fELF".to_vec();
            elf.extend(vec![0u8; 60]);
            elf.extend(go_blob());
            elf
        })
        .unwrap();
        let found = scan(r);
        let purls: Vec<&str> = found.iter().map(|p| p.purl.as_str()).collect();
        assert!(purls.contains(&"pkg:deb/debian/bash@5.2.15-2%2Bb7?arch=amd64"));
        // Found both in the lockfile and in node_modules: listed once.
        assert_eq!(
            purls
                .iter()
                .filter(|p| **p == "pkg:npm/is-number@7.0.0")
                .count(),
            1
        );
        assert!(purls.contains(&"pkg:golang/github.com/pkg/errors@v0.9.1"));
        let a = document(&found, "reg/app:1", "2023-11-14T22:13:20Z");
        let b = document(&scan(r), "reg/app:1", "2023-11-14T22:13:20Z");
        assert_eq!(a, b);
        assert_eq!(a["spdxVersion"], "SPDX-2.3");
        assert_eq!(a["packages"].as_array().unwrap().len(), found.len());
    }
}
