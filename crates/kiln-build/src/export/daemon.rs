//! The local image stores `--load` puts an image into, and the two ways of talking to them:
//! the Docker Engine API on a unix socket or TCP (plain, or TLS with the docker CLI's client
//! certificates) — dockerd, or podman's Docker-compatible service — and `podman load`
//! reading the archive on its standard input.
//!
//! [`ImageStore::find`] picks the store: `DOCKER_HOST`, the docker CLI's current context
//! (`DOCKER_CONTEXT`, else `currentContext` of its `config.json`), then podman's
//! `CONTAINER_HOST` (each, when set, is the user's choice: unreachable is an error, never a
//! fallback), then Docker's default socket, podman's default API socket, and `podman` on
//! `PATH`. Every attempt is kept, so that finding none says what was tried.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;

/// Docker's default socket, used when `DOCKER_HOST` is unset.
pub const DOCKER_DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// podman's API socket when it runs as root (`podman system service`).
pub const PODMAN_ROOT_SOCKET: &str = "/run/podman/podman.sock";

/// How long a store has to answer `GET /_ping` before it counts as unreachable.
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of the archive is sent at once to an Engine API.
const CHUNK: usize = 1 << 20;

/// What [`ImageStore::find`] reads from the environment, gathered once so that the choice
/// can be followed (and tested) without touching the process's variables.
#[derive(Debug, Clone, Default)]
pub struct StoreEnv {
    /// `DOCKER_HOST`.
    pub docker_host: Option<String>,
    /// How a `tcp://` `DOCKER_HOST` is reached: `DOCKER_TLS_VERIFY` (TLS with the
    /// certificates of `DOCKER_CERT_PATH`, else the config dir), `DOCKER_TLS`, or neither.
    pub docker_tls: Tls,
    /// The docker CLI's config dir: `DOCKER_CONFIG`, else `~/.docker`.
    pub docker_config: Option<PathBuf>,
    /// The docker CLI's current context, other than `default`.
    pub docker_context: Option<DockerContext>,
    /// `CONTAINER_HOST`: podman's remote service, as podman reads it.
    pub container_host: Option<String>,
    /// Docker's default socket ([`DOCKER_DEFAULT_SOCKET`]).
    pub docker_socket: PathBuf,
    /// podman's default API socket: [`PODMAN_ROOT_SOCKET`] for root, else under
    /// `XDG_RUNTIME_DIR` (none when that is unset).
    pub podman_socket: Option<PathBuf>,
    /// `PATH`, where `podman` is looked for.
    pub path: Option<OsString>,
}

impl StoreEnv {
    /// The variables of this process (empty ones count as unset, as the docker CLI reads them).
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let podman_socket = if root {
            Some(PathBuf::from(PODMAN_ROOT_SOCKET))
        } else {
            var("XDG_RUNTIME_DIR").map(|d| Path::new(&d).join("podman/podman.sock"))
        };
        let docker_config = var("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| Path::new(&h).join(".docker")));
        let docker_context = docker_config
            .as_deref()
            .and_then(|dir| docker_context(dir, var("DOCKER_CONTEXT")));
        let docker_tls = match (var("DOCKER_TLS_VERIFY"), var("DOCKER_TLS")) {
            (Some(_), _) => var("DOCKER_CERT_PATH")
                .map(PathBuf::from)
                .or_else(|| docker_config.clone())
                .map_or(Tls::Unverified, Tls::Verify),
            (None, Some(_)) => Tls::Unverified,
            (None, None) => Tls::Off,
        };
        StoreEnv {
            docker_host: var("DOCKER_HOST"),
            docker_tls,
            docker_config,
            docker_context,
            container_host: var("CONTAINER_HOST"),
            docker_socket: PathBuf::from(DOCKER_DEFAULT_SOCKET),
            podman_socket,
            path: std::env::var_os("PATH"),
        }
    }

