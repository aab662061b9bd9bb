//! One connection from accept to established: its slot among
//! `max_connections` (a newcomer may evict the oldest one still in its
//! handshake), the TLS handshake and HTTP/2 preface under the handshake
//! deadline, and the stream tonic serves ([`LimitedConn`]), which carries
//! the connection's memory-budget [`Holder`]. Connections from the Unix
//! socket go the same way, without TLS.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;
use tonic::transport::server::Connected;

use crate::attach::serve::Attacher;
use crate::attach::MAGIC as ATTACH_MAGIC;
use crate::batch::budget::Holder;
use crate::metrics::Metrics;

use super::listen::{LogThrottle, Peer};

/// The HTTP/2 client preface (RFC 9113 section 3.4): the first bytes of
/// every HTTP/2 connection, so their arrival marks a connection as a real
/// client.
pub(super) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The `max_connections` connection slots. A connection takes one at
/// accept and gives it back when it closes. Until its HTTP/2 preface
/// arrives it is *pending*, and when all slots are taken a newcomer takes
/// the slot of the oldest pending one, which is closed: idle sockets (a
/// port scanner, a half-open load balancer probe, a flood) can then delay
/// real clients by no more than a handshake, instead of locking them out
/// until the handshake deadline (16 idle sockets against 16 slots held
/// them for 300 s before there was one).
pub(super) struct Slots {
    pub(super) max: usize,
    pub(super) state: Mutex<SlotState>,
    pub(super) metrics: Arc<Metrics>,
}

pub(super) struct SlotState {
    /// Slots held, pending or established.
    pub(super) taken: usize,
    /// The pending holders by age (accept order), each with the signal
    /// that closes it.
    pub(super) pending: BTreeMap<u64, Arc<Notify>>,
    pub(super) next_id: u64,
}

impl Slots {
    pub(super) fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            max,
            state: Mutex::new(SlotState {
                taken: 0,
                pending: BTreeMap::new(),
                next_id: 0,
            }),
            metrics,
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new connection: a free one, or the oldest pending
    /// connection's (which is told to close); `None` when every slot is
    /// held by an established connection.
    pub(super) fn take(self: &Arc<Self>) -> Option<Slot> {
        let mut s = self.lock();
        if s.taken < self.max {
            s.taken += 1;
        } else if let Some((_, evict)) = s.pending.pop_first() {
            // Its slot passes to the newcomer: `taken` stays.
            evict.notify_one();
            self.metrics.conns.evicted.fetch_add(1, Ordering::Relaxed);
        } else {
            return None;
        }
        let id = s.next_id;
        s.next_id += 1;
        let evicted = Arc::new(Notify::new());
        s.pending.insert(id, evicted.clone());
        self.metrics
            .conns
            .open
            .store(s.taken as u64, Ordering::Relaxed);
        Some(Slot {
            slots: self.clone(),
            id,
            evicted,
            established: false,
        })
    }
}

/// One connection's hold on a slot (see [`Slots`]).
pub(super) struct Slot {
    pub(super) slots: Arc<Slots>,
    pub(super) id: u64,
    /// Notified when a newcomer took this slot.
    pub(super) evicted: Arc<Notify>,
    pub(super) established: bool,
}

impl Slot {
    /// Marks the connection established (no longer evictable); false when
    /// it was evicted first and must close.
    pub(super) fn establish(&mut self) -> bool {
        self.established = self.slots.lock().pending.remove(&self.id).is_some();
        self.established
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock();
        // An evicted connection's slot already belongs to its evictor.
        if self.established || s.pending.remove(&self.id).is_some() {
            s.taken -= 1;
            self.slots
                .metrics
                .conns
                .open
                .store(s.taken as u64, Ordering::Relaxed);
        }
    }
}

/// A [`Slot`], and a place in its serving thread's count, held until the
/// connection closes.
pub(super) struct ConnSlot {
    pub(super) slot: Slot,
    pub(super) open: Arc<AtomicUsize>,
}

impl ConnSlot {
    pub(super) fn new(slot: Slot, open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self { slot, open }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection was closed before tonic saw it.
#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    #[error("no HTTP/2 preface within {0:?} of accept")]
    Timeout(Duration),
    #[error("closed for a newer connection: all slots were taken")]
    Evicted,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("the first bytes are not the HTTP/2 client preface")]
    NotHttp2,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// An accepted connection on its way to a serving thread.
pub(super) enum Accepted {
    Tcp(std::net::TcpStream),
    /// From the Unix socket: never TLS (the socket file's permissions say
    /// who may connect).
    Unix(std::os::unix::net::UnixStream),
}

impl Accepted {
    /// The peer, for log lines.
    fn peer(&self) -> Peer {
        match self {
            Accepted::Tcp(s) => s.peer_addr().map_or(Peer::Unknown, Peer::Tcp),
            Accepted::Unix(_) => Peer::Unix,
        }
    }
}

/// How serving threads establish connections: TLS (if on, TCP only), then the
/// HTTP/2 preface, all within `timeout` of the connection's arrival.
pub(super) struct Handshake {
    pub(super) tls: Option<tokio_rustls::TlsAcceptor>,
    pub(super) timeout: Duration,
    /// Each connection's share of the memory budget for chunks (see
    /// `batch::budget::Holder`).
    pub(super) conn_share: usize,
    pub(super) metrics: Arc<Metrics>,
    pub(super) timeouts_log: LogThrottle,
    pub(super) failures_log: LogThrottle,
}

impl Handshake {
    /// The established connection, or `None` (logged, counted) when it
    /// failed, timed out or was evicted.
    pub(super) async fn run(&self, conn: Accepted, slot: ConnSlot) -> Option<Established> {
        let peer = conn.peer();
        match self.establish(conn, slot).await {
            Ok(c) => Some(c),
            Err(HandshakeError::Timeout(t)) => {
                self.metrics
                    .conns
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.timeouts_log.allow() {
                    tracing::warn!(%peer, timeout_s = t.as_secs_f64(), suppressed, "closed a connection that sent no HTTP/2 preface in time (--handshake-timeout-secs)");
                }
                None
            }
            // Counted where it happened; the newcomer's arrival is the news.
            Err(HandshakeError::Evicted) => None,
            Err(e) => {
                self.metrics
                    .conns
                    .handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.failures_log.allow() {
                    tracing::info!(%peer, error = %e, suppressed, "connection closed during its handshake");
                }
                None
            }
        }
    }

