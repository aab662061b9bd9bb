//! `run(listener, ...)`: the gRPC server with health, reflection and limits,
//! plus the metrics endpoint, on already-bound listeners so tests can bind
//! port 0 and get a real server in one line.
//!
//! Connections: a plain accept loop (it sees every accept error, and backs
//! off on the ones that repeat, such as running out of file descriptors)
//! takes one of `max_connections` slots per connection and hands it to a
//! serving thread, which runs the TLS handshake and waits for the HTTP/2
//! client preface under `handshake_timeout` before tonic serves it. A
//! connection holds its slot until it closes; one that has not sent its
//! preface yet may lose it to a newcomer when all slots are taken, so idle
//! sockets cannot lock real clients out.
//!
//! With [`ServerOptions::uds`] the same services are served on a Unix
//! domain socket as well, for trainers on the same host: a second accept
//! loop over the same slots, serving threads, handshake deadline, bearer
//! token and limits. TLS never applies there; the socket file's mode and
//! group say who may connect (see [`UdsOptions`]).
use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::transport::server::Router;
use tonic::transport::Server;

use crate::attach::serve::{Attacher, DEFAULT_MAX_ATTACHED};
use crate::batch::prepared::{Limits, Prepared};
use crate::catalog::{Catalog, Datasets};
use crate::metrics::Metrics;
use crate::proto;
use crate::routes::SERVICE;
use crate::service::BatchService;

mod conn;
mod listen;

pub use conn::ConnInfo;
use conn::{Accepted, ConnSlot, Established, Handshake, LimitedConn, Slots};
pub(crate) use listen::AcceptErrors;
use listen::{accept, LOG_EVERY};
pub use listen::{
    bind, bind_uds, fds_needed, fit_fd_limit, make_room_for_fds, FdLimit, LogThrottle, UdsFile,
};

/// Default connection cap: far above a training fleet's trainers per
/// replica, far below what exhausts file descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default RPCs in flight per connection: a trainer with a prefetching data
/// loader keeps a handful; each open stream can hold one minibatch.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 64;
/// Default time from accept to the HTTP/2 client preface (TLS handshake
/// included). Clients send the preface as soon as TCP (and TLS) is up: on
/// loopback the whole TLS handshake plus preface takes about 2 ms here, and
/// across a region a few round trips of 100 ms or less; 5 s leaves room
/// for a client stalled by its own start-up (a Python trainer importing
/// torch while its connection opens) while an idle socket gives its slot
/// back within seconds, not at the 30 s + 10 s keepalive that applies only
/// once HTTP/2 runs. (gRPC-Go and gRPC C++ wait 120 s, without a cap that
/// idle sockets can fill.)
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default listen backlog: connections the kernel completes and queues
/// before `accept`. The previous 128 (tokio's and Rust's default) made a
/// 256-rank job connecting at once see SYN retransmits (1 s, then 3 s of
/// stall per dropped SYN); 4096 leaves room for 256 ranks with a dozen
/// data-loader connections each, costs nothing until used (a queue bound,
/// not memory), and equals Linux's default `net.core.somaxconn` since 5.4,
/// which caps it silently (see [`bind`]).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;
/// Longest duration any option may hold (shutdown grace, keepalive,
/// handshake): no deployment waits a day for any of them, and the bound
/// keeps `Instant + duration` arithmetic far from overflowing (it panics).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// File descriptors the daemon holds besides its connections and serving
/// threads: stdio, the listeners (gRPC, metrics, the Unix socket), the main
/// runtime's epoll and eventfds.
/// Measured: 13 (17 open at idle with one serving thread, metrics on, `ls
/// /proc/PID/fd`); 32 leaves room for the dataset file while loading, a
/// log sink, and the dataset's memfds (one per loaded buffer: 1 for a
/// pickle, 4 for IDX files, plus one per uint8 mirror).
pub const FD_RESERVE: u64 = 32;
/// File descriptors per serving thread (its runtime's epoll instances and
/// eventfd). Measured: 17, 21 and 45 open at idle with 1, 2 and 8 threads.
pub const FDS_PER_IO_THREAD: u64 = 4;

