//! How kiln speaks HTTP to registries and download servers: timeouts that notice a server
//! which stops answering (or answers one byte at a time), and TLS whose trust roots are read
//! from the system only when a TLS connection is actually made, so that builds which never
//! leave plain-HTTP or local registries work on hosts without `/etc/ssl/certs`.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Environment variable with the timeouts of every registry client and `ADD <url>` download
/// (see [`Timeouts::parse`]).
pub const TIMEOUT_ENV: &str = "KILN_REGISTRY_TIMEOUT";

/// A transfer is making progress while at least this many bytes move per idle period; fewer
/// means the peer is stalled, even if it sends a byte now and then.
pub const PROGRESS_BYTES: u64 = 16 << 10;

/// How long kiln waits on a server before it gives up on a request (which may then be
/// retried, see [`crate::RetryPolicy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect and TLS handshake.
    pub connect: Duration,
    /// From the end of the request (its body sent) to the response's headers.
    pub response: Duration,
    /// Longest time in which fewer than [`PROGRESS_BYTES`] of a body (either way) may move.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        // The response wait is generous: a registry answers the last PUT of a large blob only
        // once it has hashed (and, on object storage, moved) the whole blob.
        Timeouts {
            connect: Duration::from_secs(30),
            response: Duration::from_secs(120),
            idle: Duration::from_secs(60),
        }
    }
}

impl fmt::Display for Timeouts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connect={},response={},idle={}",
            show_duration(self.connect),
            show_duration(self.response),
            show_duration(self.idle)
        )
    }
}

fn show_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

/// Parses a positive duration: a number with `ms`, `s`, `m` or `h` (a bare number is seconds).
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    if split == 0 {
        return None;
    }
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs > 0.0 && secs < 1e9).then(|| Duration::from_secs_f64(secs))
}

impl Timeouts {
    /// Parses `value` given as `what` (a flag or variable name, named in the error): one
    /// duration for all three (`30s`), or any of `connect=`, `response=`, `idle=` separated by
    /// commas (`connect=5s,idle=2m`; the others keep their defaults). Durations take `ms`,
    /// `s`, `m` or `h`; a bare number is seconds.
    pub fn parse(what: &str, value: &str) -> Result<Timeouts, String> {
        let bad = |detail: String| {
            format!(
                "{what}={value}: {detail}; expected a duration such as 30s, or connect=DUR,response=DUR,idle=DUR"
            )
        };
        let mut t = Timeouts::default();
        if !value.contains('=') {
            let d = parse_duration(value)
                .ok_or_else(|| bad(format!("{value:?} is not a positive duration")))?;
            return Ok(Timeouts {
                connect: d,
                response: d,
                idle: d,
            });
        }
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} has no '='")))?;
            let d = parse_duration(v)
                .ok_or_else(|| bad(format!("{v:?} is not a positive duration")))?;
            match k.trim() {
                "connect" => t.connect = d,
                "response" => t.response = d,
                "idle" => t.idle = d,
                other => return Err(bad(format!("unknown timeout {other:?}"))),
            }
        }
        Ok(t)
    }

    /// The timeouts `KILN_REGISTRY_TIMEOUT` sets, if it is set; an invalid value is an error
    /// naming the variable.
    pub fn from_env() -> Result<Option<Timeouts>, String> {
        match std::env::var(TIMEOUT_ENV) {
            Ok(v) => Timeouts::parse(TIMEOUT_ENV, &v).map(Some),
            Err(_) => Ok(None),
        }
    }
}

/// Why a request was given up as stalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// The response headers did not arrive within the response timeout.
    Response(Duration),
    /// A body moved fewer than [`PROGRESS_BYTES`] in the idle timeout.
    Idle(Duration),
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stall::Response(d) => {
                write!(f, "no response within {} of the request", show_duration(*d))
            }
            Stall::Idle(d) => write!(
                f,
                "the transfer stalled (less than {} KiB in {})",
                PROGRESS_BYTES >> 10,
                show_duration(*d)
            ),
        }
    }
}

/// Watches one request on its way out: while its body is being sent, the idle rule applies;
/// once it is sent (or if it has none), the response timeout runs. Clones share the state, so
/// the body stream reports progress to the request's watchdog.
#[derive(Clone)]
pub struct RequestWatch {
    state: Arc<Mutex<WatchState>>,
}

struct WatchState {
    /// Bytes of the body still to be sent (0: the request is sent).
    remaining: u64,
    window_start: Instant,
    window_bytes: u64,
    sent_at: Instant,
}

