//! `run(listener, ...)`: the gRPC server with health, reflection and limits,
//! plus the metrics endpoint, on already-bound listeners so tests can bind
//! port 0 and get a real server in one line.
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::StreamExt;
use tonic::transport::server::Router;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::Server;

use crate::batch::prepared::{Limits, Prepared};
use crate::metrics::Metrics;
use crate::proto;
use crate::routes::SERVICE;
use crate::service::BatchService;
use crate::store::Dataset;

/// Default connection cap: far above a training fleet's trainers per
/// replica, far below what exhausts file descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default RPCs in flight per connection: a trainer with a prefetching data
/// loader keeps a handful; each open stream can hold one minibatch.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 64;

/// How often the shutdown drain looks at the number of open streams.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Server settings beyond the dataset.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub limits: Limits,
    /// Connections served at once; more are closed at accept (the client
    /// sees UNAVAILABLE and can try a replica).
    pub max_connections: usize,
    /// HTTP/2 streams (RPCs) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive PING interval; a peer that does not answer within
    /// `keepalive_timeout` is dropped, freeing its streams.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Bearer token every BatchService call must carry (health stays open).
    pub auth_token: Option<String>,
    pub tls: Option<crate::access::TlsFiles>,
    /// How long in-flight streams may run on after shutdown is asked for.
    pub shutdown_grace: Duration,
    /// Compute sha256s and exactness facts right after start (otherwise on
    /// the first request that needs them).
    pub eager_stats: bool,
    /// Serving threads; 0 = one per CPU. See [`run`] for why connections
    /// are spread over single-threaded runtimes.
    pub io_threads: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            auth_token: None,
            tls: None,
            shutdown_grace: Duration::from_secs(30),
            eager_stats: true,
            io_threads: 0,
        }
    }
}

/// Checks option combinations that would make the server misbehave.
pub fn validate(o: &ServerOptions) -> Result<(), String> {
    let l = &o.limits;
    let overhead = crate::batch::frame::MESSAGE_OVERHEAD;
    if l.chunk_bytes == 0 {
        return Err("chunk size must be at least 1 byte".into());
    }
    if l.max_message_bytes > u32::MAX as usize {
        return Err(format!(
            "max message size {} exceeds {} bytes: gRPC frames a message's length in 32 bits",
            l.max_message_bytes,
            u32::MAX
        ));
    }
    if l.chunk_bytes + overhead > l.max_message_bytes {
        return Err(format!(
            "chunk size {} plus {overhead} bytes of message fields exceeds the max message size {}",
            l.chunk_bytes, l.max_message_bytes
        ));
    }
    if l.budget_bytes < l.stream_bytes() {
        return Err(format!(
            "memory budget {} bytes is below what one stream may need at once ({} bytes: a \
             chunk at the max message size and a shuffled minibatch's index list at the max \
             batch size); raise it or lower those limits",
            l.budget_bytes,
            l.stream_bytes()
        ));
    }
    if l.max_batch_size == 0 {
        return Err("max batch size must be at least 1".into());
    }
    if o.max_connections == 0 || o.max_concurrent_streams == 0 {
        return Err("max connections and max concurrent streams must be at least 1".into());
    }
    if o.auth_token.as_deref() == Some("") {
        return Err("the auth token is empty".into());
    }
    Ok(())
}

