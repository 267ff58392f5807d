//! The open client connections of a running registry: a bounded table of them, with what
//! each is doing, so that slow or idle clients cannot hold every descriptor.
//!
//! Defences, each against one way of starving legitimate clients:
//! - a cap on open connections, derived from the descriptor limit unless configured, so the
//!   process keeps descriptors for the files it serves;
//! - at the cap, a new client evicts the oldest connection that has no request in progress
//!   (a slow client still sending its first request head goes first), instead of waiting
//!   behind it;
//! - a connection whose first request head is not complete within the header timeout is
//!   closed (hyper enforces the same for every later head on HTTP/1);
//! - a connection with no request in progress and no bytes moving for the idle timeout is
//!   closed (idle keep-alive, a client that stopped reading its response);
//! - when `accept` fails for lack of descriptors, the loop evicts an idle connection and
//!   backs off instead of spinning (see `server::accept_loop`).

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Descriptors kept free of connections for the listener, the runtime, logs, `gc.lock` and
/// the like.
const RESERVED_FDS: u64 = 32;

/// Upper bound of the derived connection limit.
const MAX_DERIVED_LIMIT: u64 = 8192;

/// The connection limit when none is configured: half of what the soft `RLIMIT_NOFILE`
/// leaves after [`RESERVED_FDS`], since a connection can hold a second descriptor (the blob
/// it streams, the upload it writes) besides its socket.
pub(crate) fn derived_connection_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    let limit = (soft.saturating_sub(RESERVED_FDS) / 2).clamp(1, MAX_DERIVED_LIMIT);
    usize::try_from(limit).unwrap_or(1)
}

/// Whether an `accept` error means the process or system ran out of descriptors or buffers
/// (retrying at once would fail the same way).
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// What one open connection is doing, shared between its serving task, its request
/// handlers and the accept loop.
pub(crate) struct Connection {
    opened: Instant,
    /// Requests whose handler is running.
    handlers: AtomicUsize,
    /// Responses whose body is still being sent.
    responses: AtomicUsize,
    /// Requests received so far.
    requests: AtomicU64,
    /// When bytes last moved either way, in milliseconds since `opened`.
    last_progress_ms: AtomicU64,
    /// Wakes the serving task when the accept loop evicts this connection.
    evicted: Notify,
}

