//! `run(listener, ...)`: the gRPC server with health, reflection and limits,
//! plus the metrics endpoint, on already-bound listeners so tests can bind
//! port 0 and get a real server in one line.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};
use tonic::transport::Server;

use crate::metrics::Metrics;
use crate::proto;
use crate::service::{BatchService, Limits, Shared};
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
        }
    }
}

/// Checks option combinations that would make the server misbehave.
pub fn validate(o: &ServerOptions) -> Result<(), String> {
    let l = &o.limits;
    if l.chunk_bytes == 0 {
        return Err("chunk size must be at least 1 byte".into());
    }
    if l.chunk_bytes + crate::wire::MESSAGE_OVERHEAD > l.max_message_bytes {
        return Err(format!(
            "chunk size {} plus {} bytes of message fields exceeds the max message size {}",
            l.chunk_bytes,
            crate::wire::MESSAGE_OVERHEAD,
            l.max_message_bytes
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
/// NOT_SERVING (so balancers drain), stops accepting, lets in-flight streams
/// finish for up to `shutdown_grace`, and returns.
pub async fn run(
    listener: TcpListener,
    dataset: Arc<Dataset>,
    opts: ServerOptions,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    validate(&opts).map_err(anyhow::Error::msg)?;
    let shared = Shared::new(dataset, opts.limits, metrics.clone());
    {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("row-crcs".into())
            .spawn(move || s.compute_row_crcs())?;
    }
    if opts.eager_stats {
        let s = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = s.stats().await {
                tracing::error!(error = %e, "computing dataset statistics failed");
            }
        });
    }
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<proto::batch_service_server::BatchServiceServer<BatchService>>()
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
    let svc = crate::routes::BatchRoutes::new(
        BatchService::new(shared),
        auth,
        opts.limits.max_message_bytes,
    );

    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && opts.auth_token.is_none() && opts.tls.is_none() {
        tracing::warn!(%addr, "listening beyond loopback with neither TLS nor a bearer token: anyone who can reach this port can read the dataset");
    }
    let mut builder = Server::builder();
    if let Some(tls) = &opts.tls {
        builder = builder.tls_config(tls.server_config()?)?;
        tracing::info!(mtls = tls.client_ca.is_some(), "TLS on");
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = builder
        .tcp_nodelay(true)
        .max_concurrent_streams(opts.max_concurrent_streams)
        .http2_keepalive_interval(Some(opts.keepalive_interval))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(svc)
        .serve_with_incoming_shutdown(limited_incoming(listener, opts.max_connections), async {
            let _ = stop_rx.await;
        });
    tokio::pin!(serve);
    tracing::info!(%addr, "serving gRPC");
    tokio::select! {
        r = &mut serve => return r.map_err(Into::into),
        _ = shutdown => {}
    }
    tracing::info!(
        grace_s = opts.shutdown_grace.as_secs_f64(),
        "shutting down: health NOT_SERVING, finishing in-flight streams"
    );
    health
        .set_not_serving::<proto::batch_service_server::BatchServiceServer<BatchService>>()
        .await;
    // The server-wide status too, so probes that name no service drain.
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    // Drain first, then close: hyper's HTTP/2 graceful close can cut a
    // response body that is still streaming (seen in tests here), so the
    // server waits for its own streams to finish before it closes
    // connections. New requests are still answered while balancers notice
    // NOT_SERVING.
    let deadline = tokio::time::Instant::now() + opts.shutdown_grace;
    while metrics
        .active_streams
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::select! {
            r = &mut serve => return r.map_err(Into::into),
            _ = tokio::time::sleep(DRAIN_POLL) => {}
        }
    }
    let _ = stop_tx.send(());
    match tokio::time::timeout_at(
        deadline.max(tokio::time::Instant::now() + DRAIN_POLL),
        serve,
    )
    .await
    {
        Ok(r) => r?,
        Err(_) => tracing::warn!("shutdown grace period over; closing the remaining streams"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Accepted connections, at most `max` at once. Nodelay is set here: the
/// builder's setting only applies to listeners tonic binds itself, and
/// without it small minibatches stall 40 ms on delayed ACKs.
fn limited_incoming(
    listener: TcpListener,
    max: usize,
) -> impl Stream<Item = std::io::Result<LimitedConn>> {
    let slots = Arc::new(Semaphore::new(max));
    TcpIncoming::from(listener).with_nodelay(Some(true)).filter_map(move |conn| match conn {
        Err(e) => {
            // Accept errors (EMFILE, a reset before accept) must not end the server.
            tracing::warn!(error = %e, "accept failed");
            None
        }
        Ok(stream) => match slots.clone().try_acquire_owned() {
            Ok(permit) => Some(Ok(LimitedConn { stream, _permit: permit })),
            Err(_) => {
                tracing::warn!(peer = ?stream.peer_addr().ok(), max, "connection refused: --max-connections reached");
                None
            }
        },
    })
}

/// A connection that holds one of the `max_connections` slots until closed.
pub struct LimitedConn {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
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
