//! Where a bucket is and how to sign for it: [`S3Config`] from an `s3://BUCKET/PREFIX` URL,
//! the AWS environment variables and the `~/.aws/credentials` and `~/.aws/config` files.
//!
//! Precedence, as the AWS tools have it: environment variables first, then the profile
//! (`AWS_PROFILE`, else `default`) of the credentials file, then of the config file.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use url::Url;

use crate::S3Error;

/// Access key, secret and (for temporary credentials) a session token. `Debug` never shows
/// the secret or the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id (`AWS_ACCESS_KEY_ID`).
    pub key: String,
    /// The secret access key (`AWS_SECRET_ACCESS_KEY`).
    pub secret: String,
    /// The session token of temporary credentials (`AWS_SESSION_TOKEN`).
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("key", &self.key)
            .field("secret", &"[redacted]")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// One bucket on one S3 endpoint, with the credentials to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// The service endpoint (`https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:3900`).
    pub endpoint: Url,
    /// The signing region (`us-east-1`, `garage`).
    pub region: String,
    /// The bucket name.
    pub bucket: String,
    /// Address the bucket as `ENDPOINT/BUCKET/KEY` rather than `BUCKET.ENDPOINT/KEY`
    /// (most self-hosted stores need this).
    pub path_style: bool,
    /// Who signs the requests.
    pub credentials: Credentials,
    /// Prepended to every key the client is given (`kiln/registry/`): empty, or ending in
    /// `/`. From the URL's path.
    pub prefix: String,
}

/// The region used when none is configured (AWS's own default).
pub const DEFAULT_REGION: &str = "us-east-1";

impl S3Config {
    /// The configuration for `s3://BUCKET/PREFIX` from the process environment and the AWS
    /// files (see the module documentation). Without an endpoint setting the endpoint is
    /// AWS's for the region, virtual-host style; with one, path style.
    pub fn from_env_and_url(s3_url: &str) -> Result<Self, S3Error> {
        Self::from_url_with(s3_url, &|name| std::env::var(name).ok())
    }

    /// As [`from_env_and_url`](Self::from_env_and_url), reading variables through `env`
    /// (files are found through it too: `HOME`, `AWS_SHARED_CREDENTIALS_FILE`,
    /// `AWS_CONFIG_FILE`).
    pub fn from_url_with(
        s3_url: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, S3Error> {
        let (bucket, prefix) = parse_s3_url(s3_url)?;
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".to_owned());
        let home = env("HOME").map(PathBuf::from);
        let file = |var: &str, name: &str| {
            env(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
        };
        let creds_file = match file("AWS_SHARED_CREDENTIALS_FILE", "credentials") {
            Some(p) => read_profile(&p, &profile, false)?,
            None => HashMap::new(),
        };
        let config_file = match file("AWS_CONFIG_FILE", "config") {
            Some(p) => read_profile(&p, &profile, true)?,
            None => HashMap::new(),
        };
        let from_files = |k: &str| {
            creds_file
                .get(k)
                .or_else(|| config_file.get(k))
                .filter(|v| !v.is_empty())
                .cloned()
        };

        let credentials = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(key), Some(secret)) => Credentials {
                key,
                secret,
                session_token: env("AWS_SESSION_TOKEN"),
            },
            (Some(_), None) | (None, Some(_)) => {
                return Err(S3Error::Config(
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together".into(),
                ))
            }
            (None, None) => match (
                from_files("aws_access_key_id"),
                from_files("aws_secret_access_key"),
            ) {
                (Some(key), Some(secret)) => Credentials {
                    key,
                    secret,
                    session_token: from_files("aws_session_token"),
                },
                _ => {
                    return Err(S3Error::Config(format!(
                        "no S3 credentials for {s3_url}: set AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY, or give profile `{profile}` \
                         aws_access_key_id and aws_secret_access_key in ~/.aws/credentials"
                    )))
                }
            },
        };

        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| from_files("region"))
            .unwrap_or_else(|| DEFAULT_REGION.to_owned());
        let endpoint = env("AWS_ENDPOINT_URL_S3")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| from_files("endpoint_url"));
        let (endpoint, path_style) = match endpoint {
            Some(e) => (parse_endpoint(&e)?, true),
            None => (aws_endpoint(&region)?, false),
        };
        Ok(S3Config {
            endpoint,
            region,
            bucket,
            path_style,
            credentials,
            prefix,
        })
    }

    /// Replaces the endpoint (`--s3-endpoint`): `http(s)://HOST[:PORT]`.
    pub fn set_endpoint(&mut self, endpoint: &str) -> Result<(), S3Error> {
        self.endpoint = parse_endpoint(endpoint)?;
        Ok(())
    }

    /// The `s3://BUCKET/PREFIX` this configuration names, for messages.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

/// AWS's endpoint for `region`.
fn aws_endpoint(region: &str) -> Result<Url, S3Error> {
    parse_endpoint(&format!("https://s3.{region}.amazonaws.com"))
}