/// How often the shutdown drain looks at the number of open streams.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Default mode of the Unix socket file: owner and group may connect
/// (connecting needs write permission), others may not.
pub const DEFAULT_UDS_MODE: u32 = 0o660;

/// The Unix domain socket (`--uds`): who can open its file can connect, so
/// its mode and group are the access control there (TLS does not apply;
/// the bearer token, when set, does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdsOptions {
    pub path: std::path::PathBuf,
    /// Permission bits of the socket file (at most 0o777).
    pub mode: u32,
    /// Group to give the socket file (a name or a number); `None` keeps the
    /// daemon's own.
    pub group: Option<String>,
}

impl UdsOptions {
    /// `path` with the default mode and group.
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Self {
            path: path.into(),
            mode: DEFAULT_UDS_MODE,
            group: None,
        }
    }
}

/// Server settings beyond the dataset.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub limits: Limits,
    /// Connections served at once; more are closed at accept (the client
    /// sees UNAVAILABLE and can try a replica), unless one of the open ones
    /// has not completed its handshake: the oldest such is closed instead.
    pub max_connections: usize,
    /// HTTP/2 streams (RPCs) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive PING interval; a peer that does not answer within
    /// `keepalive_timeout` is dropped, freeing its streams.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Time from accept to the HTTP/2 client preface, TLS handshake
    /// included (see [`DEFAULT_HANDSHAKE_TIMEOUT`]); a connection that takes
    /// longer is closed and frees its slot.
    pub handshake_timeout: Duration,
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
    /// Also serve on this Unix domain socket (off by default); bound by
    /// [`run`], which removes the file when it returns.
    pub uds: Option<UdsOptions>,
    /// Listen backlog of the Unix socket (the TCP listener comes bound).
    pub uds_backlog: u32,
    /// Same-host clients attached to the dataset's memory at once (see
    /// [`crate::attach`]); more are refused with RESOURCE_EXHAUSTED.
    pub max_attached: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            auth_token: None,
            tls: None,
            shutdown_grace: Duration::from_secs(30),
            eager_stats: true,
            io_threads: 0,
            uds: None,
            uds_backlog: DEFAULT_LISTEN_BACKLOG,
            max_attached: DEFAULT_MAX_ATTACHED,
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
            "memory budget {} bytes is below what one stream may need at once ({} bytes: its \
             largest chunk and a shuffled minibatch's index list at the max batch size); raise \
             it or lower the max batch size",
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
    if let Some(u) = &o.uds {
        if u.path.as_os_str().is_empty() {
            return Err("the unix socket path is empty".into());
        }
        if u.mode > 0o777 {
            return Err(format!(
                "unix socket mode {:o} is not a permission mode (at most 777)",
                u.mode
            ));
        }
        if u.group.as_deref() == Some("") {
            return Err("the unix socket group is empty".into());
        }
    }
    if o.max_attached == 0 {
        return Err(
            "max attached must be at least 1 (attach needs --uds; without it nothing attaches)"
                .into(),
        );
    }
    if o.uds_backlog == 0 {
        return Err("the unix socket listen backlog must be at least 1".into());
    }
    for (name, d) in [
        ("shutdown grace", o.shutdown_grace),
        ("keepalive interval", o.keepalive_interval),
        ("keepalive timeout", o.keepalive_timeout),
        ("handshake timeout", o.handshake_timeout),
    ] {
        if d > MAX_DURATION {
            return Err(format!(
                "{name} {d:?} exceeds the longest allowed, {} s",
                MAX_DURATION.as_secs()
            ));
        }
    }
    for (name, d) in [
        ("keepalive interval", o.keepalive_interval),
        ("keepalive timeout", o.keepalive_timeout),
        ("handshake timeout", o.handshake_timeout),
    ] {
        if d.is_zero() {
            return Err(format!("{name} must be longer than zero"));
        }
    }
    Ok(())
}

