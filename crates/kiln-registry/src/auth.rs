//! Access control: htpasswd (bcrypt) basic auth and bearer tokens (HS256 JWTs).
//!
//! Token auth follows the Docker token protocol: a 401 carries
//! `WWW-Authenticate: Bearer realm=..,service=..,scope=repository:<name>:<actions>`; the
//! client fetches a token from the realm and retries with `Authorization: Bearer <jwt>`. The
//! registry verifies the HMAC-SHA256 signature with the shared key, `exp`/`nbf`, `aud`
//! (the service, required) and that the `access` claim grants the action.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hyper::header::{self, HeaderMap};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{ApiError, Code, RegistryError};

/// What a request needs permission for.
pub(crate) enum Scope {
    /// `/v2/` and the token endpoint: any authenticated client.
    Base,
    /// `/v2/_catalog`.
    Catalog,
    /// `/metrics`: request counts and storage size are not for anonymous clients.
    Metrics,
    /// An action (`pull`, `push`, `delete`) on a repository.
    Repository { name: String, action: &'static str },
}

impl Scope {
    fn to_token_scope(&self) -> Option<String> {
        match self {
            Scope::Base => None,
            Scope::Catalog => Some("registry:catalog:*".into()),
            Scope::Metrics => Some("registry:metrics:pull".into()),
            Scope::Repository { name, action } => Some(match *action {
                "push" => format!("repository:{name}:pull,push"),
                a => format!("repository:{name}:{a}"),
            }),
        }
    }
}

/// One entry of a token's `access` claim.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenAccess {
    /// `repository` or `registry`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Repository name (or `catalog`).
    pub name: String,
    /// Granted actions: `pull`, `push`, `delete` or `*`.
    pub actions: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default)]
    iss: String,
    #[serde(default)]
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
    exp: u64,
    #[serde(default)]
    nbf: u64,
    #[serde(default)]
    iat: u64,
    #[serde(default)]
    access: Vec<TokenAccess>,
}

/// Token verification settings.
#[derive(Clone)]
pub(crate) struct TokenConfig {
    /// Whether this server speaks HTTPS (for realms given as a path).
    pub(crate) tls: bool,
    pub(crate) realm: String,
    pub(crate) service: String,
    pub(crate) key: Vec<u8>,
}