    /// This environment with the docker context `name` chosen (the `context=` attribute):
    /// `default` is `DOCKER_HOST` or Docker's default socket, any other name the endpoint
    /// stored for it, whatever `DOCKER_HOST` says.
    pub fn with_docker_context(mut self, name: &str) -> Self {
        if name == "default" {
            self.docker_context = None;
        } else {
            self.docker_host = None;
            self.docker_context = self
                .docker_config
                .as_deref()
                .and_then(|dir| docker_context(dir, Some(name.to_owned())))
                .or_else(|| {
                    Some(DockerContext {
                        name: name.to_owned(),
                        host: None,
                        tls: Tls::Off,
                    })
                });
        }
        self
    }
}

/// A docker CLI context, as its store under the CLI's config dir describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerContext {
    /// Its name.
    pub name: String,
    /// The host of its `docker` endpoint (`None`: no such context stored).
    pub host: Option<String>,
    /// How its endpoint is reached: TLS with the files it keeps for it
    /// (`contexts/tls/<id>/docker`), unless its `SkipTLSVerify` says not to verify.
    pub tls: Tls,
}

/// How a `tcp://` host is reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Tls {
    /// Plain HTTP.
    #[default]
    Off,
    /// TLS, verifying the daemon with `DIR/ca.pem` and presenting `DIR/cert.pem` and
    /// `DIR/key.pem`, as the docker CLI does.
    Verify(PathBuf),
    /// TLS without verifying the daemon (`DOCKER_TLS`, `SkipTLSVerify`): refused.
    Unverified,
}

/// The docker CLI's current context as it resolves it when `DOCKER_HOST` is unset:
/// `DOCKER_CONTEXT`, else `currentContext` of `DIR/config.json`; `default` (or none) is
/// `None`. Its endpoint is read from `DIR/contexts/meta/<sha256 of the name>/meta.json`.
pub fn docker_context(config_dir: &Path, env_context: Option<String>) -> Option<DockerContext> {
    let name = env_context.or_else(|| {
        let config = std::fs::read(config_dir.join("config.json")).ok()?;
        let config: serde_json::Value = serde_json::from_slice(&config).ok()?;
        Some(config.get("currentContext")?.as_str()?.to_owned())
    })?;
    if name.is_empty() || name == "default" {
        return None;
    }
    let id = kiln_oci::Digest::sha256_of(name.as_bytes());
    let meta = config_dir
        .join("contexts/meta")
        .join(id.hex())
        .join("meta.json");
    let meta = std::fs::read(meta)
        .ok()
        .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok());
    let endpoint = meta.as_ref().and_then(|m| m.pointer("/Endpoints/docker"));
    let host = endpoint
        .and_then(|e| e.get("Host")?.as_str())
        .map(str::to_owned);
    let skip_verify = endpoint
        .and_then(|e| e.get("SkipTLSVerify")?.as_bool())
        .unwrap_or(false);
    let tls_dir = config_dir
        .join("contexts/tls")
        .join(id.hex())
        .join("docker");
    let tls = match (tls_dir.is_dir(), skip_verify) {
        (_, true) => Tls::Unverified,
        (true, false) => Tls::Verify(tls_dir),
        (false, false) => Tls::Off,
    };
    Some(DockerContext { name, host, tls })
}

/// Where an Engine API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket (`unix:///run/docker.sock`).
    Unix(PathBuf),
    /// HTTP over TCP (`tcp://HOST:PORT`), as a `docker:dind` service listens: plain, or TLS
    /// with the client certificates in this directory.
    Tcp {
        /// `HOST:PORT`.
        addr: String,
        /// The directory of `ca.pem`, `cert.pem` and `key.pem`, for TLS.
        tls: Option<PathBuf>,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix://{}", path.display()),
            Endpoint::Tcp { addr, tls: None } => write!(f, "tcp://{addr}"),
            Endpoint::Tcp { addr, tls: Some(_) } => write!(f, "tcp://{addr} over TLS"),
        }
    }
}

/// Which engine serves an Engine API socket, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// dockerd.
    Docker,
    /// podman's Docker-compatible API service.
    Podman,
}