    pub(super) async fn establish(
        &self,
        conn: Accepted,
        mut slot: ConnSlot,
    ) -> Result<Established, HandshakeError> {
        let evicted = slot.slot.evicted.clone();
        let work = async {
            let mut io = match conn {
                Accepted::Tcp(std) => {
                    let stream = TcpStream::from_std(std)?;
                    match &self.tls {
                        Some(acceptor) => Io::Tls(Box::new(
                            acceptor.accept(stream).await.map_err(HandshakeError::Tls)?,
                        )),
                        None => Io::Plain(stream),
                    }
                }
                Accepted::Unix(std) => Io::Unix(UnixStream::from_std(std)?),
            };
            // The first 8 bytes tell HTTP/2 from an attach request.
            let mut preface = [0u8; PREFACE.len()];
            io.read_exact(&mut preface[..ATTACH_MAGIC.len()]).await?;
            if &preface[..ATTACH_MAGIC.len()] == ATTACH_MAGIC {
                return Ok((io, true));
            }
            io.read_exact(&mut preface[ATTACH_MAGIC.len()..]).await?;
            if &preface != PREFACE {
                return Err(HandshakeError::NotHttp2);
            }
            Ok((io, false))
        };
        let (io, attach) = tokio::select! {
            r = tokio::time::timeout(self.timeout, work) => {
                r.map_err(|_| HandshakeError::Timeout(self.timeout))??
            }
            _ = evicted.notified() => return Err(HandshakeError::Evicted),
        };
        if attach {
            // Still pending (evictable) until its request is read; then
            // attachments count against their own limit (--max-attached).
            return Ok(Established::Attach(io, slot));
        }
        if !slot.slot.establish() {
            return Err(HandshakeError::Evicted);
        }
        let info = ConnInfo {
            holder: Arc::new(Holder::new(self.conn_share)),
            peer: io.peer(),
        };
        Ok(Established::Http2(LimitedConn {
            io,
            replayed: 0,
            info,
            _slot: slot,
        }))
    }
}

/// What a connection turned out to be.
pub(super) enum Established {
    Http2(LimitedConn),
    /// Sent [`ATTACH_MAGIC`] (read) instead of the HTTP/2 preface; holds
    /// its pending slot until the request is read.
    Attach(Io, ConnSlot),
}

impl Established {
    /// Hands an attach request to `attacher`: served on the Unix socket,
    /// refused on TCP. Like a handshake, reading the request holds a
    /// connection slot and yields it to a newcomer when all are taken, so
    /// connections that send the magic and stop cannot pile up.
    pub(super) async fn attach(io: Io, slot: ConnSlot, attacher: &Attacher) {
        let evicted = slot.slot.evicted.clone();
        let evicted = async move { evicted.notified().await };
        match io {
            Io::Unix(s) => attacher.serve(s, slot, evicted).await,
            other => attacher.refuse_remote(other, slot, evicted).await,
        }
    }
}

/// The transport under HTTP/2.
pub(super) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl Io {
    /// Who is connected, for the status page: the TCP address, or the
    /// Unix socket peer's pid (SO_PEERCRED).
    fn peer(&self) -> crate::status::Peer {
        use crate::status::Peer;
        match self {
            Io::Plain(s) => Peer::tcp(s.peer_addr().ok()),
            Io::Tls(s) => Peer::tcp(s.get_ref().0.peer_addr().ok()),
            Io::Unix(s) => Peer::unix(s.peer_cred().ok().and_then(|c| c.pid())),
        }
    }
}

/// What every request of a connection carries in its extensions (tonic
/// puts the connect info there): the budget [`Holder`] its streams lease
/// on behalf of, and its peer for the status page.
#[derive(Clone)]
pub struct ConnInfo {
    pub holder: Arc<Holder>,
    pub peer: crate::status::Peer,
}

macro_rules! io_delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Plain($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            Io::Tls($s) => {
                let $s = std::pin::Pin::new(&mut **$s);
                $e
            }
            Io::Unix($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        io_delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        io_delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        io_delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        io_delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        io_delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// An established connection, as tonic serves it: holds its [`ConnSlot`]
/// until closed, hands hyper the preface that [`Handshake`] read before
/// the rest of the stream, and fails its reads once its [`Holder`] is
/// closed (the memory budget evicts connections whose streams hold leases
/// unread), which makes hyper drop the connection and its streams.
pub struct LimitedConn {
    pub(super) io: Io,
    /// Bytes of [`PREFACE`] already handed to hyper.
    pub(super) replayed: usize,
    /// Every request of the connection carries it (tonic puts the connect
    /// info in request extensions), so its streams lease on its behalf.
    pub(super) info: ConnInfo,
    pub(super) _slot: ConnSlot,
}

impl Connected for LimitedConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.info.holder.closed(cx.waker()) {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "evicted: its streams held memory budget unread while others waited",
            )));
        }
        if self.replayed < PREFACE.len() {
            let rest = &PREFACE[self.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.replayed += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