/// The configured access policy. With neither htpasswd nor token, everything is open.
#[derive(Default)]
pub(crate) struct Auth {
    users: Option<HashMap<String, String>>,
    token: Option<TokenConfig>,
    /// `sha256(user:password)` of credentials already verified, so bcrypt runs once per user.
    verified: Mutex<HashMap<[u8; 32], ()>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads an htpasswd file of `user:bcrypt-hash` lines.
pub(crate) fn load_htpasswd(path: &Path) -> Result<HashMap<String, String>, RegistryError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RegistryError::io("reading htpasswd file", path, e))?;
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| RegistryError::Htpasswd {
                path: path.to_owned(),
                line: i + 1,
                reason: "expected user:hash".into(),
            })?;
        if !hash.starts_with("$2") {
            return Err(RegistryError::Htpasswd {
                path: path.to_owned(),
                line: i + 1,
                reason: "only bcrypt hashes ($2y$...) are supported; create with `htpasswd -B`"
                    .into(),
            });
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Signs a token (HS256 JWT) granting `access` to `subject` for `ttl_secs`, for `service`.
pub fn issue_token(
    key: &[u8],
    service: &str,
    subject: &str,
    access: Vec<TokenAccess>,
    ttl_secs: u64,
) -> String {
    let t = now();
    let claims = Claims {
        iss: "kiln".into(),
        sub: subject.into(),
        aud: Some(service.into()),
        exp: t + ttl_secs,
        nbf: t.saturating_sub(60),
        iat: t,
        access,
    };
    let header = b64().encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = b64().encode(serde_json::to_vec(&claims).unwrap_or_default());
    let signing = format!("{header}.{payload}");
    let sig = b64().encode(hmac_sha256(key, signing.as_bytes()));
    format!("{signing}.{sig}")
}

/// Parses `repository:name:pull,push` scope strings into access entries.
pub fn parse_scope(scope: &str) -> Option<TokenAccess> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some(TokenAccess {
        kind: kind.into(),
        name: name.into(),
        actions: actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

impl Auth {
    pub(crate) fn new(users: Option<HashMap<String, String>>, token: Option<TokenConfig>) -> Auth {
        Auth {
            users,
            token,
            verified: Mutex::new(HashMap::new()),
        }
    }

    fn unauthorized(&self, headers: &HeaderMap, scope: &Scope, why: &str) -> ApiError {
        let mut e = ApiError::new(
            Code::Unauthorized,
            format!("authentication required: {why}"),
        );
        e.challenge = Some(match &self.token {
            Some(t) => {
                // A realm given as a path ("/token") is this server's own token endpoint,
                // addressed the way the client reached us.
                let realm = match (t.realm.starts_with('/'), headers.get(header::HOST)) {
                    (true, Some(host)) => format!(
                        "{}://{}{}",
                        if t.tls { "https" } else { "http" },
                        host.to_str().unwrap_or("localhost"),
                        t.realm
                    ),
                    _ => t.realm.clone(),
                };
                let mut c = format!("Bearer realm=\"{realm}\",service=\"{}\"", t.service);
                if let Some(s) = scope.to_token_scope() {
                    c.push_str(&format!(",scope=\"{s}\""));
                }
                c
            }
            None => "Basic realm=\"kiln-registry\"".into(),
        });
        e
    }

    /// True when no authentication is configured (single-tenant registry).
    pub(crate) fn is_open(&self) -> bool {
        self.users.is_none() && self.token.is_none()
    }

    /// Checks the request's credentials for `scope`; a 401 with a challenge otherwise.
    pub(crate) async fn check(&self, headers: &HeaderMap, scope: &Scope) -> Result<(), ApiError> {
        if self.users.is_none() && self.token.is_none() {
            return Ok(());
        }
        let authz = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Some(t) = &self.token {
            let Some(jwt) = authz.and_then(|a| a.strip_prefix("Bearer ")) else {
                return Err(self.unauthorized(headers, scope, "no bearer token"));
            };
            return match verify_token(t, jwt.trim()) {
                Ok(claims) if grants(&claims.access, scope) => Ok(()),
                Ok(_) => Err(self.unauthorized(headers, scope, "token does not grant this access")),
                Err(why) => Err(self.unauthorized(headers, scope, &why)),
            };
        }
        match self.basic_user(authz).await {
            Some(_) => Ok(()),
            None => Err(self.unauthorized(headers, scope, "invalid username or password")),
        }
    }

    /// The user named by valid `Authorization: Basic` credentials.
    async fn basic_user(&self, authz: Option<&str>) -> Option<String> {
        let users = self.users.as_ref()?;
        let raw = authz?.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(raw.trim())
            .ok()?;
        let key: [u8; 32] = Sha256::digest(&decoded).into();
        let text = String::from_utf8(decoded).ok()?;
        let (user, pass) = text.split_once(':')?;
        let hash = users.get(user)?.clone();
        if self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&key)
        {
            return Some(user.to_owned());
        }
        let pass = pass.to_owned();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(pass, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        if ok {
            self.verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, ());
            Some(user.to_owned())
        } else {
            None
        }
    }

    /// The built-in token endpoint: checks basic credentials (when htpasswd is configured)
    /// and grants the requested scopes.
    pub(crate) async fn issue_for_request(
        &self,
        headers: &HeaderMap,
        scopes: &[&str],
    ) -> Result<String, ApiError> {
        let Some(t) = &self.token else {
            return Err(
                ApiError::new(Code::Unsupported, "token auth is not configured")
                    .with_status(hyper::StatusCode::NOT_FOUND),
            );
        };
        let authz = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let subject = if self.users.is_some() {
            match self.basic_user(authz).await {
                Some(u) => u,
                None => {
                    let mut e = ApiError::new(Code::Unauthorized, "invalid username or password");
                    e.challenge = Some("Basic realm=\"kiln-registry\"".into());
                    return Err(e);
                }
            }
        } else {
            "anonymous".into()
        };
        let access = scopes
            .iter()
            .flat_map(|s| s.split(' '))
            .filter_map(parse_scope)
            .collect();
        Ok(issue_token(&t.key, &t.service, &subject, access, 3600))
    }
}

fn verify_token(t: &TokenConfig, jwt: &str) -> Result<Claims, String> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed token".into());
    };
    let header: serde_json::Value = b64()
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("malformed token header")?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
        return Err("token algorithm must be HS256".into());
    }
    let sig = b64().decode(s).map_err(|_| "malformed token signature")?;
    let expect = hmac_sha256(&t.key, format!("{h}.{p}").as_bytes());
    if !constant_time_eq(&sig, &expect) {
        return Err("token signature is invalid".into());
    }
    let claims: Claims = b64()
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("malformed token claims")?;
    let t_now = now();
    if claims.exp <= t_now {
        return Err("token expired".into());
    }
    if claims.nbf > t_now + 60 {
        return Err("token not yet valid".into());
    }
    // A token without an audience could have been issued for any service sharing the key;
    // the Docker token spec makes `aud` the service name, so it is required.
    match &claims.aud {
        Some(aud) if aud == &t.service => {}
        Some(aud) => return Err(format!("token is for service {aud}, not {}", t.service)),
        None => {
            return Err(format!(
                "token has no audience (aud); it must name the service {}",
                t.service
            ))
        }
    }
    Ok(claims)
}