/// A local image store `--load` can write to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageStore {
    /// A Docker Engine API (`POST /images/load` with a Docker archive).
    EngineApi {
        /// dockerd or podman.
        engine: Engine,
        /// Where it listens.
        endpoint: Endpoint,
        /// Where the socket came from (`DOCKER_HOST`, `Docker's default socket`, ...).
        origin: String,
    },
    /// The `podman` program: `podman load` reads the archive on its standard input.
    PodmanCli {
        /// The program found on `PATH`.
        program: PathBuf,
    },
}

impl fmt::Display for ImageStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageStore::EngineApi {
                engine,
                endpoint,
                origin,
            } => {
                let who = match engine {
                    Engine::Docker => "the Docker daemon",
                    Engine::Podman => "podman's API service",
                };
                write!(f, "{who} at {endpoint} ({origin})")
            }
            ImageStore::PodmanCli { program } => {
                write!(f, "podman's store (`{} load`)", program.display())
            }
        }
    }
}

/// A failure to find an image store or to load an image into it. Every message starts with
/// `--load`: the flag (or `--output type=docker` without `dest`) the user gave; the refusal
/// of several platforms names the docker exporter, as buildx does.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No store answered; `tried` lists every place looked at, and why it did not serve.
    #[error(
        "--load: no local image store to load the image into; tried: {}. Start dockerd \
         (or set DOCKER_HOST=unix:///PATH/docker.sock), start `podman system service` or \
         install podman, or write the image to a file with --output type=docker,dest=FILE",
        tried.join("; ")
    )]
    NoStore {
        /// What was tried, in order, each with why it did not serve.
        tried: Vec<String>,
    },
    /// `DOCKER_HOST`, a docker context or `CONTAINER_HOST` names a host kiln cannot reach
    /// this way.
    #[error(
        "--load: {var}={value}: {why}; use a unix:///PATH/TO/SOCKET or plain tcp://HOST:PORT \
         host, or --output type=docker,dest=FILE and load the file there"
    )]
    UnsupportedHost {
        /// The variable (or `docker context NAME`).
        var: String,
        /// Its value.
        value: String,
        /// Why kiln cannot reach it.
        why: &'static str,
    },
    /// The docker CLI's current context has no Docker endpoint kiln can read.
    #[error(
        "--load: the docker CLI's current context `{0}` (DOCKER_CONTEXT or currentContext \
         in config.json) has no stored Docker endpoint; run `docker context use default` \
         or set DOCKER_HOST=unix:///PATH/TO/SOCKET"
    )]
    UnknownContext(String),
    /// The store the user chose (`DOCKER_HOST`, `CONTAINER_HOST`) did not answer.
    #[error("--load: {var}={value} does not answer: {reason}")]
    Unreachable {
        /// The variable (or `docker context NAME`).
        var: String,
        /// Its value.
        value: String,
        /// Why (connecting, or its answer to `GET /_ping`).
        reason: String,
    },
    /// The store refused the image or failed while loading it.
    #[error("--load: {store} did not load the image: {message}")]
    Rejected {
        /// The store.
        store: String,
        /// What it said.
        message: String,
    },
    /// Talking to the store failed (connection, HTTP, starting podman).
    #[error("--load: talking to {store}: {reason}")]
    Transport {
        /// The store.
        store: String,
        /// What failed.
        reason: String,
    },
    /// The Docker archive could not be written (a blob missing from kiln's store, ...).
    #[error("--load: writing the image archive: {0}")]
    Archive(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A multi-platform result for `--load`: the image store takes one image per name
    /// (buildx's message).
    #[error(
        "docker exporter does not currently support exporting manifest lists \
         ({platforms} platforms requested): --load loads one image into the image store; \
         build one --platform at a time, push the multi-platform image with --push, or write \
         it with --output type=oci,dest=FILE"
    )]
    ManifestList {
        /// How many platforms the build was asked for.
        platforms: usize,
    },
}

/// What a store said it loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The names (or, for an unnamed image, the image id) of each `Loaded image` line.
    pub images: Vec<String>,
}

