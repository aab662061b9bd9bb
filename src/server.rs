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
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_stream::StreamExt;
use tonic::transport::server::Connected;
use tonic::transport::server::Router;
use tonic::transport::Server;

use crate::batch::budget::Holder;
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
/// threads: stdio, the two listeners, the main runtime's epoll and eventfds.
/// Measured: 13 (17 open at idle with one serving thread, metrics on, `ls
/// /proc/PID/fd`); 32 leaves room for the dataset file while loading and a
/// log sink.
pub const FD_RESERVE: u64 = 32;
/// File descriptors per serving thread (its runtime's epoll instances and
/// eventfd). Measured: 17, 21 and 45 open at idle with 1, 2 and 8 threads.
pub const FDS_PER_IO_THREAD: u64 = 4;

/// The HTTP/2 client preface (RFC 9113 section 3.4): the first bytes of
/// every HTTP/2 connection, so their arrival marks a connection as a real
/// client.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How often the shutdown drain looks at the number of open streams.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// First pause after an accept error that will repeat (out of file
/// descriptors, out of memory): the failed connection stays queued, so
/// accepting again at once fails again at once. Retrying with no pause took
/// 77 % of a core and wrote 688,000 log lines in 5 s under a 48-descriptor
/// limit (before this back-off); 10 ms keeps recovery quick once
/// descriptors free up.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accept retries: a queued client waits at most this
/// long after descriptors free up.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// One log line per this interval per kind of repeated connection event
/// (accept errors, refused connections, handshake timeouts); the next line
/// says how many were suppressed. Refusing connections wrote 30,000 WARN
/// lines in 4.2 s before.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

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

/// Binds a listening socket on `addr` (the first of its addresses that
/// binds) with a listen backlog of `backlog` (see
/// [`DEFAULT_LISTEN_BACKLOG`]); SO_REUSEADDR as tokio's own `bind` sets it.
/// The kernel silently caps the backlog at `net.core.somaxconn`: this warns
/// when it will.
pub async fn bind(addr: &str, backlog: u32) -> std::io::Result<TcpListener> {
    if let Some(max) = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        if backlog > max {
            tracing::warn!(
                backlog,
                somaxconn = max,
                "the kernel caps the listen backlog at net.core.somaxconn; raise it (sysctl) for the backlog asked for"
            );
        }
    }
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(backlog)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// File descriptors a server with `opts` needs when full, with
/// `metrics_connections` metrics connections open too (0 when metrics are
/// off): what [`fit_fd_limit`] makes room for.
pub fn fds_needed(opts: &ServerOptions, metrics_connections: usize) -> u64 {
    (opts.max_connections + metrics_connections) as u64
        + FD_RESERVE
        + FDS_PER_IO_THREAD * serving_threads(opts.io_threads) as u64
}

/// Serving threads for `--io-threads` (0 = one per CPU).
fn serving_threads(io_threads: usize) -> usize {
    match io_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// What [`fit_fd_limit`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdLimit {
    /// The soft limit already allows `needed` descriptors.
    Enough { soft: u64 },
    /// The soft limit was raised (up to at most the hard limit).
    Raised { from: u64, to: u64 },
    /// The hard limit is below what is needed; the soft limit is now the
    /// hard one. Connections beyond it fail at accept (which backs off).
    Short { limit: u64, needed: u64 },
}

/// Makes room for `needed` open file descriptors (see [`fds_needed`]): raises the soft RLIMIT_NOFILE when it is lower and the
/// hard limit allows, as Go's runtime does at start-up (the common default
/// soft limit of 1024 is below `--max-connections 1024` plus the daemon's
/// own descriptors).
pub fn fit_fd_limit(needed: u64) -> std::io::Result<FdLimit> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let plan = fd_plan(r.rlim_cur, r.rlim_max, needed);
    let to = match plan {
        FdLimit::Enough { .. } => return Ok(plan),
        FdLimit::Raised { to, .. } => to,
        FdLimit::Short { limit, .. } => limit,
    };
    r.rlim_cur = to;
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(plan)
}

