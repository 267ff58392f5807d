//! A registry without a listener, for fuzzing: raw HTTP bytes in, raw response bytes out,
//! through hyper's connection handling and the same request handlers as `serve`.
//!
//! Only built with the `byte-registry` feature (the fuzz targets in `fuzz/` enable it).

use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::{self, App};
use crate::error::RegistryError;
use crate::Config;

/// A registry on the storage of `config` that answers requests handed to it as bytes.
pub struct ByteRegistry {
    app: Arc<App>,
    runtime: tokio::runtime::Runtime,
}

impl ByteRegistry {
    /// Opens the storage and auth of `config` (its address, TLS and timeouts are unused).
    pub fn open(config: &Config) -> Result<ByteRegistry, RegistryError> {
        let store = crate::storage::open(config)?;
        let auth = crate::server::build_auth(config)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RegistryError::io("starting the async runtime for", &config.root, e))?;
        Ok(ByteRegistry {
            app: Arc::new(App::new(store, config, auth)),
            runtime,
        })
    }

    /// Sends `request` (one or more HTTP/1.1 requests, or an HTTP/2 preface and frames) on a
    /// fresh connection, closes the client's sending side, and returns everything the
    /// server wrote before closing. A panic in a handler is resumed here, so it is seen.
    pub fn exchange(&self, request: &[u8]) -> Vec<u8> {
        let app = self.app.clone();
        let request = request.to_vec();
        self.runtime.block_on(async move {
            let (mut client, server) = tokio::io::duplex(64 << 10);
            let serving = tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, std::convert::Infallible>(api::handle(app, req).await) }
                });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                // The client half-closes after its request; the server must still answer.
                builder.http1().half_close(true);
                let _ = builder.serve_connection(TokioIo::new(server), svc).await;
            });
            let (mut rd, mut wr) = tokio::io::split(&mut client);
            let send = async move {
                let _ = wr.write_all(&request).await;
                let _ = wr.shutdown().await;
            };
            let mut response = Vec::new();
            let (_, _) = tokio::join!(send, rd.read_to_end(&mut response));
            if let Err(e) = serving.await {
                if e.is_panic() {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
            response
        })
    }
}
