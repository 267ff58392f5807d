//! Accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2, graceful shutdown, periodic GC.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, App};
use crate::auth::{load_htpasswd, Auth, TokenConfig};
use crate::error::RegistryError;
use crate::storage::Storage;
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

fn build_auth(cfg: &Config) -> Result<Auth, RegistryError> {
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

pub(crate) async fn start(cfg: Config) -> Result<RunningRegistry, RegistryError> {
    let store = Storage::open(&cfg.root, cfg.fsync)
        .map_err(|e| RegistryError::io("creating storage under", &cfg.root, e))?;
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
    let app = Arc::new(App::new(store, cfg.read_only, cfg.max_manifest_bytes, auth));
    let (tx, rx) = watch::channel(false);
    let is_tls = tls.is_some();
    tracing::info!(
        "kiln registry serving {} on {}://{addr}",
        cfg.root.display(),
        if is_tls { "https" } else { "http" }
    );
    if let Some(every) = crate::gc_interval(&cfg) {
        let opts = gc::GcOptions {
            delete_untagged: cfg.gc_delete_untagged,
            dry_run: false,
            grace: Duration::from_secs(cfg.gc_grace_secs),
        };
        tokio::spawn(periodic_gc(cfg.root.clone(), every, opts, rx.clone()));
    }
    let task = tokio::spawn(accept_loop(listener, tls, app, rx));
    Ok(RunningRegistry {
        addr,
        tls: is_tls,
        shutdown: tx,
        task: Some(task),
    })
}

async fn periodic_gc(
    root: std::path::PathBuf,
    every: Duration,
    opts: gc::GcOptions,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let (root, opts) = (root.clone(), opts.clone());
        match tokio::task::spawn_blocking(move || gc::collect_garbage(&root, &opts)).await {
            Ok(Ok(r)) => tracing::info!(
                "gc: deleted {} blobs ({} bytes), {} manifests; kept {} blobs",
                r.blobs_deleted.len(),
                r.bytes_freed,
                r.manifests_deleted.len(),
                r.blobs_kept
            ),
            Ok(Err(e)) => tracing::error!("gc failed: {e}"),
            Err(e) => tracing::error!("gc task failed: {e}"),
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        while conns.try_join_next().is_some() {}
        let (app, builder, tls, mut stop) =
            (app.clone(), builder.clone(), tls.clone(), stop.clone());
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, std::convert::Infallible>(api::handle(app, req).await) }
            });
            match tls {
                Some(acc) => {
                    let Ok(s) = acc.accept(stream).await else {
                        return;
                    };
                    serve(&builder, TokioIo::new(s), svc, &mut stop).await
                }
                None => serve(&builder, TokioIo::new(stream), svc, &mut stop).await,
            }
        });
    }
    drop(listener);
    // In-flight requests finish; idle keep-alive connections close.
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

async fn serve<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    svc: S,
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
        }
    }
}
