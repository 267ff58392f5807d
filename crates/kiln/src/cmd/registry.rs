//! `kiln registry`: serve kiln's OCI registry, collect its garbage, issue tokens.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use kiln_registry::{Config, GcOptions, S3Settings, StorageDriver};

use crate::Globals;

/// Arguments of `kiln registry`.
#[derive(clap::Args)]
pub struct RegistryArgs {
    #[command(subcommand)]
    command: RegistryCommand,
}

#[derive(clap::Subcommand)]
enum RegistryCommand {
    /// Serve an OCI distribution v1.1 registry
    Serve(Box<ServeArgs>),
    /// Delete blobs and manifests no tag reaches
    Gc(Box<GcArgs>),
    /// Print a bearer token signed with the registry's token key
    Token(TokenArgs),
}

/// Where the registry keeps its data (`serve` and `gc` alike).
#[derive(clap::Args)]
struct StorageArgs {
    /// Storage: `s3://BUCKET/PREFIX` (an S3 bucket several registry processes may share;
    /// credentials from AWS_* variables or ~/.aws files) or a directory (default
    /// `<root>/registry`)
    #[arg(long, value_name = "s3://BUCKET/PREFIX|DIR")]
    storage: Option<String>,
    /// S3 endpoint when not AWS's, e.g. `http://127.0.0.1:3900` (implies path style)
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// S3 signing region (default AWS_REGION, the AWS config file, or us-east-1)
    #[arg(long, value_name = "REGION")]
    s3_region: Option<String>,
    /// Address the bucket in the URL path (`ENDPOINT/BUCKET/KEY`) rather than the host name
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    s3_path_style: Option<bool>,
    /// Answer blob GETs with a 307 redirect to a presigned URL of the object
    #[arg(long)]
    s3_redirect: bool,
}

impl StorageArgs {
    /// Applies the flags to `cfg`; S3 flags without an `s3://` storage are an error.
    fn apply(self, cfg: &mut Config) -> anyhow::Result<()> {
        if let Some(s) = self.storage {
            if s.starts_with("s3://") {
                kiln_s3::parse_s3_url(&s).map_err(|e| anyhow::anyhow!("--storage: {e}"))?;
                cfg.storage = StorageDriver::S3;
                cfg.s3 = S3Settings {
                    url: s,
                    ..S3Settings::default()
                };
            } else if s.contains("://") {
                anyhow::bail!("--storage {s:?}: expected s3://BUCKET/PREFIX or a directory");
            } else {
                cfg.storage = StorageDriver::Filesystem;
                cfg.root = PathBuf::from(s);
            }
        }
        let s3_flag = [
            ("--s3-endpoint", self.s3_endpoint.is_some()),
            ("--s3-region", self.s3_region.is_some()),
            ("--s3-path-style", self.s3_path_style.is_some()),
            ("--s3-redirect", self.s3_redirect),
        ]
        .into_iter()
        .find(|(_, given)| *given);
        if let Some((flag, _)) = s3_flag {
            if cfg.storage != StorageDriver::S3 {
                anyhow::bail!("{flag} needs --storage s3://BUCKET/PREFIX");
            }
        }
        if let Some(e) = self.s3_endpoint {
            cfg.s3.endpoint = Some(e);
        }
        if let Some(r) = self.s3_region {
            cfg.s3.region = Some(r);
        }
        if let Some(p) = self.s3_path_style {
            cfg.s3.path_style = Some(p);
        }
        cfg.s3.redirect |= self.s3_redirect;
        Ok(())
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Listen address
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,
    #[command(flatten)]
    storage: StorageArgs,
    /// JSON configuration file with the same settings as the flags (flags win)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// PEM certificate chain for HTTPS
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require basic auth against this htpasswd file (bcrypt entries, `htpasswd -B`)
    #[arg(long, value_name = "FILE")]
    htpasswd: Option<PathBuf>,
    /// Token auth: realm URL clients fetch tokens from; a path such as `/token` means this
    /// server's own token endpoint (basic auth against --htpasswd)
    #[arg(long, value_name = "URL", requires = "token_key")]
    token_realm: Option<String>,
    /// Token auth: service name
    #[arg(long, value_name = "NAME")]
    token_service: Option<String>,
    /// Token auth: file with the shared HS256 signing key (at least 16 bytes)
    #[arg(long, value_name = "FILE", requires = "token_realm")]
    token_key: Option<PathBuf>,
    /// Refuse all writes
    #[arg(long)]
    read_only: bool,
    /// Run garbage collection periodically, e.g. `1h`
    #[arg(long, value_name = "DURATION", value_parser = humantime_secs)]
    gc_interval: Option<u64>,
    /// Grace period for content not yet referenced, e.g. `1h`
    #[arg(long, value_name = "DURATION", value_parser = humantime_secs)]
    gc_grace: Option<u64>,
    /// Periodic GC also deletes untagged manifests
    #[arg(long)]
    gc_delete_untagged: bool,
    /// Skip fsync (faster; still safe against process crashes, not against power loss)
    #[arg(long)]
    no_fsync: bool,
}

#[derive(clap::Args)]
struct GcArgs {
    #[command(flatten)]
    storage: StorageArgs,
    /// Also delete manifests that no tag reaches
    #[arg(long)]
    delete_untagged: bool,
    /// Print what would be deleted, delete nothing
    #[arg(long)]
    dry_run: bool,
    /// Keep content younger than this, e.g. `1h`, `0s`
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime_secs)]
    grace: u64,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// File with the shared signing key (the server's --token-key)
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Service name (the server's --token-service)
    #[arg(long, default_value = "kiln-registry")]
    service: String,
    /// Subject (user name) recorded in the token
    #[arg(long, default_value = "kiln")]
    subject: String,
    /// Granted scope, e.g. `repository:app:pull,push` (repeatable)
    #[arg(long = "scope", value_name = "SCOPE", required = true)]
    scopes: Vec<String>,
    /// Lifetime, e.g. `1h`
    #[arg(long, default_value = "1h", value_parser = humantime_secs)]
    ttl: u64,
}