impl ImageStore {
    /// The store `--load` writes to, looked up in this order: `DOCKER_HOST` (when set: the
    /// daemon the user chose, an error when it does not answer), `CONTAINER_HOST` (likewise,
    /// podman), Docker's default socket, podman's default API socket, `podman` on `PATH`.
    /// Sockets are asked `GET /_ping` on `runtime`.
    pub fn find(env: &StoreEnv, runtime: &tokio::runtime::Handle) -> Result<Self, LoadError> {
        let context = match (&env.docker_host, &env.docker_context) {
            (None, Some(c)) => match &c.host {
                None => return Err(LoadError::UnknownContext(c.name.clone())),
                Some(host) => Some((format!("docker context {}", c.name), host, &c.tls)),
            },
            _ => None,
        };
        // (where the host came from, the host, whether it wants TLS, the engine)
        let chosen = [
            env.docker_host.as_ref().map(|h| {
                let var = "DOCKER_HOST".to_owned();
                (var, h, &env.docker_tls, Engine::Docker)
            }),
            context.map(|(var, host, tls)| (var, host, tls, Engine::Docker)),
            env.container_host
                .as_ref()
                .map(|h| ("CONTAINER_HOST".to_owned(), h, &Tls::Off, Engine::Podman)),
        ];
        if let Some((var, value, tls, engine)) = chosen.into_iter().flatten().next() {
            let endpoint = endpoint(&var, value, tls)?;
            return match runtime.block_on(ping(&endpoint)) {
                Ok(()) => Ok(ImageStore::EngineApi {
                    engine,
                    endpoint,
                    origin: var,
                }),
                Err(reason) => Err(LoadError::Unreachable {
                    var,
                    value: value.clone(),
                    reason,
                }),
            };
        }
        let mut tried =
            vec!["DOCKER_HOST, a docker context and CONTAINER_HOST (none set)".to_owned()];
        let mut sockets = vec![(
            env.docker_socket.clone(),
            Engine::Docker,
            "Docker's default socket",
        )];
        if let Some(socket) = &env.podman_socket {
            sockets.push((socket.clone(), Engine::Podman, "podman's default socket"));
        }
        for (socket, engine, origin) in sockets {
            if !socket.exists() {
                tried.push(format!("{origin} unix://{} (absent)", socket.display()));
                continue;
            }
            let endpoint = Endpoint::Unix(socket.clone());
            match runtime.block_on(ping(&endpoint)) {
                Ok(()) => {
                    return Ok(ImageStore::EngineApi {
                        engine,
                        endpoint,
                        origin: origin.to_owned(),
                    })
                }
                Err(reason) => {
                    tried.push(format!("{origin} unix://{} ({reason})", socket.display()))
                }
            }
        }
        match find_on_path("podman", env.path.as_deref()) {
            Some(program) => Ok(ImageStore::PodmanCli { program }),
            None => {
                tried.push("`podman` on PATH (not found)".to_owned());
                Err(LoadError::NoStore { tried })
            }
        }
    }

    /// Streams the Docker archive `write_archive` writes into this store and returns what it
    /// said it loaded. The archive is never held whole in memory or on disk by kiln.
    pub fn load<E>(
        &self,
        runtime: &tokio::runtime::Handle,
        write_archive: impl FnOnce(&mut dyn Write) -> Result<(), E> + Send,
    ) -> Result<Loaded, LoadError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        match self {
            ImageStore::EngineApi { endpoint, .. } => {
                load_over_api(self, endpoint, runtime, write_archive)
            }
            ImageStore::PodmanCli { program } => load_with_podman(self, program, write_archive),
        }
    }
}