/// Serves `dataset` on `listener` until `shutdown` resolves; then reports
/// NOT_SERVING (so balancers drain), lets in-flight streams finish for up
/// to `shutdown_grace` while still answering, stops accepting, closes the
/// connections, and returns.
///
/// Connections are served thread-per-core: each serving thread runs a
/// single-threaded tokio runtime and serves the connections handed to it
/// from accept to close, and this function (on the caller's runtime)
/// accepts and hands each new connection to the thread with the fewest.
/// Why: on one shared multi-threaded runtime a GetBatch hops between
/// worker threads (the connection task, the stream's task and the
/// response body wake each other), and with one client on this project's
/// 2-core machines those hops cost GetBatch(500) about 15 % of its
/// throughput (1.95 against 2.3 GB/s, `minibatchd bench`, same binary with
/// `TOKIO_WORKER_THREADS=1`). The work of one connection is mostly the
/// kernel's copy of tensor bytes into its socket, so keeping a connection on
/// one thread loses nothing, and connections still spread over all cores.
pub async fn run(
    listener: TcpListener,
    dataset: Arc<Dataset>,
    opts: ServerOptions,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    validate(&opts).map_err(anyhow::Error::msg)?;
    let prepared = Prepared::new(dataset, opts.limits, metrics.clone());
    {
        let s = prepared.clone();
        std::thread::Builder::new()
            .name("row-crcs".into())
            .spawn(move || s.compute_row_crcs())?;
    }
    if opts.eager_stats {
        let s = prepared.clone();
        tokio::spawn(async move {
            if let Err(e) = s.stats().await {
                tracing::error!(error = %e, "computing dataset statistics failed");
            }
        });
    }
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let auth = opts
        .auth_token
        .as_deref()
        .map(crate::access::BearerAuth::new);
    let svc = crate::routes::BatchRoutes::new(BatchService::new(prepared), auth);

    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && opts.auth_token.is_none() && opts.tls.is_none() {
        tracing::warn!(%addr, "listening beyond loopback with neither TLS nor a bearer token: anyone who can reach this port can read the dataset");
    }
    let mut builder = Server::builder();
    if let Some(tls) = &opts.tls {
        builder = builder.tls_config(tls.server_config()?)?;
        tracing::info!(mtls = tls.client_ca.is_some(), "TLS on");
    }
    let router = builder
        .tcp_nodelay(true)
        .max_concurrent_streams(opts.max_concurrent_streams)
        .http2_keepalive_interval(Some(opts.keepalive_interval))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(svc);
    let threads = match opts.io_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Serving);
    let (shards, mut done): (Vec<Shard>, Vec<_>) = (0..threads)
        .map(|i| Shard::start(i, router.clone(), phase_rx.clone()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    drop(router);

    // Boxed, not pinned on the stack, so that dropping it below really ends
    // it (and closes the listening socket).
    let mut accept = Box::pin(accept(listener, opts.max_connections, &shards));
    tracing::info!(%addr, io_threads = threads, "serving gRPC");
    tokio::select! {
        _ = &mut accept => unreachable!("the accept loop runs until dropped"),
        r = first_done(&mut done) => return Err(shard_ended(r)),
        _ = shutdown => {}
    }
    tracing::info!(
        grace_s = opts.shutdown_grace.as_secs_f64(),
        "shutting down: health NOT_SERVING, finishing in-flight streams"
    );
    health
        .set_service_status(SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    // The server-wide status too, so probes that name no service drain.
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    // Drain first, then close: hyper's HTTP/2 graceful close can cut a
    // response body that is still streaming (seen in tests here), so the
    // server waits for its own streams to finish before it closes
    // connections. New connections and requests are still answered while
    // balancers notice NOT_SERVING.
    let deadline = tokio::time::Instant::now() + opts.shutdown_grace;
    while metrics
        .active_streams
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::select! {
            _ = &mut accept => unreachable!("the accept loop runs until dropped"),
            r = first_done(&mut done) => return Err(shard_ended(r)),
            _ = tokio::time::sleep(DRAIN_POLL) => {}
        }
    }
    // Stop accepting (closes the listening socket: new clients are refused
    // at once rather than left hanging), then close the connections.
    drop(accept);
    let _ = phase_tx.send(Phase::Closing);
    let closed = async {
        while !done.is_empty() {
            if let Err(e) = first_done(&mut done).await {
                tracing::error!(error = %e, "serving thread failed while closing");
            }
        }
    };
    let over = deadline.max(tokio::time::Instant::now() + DRAIN_POLL);
    if tokio::time::timeout_at(over, closed).await.is_err() {
        tracing::warn!("shutdown grace period over; closing the remaining streams");
        let _ = phase_tx.send(Phase::Abort);
        while !done.is_empty() {
            let _ = first_done(&mut done).await;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// What the serving threads are to do.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Serving,
    /// Close connections gracefully (HTTP/2 GOAWAY), finishing their streams.
    Closing,
    /// Drop everything now.
    Abort,
}

/// One serving thread (see [`run`]): a single-threaded runtime serving the
/// connections handed to it.
struct Shard {
    conns: tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, ConnSlot)>,
    /// Connections it serves now (for placing new ones).
    open: Arc<AtomicUsize>,
}

/// How a serving thread's server ended.
type Done = tokio::sync::oneshot::Receiver<anyhow::Result<()>>;

impl Shard {
    fn start(
        i: usize,
        router: Router,
        phase: tokio::sync::watch::Receiver<Phase>,
    ) -> std::io::Result<(Self, Done)> {
        let (conns, rx) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("minibatchd-io-{i}"))
            .spawn(move || {
                let r = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(serve_shard(router, rx, phase)));
                let _ = done_tx.send(r);
            })?;
        Ok((
            Self {
                conns,
                open: Arc::new(AtomicUsize::new(0)),
            },
            done,
        ))
    }
}