/// Serving threads for `--io-threads` (0 = one per CPU).
fn serving_threads(io_threads: usize) -> usize {
    match io_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Serves `datasets` (one `Arc<Dataset>` converts) on `listener` (and on the Unix socket of
/// [`ServerOptions::uds`], bound here with [`bind_uds`] and removed when
/// this returns) until `shutdown` resolves; then reports
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
    datasets: impl Into<Datasets>,
    opts: ServerOptions,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    validate(&opts).map_err(anyhow::Error::msg)?;
    // Bound first, so that a live daemon on the path stops this one before
    // it does anything; the file goes when `_uds_file` drops, on every
    // return below.
    let (uds, _uds_file) = match &opts.uds {
        Some(u) => {
            let (l, f) = bind_uds(u, opts.uds_backlog)?;
            (Some(l), Some(f))
        }
        None => (None, None),
    };
    let catalog = Catalog::new(&datasets.into(), opts.limits, metrics.clone());
    for p in catalog.all() {
        prepare_in_background(p, opts.eager_stats)?;
    }
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let auth = opts
        .auth_token
        .as_deref()
        .map(crate::access::BearerAuth::new);
    let attacher = Arc::new(Attacher::new(
        catalog.clone(),
        auth.clone(),
        opts.max_attached,
        opts.handshake_timeout,
    ));
    metrics
        .status
        .serve(&catalog, auth.clone(), opts.uds.is_some());
    let router = router(catalog, &opts, auth, health_svc)?;

    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && opts.auth_token.is_none() && opts.tls.is_none() {
        tracing::warn!(%addr, "listening beyond loopback with neither TLS nor a bearer token: anyone who can reach this port can read the dataset");
    }
    // TLS is not tonic's to do: the serving threads run the handshake under
    // the handshake deadline and hand tonic the established stream.
    let tls = match &opts.tls {
        Some(t) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(t.server_config()?);
            tracing::info!(mtls = t.client_ca.is_some(), "TLS on");
            Some(acceptor)
        }
        None => None,
    };
    let handshake = Arc::new(Handshake {
        tls,
        timeout: opts.handshake_timeout,
        conn_share: opts.limits.connection_share(),
        metrics: metrics.clone(),
        timeouts_log: LogThrottle::new(LOG_EVERY),
        failures_log: LogThrottle::new(LOG_EVERY),
    });
    let threads = serving_threads(opts.io_threads);
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Serving);
    let (io_threads, mut done): (Vec<IoThread>, Vec<_>) = (0..threads)
        .map(|i| {
            let (r, h, a) = (router.clone(), handshake.clone(), attacher.clone());
            IoThread::start(i, r, h, a, phase_rx.clone())
        })
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    drop(router);

    // Boxed, not pinned on the stack, so that dropping it below really ends
    // it (and closes the listening socket).
    let slots = Arc::new(Slots::new(opts.max_connections, metrics.clone()));
    let tcp = accept(listener, "grpc", slots.clone(), &io_threads, &metrics);
    let unix = async {
        match uds {
            Some(l) => accept(l, "grpc-unix", slots, &io_threads, &metrics).await,
            None => std::future::pending().await,
        }
    };
    let mut accept = Box::pin(async {
        tokio::join!(tcp, unix);
    });
    tracing::info!(%addr, io_threads = threads, "serving gRPC");
    if let Some(u) = &opts.uds {
        tracing::info!(
            group = u.group.as_deref(),
            "serving gRPC on unix socket {} (mode {:04o})",
            u.path.display(),
            u.mode
        );
        if u.mode & 0o002 != 0 && opts.auth_token.is_none() {
            tracing::warn!(path = %u.path.display(), "the unix socket is open to every user of this host (--uds-mode) and there is no bearer token: any of them can read the dataset");
        }
    }
    tokio::select! {
        _ = &mut accept => unreachable!("the accept loop runs until dropped"),
        r = first_done(&mut done) => return Err(io_thread_ended(r)),
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
    let busy = || {
        metrics
            .active_streams
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
            || !attacher.device_holders().is_empty()
    };
    let r = drain(accept, done, phase_tx, busy, opts.shutdown_grace).await;
    let holders = attacher.device_holders();
    if !holders.is_empty() {
        tracing::warn!(
            holders = holders.join("; "),
            "shutdown grace period over with processes still attached to device memory: \
             freeing it under them"
        );
    }
    r
}