/// The endpoint of a `unix://PATH` or `tcp://HOST:PORT` host value, reached over TCP as
/// `tls` says; any other scheme, and TLS without verification, are refused.
fn endpoint(var: &str, value: &str, tls: &Tls) -> Result<Endpoint, LoadError> {
    let refused = |why| LoadError::UnsupportedHost {
        var: var.to_owned(),
        value: value.to_owned(),
        why,
    };
    if let Some(path) = value.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(refused("a unix socket needs an absolute path"));
        }
        return Ok(Endpoint::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = value.strip_prefix("tcp://") {
        let tls = match tls {
            Tls::Off => None,
            Tls::Verify(dir) => Some(dir.clone()),
            Tls::Unverified => {
                return Err(refused(
                    "TLS without verifying the daemon (DOCKER_TLS, or the context's \
                     SkipTLSVerify) is not supported; set DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH",
                ))
            }
        };
        let addr = addr.trim_end_matches('/');
        return match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Endpoint::Tcp {
                    addr: addr.to_owned(),
                    tls,
                })
            }
            _ => Err(refused("a tcp host needs HOST:PORT")),
        };
    }
    Err(refused("kiln reaches a daemon over unix:// or tcp:// only"))
}

/// The first executable `name` in the directories of `path`.
fn find_on_path(name: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A request sender and the task driving its connection.
type Connection<B> = (
    hyper::client::conn::http1::SendRequest<B>,
    tokio::task::JoinHandle<()>,
);

/// An HTTP/1.1 connection to the Engine API at `endpoint`: the request sender, and the task
/// driving the connection (which owns a request's body while it is sent).
async fn connect<B>(endpoint: &Endpoint) -> Result<Connection<B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match endpoint {
        Endpoint::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| format!("connecting: {e}"))?;
            handshake(stream).await
        }
        Endpoint::Tcp { addr, tls } => {
            let stream = tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map_err(|e| format!("connecting: {e}"))?;
            let Some(dir) = tls else {
                return handshake(stream).await;
            };
            let (connector, name) = tls_connector(dir, addr)?;
            let stream = connector
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            handshake(stream).await
        }
    }
}

/// A TLS client as the docker CLI's `DOCKER_TLS_VERIFY`: the daemon verified with
/// `DIR/ca.pem`, `DIR/cert.pem` and `DIR/key.pem` presented; and the name to verify (the
/// host of `addr`).
fn tls_connector(
    dir: &Path,
    addr: &str,
) -> Result<
    (
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    ),
    String,
> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let file = |name: &str| dir.join(name);
    let read_certs = |name: &str| -> Result<Vec<CertificateDer<'static>>, String> {
        CertificateDer::pem_file_iter(file(name))
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("reading {}: {e}", file(name).display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs("ca.pem")? {
        roots
            .add(ca)
            .map_err(|e| format!("{}: {e}", file("ca.pem").display()))?;
    }
    let certs = read_certs("cert.pem")?;
    let key = PrivateKeyDer::from_pem_file(file("key.pem"))
        .map_err(|e| format!("reading {}: {e}", file("key.pem").display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("{}: {e}", file("cert.pem").display()))?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host} as a TLS server name: {e}"))?;
    Ok((
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)),
        name,
    ))
}

/// HTTP/1.1 over `stream`, its connection driven by a task of its own.
async fn handshake<S, B>(stream: S) -> Result<Connection<B>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(async move {
        // Its errors reach the request that was under way; nothing else is waiting for it.
        let _ = conn.await;
    });
    Ok((sender, driver))
}

/// `GET /_ping`: `Ok` when the engine answers `200 OK`, else why not.
async fn ping(endpoint: &Endpoint) -> Result<(), String> {
    let asked = async {
        let (mut sender, _driver) = connect::<Empty<Bytes>>(endpoint).await?;
        let request = hyper::Request::get("/_ping")
            .header(hyper::header::HOST, "localhost")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("GET /_ping: {e}"))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("GET /_ping answered {status}"))
        }
    };
    match tokio::time::timeout(PING_TIMEOUT, asked).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "GET /_ping: no answer in {}s",
            PING_TIMEOUT.as_secs()
        )),
    }
}

