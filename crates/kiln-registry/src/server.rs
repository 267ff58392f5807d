//! Accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2, connection limits and timeouts
//! (see `connections`), graceful shutdown, periodic GC.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, App};
use crate::auth::{load_htpasswd, Auth, TokenConfig};
use crate::connections::{
    derived_connection_limit, is_resource_exhaustion, Connection, ConnectionTable, TrackedStream,
};
use crate::error::RegistryError;
use crate::storage::{self, Storage};
use crate::{gc, Config, RunningRegistry};

fn tls_acceptor(cfg: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, RegistryError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = match (&cfg.tls_cert, &cfg.tls_key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        _ => {
            return Err(RegistryError::Config(
                "--tls-cert and --tls-key go together".into(),
            ))
        }
    };
    let fail = |reason: String| RegistryError::Tls {
        cert: cert.clone(),
        key: key.clone(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| fail(format!("reading certificate: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| fail(format!("parsing certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| fail(format!("reading key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| fail(e.to_string()))?;
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(sc))))
}

pub(crate) fn build_auth(cfg: &Config) -> Result<Auth, RegistryError> {
    let users = cfg.htpasswd.as_deref().map(load_htpasswd).transpose()?;
    let token = match (&cfg.token_realm, &cfg.token_key) {
        (None, None) => None,
        (Some(realm), Some(key)) => {
            let key =
                std::fs::read(key).map_err(|e| RegistryError::io("reading token key", key, e))?;
            if key.len() < 16 {
                return Err(RegistryError::Config(
                    "the token key must be at least 16 bytes".into(),
                ));
            }
            Some(TokenConfig {
                tls: cfg.tls_cert.is_some(),
                realm: realm.clone(),
                service: cfg
                    .token_service
                    .clone()
                    .unwrap_or_else(|| "kiln-registry".into()),
                key,
            })
        }
        _ => {
            return Err(RegistryError::Config(
                "--token-realm and --token-key go together".into(),
            ))
        }
    };
    Ok(Auth::new(users, token))
}

/// Starts serving `cfg` on `store`, or on the storage `cfg` names when `store` is `None`.
pub(crate) async fn start(
    cfg: Config,
    store: Option<Arc<dyn Storage>>,
) -> Result<RunningRegistry, RegistryError> {
    let store = match store {
        Some(s) => s,
        None => storage::open(&cfg)?,
    };
    let tls = tls_acceptor(&cfg)?;
    let auth = build_auth(&cfg)?;
    let listener = TcpListener::bind(&cfg.addr)
        .await
        .map_err(|e| RegistryError::Bind {
            addr: cfg.addr.clone(),
            source: e,
        })?;
    let addr = listener.local_addr().map_err(|e| RegistryError::Bind {
        addr: cfg.addr.clone(),
        source: e,
    })?;
    let app = Arc::new(App::new(store.clone(), &cfg, auth));
    let limits = ConnectionLimits {
        table: ConnectionTable::new(match cfg.max_connections {
            0 => derived_connection_limit(),
            n => n,
        }),
        header_timeout: crate::secs_or_off(cfg.header_read_timeout_secs),
        idle_timeout: crate::secs_or_off(cfg.idle_timeout_secs),
    };
    let (tx, rx) = watch::channel(false);
    let is_tls = tls.is_some();
    tracing::info!(
        "kiln registry serving {} on {}://{addr} (at most {} connections)",
        store.location(),
        if is_tls { "https" } else { "http" },
        limits.table.limit()
    );
    if let Some(every) = crate::gc_interval(&cfg) {
        let opts = gc::GcOptions {
            delete_untagged: cfg.gc_delete_untagged,
            dry_run: false,
            grace: Duration::from_secs(cfg.gc_grace_secs),
        };
        tokio::spawn(periodic_gc(store, every, opts, rx.clone()));
    }
    let task = tokio::spawn(accept_loop(listener, tls, app, limits, rx));
    Ok(RunningRegistry {
        addr,
        tls: is_tls,
        shutdown: tx,
        task: Some(task),
    })
}

async fn periodic_gc(
    store: Arc<dyn Storage>,
    every: Duration,
    opts: gc::GcOptions,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        match gc::collect_garbage_in(&*store, &opts).await {
            Ok(r) => tracing::info!(
                "gc: deleted {} blobs ({} bytes), {} manifests; kept {} blobs",
                r.blobs_deleted.len(),
                r.bytes_freed,
                r.manifests_deleted.len(),
                r.blobs_kept
            ),
            Err(e) => tracing::error!("gc failed: {e}"),
        }
    }
}

/// How many connections may be open and how long each may dawdle.
struct ConnectionLimits {
    table: Arc<ConnectionTable>,
    header_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
}

/// Longest pause between failed accepts while descriptors are exhausted.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// How often running out of descriptors is logged at most.
const ACCEPT_REPORT_EVERY: Duration = Duration::from_secs(10);

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Arc<App>,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let builder = Arc::new(builder);
    let limits = Arc::new(limits);
    let mut conns = tokio::task::JoinSet::new();
    let mut backoff = Duration::ZERO;
    // Out-of-descriptor failures are reported once per `ACCEPT_REPORT_EVERY`, with a count.
    let mut last_report: Option<Instant> = None;
    let mut unreported = 0u64;
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) if !is_resource_exhaustion(&e) => {
                    // ECONNABORTED and the like: that one client is gone, take the next.
                    tracing::debug!("accept failed: {e}");
                    continue;
                }
                Err(e) => {
                    // Out of descriptors: retrying at once would fail again (and flood the
                    // log). Free one by closing an idle connection, and back off.
                    unreported += 1;
                    if last_report.is_none_or(|t| t.elapsed() >= ACCEPT_REPORT_EVERY) {
                        tracing::warn!(
                            "accept failed {unreported} time(s) since the last report: {e}; \
                             closing idle connections and backing off (raise the descriptor \
                             limit or lower max_connections)"
                        );
                        last_report = Some(Instant::now());
                        unreported = 0;
                    }
                    limits.table.evict_one();
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        backoff = Duration::ZERO;
        let _ = stream.set_nodelay(true);
        while conns.try_join_next().is_some() {}
        let admission = match limits.table.try_admit() {
            Some(a) => a,
            None => tokio::select! {
                a = limits.table.admit_waiting() => a,
                _ = stop.changed() => break,
            },
        };
        let (app, builder, tls, mut stop, limits) = (
            app.clone(),
            builder.clone(),
            tls.clone(),
            stop.clone(),
            limits.clone(),
        );
        conns.spawn(async move {
            let conn = admission.conn.clone();
            let stream = TrackedStream::new(stream, conn.clone());
            let svc_conn = conn.clone();
            let svc = service_fn(move |req| {
                let (app, conn) = (app.clone(), svc_conn.clone());
                async move {
                    let handling = conn.start_request();
                    let resp = api::handle(app, req).await;
                    drop(handling);
                    Ok::<_, std::convert::Infallible>(
                        resp.map(|b| BodyExt::boxed(conn.track_response(b))),
                    )
                }
            });
            match tls {
                Some(acc) => {
                    let handshake = async {
                        match limits.header_timeout {
                            Some(d) => tokio::time::timeout(d, acc.accept(stream)).await.ok(),
                            None => Some(acc.accept(stream).await),
                        }
                    };
                    let Some(Ok(s)) = handshake.await else {
                        return;
                    };
                    serve(&builder, TokioIo::new(s), svc, &conn, &limits, &mut stop).await
                }
                None => {
                    serve(
                        &builder,
                        TokioIo::new(stream),
                        svc,
                        &conn,
                        &limits,
                        &mut stop,
                    )
                    .await
                }
            }
            drop(admission);
        });
    }
    drop(listener);
    // In-flight requests finish; idle keep-alive connections close.
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

/// Why a connection's watchdog closes it, if it should now.
fn overstayed(conn: &Connection, limits: &ConnectionLimits) -> Option<&'static str> {
    // The first request head (or a TLS handshake, or an HTTP/2 preface) trickled in too
    // slowly; hyper times later HTTP/1 heads itself.
    if let Some(d) = limits.header_timeout {
        if !conn.has_requests() && conn.age() > d {
            return Some("no complete request within the header timeout");
        }
    }
    if let Some(d) = limits.idle_timeout {
        if !conn.is_handling() && conn.quiet_for() > d {
            return Some("idle for the idle timeout");
        }
    }
    None
}

async fn serve<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    svc: S,
    tracked: &Connection,
    limits: &ConnectionLimits,
    stop: &mut watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<api::Body>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    if *stop.borrow() {
        conn.as_mut().graceful_shutdown();
    }
    // Checked a few times per timeout, so a connection overstays by a fraction of it.
    let shortest = [limits.header_timeout, limits.idle_timeout]
        .into_iter()
        .flatten()
        .min();
    let every = shortest.map_or(Duration::from_secs(3600), |d| {
        (d / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    });
    let mut watchdog = tokio::time::interval(every);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            r = stop.changed() => {
                conn.as_mut().graceful_shutdown();
                if r.is_err() {
                    let _ = conn.as_mut().await;
                    return;
                }
            }
            // Dropping the connection closes the socket; nothing is in progress on it.
            _ = tracked.evicted() => {
                tracing::debug!("closing a connection to make room for a new client");
                return;
            }
            _ = watchdog.tick() => {
                if let Some(why) = overstayed(tracked, limits) {
                    tracing::debug!("closing a connection: {why}");
                    return;
                }
            }
        }
    }
}