fn humantime_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 10m, 1h"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    Ok(n * mult)
}

/// Runs `kiln registry`. The registry's storage is `<root>/registry`, where `<root>` is the
/// global `--root` (or a config file's `root`).
pub fn run(args: RegistryArgs, globals: &Globals) -> anyhow::Result<ExitCode> {
    let default_root = globals.root.join("registry");
    match args.command {
        RegistryCommand::Serve(a) => serve(*a, default_root),
        RegistryCommand::Gc(a) => {
            let mut cfg = Config {
                root: default_root,
                gc_grace_secs: a.grace,
                ..Config::default()
            };
            a.storage.apply(&mut cfg)?;
            let opts = GcOptions {
                delete_untagged: a.delete_untagged,
                dry_run: a.dry_run,
                grace: Duration::from_secs(a.grace),
            };
            let r = match cfg.storage {
                StorageDriver::Filesystem => kiln_registry::collect_garbage(&cfg.root, &opts)
                    .with_context(|| format!("garbage collection of {}", cfg.root.display()))?,
                StorageDriver::S3 => kiln_registry::collect_garbage_with_config(&cfg, &opts)
                    .with_context(|| format!("garbage collection of {}", cfg.s3.url))?,
            };
            let verb = if a.dry_run { "would delete" } else { "deleted" };
            for (repo, d) in &r.manifests_deleted {
                outln!("{verb} manifest {repo}@{d}");
            }
            for d in &r.blobs_deleted {
                outln!("{verb} blob {d}");
            }
            outln!(
                "{verb} {} blobs ({} bytes) and {} manifests; kept {} blobs",
                r.blobs_deleted.len(),
                r.bytes_freed,
                r.manifests_deleted.len(),
                r.blobs_kept
            );
            Ok(ExitCode::SUCCESS)
        }
        RegistryCommand::Token(a) => {
            let key = std::fs::read(&a.key)
                .with_context(|| format!("reading token key {}", a.key.display()))?;
            let mut access = Vec::new();
            for s in &a.scopes {
                access.push(kiln_registry::parse_scope(s).with_context(|| {
                    format!("scope {s:?} is not TYPE:NAME:ACTIONS, e.g. repository:app:pull,push")
                })?);
            }
            outln!(
                "{}",
                kiln_registry::issue_token(&key, &a.service, &a.subject, access, a.ttl)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn serve(a: ServeArgs, default_root: PathBuf) -> anyhow::Result<ExitCode> {
    let mut cfg = match &a.config {
        Some(p) => Config::from_file(p)?,
        None => Config {
            root: default_root,
            ..Config::default()
        },
    };
    if let Some(x) = a.addr {
        cfg.addr = x;
    }
    a.storage.apply(&mut cfg)?;
    if a.tls_cert.is_some() {
        cfg.tls_cert = a.tls_cert;
        cfg.tls_key = a.tls_key;
    }
    if a.htpasswd.is_some() {
        cfg.htpasswd = a.htpasswd;
    }
    if a.token_realm.is_some() {
        cfg.token_realm = a.token_realm;
        cfg.token_key = a.token_key;
    }
    if a.token_service.is_some() {
        cfg.token_service = a.token_service;
    }
    cfg.read_only |= a.read_only;
    if let Some(x) = a.gc_interval {
        cfg.gc_interval_secs = x;
    }
    if let Some(x) = a.gc_grace {
        cfg.gc_grace_secs = x;
    }
    cfg.gc_delete_untagged |= a.gc_delete_untagged;
    if a.no_fsync {
        cfg.fsync = false;
    }
    kiln_registry::init_logging();
    kiln_registry::serve_blocking(cfg, |url| eprintln!("kiln registry listening on {url}"))?;
    Ok(ExitCode::SUCCESS)
}