/// [`fit_fd_limit`], with what it did or could not do in the log (for
/// start-up).
pub fn make_room_for_fds(needed: u64) {
    match fit_fd_limit(needed) {
        Ok(FdLimit::Enough { .. }) => {}
        Ok(FdLimit::Raised { from, to }) => tracing::info!(
            from,
            to,
            "raised the open-file limit (RLIMIT_NOFILE) to fit --max-connections"
        ),
        Ok(FdLimit::Short { limit, needed }) => tracing::warn!(
            limit,
            needed,
            "the open-file limit (RLIMIT_NOFILE, hard) is below what --max-connections needs: connections beyond it wait in the listen backlog; raise the limit (ulimit -n, LimitNOFILE=) or lower --max-connections"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
}

/// The decision of [`fit_fd_limit`], without the system calls.
fn fd_plan(soft: u64, hard: u64, needed: u64) -> FdLimit {
    if soft >= needed {
        FdLimit::Enough { soft }
    } else if hard >= needed {
        FdLimit::Raised {
            from: soft,
            to: needed,
        }
    } else {
        FdLimit::Short {
            limit: hard,
            needed,
        }
    }
}

/// At most one log line per `every` for one kind of repeated event, so a
/// flood of failures costs a line per interval rather than one each; the
/// line that is written says how many were suppressed since the last one.
///
/// ```
/// use std::time::Duration;
/// let t = minibatchd::server::LogThrottle::new(Duration::from_secs(5));
/// if let Some(suppressed) = t.allow() {
///     eprintln!("accept failed (and {suppressed} more since the last line)");
/// }
/// ```
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(ThrottleState {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(events suppressed since the last line)` when a line may be
    /// written now; `None` (and one more suppressed) otherwise.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`Self::allow`] at a given time (for tests).
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match s.last {
            Some(t) if now.saturating_duration_since(t) < self.every => {
                s.suppressed += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

/// Accept errors, told apart by what to do next: an error about one
/// connection (it was reset while queued) is skipped; any other (out of
/// file descriptors or memory) leaves the connection queued and would fail
/// again at once, so the loop pauses, doubling the pause while it lasts.
pub(crate) struct AcceptErrors {
    backoff: Duration,
    log: LogThrottle,
    /// What the listener is for, in log lines.
    what: &'static str,
}

impl AcceptErrors {
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            backoff: ACCEPT_BACKOFF_MIN,
            log: LogThrottle::new(LOG_EVERY),
            what,
        }
    }

    /// After a successful accept.
    pub(crate) fn ok(&mut self) {
        self.backoff = ACCEPT_BACKOFF_MIN;
    }

    /// Logs (throttled) and, unless the error concerns only one
    /// connection, sleeps before the next accept.
    pub(crate) async fn failed(&mut self, e: &std::io::Error) {
        let one_connection = matches!(
            e.raw_os_error(),
            Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::EINTR)
        );
        let pause = (!one_connection).then_some(self.backoff);
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(
                error = %e,
                listener = self.what,
                retry_in_ms = pause.map_or(0, |p| p.as_millis() as u64),
                suppressed,
                "accept failed"
            );
        }
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
            self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
        }
    }
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
    let router = Server::builder()
        .max_concurrent_streams(opts.max_concurrent_streams)
        .http2_keepalive_interval(Some(opts.keepalive_interval))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(svc);
    let threads = serving_threads(opts.io_threads);
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(Phase::Serving);
    let (shards, mut done): (Vec<Shard>, Vec<_>) = (0..threads)
        .map(|i| Shard::start(i, router.clone(), handshake.clone(), phase_rx.clone()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    drop(router);

    // Boxed, not pinned on the stack, so that dropping it below really ends
    // it (and closes the listening socket).
    let slots = Arc::new(Slots::new(opts.max_connections, metrics.clone()));
    let mut accept = Box::pin(accept(listener, slots, &shards, &metrics));
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
        handshake: Arc<Handshake>,
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
                    .and_then(|rt| rt.block_on(serve_shard(router, handshake, rx, phase)));
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
async fn serve_shard(
    router: Router,
    handshake: Arc<Handshake>,
    mut conns: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, ConnSlot)>,
    mut phase: tokio::sync::watch::Receiver<Phase>,
) -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = tokio::sync::mpsc::unbounded_channel::<LimitedConn>();
    tokio::spawn(async move {
        while let Some((std, slot)) = conns.recv().await {
            let (hs, ready) = (handshake.clone(), ready_tx.clone());
            tokio::spawn(async move {
                if let Some(conn) = hs.run(std, slot).await {
                    // Fails only once the server is closing.
                    let _ = ready.send(conn);
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

/// Accepts connections and hands each, with a slot (see [`Slots`]), to the
/// serving thread with the fewest; refused connections are closed at once
/// (the client sees UNAVAILABLE and can try a replica). Runs until dropped.
async fn accept(listener: TcpListener, slots: Arc<Slots>, shards: &[Shard], metrics: &Metrics) {
    let mut errors = AcceptErrors::new("grpc");
    let refused_log = LogThrottle::new(LOG_EVERY);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => {
                errors.ok();
                c
            }
            Err(e) => {
                metrics.conns.accept_errors.fetch_add(1, Ordering::Relaxed);
                errors.failed(&e).await;
                continue;
            }
        };
        metrics.conns.accepted.fetch_add(1, Ordering::Relaxed);
        // Without nodelay small minibatches stall 40 ms on delayed ACKs.
        let _ = stream.set_nodelay(true);
        let Some(slot) = slots.take() else {
            metrics.conns.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = refused_log.allow() {
                tracing::warn!(%peer, max = slots.max, suppressed, "connection refused: --max-connections reached, all of them past their handshake");
            }
            continue;
        };
        let Some(shard) = shards.iter().min_by_key(|s| s.open.load(Ordering::Relaxed)) else {
            return;
        };
        let slot = ConnSlot::new(slot, shard.open.clone());
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

/// The `max_connections` connection slots. A connection takes one at
/// accept and gives it back when it closes. Until its HTTP/2 preface
/// arrives it is *pending*, and when all slots are taken a newcomer takes
/// the slot of the oldest pending one, which is closed: idle sockets (a
/// port scanner, a half-open load balancer probe, a flood) can then delay
/// real clients by no more than a handshake, instead of locking them out
/// until the handshake deadline (16 idle sockets against 16 slots held
/// them for 300 s before there was one).
struct Slots {
    max: usize,
    state: Mutex<SlotState>,
    metrics: Arc<Metrics>,
}

struct SlotState {
    /// Slots held, pending or established.
    taken: usize,
    /// The pending holders by age (accept order), each with the signal
    /// that closes it.
    pending: BTreeMap<u64, Arc<Notify>>,
    next_id: u64,
}

impl Slots {
    fn new(max: usize, metrics: Arc<Metrics>) -> Self {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a new connection: a free one, or the oldest pending
    /// connection's (which is told to close); `None` when every slot is
    /// held by an established connection.
    fn take(self: &Arc<Self>) -> Option<Slot> {
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
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    /// Notified when a newcomer took this slot.
    evicted: Arc<Notify>,
    established: bool,
}

impl Slot {
    /// Marks the connection established (no longer evictable); false when
    /// it was evicted first and must close.
    fn establish(&mut self) -> bool {
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
struct ConnSlot {
    slot: Slot,
    open: Arc<AtomicUsize>,
}

impl ConnSlot {
    fn new(slot: Slot, open: Arc<AtomicUsize>) -> Self {
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
enum HandshakeError {
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

/// How serving threads establish connections: TLS (if on), then the
/// HTTP/2 preface, all within `timeout` of the connection's arrival.
struct Handshake {
    tls: Option<tokio_rustls::TlsAcceptor>,
    timeout: Duration,
    /// Each connection's share of the memory budget for chunks (see
    /// `batch::budget::Holder`).
    conn_share: usize,
    metrics: Arc<Metrics>,
    timeouts_log: LogThrottle,
    failures_log: LogThrottle,
}

impl Handshake {
    /// The established connection, or `None` (logged, counted) when it
    /// failed, timed out or was evicted.
    async fn run(&self, std: std::net::TcpStream, slot: ConnSlot) -> Option<LimitedConn> {
        let peer = std.peer_addr().ok();
        match self.establish(std, slot).await {
            Ok(c) => Some(c),
            Err(HandshakeError::Timeout(t)) => {
                self.metrics
                    .conns
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.timeouts_log.allow() {
                    tracing::warn!(peer = ?peer, timeout_s = t.as_secs_f64(), suppressed, "closed a connection that sent no HTTP/2 preface in time (--handshake-timeout-secs)");
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
                    tracing::info!(peer = ?peer, error = %e, suppressed, "connection closed during its handshake");
                }
                None
            }
        }
    }

    async fn establish(
        &self,
        std: std::net::TcpStream,
        mut slot: ConnSlot,
    ) -> Result<LimitedConn, HandshakeError> {
        let stream = TcpStream::from_std(std)?;
        let evicted = slot.slot.evicted.clone();
        let work = async {
            let mut io = match &self.tls {
                Some(acceptor) => Io::Tls(Box::new(
                    acceptor.accept(stream).await.map_err(HandshakeError::Tls)?,
                )),
                None => Io::Plain(stream),
            };
            let mut preface = [0u8; PREFACE.len()];
            io.read_exact(&mut preface).await?;
            if &preface != PREFACE {
                return Err(HandshakeError::NotHttp2);
            }
            Ok(io)
        };
        let io = tokio::select! {
            r = tokio::time::timeout(self.timeout, work) => {
                r.map_err(|_| HandshakeError::Timeout(self.timeout))??
            }
            _ = evicted.notified() => return Err(HandshakeError::Evicted),
        };
        if !slot.slot.establish() {
            return Err(HandshakeError::Evicted);
        }
        Ok(LimitedConn {
            io,
            replayed: 0,
            holder: Arc::new(Holder::new(self.conn_share)),
            _slot: slot,
        })
    }
}

/// The transport under HTTP/2.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
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
    io: Io,
    /// Bytes of [`PREFACE`] already handed to hyper.
    replayed: usize,
    /// Every request of the connection carries it (tonic puts the connect
    /// info in request extensions), so its streams lease on its behalf.
    holder: Arc<Holder>,
    _slot: ConnSlot,
}

impl Connected for LimitedConn {
    type ConnectInfo = Arc<Holder>;
    fn connect_info(&self) -> Arc<Holder> {
        self.holder.clone()
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.holder.closed(cx.waker()) {
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

#[cfg(test)]
mod tests {
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