/// Writes into a channel the HTTP request body reads from, in [`CHUNK`]-sized pieces; an
/// `Err` sent down the channel aborts the request.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the image store stopped reading the archive",
            )
        })
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Whether an archive error is only the store hanging up (its own answer says why).
fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::BrokenPipe {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// `POST /images/load` with the archive streamed as the request body (chunked): the archive
/// is written on a thread of its own while this one drives the request on `runtime`.
fn load_over_api<E>(
    store: &ImageStore,
    endpoint: &Endpoint,
    runtime: &tokio::runtime::Handle,
    write_archive: impl FnOnce(&mut dyn Write) -> Result<(), E> + Send,
) -> Result<Loaded, LoadError>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
    let (written, answered) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<(), LoadError> {
            let mut w = ChannelWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            };
            let written = write_archive(&mut w)
                .map_err(|e| LoadError::Archive(Box::new(e)))
                .and_then(|()| w.flush().map_err(|e| LoadError::Archive(Box::new(e))));
            if written.is_err() {
                // A half-written archive must not end like a whole one: abort the request.
                let broken = io::Error::other("the image archive could not be written");
                let _ = w.tx.blocking_send(Err(broken));
            }
            written
        });
        let answered = runtime.block_on(async {
            let body = StreamBody::new(futures::stream::poll_fn(move |cx| {
                rx.poll_recv(cx)
                    .map(|chunk| chunk.map(|c| c.map(Frame::data)))
            }));
            let (mut sender, driver) = connect(endpoint).await?;
            let request = hyper::Request::post("/images/load?quiet=1")
                .header(hyper::header::HOST, "localhost")
                .header(hyper::header::CONTENT_TYPE, "application/x-tar")
                .body(body)
                .map_err(|e| e.to_string())?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("POST /images/load: {e}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the answer to POST /images/load: {e}"))?
                .to_bytes();
            // The store has answered: whatever of the archive it did not read is dropped, so
            // the writer stops (a store that answers early and keeps the connection open
            // would otherwise leave it blocked on a full channel).
            driver.abort();
            Ok::<_, String>((status, body))
        });
        let written = writer.join().unwrap_or_else(|_| {
            Err(LoadError::Archive(
                "writing the archive panicked".to_owned().into(),
            ))
        });
        (written, answered)
    });
    // A failed archive is the cause unless the store only stopped reading it.
    if let Err(LoadError::Archive(e)) = &written {
        if !is_broken_pipe(e.as_ref()) {
            return written.map(|()| Loaded::default());
        }
    }
    let (status, body) = answered.map_err(|reason| LoadError::Transport {
        store: store.to_string(),
        reason,
    })?;
    if !status.is_success() {
        return Err(LoadError::Rejected {
            store: store.to_string(),
            message: format!("{status}: {}", api_error_message(&body)),
        });
    }
    let loaded = read_load_stream(&body).map_err(|message| LoadError::Rejected {
        store: store.to_string(),
        message,
    })?;
    written?;
    Ok(loaded)
}

/// The `message` of an Engine API error body (`{"message": "..."}`), else the body as text.
fn api_error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}

/// Reads the JSON messages of `POST /images/load`'s answer: the first `error` is the
/// failure; `stream` lines saying `Loaded image: NAME` (or `Loaded image ID: ID`) are what
/// was loaded.
pub fn read_load_stream(body: &[u8]) -> Result<Loaded, String> {
    let mut loaded = Loaded::default();
    for message in serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>() {
        let message = message.map_err(|e| {
            format!(
                "unreadable answer ({e}): {}",
                String::from_utf8_lossy(body).trim()
            )
        })?;
        if let Some(error) = message.get("error").and_then(|e| e.as_str()) {
            return Err(error.to_owned());
        }
        if let Some(text) = message.get("stream").and_then(|s| s.as_str()) {
            loaded.images.extend(loaded_names(text));
        }
    }
    Ok(loaded)
}