/// Shutdown after NOT_SERVING: streams in flight finish (new requests are
/// still answered), and processes attached to device memory detach, for up
/// to `grace` (while `busy`), then accepting stops and the connections
/// close; past the grace period whatever is left is dropped. Why wait for
/// device attachments: CUDA IPC importers read the daemon's own
/// allocations, freed when it exits.
async fn drain(
    mut accept: std::pin::Pin<Box<impl Future<Output = ()>>>,
    mut done: Vec<Done>,
    phase_tx: tokio::sync::watch::Sender<Phase>,
    busy: impl Fn() -> bool,
    grace: Duration,
) -> anyhow::Result<()> {
    // Drain first, then close: hyper's HTTP/2 graceful close can cut a
    // response body that is still streaming (seen in tests here), so the
    // server waits for its own streams to finish before it closes
    // connections. New connections and requests are still answered while
    // balancers notice NOT_SERVING.
    let deadline = tokio::time::Instant::now() + grace;
    while busy() && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = &mut accept => unreachable!("the accept loop runs until dropped"),
            r = first_done(&mut done) => return Err(io_thread_ended(r)),
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

/// Work that makes serving cheaper or richer, off the serving threads:
/// per-row CRCs now, dataset statistics now (`eager`) or on first need.
fn prepare_in_background(prepared: &Arc<Prepared>, eager: bool) -> std::io::Result<()> {
    let s = prepared.clone();
    std::thread::Builder::new()
        .name("row-crcs".into())
        .spawn(move || s.compute_row_crcs())?;
    if eager {
        let s = prepared.clone();
        tokio::spawn(async move {
            if let Err(e) = s.stats().await {
                tracing::error!(error = %e, "computing dataset statistics failed");
            }
        });
    }
    Ok(())
}

/// The services every connection gets: health, reflection (v1 and
/// v1alpha) and the BatchService behind its token check.
fn router(
    catalog: Arc<Catalog>,
    opts: &ServerOptions,
    auth: Option<crate::access::BearerAuth>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<Router> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (v1, v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let svc = crate::routes::BatchRoutes::new(BatchService::new(catalog), auth);
    Ok(Server::builder()
        .max_concurrent_streams(opts.max_concurrent_streams)
        .http2_keepalive_interval(Some(opts.keepalive_interval))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout))
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(svc))
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
struct IoThread {
    conns: tokio::sync::mpsc::UnboundedSender<(Accepted, ConnSlot)>,
    /// Connections it serves now (for placing new ones).
    open: Arc<AtomicUsize>,
}

/// How a serving thread's server ended.
type Done = tokio::sync::oneshot::Receiver<anyhow::Result<()>>;

impl IoThread {
    fn start(
        i: usize,
        router: Router,
        handshake: Arc<Handshake>,
        attacher: Arc<Attacher>,
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
                    .and_then(|rt| {
                        rt.block_on(serve_io_thread(router, handshake, attacher, rx, phase))
                    });
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

/// A serving thread's server: connections come from the accept loop, are
/// registered with this thread's runtime, go through [`handshake`] each on
/// its own task, and reach tonic once their HTTP/2 preface has arrived.
/// Handshakes still running when the thread ends are dropped with its
/// runtime.
async fn serve_io_thread(
    router: Router,
    handshake: Arc<Handshake>,
    attacher: Arc<Attacher>,
    mut conns: tokio::sync::mpsc::UnboundedReceiver<(Accepted, ConnSlot)>,
    mut phase: tokio::sync::watch::Receiver<Phase>,
) -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = tokio::sync::mpsc::unbounded_channel::<LimitedConn>();
    tokio::spawn(async move {
        while let Some((std, slot)) = conns.recv().await {
            let (hs, ready, attacher) = (handshake.clone(), ready_tx.clone(), attacher.clone());
            tokio::spawn(async move {
                match hs.run(std, slot).await {
                    // Fails only once the server is closing.
                    Some(Established::Http2(conn)) => _ = ready.send(conn),
                    // Held on this thread until the client closes it (or
                    // the thread ends, at shutdown).
                    Some(Established::Attach(io, slot)) => {
                        Established::attach(io, slot, &attacher).await
                    }
                    None => {}
                }
            });
        }
    });
    let incoming =
        tokio_stream::wrappers::UnboundedReceiverStream::new(ready_rx).map(Ok::<_, std::io::Error>);
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

fn io_thread_ended(r: anyhow::Result<()>) -> anyhow::Error {
    match r {
        Ok(()) => anyhow::anyhow!("a serving thread stopped unexpectedly"),
        Err(e) => e.context("a serving thread failed"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::conn::*;
    use super::listen::*;
    use super::*;

    #[test]
    fn log_throttle_writes_one_line_per_interval_and_counts_the_rest() {
        let t = LogThrottle::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(t.allow_at(t0), Some(0));
        for ms in [1, 100, 4_999] {
            assert_eq!(t.allow_at(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(t.allow_at(t0 + Duration::from_secs(5)), Some(3));
        assert_eq!(t.allow_at(t0 + Duration::from_secs(6)), None);
        assert_eq!(t.allow_at(t0 + Duration::from_secs(60)), Some(1));
        // A clock that goes backwards (another thread's earlier `now`)
        // counts as within the interval.
        assert_eq!(t.allow_at(t0), None);
    }

    #[test]
    fn fd_plan_raises_the_soft_limit_within_the_hard_one() {
        assert_eq!(fd_plan(4096, 4096, 1100), FdLimit::Enough { soft: 4096 });
        assert_eq!(
            fd_plan(1024, 524_288, 1152),
            FdLimit::Raised {
                from: 1024,
                to: 1152
            }
        );
        assert_eq!(
            fd_plan(48, 48, 1152),
            FdLimit::Short {
                limit: 48,
                needed: 1152
            }
        );
    }

    #[test]
    fn validate_refuses_what_the_wire_and_clocks_cannot_hold() {
        let mut o = ServerOptions::default();
        assert_eq!(validate(&o), Ok(()));
        o.limits.max_message_bytes = u32::MAX as usize + 1;
        assert!(validate(&o).unwrap_err().contains("32 bits"));
        o.limits.max_message_bytes = u32::MAX as usize;
        assert_eq!(validate(&o), Ok(()));
        o.shutdown_grace = Duration::MAX;
        assert!(validate(&o).unwrap_err().contains("shutdown grace"));
        o.shutdown_grace = Duration::ZERO;
        assert_eq!(validate(&o), Ok(()), "no grace is allowed");
        o.handshake_timeout = Duration::ZERO;
        assert!(validate(&o).unwrap_err().contains("handshake timeout"));
    }

    #[tokio::test]
    async fn a_newcomer_takes_the_oldest_pending_slot_never_an_established_one() {
        let slots = Arc::new(Slots::new(2, Arc::new(Metrics::default())));
        let mut a = slots.take().unwrap();
        let b = slots.take().unwrap();
        assert!(a.establish());
        // Full: c evicts b (the only pending one), not a.
        let c = slots.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), b.evicted.notified())
            .await
            .expect("b is told to close");
        let mut b = b;
        assert!(!b.establish(), "an evicted connection cannot establish");
        drop(b);
        // Still full (a established, c pending): d evicts c.
        let d = slots.take().unwrap();
        drop(c);
        let mut d = d;
        assert!(d.establish());
        assert!(slots.take().is_none(), "all established: refused");
        drop(a);
        assert!(slots.take().is_some(), "a closed: its slot is free");
        assert_eq!(slots.lock().taken, 1, "d's, once the last taker left");
    }
}
