//! `kiln registry serve`: an OCI distribution v1.1 registry with pluggable storage
//! ([`Storage`]; the filesystem driver [`FsStorage`] by default), garbage collection, TLS,
//! basic/token auth and metrics.
//!
//! In-process use (tests, other crates):
//!
//! ```no_run
//! # async fn f() -> Result<(), kiln_registry::RegistryError> {
//! let reg = kiln_registry::Registry::builder().root("/tmp/reg").bind("127.0.0.1:0").start().await?;
//! println!("http://{}", reg.addr);
//! reg.shutdown().await;
//! # Ok(()) }
//! ```

mod api;
mod auth;
#[cfg(feature = "byte-registry")]
mod byte_registry;
mod connections;
mod error;
mod gc;
mod manifest;
mod metrics;
mod names;
mod server;
pub mod storage;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub use auth::{issue_token, parse_scope, TokenAccess};
#[cfg(feature = "byte-registry")]
pub use byte_registry::ByteRegistry;
pub use error::RegistryError;
pub use gc::{
    collect_garbage, collect_garbage_in, collect_garbage_with_config, GcOptions, GcReport,
};
pub use storage::{FsStorage, S3Settings, S3Storage, Storage, StorageDriver};

/// Largest manifest accepted by default (distribution's limit too).
pub const DEFAULT_MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Everything that configures a registry; the CLI flags and the `--config` file (JSON) both
/// fill this.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct Config {
    /// Listen address, e.g. `127.0.0.1:5000` (port 0 picks a free port).
    pub addr: String,
    /// Storage driver (`filesystem`, the default: everything under `root`).
    pub storage: StorageDriver,
    /// Storage root of the filesystem driver.
    pub root: PathBuf,
    /// Settings of the `s3` driver (bucket URL, endpoint, region, redirects).
    pub s3: S3Settings,
    /// Refuse every write with 405.
    pub read_only: bool,
    /// PEM certificate chain; with `tls_key`, serve HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    pub tls_key: Option<PathBuf>,
    /// htpasswd file (bcrypt) for basic auth (or for the built-in token endpoint).
    pub htpasswd: Option<PathBuf>,
    /// Token auth: the realm URL clients fetch tokens from. A path (`/token`) means this
    /// server's own token endpoint, addressed by the Host the client used.
    pub token_realm: Option<String>,
    /// Token auth: the service name tokens are issued for.
    pub token_service: Option<String>,
    /// Token auth: file holding the shared HS256 signing key.
    pub token_key: Option<PathBuf>,
    /// Run GC every this many seconds (0: never).
    pub gc_interval_secs: u64,
    /// GC grace period in seconds for content not yet referenced.
    pub gc_grace_secs: u64,
    /// Periodic GC also deletes untagged manifests.
    pub gc_delete_untagged: bool,
    /// fsync data and directories before acknowledging writes (power-loss safety).
    pub fsync: bool,
    /// Largest manifest accepted, in bytes.
    pub max_manifest_bytes: usize,
    /// Seconds a client has to send a complete request head (from connecting, or from the
    /// end of its previous response); 0 turns the limit off.
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may sit with no request in progress and no bytes moving, and
    /// a request body may stall, before the registry gives up on it; 0 turns it off.
    pub idle_timeout_secs: u64,
    /// Most client connections open at once (0: derived from the descriptor limit, half
    /// of what is left after a reserve, so the files being served keep descriptors too).
    pub max_connections: usize,
    /// Most upload sessions open at once across all repositories (0: no limit). Each holds
    /// a staged file; past the bound, starting one answers `429 TOOMANYREQUESTS`.
    pub max_open_uploads: usize,
    /// Most upload sessions open at once in one repository (0: no limit), so one busy or
    /// hostile repository cannot take every slot of `max_open_uploads`.
    pub max_open_uploads_per_repository: usize,
    /// Seconds after which a staged upload that still holds no data counts as abandoned:
    /// when a bound above is reached, such uploads are removed before refusing a new one.
    pub empty_upload_max_age_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: "127.0.0.1:5000".into(),
            storage: StorageDriver::Filesystem,
            root: PathBuf::from("registry"),
            s3: S3Settings::default(),
            read_only: false,
            tls_cert: None,
            tls_key: None,
            htpasswd: None,
            token_realm: None,
            token_service: None,
            token_key: None,
            gc_interval_secs: 0,
            gc_grace_secs: 3600,
            gc_delete_untagged: false,
            fsync: true,
            max_manifest_bytes: DEFAULT_MAX_MANIFEST_BYTES,
            header_read_timeout_secs: 30,
            idle_timeout_secs: 120,
            max_connections: 0,
            max_open_uploads: 1024,
            max_open_uploads_per_repository: 128,
            empty_upload_max_age_secs: 600,
        }
    }
}