/// The names in `Loaded image: A` / `Loaded image(s): A,B` / `Loaded image ID: ID` lines.
fn loaded_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            ["Loaded image ID:", "Loaded image(s):", "Loaded image:"]
                .iter()
                .find_map(|p| line.strip_prefix(p))
        })
        .flat_map(|names| names.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `podman load`, the archive written to its standard input while another thread collects
/// its output.
fn load_with_podman<E>(
    store: &ImageStore,
    program: &Path,
    write_archive: impl FnOnce(&mut dyn Write) -> Result<(), E> + Send,
) -> Result<Loaded, LoadError>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let transport = |reason: String| LoadError::Transport {
        store: store.to_string(),
        reason,
    };
    let mut child = Command::new(program)
        .arg("load")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| transport(format!("starting {}: {e}", program.display())))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| transport("no standard input to write to".to_owned()))?;
    let (written, output) = std::thread::scope(|scope| {
        let output = scope.spawn(move || {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let mut stdout = child.stdout.take();
            let mut stderr = child.stderr.take();
            std::thread::scope(|inner| {
                inner.spawn(|| {
                    if let Some(s) = stderr.as_mut() {
                        let _ = s.read_to_end(&mut err);
                    }
                });
                if let Some(s) = stdout.as_mut() {
                    let _ = s.read_to_end(&mut out);
                }
            });
            child.wait().map(|status| (status, out, err))
        });
        let mut buffered = io::BufWriter::with_capacity(CHUNK, &mut stdin);
        let written = write_archive(&mut buffered)
            .map_err(|e| LoadError::Archive(Box::new(e)))
            .and_then(|()| {
                buffered
                    .flush()
                    .map_err(|e| LoadError::Archive(Box::new(e)))
            });
        drop(buffered);
        // A half-written archive lacks manifest.json (the writer puts it last after the
        // blobs), so podman refuses it rather than loading part of an image.
        drop(stdin);
        let output = output
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("reading podman's output panicked")));
        (written, output)
    });
    let (status, out, err) =
        output.map_err(|e| transport(format!("waiting for {}: {e}", program.display())))?;
    if let Err(LoadError::Archive(e)) = &written {
        if !is_broken_pipe(e.as_ref()) || status.success() {
            return written.map(|()| Loaded::default());
        }
    }
    if !status.success() {
        let said = String::from_utf8_lossy(&err);
        return Err(LoadError::Rejected {
            store: store.to_string(),
            message: format!("`podman load` {status}: {}", said.trim()),
        });
    }
    written?;
    Ok(Loaded {
        images: loaded_names(&String::from_utf8_lossy(&out)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_stream_reads_loaded_names_and_ids() {
        let body = br#"{"stream":"Loaded image: localhost/app:1\n"}
{"stream":"Loaded image ID: sha256:abc\n"}"#;
        let loaded = read_load_stream(body).unwrap();
        assert_eq!(loaded.images, ["localhost/app:1", "sha256:abc"]);
    }

    #[test]
    fn load_stream_error_is_the_failure() {
        let body = br#"{"errorDetail":{"message":"unexpected EOF"},"error":"unexpected EOF"}"#;
        assert_eq!(read_load_stream(body).unwrap_err(), "unexpected EOF");
    }

    #[test]
    fn podman_output_names_every_image() {
        assert_eq!(
            loaded_names("Loaded image(s): localhost/a:1,localhost/b:2\n"),
            ["localhost/a:1", "localhost/b:2"]
        );
    }

    #[test]
    fn hosts_are_unix_sockets_or_plain_tcp_and_others_are_refused_naming_the_variable() {
        assert_eq!(
            endpoint("DOCKER_HOST", "unix:///run/d.sock", &Tls::Off).unwrap(),
            Endpoint::Unix(PathBuf::from("/run/d.sock"))
        );
        assert_eq!(
            endpoint("DOCKER_HOST", "tcp://docker:2375/", &Tls::Off).unwrap(),
            Endpoint::Tcp {
                addr: "docker:2375".into(),
                tls: None
            }
        );
        let certs = Tls::Verify(PathBuf::from("/certs/client"));
        assert_eq!(
            endpoint("DOCKER_HOST", "tcp://docker:2376", &certs).unwrap(),
            Endpoint::Tcp {
                addr: "docker:2376".into(),
                tls: Some(PathBuf::from("/certs/client"))
            }
        );
        for (value, tls, why) in [
            ("tcp://docker:2376", Tls::Unverified, "without verifying"),
            ("tcp://docker", Tls::Off, "needs HOST:PORT"),
            ("ssh://me@host", Tls::Off, "over unix:// or tcp:// only"),
            ("unix://run/d.sock", Tls::Off, "absolute path"),
        ] {
            let text = endpoint("DOCKER_HOST", value, &tls)
                .unwrap_err()
                .to_string();
            assert!(
                text.starts_with(&format!("--load: DOCKER_HOST={value}: ")) && text.contains(why),
                "{text}"
            );
        }
    }

    #[test]
    fn no_store_lists_what_was_tried() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let empty = tempfile::tempdir().unwrap();
        let env = StoreEnv {
            docker_socket: empty.path().join("docker.sock"),
            podman_socket: Some(empty.path().join("podman/podman.sock")),
            path: Some(empty.path().as_os_str().to_owned()),
            ..StoreEnv::default()
        };
        let text = ImageStore::find(&env, runtime.handle())
            .unwrap_err()
            .to_string();
        assert!(text.starts_with("--load: no local image store"), "{text}");
        let docker = format!("unix://{}/docker.sock (absent)", empty.path().display());
        assert!(text.contains(&docker), "{text}");
        assert!(text.contains("`podman` on PATH (not found)"), "{text}");
    }

    #[test]
    fn the_docker_cli_context_names_the_daemon_unless_docker_host_is_set() {
        let config = tempfile::tempdir().unwrap();
        assert_eq!(docker_context(config.path(), None), None);
        std::fs::write(
            config.path().join("config.json"),
            r#"{"currentContext": "rootless"}"#,
        )
        .unwrap();
        let context = |host: Option<&str>| DockerContext {
            name: "rootless".to_owned(),
            host: host.map(str::to_owned),
            tls: Tls::Off,
        };
        assert_eq!(docker_context(config.path(), None), Some(context(None)));
        // The name's sha256 is the directory, as the docker CLI stores it.
        let id = kiln_oci::Digest::sha256_of(b"rootless");
        let meta = config.path().join("contexts/meta").join(id.hex());
        std::fs::create_dir_all(&meta).unwrap();
        std::fs::write(
            meta.join("meta.json"),
            r#"{"Name":"rootless","Endpoints":{"docker":{"Host":"unix:///run/user/1000/docker.sock"}}}"#,
        )
        .unwrap();
        let rootless = docker_context(config.path(), None);
        assert_eq!(
            rootless,
            Some(context(Some("unix:///run/user/1000/docker.sock")))
        );
        // DOCKER_CONTEXT wins over the config file; `default` is no context.
        assert_eq!(docker_context(config.path(), Some("default".into())), None);

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let env = StoreEnv {
            docker_context: rootless,
            ..StoreEnv::default()
        };
        let text = ImageStore::find(&env, runtime.handle())
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with(
                "--load: docker context rootless=unix:///run/user/1000/docker.sock does not answer"
            ),
            "{text}"
        );
        let env = StoreEnv {
            docker_context: Some(DockerContext {
                name: "gone".into(),
                host: None,
                tls: Tls::Off,
            }),
            ..StoreEnv::default()
        };
        let text = ImageStore::find(&env, runtime.handle())
            .unwrap_err()
            .to_string();
        assert!(text.contains("current context `gone`"), "{text}");
    }

    #[test]
    fn a_chosen_docker_host_that_does_not_answer_is_an_error_not_a_fallback() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let value = format!("unix://{}/docker.sock", dir.path().display());
        let env = StoreEnv {
            docker_host: Some(value.clone()),
            ..StoreEnv::default()
        };
        let text = ImageStore::find(&env, runtime.handle())
            .unwrap_err()
            .to_string();
        assert!(
            text.starts_with(&format!("--load: DOCKER_HOST={value} does not answer")),
            "{text}"
        );
    }
}