impl RequestWatch {
    /// A watch for a request whose body is `body_len` bytes (0 for none).
    pub fn new(body_len: u64) -> Self {
        let now = Instant::now();
        RequestWatch {
            state: Arc::new(Mutex::new(WatchState {
                remaining: body_len,
                window_start: now,
                window_bytes: 0,
                sent_at: now,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        // A panic while holding this lock leaves plain numbers behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The request carries a streamed body of `len` bytes: until they are sent, the idle rule
    /// applies (from now).
    pub fn sending(&self, len: u64) {
        let mut s = self.lock();
        s.remaining = len;
        s.window_start = Instant::now();
        s.window_bytes = 0;
    }

    /// `n` body bytes were handed to the connection.
    pub fn sent(&self, n: u64) {
        let mut s = self.lock();
        let now = Instant::now();
        s.window_bytes += n;
        if s.window_bytes >= PROGRESS_BYTES {
            s.window_start = now;
            s.window_bytes = 0;
        }
        s.remaining = s.remaining.saturating_sub(n);
        if s.remaining == 0 {
            s.sent_at = now;
        }
    }

    /// The body ended (its stream is exhausted), whatever its declared length.
    pub fn body_done(&self) {
        let mut s = self.lock();
        if s.remaining != 0 {
            s.remaining = 0;
            s.sent_at = Instant::now();
        }
    }

    /// Resolves when the request has stalled under `t`; never resolves while it progresses.
    pub async fn stalled(&self, t: Timeouts) -> Stall {
        loop {
            let (deadline, stall) = {
                let s = self.lock();
                if s.remaining > 0 {
                    (s.window_start + t.idle, Stall::Idle(t.idle))
                } else {
                    (s.sent_at + t.response, Stall::Response(t.response))
                }
            };
            if Instant::now() >= deadline {
                return stall;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// The idle rule for a body being read: [`ReadWatch::deadline`] is when the read must have
/// made progress by.
#[derive(Debug, Clone)]
pub struct ReadWatch {
    idle: Duration,
    window_start: Instant,
    window_bytes: u64,
}

impl ReadWatch {
    /// A watch that starts now, with the idle timeout of `t`.
    pub fn new(t: Timeouts) -> Self {
        ReadWatch {
            idle: t.idle,
            window_start: Instant::now(),
            window_bytes: 0,
        }
    }

    /// `n` bytes arrived.
    pub fn received(&mut self, n: usize) {
        self.window_bytes += n as u64;
        if self.window_bytes >= PROGRESS_BYTES {
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
    }

    /// When the next chunk must have arrived by, unless [`PROGRESS_BYTES`] came in since the
    /// window started.
    pub fn deadline(&self) -> tokio::time::Instant {
        (self.window_start + self.idle).into()
    }

    /// The stall reported when the deadline passes.
    pub fn stall(&self) -> Stall {
        Stall::Idle(self.idle)
    }
}

/// The system's trust roots, loaded on first use: `Err` says why there are none.
fn system_verifier() -> Result<Arc<rustls_platform_verifier::Verifier>, String> {
    static ROOTS: OnceLock<Result<Arc<rustls_platform_verifier::Verifier>, String>> =
        OnceLock::new();
    ROOTS
        .get_or_init(|| {
            rustls_platform_verifier::Verifier::new(provider())
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .clone()
}

/// Checks that the system's trust roots can be loaded (they are read on the first call):
/// callers use it before speaking TLS to a host, so that a host without CA certificates gets
/// an error saying so instead of a failed handshake.
pub fn check_system_roots() -> Result<(), String> {
    system_verifier().map(|_| ()).map_err(|e| {
        format!(
            "cannot load the system's CA certificates ({e}); install them (Debian: apt-get install ca-certificates), point SSL_CERT_FILE or SSL_CERT_DIR at them, or reach the host over plain HTTP"
        )
    })
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Verifies server certificates against the system's roots, read at the first handshake.
#[derive(Debug)]
struct LazySystemVerifier {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for LazySystemVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let v = system_verifier()
            .map_err(|_| rustls::Error::General(check_system_roots().err().unwrap_or_default()))?;
        v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A reqwest client builder for registries and downloads: kiln's user agent, the connect
/// timeout of `t`, and TLS (rustls, ring) that reads the system's trust roots only at the
/// first handshake. Building it never touches the trust store.
pub fn client_builder(t: &Timeouts) -> Result<reqwest::ClientBuilder, String> {
    // reqwest is built without a default crypto provider; ring is the workspace's choice.
    // An error only means a provider is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(LazySystemVerifier { provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(reqwest::Client::builder()
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(t.connect)
        .tls_backend_preconfigured(tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_one_duration_or_named_parts() {
        let all = Timeouts::parse("X", "2s").unwrap();
        assert_eq!(all.connect, Duration::from_secs(2));
        assert_eq!(all.idle, Duration::from_secs(2));
        let some = Timeouts::parse("X", "connect=500ms, idle=3m").unwrap();
        assert_eq!(some.connect, Duration::from_millis(500));
        assert_eq!(some.idle, Duration::from_secs(180));
        assert_eq!(some.response, Timeouts::default().response);
        assert_eq!(
            Timeouts::parse("X", "response=90").unwrap().response,
            Duration::from_secs(90)
        );
        for bad in [
            "", "0s", "fast", "connect=", "speed=3s", "idle=-1s", "3 weeks",
        ] {
            let e = Timeouts::parse("KILN_REGISTRY_TIMEOUT", bad).unwrap_err();
            assert!(e.starts_with("KILN_REGISTRY_TIMEOUT="), "{e}");
        }
        let t = Timeouts::parse("X", "connect=1500ms,response=2s,idle=1m").unwrap();
        assert_eq!(t.to_string(), "connect=1500ms,response=2s,idle=60s");
        assert_eq!(Timeouts::parse("X", &t.to_string()), Ok(t));
    }

    #[test]
    fn a_request_watch_runs_the_idle_rule_while_sending_and_the_response_rule_after() {
        let w = RequestWatch::new(PROGRESS_BYTES * 2);
        let t = Timeouts {
            connect: Duration::from_secs(1),
            response: Duration::from_millis(40),
            idle: Duration::from_millis(30),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(w.stalled(t)), Stall::Idle(t.idle));
        w.sent(PROGRESS_BYTES * 2);
        assert_eq!(rt.block_on(w.stalled(t)), Stall::Response(t.response));
    }

    #[test]
    fn a_read_watch_moves_its_deadline_only_after_enough_bytes() {
        let t = Timeouts::default();
        let mut r = ReadWatch::new(t);
        let first = r.deadline();
        std::thread::sleep(Duration::from_millis(5));
        r.received(1);
        assert_eq!(r.deadline(), first, "one byte is no progress");
        r.received(PROGRESS_BYTES as usize);
        assert!(r.deadline() > first);
    }
}