/// A serving thread's server: connections come from the accept loop and
/// are registered with this thread's runtime.
async fn serve_shard(
    router: Router,
    conns: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, ConnSlot)>,
    mut phase: tokio::sync::watch::Receiver<Phase>,
) -> anyhow::Result<()> {
    let incoming =
        tokio_stream::wrappers::UnboundedReceiverStream::new(conns).filter_map(|(std, slot)| {
            match TcpStream::from_std(std) {
                Ok(stream) => Some(Ok::<_, std::io::Error>(LimitedConn {
                    stream,
                    _slot: slot,
                })),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot serve an accepted connection");
                    None
                }
            }
        });
    let mut closing = phase.clone();
    let serve = router.serve_with_incoming_shutdown(incoming, async move {
        // Closing or Abort; a dropped sender (run() dropped) too.
        let _ = closing.wait_for(|p| *p != Phase::Serving).await;
    });
    tokio::select! {
        r = serve => r.map_err(Into::into),
        _ = phase.wait_for(|p| *p == Phase::Abort) => Ok(()),
    }
}

/// Accepts connections, at most `max` open at once (more are closed at
/// accept: the client sees UNAVAILABLE and can try a replica), and hands
/// each to the serving thread with the fewest. Runs until dropped.
async fn accept(listener: TcpListener, max: usize, shards: &[Shard]) {
    let slots = Arc::new(Semaphore::new(max));
    // Nodelay is set here: without it small minibatches stall 40 ms on
    // delayed ACKs.
    let mut incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    while let Some(conn) = incoming.next().await {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Accept errors (EMFILE, a reset before accept) must not end the server.
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = ?stream.peer_addr().ok(), max, "connection refused: --max-connections reached");
            continue;
        };
        let Some(shard) = shards.iter().min_by_key(|s| s.open.load(Ordering::Relaxed)) else {
            return;
        };
        let slot = ConnSlot::new(permit, shard.open.clone());
        match stream.into_std() {
            Ok(std) => {
                // Fails only once the thread is gone (shutting down).
                let _ = shard.conns.send((std, slot));
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand over an accepted connection"),
        }
    }
}

/// The first serving thread to end (only at shutdown, or on a failure).
/// Removes it from `done` (a finished receiver must not be polled again);
/// pending forever when `done` is empty.
async fn first_done(done: &mut Vec<Done>) -> anyhow::Result<()> {
    std::future::poll_fn(|cx| {
        for i in 0..done.len() {
            if let std::task::Poll::Ready(r) = std::pin::Pin::new(&mut done[i]).poll(cx) {
                done.swap_remove(i);
                return std::task::Poll::Ready(
                    r.unwrap_or_else(|_| Err(anyhow::anyhow!("a serving thread panicked"))),
                );
            }
        }
        std::task::Poll::Pending
    })
    .await
}

fn shard_ended(r: anyhow::Result<()>) -> anyhow::Error {
    match r {
        Ok(()) => anyhow::anyhow!("a serving thread stopped unexpectedly"),
        Err(e) => e.context("a serving thread failed"),
    }
}

/// One of the `max_connections` slots, and a place in its serving thread's
/// count, held until the connection closes.
struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
}

impl ConnSlot {
    fn new(permit: OwnedSemaphorePermit, open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self {
            _permit: permit,
            open,
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection that holds its [`ConnSlot`] until closed.
pub struct LimitedConn {
    stream: TcpStream,
    _slot: ConnSlot,
}

impl Connected for LimitedConn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