/// An `http(s)://` endpoint URL, or a clear error naming it.
pub(crate) fn parse_endpoint(s: &str) -> Result<Url, S3Error> {
    let url = Url::parse(s).map_err(|e| S3Error::Url {
        url: s.to_owned(),
        reason: format!("not an endpoint URL ({e}); expected http(s)://HOST[:PORT]"),
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(S3Error::Url {
            url: s.to_owned(),
            reason: "expected http(s)://HOST[:PORT]".into(),
        });
    }
    Ok(url)
}

/// Splits `s3://BUCKET[/PREFIX]` into the bucket and the prefix (empty, or ending in `/`).
pub fn parse_s3_url(s3_url: &str) -> Result<(String, String), S3Error> {
    let bad = |reason: &str| S3Error::Url {
        url: s3_url.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = s3_url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("expected s3://BUCKET[/PREFIX]"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !valid_bucket {
        return Err(bad(
            "bucket names are 3 to 63 lowercase letters, digits, `-` and `.`",
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
        return Err(bad("the prefix may not hold `.`, `..` or empty segments"));
    }
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_owned(), prefix))
}

/// The `key = value` pairs of `profile` in an AWS INI file; empty when the file is missing.
/// The config file names profiles `[profile NAME]` (except `[default]`).
fn read_profile(
    path: &std::path::Path,
    profile: &str,
    config_file: bool,
) -> Result<HashMap<String, String>, S3Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(S3Error::Config(format!("reading {}: {e}", path.display()))),
    };
    let wanted = if config_file && profile != "default" {
        format!("profile {profile}")
    } else {
        profile.to_owned()
    };
    let mut out = HashMap::new();
    let mut inside = false;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[') {
            let Some(section) = section.strip_suffix(']') else {
                return Err(S3Error::Config(format!(
                    "{}:{}:1: unclosed section header",
                    path.display(),
                    n + 1
                )));
            };
            inside = section.trim() == wanted;
            continue;
        }
        if !inside {
            continue;
        }
        // Nested settings (`s3 =` followed by indented lines) are skipped, not misread.
        if let Some((k, v)) = line.split_once('=') {
            out.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn s3_urls_split_into_bucket_and_prefix() {
        assert_eq!(
            parse_s3_url("s3://kiln-cache").unwrap(),
            ("kiln-cache".into(), "".into())
        );
        assert_eq!(
            parse_s3_url("s3://b12/reg/one/").unwrap(),
            ("b12".into(), "reg/one/".into())
        );
        for bad in [
            "kiln",
            "s3://",
            "s3://AB",
            "s3://b/../x",
            "https://x/y",
            "s3://-ab",
        ] {
            let e = parse_s3_url(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn environment_wins_over_files_and_endpoint_implies_path_style() {
        let dir = tempfile::tempdir().unwrap();
        let aws = dir.path().join(".aws");
        std::fs::create_dir(&aws).unwrap();
        std::fs::write(
            aws.join("credentials"),
            "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = FILESECRET\n\
             [ci]\naws_access_key_id=CIKEY\naws_secret_access_key=CISECRET\naws_session_token=T\n",
        )
        .unwrap();
        std::fs::write(
            aws.join("config"),
            "[default]\nregion = eu-west-3\n[profile ci]\nregion = garage\nendpoint_url = http://127.0.0.1:3900\n",
        )
        .unwrap();
        let home = dir.path().to_str().unwrap();

        let c = S3Config::from_url_with("s3://bkt/p", &env_of(&[("HOME", home)])).unwrap();
        assert_eq!(c.credentials.key, "FILEKEY");
        assert_eq!(c.region, "eu-west-3");
        assert_eq!(c.endpoint.as_str(), "https://s3.eu-west-3.amazonaws.com/");
        assert!(!c.path_style);
        assert_eq!(c.prefix, "p/");

        let c = S3Config::from_url_with(
            "s3://bkt",
            &env_of(&[("HOME", home), ("AWS_PROFILE", "ci")]),
        )
        .unwrap();
        assert_eq!(c.credentials.key, "CIKEY");
        assert_eq!(c.credentials.session_token.as_deref(), Some("T"));
        assert_eq!(c.region, "garage");
        assert_eq!(c.endpoint.as_str(), "http://127.0.0.1:3900/");
        assert!(c.path_style);

        let c = S3Config::from_url_with(
            "s3://bkt",
            &env_of(&[
                ("HOME", home),
                ("AWS_PROFILE", "ci"),
                ("AWS_ACCESS_KEY_ID", "ENVKEY"),
                ("AWS_SECRET_ACCESS_KEY", "ENVSECRET"),
                ("AWS_REGION", "r1"),
                ("AWS_ENDPOINT_URL_S3", "http://10.0.0.1:9000"),
            ]),
        )
        .unwrap();
        assert_eq!(c.credentials.key, "ENVKEY");
        assert_eq!(c.credentials.session_token, None);
        assert_eq!(c.region, "r1");
        assert_eq!(c.endpoint.as_str(), "http://10.0.0.1:9000/");
        let shown = format!("{c:?}");
        assert!(!shown.contains("ENVSECRET"), "{shown}");
    }

    #[test]
    fn missing_credentials_say_what_to_set() {
        let e = S3Config::from_url_with("s3://bkt", &env_of(&[("HOME", "/nonexistent")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("AWS_ACCESS_KEY_ID"), "{e}");
        let e = S3Config::from_url_with("s3://bkt", &env_of(&[("AWS_ACCESS_KEY_ID", "k")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("together"), "{e}");
    }
}
