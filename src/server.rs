//! `run(listener, ...)`: the gRPC server with health, reflection and limits,
//! plus the metrics endpoint, on already-bound listeners so tests can bind
//! port 0 and get a real server in one line.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::metrics::Metrics;
use crate::proto;
use crate::service::{BatchService, Limits, Shared};
use crate::store::Dataset;

/// How often the shutdown drain looks at the number of open streams.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Server settings beyond the dataset.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub limits: Limits,
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
    let max = opts.limits.max_message_bytes;
    let svc = proto::batch_service_server::BatchServiceServer::new(BatchService::new(shared))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);

    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(svc)
        // Nodelay must be set on the accepted sockets themselves: the
        // builder's setting only applies to listeners tonic binds. Without
        // it small minibatches stall 40 ms on delayed ACKs.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
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