impl Config {
    /// Reads a JSON configuration file; keys are the field names above.
    pub fn from_file(path: &Path) -> Result<Config, RegistryError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RegistryError::io("reading config file", path, e))?;
        serde_json::from_str(&text).map_err(|e| {
            RegistryError::Config(format!(
                "{}:{}:{}: {e}",
                path.display(),
                e.line(),
                e.column()
            ))
        })
    }
}

/// Entry point for building a registry.
pub struct Registry;

impl Registry {
    /// A builder with default settings (loopback, port 5000, fsync on).
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder {
            config: Config::default(),
            storage: None,
        }
    }
}

/// Configures and starts a registry.
pub struct RegistryBuilder {
    config: Config,
    /// Storage handed in by the caller, used instead of the driver the config names.
    storage: Option<Arc<dyn Storage>>,
}

impl RegistryBuilder {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }
    /// Serves from `storage` (any driver) instead of the one the configuration names; the
    /// configuration's `root` and `fsync` are then unused.
    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.storage = Some(storage);
        self
    }
    /// Storage root directory of the filesystem driver (created if missing).
    pub fn root(mut self, root: impl Into<PathBuf>) -> Self {
        self.config.root = root.into();
        self
    }
    /// Listen address; `127.0.0.1:0` picks a free port (see [`RunningRegistry::addr`]).
    pub fn bind(mut self, addr: impl Into<String>) -> Self {
        self.config.addr = addr.into();
        self
    }
    /// Refuse writes.
    pub fn read_only(mut self, yes: bool) -> Self {
        self.config.read_only = yes;
        self
    }
    /// Require basic auth against this htpasswd (bcrypt) file.
    pub fn htpasswd(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.htpasswd = Some(path.into());
        self
    }
    /// Serve HTTPS with this PEM certificate chain and key.
    pub fn tls(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.config.tls_cert = Some(cert.into());
        self.config.tls_key = Some(key.into());
        self
    }
    /// Whether to fsync before acknowledging writes (default true).
    pub fn fsync(mut self, yes: bool) -> Self {
        self.config.fsync = yes;
        self
    }
    /// Bounds on open upload sessions, in total and per repository (0: no limit); see
    /// [`Config::max_open_uploads`].
    pub fn upload_limits(mut self, total: usize, per_repository: usize) -> Self {
        self.config.max_open_uploads = total;
        self.config.max_open_uploads_per_repository = per_repository;
        self
    }
    /// Age after which an upload holding no data may be reclaimed when a bound is reached;
    /// see [`Config::empty_upload_max_age_secs`].
    pub fn empty_upload_max_age(mut self, age: Duration) -> Self {
        self.config.empty_upload_max_age_secs = age.as_secs();
        self
    }
    /// Binds, opens storage and starts serving on the current tokio runtime.
    pub async fn start(self) -> Result<RunningRegistry, RegistryError> {
        server::start(self.config, self.storage).await
    }
}

/// A registry serving in the background. Dropping it without [`shutdown`](Self::shutdown)
/// stops accepting connections.
pub struct RunningRegistry {
    /// The bound address (the real port when 0 was asked for).
    pub addr: SocketAddr,
    /// Whether the server speaks HTTPS.
    pub tls: bool,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningRegistry {
    /// `http://ADDR` or `https://ADDR`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// `ADDR` for image references (`127.0.0.1:PORT/repo:tag`).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Stops accepting, lets in-flight requests finish (up to 30 s), then returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn serve_until_signal(self) -> Result<(), RegistryError> {
        use tokio::signal::unix::{signal, SignalKind};
        let sig = |k| signal(k).map_err(|e| RegistryError::io("installing signal handler", "", e));
        let (mut term, mut int) = (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?);
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received; finishing in-flight requests");
        self.shutdown().await;
        Ok(())
    }
}

impl Drop for RunningRegistry {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Sends `tracing` output (access log lines included) to stderr, filtered by `RUST_LOG`
/// (default `info`). Does nothing if a subscriber is already installed.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs a registry with `config` on its own runtime until SIGTERM/SIGINT, then shuts down
/// gracefully. For binaries that are not async themselves; `on_ready` gets the base URL.
pub fn serve_blocking(config: Config, on_ready: impl FnOnce(&str)) -> Result<(), RegistryError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::io("starting the async runtime for", &config.root, e))?;
    rt.block_on(async move {
        let reg = Registry::builder().config(config).start().await?;
        on_ready(&reg.url());
        reg.serve_until_signal().await
    })
}

/// A duration in seconds from the config, `None` for 0 (off).
pub(crate) fn secs_or_off(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// The periodic GC interval, if one is configured.
pub(crate) fn gc_interval(c: &Config) -> Option<Duration> {
    (c.gc_interval_secs > 0).then(|| Duration::from_secs(c.gc_interval_secs))
}
