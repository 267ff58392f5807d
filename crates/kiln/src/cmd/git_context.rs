//! A git repository as the build context, as buildx takes it: `https://host/repo.git#REF:DIR`,
//! `git@host:repo.git#REF`, `git://…`, `ssh://…`. kiln fetches exactly the one commit the
//! URL names (`git fetch --depth 1`, the user's `git`, its credentials and ssh setup) into a
//! private directory and builds from there, without its `.git` (unless the build arg
//! `BUILDKIT_CONTEXT_KEEP_GIT_DIR` is true, as in BuildKit). A `GIT_AUTH_TOKEN` secret (what
//! docker/build-push-action passes) authenticates HTTPS fetches, through git's environment,
//! never its command line. Other URLs (an HTTP tarball or Dockerfile) are refused by the
//! options' parser with a message that says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use base64::Engine;
use kiln_graph::options::{SecretSource, SecretSpec};

/// A git URL split as buildx splits it: the repository, the ref to fetch (`None`: the
/// remote's `HEAD`) and the directory inside the repository to use as the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitContext {
    /// The repository URL, without the fragment.
    pub remote: String,
    /// Branch, tag, other ref (`heads/main`, `pull/1/merge`) or commit.
    pub reference: Option<String>,
    /// A directory inside the repository.
    pub subdir: Option<String>,
}

impl GitContext {
    /// The git context `arg` names, if it is one (git's own schemes, scp-like `git@`, or
    /// an HTTP(S) URL of a repository: ending in `.git`, or on github.com).
    pub fn parse(arg: &str) -> Option<Self> {
        let (remote, fragment) = match arg.split_once('#') {
            Some((r, f)) => (r, Some(f)),
            None => (arg, None),
        };
        let is_git = remote.starts_with("git://")
            || remote.starts_with("git@")
            || remote.starts_with("ssh://")
            || ((remote.starts_with("https://") || remote.starts_with("http://"))
                && (remote.ends_with(".git") || remote.contains("://github.com/")));
        if !is_git {
            return None;
        }
        let (reference, subdir) = match fragment {
            None | Some("") => (None, None),
            Some(f) => match f.split_once(':') {
                Some((r, d)) => (non_empty(r), non_empty(d)),
                None => (non_empty(f), None),
            },
        };
        Some(GitContext {
            remote: remote.to_string(),
            reference,
            subdir,
        })
    }

    /// Fetches the commit into `into` (an empty directory) and returns the context directory
    /// (`into` or its `subdir`). `token` authenticates HTTPS fetches (`GIT_AUTH_TOKEN`).
    pub fn fetch(
        &self,
        arg: &str,
        into: &Path,
        token: Option<&str>,
        keep_git_dir: bool,
    ) -> anyhow::Result<PathBuf> {
        let git = |args: &[&str]| -> anyhow::Result<()> {
            let mut cmd = Command::new("git");
            cmd.arg("-C").arg(into).args(args);
            // Never ask on a terminal: a CI job would hang.
            cmd.env("GIT_TERMINAL_PROMPT", "0");
            if let (Some(token), Some(host)) = (token, self.https_host()) {
                let basic = base64::engine::general_purpose::STANDARD
                    .encode(format!("x-access-token:{token}"));
                cmd.env("GIT_CONFIG_COUNT", "1")
                    .env(
                        "GIT_CONFIG_KEY_0",
                        format!("http.https://{host}/.extraheader"),
                    )
                    .env(
                        "GIT_CONFIG_VALUE_0",
                        format!("Authorization: basic {basic}"),
                    );
            }
            let out = cmd.output().with_context(|| {
                format!("invalid value {arg:?} for CONTEXT: cannot run git to fetch it (is git installed?)")
            })?;
            if !out.status.success() {
                anyhow::bail!(
                    "invalid value {arg:?} for CONTEXT: `git {}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        git(&["init", "-q"])?;
        let reference = self.reference.as_deref().unwrap_or("HEAD");
        git(&[
            "fetch",
            "-q",
            "--depth",
            "1",
            "--no-tags",
            &self.remote,
            reference,
        ])?;
        git(&["checkout", "-q", "--detach", "FETCH_HEAD"])?;
        if !keep_git_dir {
            let dot_git = into.join(".git");
            std::fs::remove_dir_all(&dot_git)
                .with_context(|| format!("removing {}", dot_git.display()))?;
        }
        let Some(sub) = &self.subdir else {
            return Ok(into.to_path_buf());
        };
        let dir = into.join(sub.trim_start_matches('/'));
        let inside = std::fs::canonicalize(&dir)
            .ok()
            .zip(std::fs::canonicalize(into).ok())
            .is_some_and(|(d, root)| d.starts_with(root) && d.is_dir());
        if !inside {
            anyhow::bail!(
                "invalid value {arg:?} for CONTEXT: the repository has no directory {sub:?} at {reference}"
            );
        }
        Ok(dir)
    }

    /// The host of an HTTPS remote, where a token applies.
    fn https_host(&self) -> Option<&str> {
        let rest = self.remote.strip_prefix("https://")?;
        let host = rest.split('/').next()?;
        Some(host.rsplit('@').next().unwrap_or(host))
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// The `GIT_AUTH_TOKEN` secret among `--secret` values (docker/build-push-action passes the
/// workflow's token so), read from its file or variable.
pub fn auth_token(secrets: &[String]) -> anyhow::Result<Option<String>> {
    for s in secrets {
        let Ok(spec) = SecretSpec::parse("--secret", s) else {
            continue;
        };
        if spec.id != "GIT_AUTH_TOKEN" {
            continue;
        }
        let value = if let SecretSource::File(p) = &spec.source {
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the GIT_AUTH_TOKEN secret {}", p.display()))?
        } else if let SecretSource::Env(v) = &spec.source {
            std::env::var(v).unwrap_or_default()
        } else {
            continue;
        };
        let value = value.trim().to_string();
        return Ok((!value.is_empty()).then_some(value));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_urls_split_into_remote_ref_and_subdir() {
        let g = GitContext::parse("https://github.com/o/r.git#main:docker/app").unwrap();
        assert_eq!(g.remote, "https://github.com/o/r.git");
        assert_eq!(g.reference.as_deref(), Some("main"));
        assert_eq!(g.subdir.as_deref(), Some("docker/app"));
        let g = GitContext::parse("git@github.com:o/r.git").unwrap();
        assert_eq!((g.reference, g.subdir), (None, None));
        let g = GitContext::parse("git://127.0.0.1:9418/r.git#:sub").unwrap();
        assert_eq!((g.reference, g.subdir.as_deref()), (None, Some("sub")));
        let g = GitContext::parse("https://github.com/o/r#heads/main").unwrap();
        assert_eq!(g.reference.as_deref(), Some("heads/main"));
        assert_eq!(g.https_host(), Some("github.com"));
        assert!(GitContext::parse("https://example.com/context.tar.gz").is_none());
        assert!(GitContext::parse("./dir").is_none());
    }
}
