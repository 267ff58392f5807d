//! Registry credentials as Docker keeps them (`~/.docker/config.json`: `auths` with a base64
//! `auth`, `credHelpers` and `credsStore` through `docker-credential-*` programs), and the
//! `WWW-Authenticate` challenges a registry answers with.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;

use crate::reference::{normalize_registry, DOCKER_HUB};

/// The key Docker uses for Docker Hub in `config.json` and with credential helpers.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A user name and password (or personal access token).
    Basic {
        /// User name.
        username: String,
        /// Password or token.
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken` in config.json), exchanged at the token realm.
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

/// Why credentials could not be read or stored.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// config.json could not be read or written.
    #[error("cannot {action} Docker config {path}: {source}")]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// config.json is not valid.
    #[error("Docker config {path} is invalid: {detail}; fix or remove the file")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A credential helper failed.
    #[error("credential helper docker-credential-{helper} failed to {action} credentials for {registry}: {detail}")]
    Helper {
        /// The helper's suffix, e.g. `pass`.
        helper: String,
        /// `get`, `store` or `erase`.
        action: &'static str,
        /// The registry asked about.
        registry: String,
        /// stderr/stdout of the helper, or the spawn error.
        detail: String,
    },
}

/// Where credentials come from: Docker's `config.json`.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    path: PathBuf,
}

impl DockerConfig {
    /// The file Docker uses: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub fn default_path() -> PathBuf {
        if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
            return PathBuf::from(d).join("config.json");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/root".into());
        home.join(".docker").join("config.json")
    }

    /// The config at Docker's default location.
    pub fn from_env() -> Self {
        DockerConfig {
            path: Self::default_path(),
        }
    }

    /// The config at `path` (which need not exist yet).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        DockerConfig { path: path.into() }
    }

    /// The file this config reads and writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load(&self) -> Result<serde_json::Map<String, serde_json::Value>, AuthError> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(source) => {
                return Err(AuthError::Io {
                    action: "read",
                    path: self.path.clone(),
                    source,
                })
            }
        };
        if text.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Default::default());
        }
        match serde_json::from_slice::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            Ok(_) => Err(AuthError::Invalid {
                path: self.path.clone(),
                detail: "not a JSON object".into(),
            }),
            Err(e) => Err(AuthError::Invalid {
                path: self.path.clone(),
                detail: e.to_string(),
            }),
        }
    }

    fn save(&self, map: &serde_json::Map<String, serde_json::Value>) -> Result<(), AuthError> {
        let io = |source| AuthError::Io {
            action: "write",
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        let mut text = serde_json::to_vec_pretty(map).unwrap_or_default();
        text.push(b'\n');
        tmp.write_all(&text).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        // NamedTempFile is created 0600, which is what a file holding passwords needs.
        tmp.persist(&self.path).map_err(|e| io(e.error))?;
        Ok(())
    }

    fn helper_for(
        map: &serde_json::Map<String, serde_json::Value>,
        registry: &str,
    ) -> Option<String> {
        if let Some(serde_json::Value::Object(h)) = map.get("credHelpers") {
            for (k, v) in h {
                if normalize_registry(k) == registry {
                    if let Some(s) = v.as_str() {
                        return Some(s.to_owned());
                    }
                }
            }
        }
        map.get("credsStore")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }

    /// The credential stored for `registry` (a host such as `ghcr.io` or `127.0.0.1:5000`),
    /// asking a credential helper when config.json names one.
    pub fn credential(&self, registry: &str) -> Result<Option<Credential>, AuthError> {
        let registry = normalize_registry(registry);
        let map = self.load()?;
        if let Some(helper) = Self::helper_for(&map, &registry) {
            if let Some(c) = helper_get(&helper, &registry)? {
                return Ok(Some(c));
            }
        }
        let Some(serde_json::Value::Object(auths)) = map.get("auths") else {
            return Ok(None);
        };
        for (key, entry) in auths {
            if normalize_registry(key) != registry {
                continue;
            }
            if let Some(t) = entry
                .get("identitytoken")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
            {
                return Ok(Some(Credential::IdentityToken(t.to_owned())));
            }
            if let Some(a) = entry
                .get("auth")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
            {
                let invalid = |detail: String| AuthError::Invalid {
                    path: self.path.clone(),
                    detail,
                };
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .map_err(|e| invalid(format!("auths.{key:?}.auth is not base64: {e}")))?;
                let text = String::from_utf8(raw)
                    .map_err(|_| invalid(format!("auths.{key:?}.auth is not UTF-8")))?;
                let (u, p) = text.split_once(':').ok_or_else(|| {
                    invalid(format!("auths.{key:?}.auth is not base64 of user:password"))
                })?;
                return Ok(Some(Credential::Basic {
                    username: u.to_owned(),
                    password: p.to_owned(),
                }));
            }
            let u = entry.get("username").and_then(|v| v.as_str());
            let p = entry.get("password").and_then(|v| v.as_str());
            if let (Some(u), Some(p)) = (u, p) {
                return Ok(Some(Credential::Basic {
                    username: u.to_owned(),
                    password: p.to_owned(),
                }));
            }
        }
        Ok(None)
    }

    /// Stores credentials for `registry` as `docker login` does: in the credential helper if
    /// config.json names one for it, else base64 in `auths`. Other settings are kept.
    pub fn store(&self, registry: &str, username: &str, password: &str) -> Result<(), AuthError> {
        let registry = normalize_registry(registry);
        let mut map = self.load()?;
        let key = config_key(&registry);
        if let Some(helper) = Self::helper_for(&map, &registry) {
            let input =
                serde_json::json!({"ServerURL": key, "Username": username, "Secret": password});
            run_helper(&helper, "store", &registry, input.to_string().as_bytes())?;
            // Docker leaves an empty entry so that `docker logout` knows the registry.
            let auths = map.entry("auths").or_insert_with(|| serde_json::json!({}));
            if let Some(obj) = auths.as_object_mut() {
                obj.retain(|k, _| normalize_registry(k) != registry);
                obj.insert(key, serde_json::json!({}));
            }
            return self.save(&map);
        }
        let auth =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        let auths = map.entry("auths").or_insert_with(|| serde_json::json!({}));
        if !auths.is_object() {
            *auths = serde_json::json!({});
        }
        if let Some(obj) = auths.as_object_mut() {
            obj.retain(|k, _| normalize_registry(k) != registry);
            obj.insert(key, serde_json::json!({ "auth": auth }));
        }
        self.save(&map)
    }

    /// Removes credentials for `registry` (from the helper and from `auths`). Returns whether
    /// anything was stored.
    pub fn erase(&self, registry: &str) -> Result<bool, AuthError> {
        let registry = normalize_registry(registry);
        let mut map = self.load()?;
        let mut found = false;
        if let Some(helper) = Self::helper_for(&map, &registry) {
            match run_helper(
                &helper,
                "erase",
                &registry,
                config_key(&registry).as_bytes(),
            ) {
                Ok(_) => found = true,
                Err(AuthError::Helper { detail, .. }) if is_not_found(&detail) => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(obj) = map.get_mut("auths").and_then(|a| a.as_object_mut()) {
            let before = obj.len();
            obj.retain(|k, _| normalize_registry(k) != registry);
            found |= obj.len() != before;
        }
        if found {
            self.save(&map)?;
        }
        Ok(found)
    }
}

fn config_key(registry: &str) -> String {
    if registry == DOCKER_HUB {
        DOCKER_HUB_KEY.to_owned()
    } else {
        registry.to_owned()
    }
}

fn is_not_found(detail: &str) -> bool {
    detail
        .to_ascii_lowercase()
        .contains("credentials not found")
}

/// How long a credential helper may take: long enough to type a passphrase into a prompt it
/// opens, short enough that a helper that hangs does not hang the build with it.
const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

fn run_helper(
    helper: &str,
    action: &'static str,
    registry: &str,
    input: &[u8],
) -> Result<Vec<u8>, AuthError> {
    run_helper_within(helper, action, registry, input, HELPER_TIMEOUT)
}

/// Runs `docker-credential-HELPER ACTION` with `input` on stdin; killed after `limit`.
fn run_helper_within(
    helper: &str,
    action: &'static str,
    registry: &str,
    input: &[u8],
    limit: std::time::Duration,
) -> Result<Vec<u8>, AuthError> {
    let fail = |detail: String| AuthError::Helper {
        helper: helper.to_owned(),
        action,
        registry: registry.to_owned(),
        detail,
    };
    let program = format!("docker-credential-{helper}");
    let mut child = Command::new(&program)
        .arg(action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot run {program} (is it installed and on PATH?): {e}"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .map_err(|e| fail(format!("writing to {program}: {e}")))?;
    }
    // The pipes are drained on threads of their own so that a helper that never exits can be
    // given up on (a program it started may keep them open: the threads are left to end).
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let start = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "{program} did not answer within {} s and was stopped",
                    limit.as_secs_f32()
                )));
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => return Err(fail(format!("waiting for {program}: {e}"))),
        }
    };
    let out = std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if !out.status.success() {
        let mut msg = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.trim().is_empty() {
            msg.push(' ');
            msg.push_str(err.trim());
        }
        return Err(fail(format!("{} ({})", msg.trim(), out.status)));
    }
    Ok(out.stdout)
}

fn helper_get(helper: &str, registry: &str) -> Result<Option<Credential>, AuthError> {
    let out = match run_helper(helper, "get", registry, config_key(registry).as_bytes()) {
        Ok(o) => o,
        Err(AuthError::Helper { detail, .. }) if is_not_found(&detail) => return Ok(None),
        Err(e) => return Err(e),
    };
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let r: Reply = serde_json::from_slice(&out).map_err(|e| AuthError::Helper {
        helper: helper.to_owned(),
        action: "get",
        registry: registry.to_owned(),
        detail: format!("its output is not the expected JSON: {e}"),
    })?;
    if r.secret.is_empty() {
        return Ok(None);
    }
    if r.username == "<token>" {
        return Ok(Some(Credential::IdentityToken(r.secret)));
    }
    Ok(Some(Credential::Basic {
        username: r.username,
        password: r.secret,
    }))
}

/// One challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// `bearer` or `basic`, lowercased.
    pub scheme: String,
    /// Parameters (`realm`, `service`, `scope`), keys lowercased.
    pub params: BTreeMap<String, String>,
}

/// Parses a `WWW-Authenticate` value such as
/// `Bearer realm="https://auth.example/token",service="reg",scope="repository:a:pull,push"`.
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.split_once(|c: char| c.is_ascii_whitespace()) {
        Some((s, r)) => (s, r.trim()),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_ascii_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_commas_inside_quotes_parses() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.example/token");
        assert_eq!(c.params["service"], "registry.example");
        assert_eq!(c.params["scope"], "repository:a/b:pull,push");
        let b = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(
            (b.scheme.as_str(), b.params["realm"].as_str()),
            ("basic", "Registry Realm")
        );
    }

    #[test]
    fn store_read_and_erase_keep_other_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"}},"psFormat":"table"}"#,
        )
        .unwrap();
        let cfg = DockerConfig::at(&path);
        assert_eq!(
            cfg.credential("docker.io").unwrap(),
            Some(Credential::Basic {
                username: "u".into(),
                password: "p".into()
            })
        );
        cfg.store("https://127.0.0.1:5000/", "alice", "s3:cret")
            .unwrap();
        assert_eq!(
            cfg.credential("127.0.0.1:5000").unwrap(),
            Some(Credential::Basic {
                username: "alice".into(),
                password: "s3:cret".into()
            })
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("psFormat"), "{text}");
        assert!(text.contains(r#""127.0.0.1:5000""#), "{text}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(cfg.erase("127.0.0.1:5000").unwrap());
        assert!(!cfg.erase("127.0.0.1:5000").unwrap());
        assert_eq!(cfg.credential("127.0.0.1:5000").unwrap(), None);
        assert!(cfg.credential("docker.io").unwrap().is_some());
    }

    #[test]
    fn broken_config_gives_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths":{"r.example":{"auth":"!!!"}}}"#).unwrap();
        let e = DockerConfig::at(&path).credential("r.example").unwrap_err();
        assert!(e.to_string().contains("not base64"), "{e}");
        std::fs::write(&path, "{").unwrap();
        let e = DockerConfig::at(&path).credential("r.example").unwrap_err();
        assert!(e.to_string().contains("invalid"), "{e}");
    }

    #[test]
    fn credential_helper_processes_store_get_and_erase() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-kilntest");
        std::fs::write(
            &helper,
            "#!/bin/sh\nd=$(dirname \"$0\")\ncase \"$1\" in\n\
             store) cat > \"$d/stored.json\" ;;\n\
             get) read url; if [ -f \"$d/stored.json\" ]; then cat \"$d/stored.json\"; \\\n\
             else echo 'credentials not found in native keychain'; exit 1; fi ;;\n\
             erase) read url; rm -f \"$d/stored.json\" ;;\n\
             esac\n",
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![dir.path().to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        // Only this test in the unit-test binary spawns programs found through PATH.
        std::env::set_var("PATH", std::env::join_paths(dirs).unwrap());
        let cfg_path = dir.path().join("config.json");
        std::fs::write(
            &cfg_path,
            r#"{"credHelpers":{"reg.example:5000":"kilntest"}}"#,
        )
        .unwrap();
        let cfg = DockerConfig::at(&cfg_path);
        assert_eq!(cfg.credential("reg.example:5000").unwrap(), None);
        cfg.store("reg.example:5000", "dave", "t0ken").unwrap();
        let stored = std::fs::read_to_string(dir.path().join("stored.json")).unwrap();
        assert!(stored.contains("\"Username\":\"dave\""), "{stored}");
        assert!(
            !std::fs::read_to_string(&cfg_path)
                .unwrap()
                .contains("t0ken"),
            "secret kept out of config.json"
        );
        assert_eq!(
            cfg.credential("reg.example:5000").unwrap(),
            Some(Credential::Basic {
                username: "dave".into(),
                password: "t0ken".into()
            })
        );
        assert!(cfg.erase("reg.example:5000").unwrap());
        assert_eq!(cfg.credential("reg.example:5000").unwrap(), None);
        // A helper that never answers is stopped, and named in the error.
        let hang = dir.path().join("docker-credential-kilnhang");
        std::fs::write(&hang, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&hang, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = run_helper_within(
            "kilnhang",
            "get",
            "reg.example:5000",
            b"reg.example:5000",
            std::time::Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("docker-credential-kilnhang did not answer within"),
            "{e}"
        );
        // A helper that does not exist is named in the error.
        std::fs::write(&cfg_path, r#"{"credsStore":"kiln-missing-helper"}"#).unwrap();
        let e = cfg.credential("other.example").unwrap_err();
        assert!(
            e.to_string()
                .contains("docker-credential-kiln-missing-helper"),
            "{e}"
        );
    }
}
