//! `kiln registry serve`: an OCI distribution v1.1 registry with filesystem storage,
//! garbage collection, TLS, basic/token auth and metrics.
