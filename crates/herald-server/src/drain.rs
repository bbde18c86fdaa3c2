//! Graceful drain: closing client transports in batches at shutdown.
//!
//! When an instance stops behind a load balancer, its clients should reconnect to the other
//! instances a batch at a time rather than all at once, and they must see a *transport* close,
//! not a server-side disconnect: socket.io-client reconnects by itself after
//! `"transport close"`, but never after `"io server disconnect"`.
//!
//! - [`DrainListener`] wraps the TCP listener. Every accepted connection is registered in the
//!   [`Drain`] and served through a [`TrackedStream`], which reads end-of-stream once its entry
//!   is closed. Hyper, the Socket.IO websocket and the HTTP keep-alive connection all end the
//!   way they would if the client had gone away, without the server saying "disconnect".
//! - `/ws` sessions register themselves as well, and close with `1001 going away` when their
//!   turn comes; they go first, so that their close frame is not cut short by a closed stream.
//! - [`Drain::close_in_batches`] closes `batch` entries every `interval` until none is left.
//!   Socket.IO long-polling sessions are not tied to one TCP connection; the caller closes what
//!   remains with `SocketIo::close` afterwards.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// What an entry is; lower kinds close first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A `/ws` session, which closes itself with a close frame.
    WsSession,
    /// An accepted TCP connection (Socket.IO websockets, polling requests, the API).
    Connection,
}

/// The live connections and sessions a drain will close.
#[derive(Default)]
pub struct Drain {
    entries: Mutex<BTreeMap<(Kind, u64), CancellationToken>>,
    next: AtomicU64,
}

/// Removes its entry from the [`Drain`] when dropped.
pub struct Registration {
    drain: Arc<Drain>,
    key: (Kind, u64),
    token: CancellationToken,
}

impl Registration {
    /// Cancelled when the drain reaches this entry.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.drain.lock().remove(&self.key);
    }
}

impl Drain {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Kind, u64), CancellationToken>> {
        // The map stays consistent whatever a panicking holder did: every operation is a
        // single insert, remove or cancel.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection or session; it is closed when its turn comes.
    pub fn register(self: &Arc<Self>, kind: Kind) -> Registration {
        let key = (kind, self.next.fetch_add(1, Ordering::Relaxed));
        let token = CancellationToken::new();
        self.lock().insert(key, token.clone());
        Registration {
            drain: self.clone(),
            key,
            token,
        }
    }

    /// How many entries are open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes up to `batch` entries of `kind` that are still open. Returns how many it closed.
    pub fn close_batch(&self, kind: Kind, batch: usize) -> usize {
        let entries = self.lock();
        let mut closed = 0;
        let open = entries
            .iter()
            .filter(|((k, _), token)| *k == kind && !token.is_cancelled());
        for (_, token) in open.take(batch) {
            token.cancel();
            closed += 1;
        }
        closed
    }

    fn count(&self, kind: Kind) -> usize {
        self.lock().keys().filter(|(k, _)| *k == kind).count()
    }

    /// Closes every entry, `batch` at a time with `interval` between batches, and returns the
    /// number closed. `/ws` sessions go first, and their connections are left to them for up
    /// to `interval` more, so that their close frame is not cut short. Entries registered
    /// meanwhile are closed too.
    pub async fn close_in_batches(&self, batch: usize, interval: Duration) -> usize {
        let mut total = 0;
        for kind in [Kind::WsSession, Kind::Connection] {
            loop {
                let closed = self.close_batch(kind, batch.max(1));
                if closed == 0 {
                    break;
                }
                total += closed;
                tracing::info!(
                    closed,
                    left = self.len(),
                    "drain: closed a batch of client transports"
                );
                tokio::time::sleep(interval).await;
            }
            if kind == Kind::WsSession {
                let deadline = tokio::time::Instant::now() + interval;
                while self.count(Kind::WsSession) > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        total
    }
}

/// A TCP listener whose connections are registered in a [`Drain`], with `TCP_NODELAY` set.
pub struct DrainListener {
    inner: TcpListener,
    drain: Arc<Drain>,
}

impl DrainListener {
    pub fn new(inner: TcpListener, drain: Arc<Drain>) -> Self {
        Self { inner, drain }
    }
}

impl axum::serve::Listener for DrainListener {
    type Io = TrackedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        // Small frames (an ack, then the echoed message) must not wait on Nagle's algorithm.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let registration = self.drain.register(Kind::Connection);
        let cut = Box::pin(registration.token().clone().cancelled_owned());
        let stream = TrackedStream {
            inner: tcp,
            cut,
            _registration: registration,
        };
        (stream, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection that reads end-of-stream once the drain closes it. Writes still go
/// through, so that whatever is being sent can finish.
pub struct TrackedStream {
    inner: TcpStream,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    _registration: Registration,
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_close_one_kind_at_a_time_and_forget_dropped_entries() {
        let drain = Drain::new();
        let conn_a = drain.register(Kind::Connection);
        let ws = drain.register(Kind::WsSession);
        let conn_b = drain.register(Kind::Connection);
        let gone = drain.register(Kind::Connection);
        drop(gone);
        assert_eq!(drain.len(), 3);

        assert_eq!(drain.close_batch(Kind::WsSession, 5), 1);
        assert!(ws.token().is_cancelled());
        assert!(!conn_a.token().is_cancelled(), "a batch holds one kind");

        assert_eq!(drain.close_batch(Kind::Connection, 1), 1);
        assert_eq!(drain.close_batch(Kind::Connection, 5), 1);
        assert!(conn_a.token().is_cancelled() && conn_b.token().is_cancelled());
        assert_eq!(
            drain.close_batch(Kind::Connection, 5),
            0,
            "closed entries are not closed twice"
        );

        drop((conn_a, ws, conn_b));
        assert!(drain.is_empty());
    }

    #[tokio::test]
    async fn a_closed_stream_reads_end_of_stream_but_still_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let drain = Drain::new();
        let mut listener = DrainListener::new(listener, drain.clone());
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (mut served, _) = axum::serve::Listener::accept(&mut listener).await;
        assert_eq!(drain.len(), 1);

        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = served.read(&mut buf).await.expect("read");
            served.write_all(b"bye").await.expect("write after cut");
            n
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            drain.close_in_batches(10, Duration::from_millis(1)).await,
            1
        );
        assert_eq!(
            reader.await.expect("reader"),
            0,
            "a closed stream reads EOF"
        );
        let mut buf = Vec::new();
        client.read_to_end(&mut buf).await.expect("client read");
        assert_eq!(buf, b"bye");
        assert!(drain.is_empty(), "a dropped stream leaves the drain");
    }
}