impl Connection {
    fn new() -> Connection {
        Connection {
            opened: Instant::now(),
            handlers: AtomicUsize::new(0),
            responses: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            last_progress_ms: AtomicU64::new(0),
            evicted: Notify::new(),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn record_progress(&self) {
        self.last_progress_ms.store(self.elapsed_ms(), Relaxed);
    }

    /// Time since bytes last moved on this connection.
    pub(crate) fn quiet_for(&self) -> Duration {
        let last = self.last_progress_ms.load(Relaxed);
        Duration::from_millis(self.elapsed_ms().saturating_sub(last))
    }

    /// Time since the connection was accepted.
    pub(crate) fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// Whether any request has arrived on this connection.
    pub(crate) fn has_requests(&self) -> bool {
        self.requests.load(Relaxed) > 0
    }

    /// Whether a request handler is running now.
    pub(crate) fn is_handling(&self) -> bool {
        self.handlers.load(Relaxed) > 0
    }

    /// Whether closing the connection now would cut no request or response short.
    fn is_evictable(&self) -> bool {
        self.handlers.load(Relaxed) == 0 && self.responses.load(Relaxed) == 0
    }

    /// Resolves when the accept loop evicts this connection.
    pub(crate) async fn evicted(&self) {
        self.evicted.notified().await
    }

    /// Counts a request as in progress until the returned guard drops.
    pub(crate) fn start_request(self: &Arc<Self>) -> RequestGuard {
        self.requests.fetch_add(1, Relaxed);
        self.handlers.fetch_add(1, Relaxed);
        self.record_progress();
        RequestGuard(self.clone())
    }

    /// Wraps a response body so the connection counts as sending until the body is done.
    pub(crate) fn track_response<B>(self: &Arc<Self>, body: B) -> TrackedBody<B> {
        self.responses.fetch_add(1, Relaxed);
        TrackedBody {
            inner: body,
            conn: self.clone(),
        }
    }
}

/// A request handler in progress; see [`Connection::start_request`].
pub(crate) struct RequestGuard(Arc<Connection>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.handlers.fetch_sub(1, Relaxed);
        self.0.record_progress();
    }
}

/// A response body that keeps its connection from being evicted while it is sent.
pub(crate) struct TrackedBody<B> {
    inner: B,
    conn: Arc<Connection>,
}

impl<B> Drop for TrackedBody<B> {
    fn drop(&mut self) {
        self.conn.responses.fetch_sub(1, Relaxed);
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A socket (or TLS stream) that records on its [`Connection`] when bytes move.
pub(crate) struct TrackedStream<S> {
    inner: S,
    conn: Arc<Connection>,
}

impl<S> TrackedStream<S> {
    pub(crate) fn new(inner: S, conn: Arc<Connection>) -> Self {
        TrackedStream { inner, conn }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TrackedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.record_progress();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TrackedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.record_progress();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.conn.record_progress();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Every open connection, in accept order, and the permits that bound their number.
pub(crate) struct ConnectionTable {
    permits: Arc<Semaphore>,
    open: Mutex<BTreeMap<u64, Arc<Connection>>>,
    next_id: AtomicU64,
    limit: usize,
}

/// A connection's place in the table: its permit and entry go when this drops.
pub(crate) struct Admission {
    table: Arc<ConnectionTable>,
    id: u64,
    /// The tracked state, for the serving task.
    pub(crate) conn: Arc<Connection>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.table
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl ConnectionTable {
    /// A table admitting at most `limit` connections at once.
    pub(crate) fn new(limit: usize) -> Arc<ConnectionTable> {
        Arc::new(ConnectionTable {
            permits: Arc::new(Semaphore::new(limit)),
            open: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            limit,
        })
    }

    /// The most connections open at once.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Admits a just-accepted connection. At the limit, evicts the connection that matters
    /// least and waits for its slot; `None` when none can be evicted right now (the caller
    /// waits with [`ConnectionTable::admit_waiting`]).
    pub(crate) fn try_admit(self: &Arc<Self>) -> Option<Admission> {
        match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(self.register(p)),
            Err(_) => {
                self.evict_one();
                None
            }
        }
    }

    /// Waits for a free slot (after [`ConnectionTable::try_admit`] found none), evicting
    /// again each time a connection becomes evictable.
    pub(crate) async fn admit_waiting(self: &Arc<Self>) -> Admission {
        loop {
            tokio::select! {
                p = self.permits.clone().acquire_owned() => {
                    // The semaphore is never closed.
                    if let Ok(p) = p {
                        return self.register(p);
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    self.evict_one();
                }
            }
        }
    }

    fn register(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Admission {
        let id = self.next_id.fetch_add(1, Relaxed);
        let conn = Arc::new(Connection::new());
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, conn.clone());
        Admission {
            table: self.clone(),
            id,
            conn,
            _permit: permit,
        }
    }

    /// Asks one connection with nothing in progress to close: the oldest that never
    /// completed a request head, else the one quiet longest. Returns whether one was asked.
    pub(crate) fn evict_one(&self) -> bool {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let idle = open.values().filter(|c| c.is_evictable());
        let victim = idle
            .clone()
            .find(|c| !c.has_requests())
            .or_else(|| idle.max_by_key(|c| c.quiet_for()));
        match victim {
            Some(c) => {
                c.evicted.notify_one();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_the_limit_the_oldest_connection_without_a_request_is_evicted() {
        let table = ConnectionTable::new(3);
        let served = table.try_admit().expect("slot 1");
        let _req = served.conn.start_request();
        drop(_req);
        let silent_old = table.try_admit().expect("slot 2");
        let silent_new = table.try_admit().expect("slot 3");
        assert!(table.try_admit().is_none(), "the table is full");
        // The eviction notice is stored, so the oldest silent connection sees it.
        tokio::time::timeout(Duration::from_secs(5), silent_old.conn.evicted())
            .await
            .expect("the oldest connection that never sent a request is evicted");
        drop(silent_old);
        let newcomer = table.try_admit().expect("the evicted slot is free again");
        drop((served, silent_new, newcomer));
    }

    #[tokio::test]
    async fn connections_with_a_request_in_progress_are_never_evicted() {
        let table = ConnectionTable::new(1);
        let busy = table.try_admit().expect("slot");
        let _handling = busy.conn.start_request();
        assert!(!table.evict_one());
        let sending = busy
            .conn
            .track_response(http_body_util::Empty::<Bytes>::new());
        drop(_handling);
        assert!(!table.evict_one(), "a response still being sent keeps it");
        drop(sending);
        assert!(table.evict_one());
    }

    #[test]
    fn the_derived_limit_leaves_descriptors_for_files() {
        let limit = derived_connection_limit();
        assert!(limit >= 1);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert!((limit as u64) * 2 + RESERVED_FDS <= lim.rlim_cur.max(RESERVED_FDS + 2));
    }
}