fn grants(access: &[TokenAccess], scope: &Scope) -> bool {
    let has = |kind: &str, name: &str, action: &str| {
        access.iter().any(|a| {
            a.kind == kind && a.name == name && a.actions.iter().any(|x| x == action || x == "*")
        })
    };
    match scope {
        Scope::Base => true,
        Scope::Catalog => has("registry", "catalog", "*"),
        Scope::Metrics => has("registry", "metrics", "pull"),
        Scope::Repository { name, action } => has("repository", name, action),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn issued_tokens_verify_and_grant_only_their_scope() {
        let cfg = TokenConfig {
            tls: false,
            realm: "r".into(),
            service: "svc".into(),
            key: b"k".to_vec(),
        };
        let access = vec![parse_scope("repository:a/b:pull,push").unwrap()];
        let tok = issue_token(b"k", "svc", "u", access, 60);
        let claims = verify_token(&cfg, &tok).unwrap();
        let push = Scope::Repository {
            name: "a/b".into(),
            action: "push",
        };
        let del = Scope::Repository {
            name: "a/b".into(),
            action: "delete",
        };
        let other = Scope::Repository {
            name: "c".into(),
            action: "pull",
        };
        assert!(grants(&claims.access, &push));
        assert!(!grants(&claims.access, &del));
        assert!(!grants(&claims.access, &other));
        let wrong_key = TokenConfig {
            key: b"other".to_vec(),
            ..cfg.clone()
        };
        assert!(verify_token(&wrong_key, &tok).is_err());
        let wrong_aud = TokenConfig {
            service: "x".into(),
            ..cfg
        };
        assert!(verify_token(&wrong_aud, &tok).is_err());
    }

    /// Signs `claims` as an HS256 JWT, the way another issuer sharing the key would.
    fn sign(key: &[u8], claims: &serde_json::Value) -> String {
        let header = b64().encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = b64().encode(serde_json::to_vec(claims).unwrap());
        let signing = format!("{header}.{payload}");
        let sig = b64().encode(hmac_sha256(key, signing.as_bytes()));
        format!("{signing}.{sig}")
    }

    #[test]
    fn tokens_without_an_audience_are_refused() {
        let cfg = TokenConfig {
            tls: false,
            realm: "r".into(),
            service: "svc".into(),
            key: b"0123456789abcdef".to_vec(),
        };
        let access = serde_json::json!([{"type": "repository", "name": "a", "actions": ["pull"]}]);
        let exp = now() + 600;
        let no_aud = sign(&cfg.key, &serde_json::json!({"exp": exp, "access": access}));
        let err = verify_token(&cfg, &no_aud).expect_err("a token without aud is refused");
        assert!(err.contains("no audience"), "{err}");
        let with_aud = sign(
            &cfg.key,
            &serde_json::json!({"aud": "svc", "exp": exp, "access": access}),
        );
        assert!(verify_token(&cfg, &with_aud).is_ok());
    }
}
