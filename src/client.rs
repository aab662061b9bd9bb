//! The Rust client: connects with the transport settings measured fastest
//! here, reassembles chunked tensors, and verifies every chunk's CRC-32C.
//!
//! ```no_run
//! # async fn demo() -> Result<(), minibatchd::client::ClientError> {
//! use minibatchd::client::{Client, BatchRequest};
//! let mut c = Client::connect("http://127.0.0.1:50051").await?;
//! let b = c.get_batch(&BatchRequest::new("train", 2, 500)).await?;
//! assert_eq!(b.x.shape, vec![500, 784]);
//! # Ok(()) }
//! ```
use std::time::Duration;

use grpc_frames::MessageReader;
use prost::Message as _;
use tensor_chunks::TensorChunk;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint};

use crate::proto;
use crate::proto::batch_service_client::BatchServiceClient;
use crate::store::DType;

/// HTTP/2 max frame size the client advertises. The server's DATA frames are
/// bounded by it; 16 KiB (the default) halves throughput here. With the
/// server's zero-copy framing, 2 MiB (a 500-image float32 minibatch in one
/// frame) measured best for GetBatch(500): 1.43–1.48 GB/s against 1.10 at
/// 512 KiB and 1.29–1.37 at 4 MiB, StreamBatches the same within noise
/// (BENCHMARKS.md, "What profiling changed").
pub const MAX_FRAME_SIZE: u32 = 2 << 20;

/// Flow-control windows: a few minibatches in flight per stream.
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// Largest message accepted from the server (the server's own default).
pub const MAX_DECODE: usize = 4 << 20;

/// Chunk size this client asks for: as large as its message limit allows,
/// so a minibatch under ~4 MB arrives as one message that becomes the
/// tensor without a copy (the server's 1 MiB default suits Python clients,
/// for which bigger messages measured slower).
pub const WHOLE_MESSAGES: u32 = (MAX_DECODE - 4096) as u32;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("invalid address {0:?}")]
    Address(String),
    #[error("server answered {code:?}: {message}", code = .0.code(), message = .0.message())]
    Status(#[from] tonic::Status),
    #[error("minibatch {index}, tensor {name}: chunk at offset {offset} failed its CRC-32C check (data corrupted in transit)")]
    Checksum {
        index: u64,
        name: String,
        offset: u64,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// One reassembled tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Little-endian, C-order bytes. A tensor that came in one message is
    /// that message's buffer, not a copy.
    pub data: bytes::Bytes,
    /// For uint8 standing for floats: value = float32(byte) / divisor.
    pub scale_divisor: u32,
}

/// One minibatch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub index: u64,
    pub x: TensorData,
    pub y: TensorData,
    /// Example indices, when the request asked for them.
    pub indices: Option<TensorData>,
}

/// Everything GetBatch and StreamBatches take, with defaults.
#[derive(Debug, Clone, Default)]
pub struct BatchRequest {
    pub set: String,
    pub index: u64,
    pub size: u32,
    pub order: proto::Order,
    pub x_dtype: Option<DType>,
    pub y_dtype: Option<DType>,
    pub with_indices: bool,
    /// StreamBatches only: minibatches to send (0 = to the end).
    pub count: u64,
    /// Largest data per message to ask for; None = [`WHOLE_MESSAGES`].
    pub max_chunk_bytes: Option<u32>,
}

impl BatchRequest {
    pub fn new(set: &str, index: u64, size: u32) -> Self {
        Self {
            set: set.into(),
            index,
            size,
            ..Default::default()
        }
    }
}

fn dt(d: Option<DType>) -> i32 {
    d.map(|d| d.to_proto() as i32).unwrap_or(0)
}

/// How to reach a server that asks for credentials.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Sent as `authorization: Bearer <token>` on every call.
    pub token: Option<String>,
    /// PEM CA certificate to verify the server (turns TLS on).
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM certificate and key to present (mutual TLS).
    pub tls_identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Name to verify in the server certificate (default: the address's host).
    pub tls_domain: Option<String>,
}

/// A connection to one minibatchd server.
#[derive(Clone)]
pub struct Client {
    inner: BatchServiceClient<Channel>,
    channel: Channel,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// The same token as a header, for the calls made with `grpc_frames`.
    auth: Option<http::HeaderValue>,
}

const GET_BATCH: &str = "/minibatch.v1.BatchService/GetBatch";
const STREAM_BATCHES: &str = "/minibatch.v1.BatchService/StreamBatches";

impl Client {
    /// Connects to `addr` (`http://host:port`, or bare `host:port`).
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, &ClientOptions::default()).await
    }

    /// Connects with credentials and/or TLS.
    pub async fn connect_with(addr: &str, o: &ClientOptions) -> Result<Self, ClientError> {
        let scheme = if o.tls_ca.is_some() { "https" } else { "http" };
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("{scheme}://{addr}")
        };
        let mut ep =
            Endpoint::from_shared(uri.clone()).map_err(|_| ClientError::Address(addr.into()))?;
        if let Some(ca) = &o.tls_ca {
            let read = |p: &std::path::Path| {
                std::fs::read(p)
                    .map_err(|e| ClientError::Protocol(format!("cannot read {}: {e}", p.display())))
            };
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
            if let Some((cert, key)) = &o.tls_identity {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            if let Some(d) = &o.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            ep = ep.tls_config(tls).map_err(|source| ClientError::Connect {
                addr: uri.clone(),
                source,
            })?;
        }
        let bad_token = || ClientError::Protocol("the token is not valid header text".into());
        let (token, auth) = match &o.token {
            Some(t) => {
                let v = format!("Bearer {t}");
                (
                    Some(v.parse().map_err(|_| bad_token())?),
                    Some(http::HeaderValue::from_str(&v).map_err(|_| bad_token())?),
                )
            }
            None => (None, None),
        };
        let ep = ep
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .max_frame_size(MAX_FRAME_SIZE)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
        let channel = ep
            .connect()
            .await
            .map_err(|source| ClientError::Connect { addr: uri, source })?;
        Ok(Self {
            inner: BatchServiceClient::new(channel.clone()).max_decoding_message_size(MAX_DECODE),
            channel,
            token,
            auth,
        })
    }

    /// Starts a server-streaming call whose responses are `TensorChunk`s,
    /// read from the HTTP/2 frames without tonic's copy (see `grpc_frames`).
    async fn chunks(
        &mut self,
        path: &str,
        msg: &impl prost::Message,
    ) -> Result<Chunks, ClientError> {
        let mut headers = http::HeaderMap::new();
        if let Some(a) = &self.auth {
            headers.insert(http::header::AUTHORIZATION, a.clone());
        }
        let req = grpc_frames::request(path, &msg.encode_to_vec(), headers)?;
        let reader = grpc_frames::call(&mut self.channel, req, MAX_DECODE).await?;
        Ok(Chunks(reader))
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    pub async fn info(&mut self) -> Result<proto::DatasetInfo, ClientError> {
        Ok(self
            .inner
            .get_info(self.request(proto::GetInfoRequest {}))
            .await?
            .into_inner())
    }

    /// gRPC health of the BatchService (`grpc.health.v1`).
    pub async fn health(&mut self) -> Result<bool, ClientError> {
        let mut h = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: "minibatch.v1.BatchService".into(),
            })
            .await?;
        Ok(r.into_inner().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    }

    /// One minibatch.
    pub async fn get_batch(&mut self, r: &BatchRequest) -> Result<Batch, ClientError> {
        let req = proto::GetBatchRequest {
            set: r.set.clone(),
            index: r.index,
            size: r.size,
            order: Some(r.order),
            x_dtype: dt(r.x_dtype),
            y_dtype: dt(r.y_dtype),
            with_indices: r.with_indices,
            max_chunk_bytes: r.max_chunk_bytes.unwrap_or(WHOLE_MESSAGES),
        };
        let mut batches = assemble(self.chunks(GET_BATCH, &req).await?);
        let b = batches
            .next()
            .await
            .ok_or_else(|| ClientError::Protocol("stream ended without a minibatch".into()))??;
        if batches.next().await.is_some() {
            return Err(ClientError::Protocol(
                "GetBatch sent more than one minibatch".into(),
            ));
        }
        Ok(b)
    }

    /// Minibatches `r.index ..` (`r.count` of them, 0 = to the end of the epoch).
    pub async fn stream_batches(
        &mut self,
        r: &BatchRequest,
    ) -> Result<impl Stream<Item = Result<Batch, ClientError>>, ClientError> {
        let req = proto::StreamBatchesRequest {
            set: r.set.clone(),
            size: r.size,
            order: Some(r.order),
            start: r.index,
            count: r.count,
            x_dtype: dt(r.x_dtype),
            y_dtype: dt(r.y_dtype),
            with_indices: r.with_indices,
            max_chunk_bytes: r.max_chunk_bytes.unwrap_or(WHOLE_MESSAGES),
        };
        Ok(assemble(self.chunks(STREAM_BATCHES, &req).await?))
    }
}

/// The `TensorChunk`s of one call, decoded from the received frames: a
/// chunk's `data` that arrived in its own DATA frame (as minibatchd sends
/// it) is that frame's bytes, not a copy.
pub struct Chunks(MessageReader<tonic::body::Body>);

impl Stream for Chunks {
    type Item = Result<TensorChunk, tonic::Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_message(cx).map(|m| {
            m.map(|m| {
                m.and_then(|m| {
                    TensorChunk::decode(m).map_err(|e| {
                        tonic::Status::internal(format!(
                            "response message is not a valid TensorChunk: {e}"
                        ))
                    })
                })
            })
        })
    }
}

/// Turns a stream of chunks into a stream of verified minibatches.
pub fn assemble<S>(chunks: S) -> Assembler<S>
where
    S: Stream<Item = Result<TensorChunk, tonic::Status>> + Unpin,
{
    Assembler {
        inner: chunks,
        chunks: tensor_chunks::Assembler::new(true),
        done: false,
    }
}

/// Reassembles chunks into minibatches with `tensor_chunks` (CRC-32C,
/// offsets and order checked there), and types their tensors.
pub struct Assembler<S> {
    inner: S,
    chunks: tensor_chunks::Assembler,
    done: bool,
}

impl From<tensor_chunks::ChunkError> for ClientError {
    fn from(e: tensor_chunks::ChunkError) -> Self {
        match e {
            tensor_chunks::ChunkError::Checksum {
                index,
                name,
                offset,
            } => ClientError::Checksum {
                index,
                name,
                offset,
            },
            tensor_chunks::ChunkError::Protocol(m) => ClientError::Protocol(m),
        }
    }
}

/// A reassembled tensor with its dtype and shape checked against its bytes.
fn typed(t: tensor_chunks::Tensor) -> Result<TensorData, ClientError> {
    let Some(dtype) = proto::Dtype::try_from(t.dtype)
        .ok()
        .and_then(DType::from_proto)
    else {
        return Err(ClientError::Protocol(format!(
            "tensor {}: unknown dtype {}",
            t.name, t.dtype
        )));
    };
    let want = t
        .shape
        .iter()
        .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d));
    if want != Some(t.total_bytes) {
        return Err(ClientError::Protocol(format!(
            "tensor {}: shape {:?} of {dtype:?} does not make {} bytes",
            t.name, t.shape, t.total_bytes
        )));
    }
    Ok(TensorData {
        data: t.contiguous(),
        name: t.name,
        dtype,
        shape: t.shape,
        scale_divisor: t.scale_divisor,
    })
}

fn typed_batch(mut b: tensor_chunks::Batch) -> Result<Batch, ClientError> {
    let x = b.take("x").map(typed).transpose()?;
    let y = b.take("y").map(typed).transpose()?;
    let indices = b.take("indices").map(typed).transpose()?;
    match (x, y) {
        (Some(x), Some(y)) => Ok(Batch {
            index: b.index,
            x,
            y,
            indices,
        }),
        _ => Err(ClientError::Protocol(format!(
            "minibatch {} without x or y",
            b.index
        ))),
    }
}

impl<S> Stream for Assembler<S>
where
    S: Stream<Item = Result<TensorChunk, tonic::Status>> + Unpin,
{
    type Item = Result<Batch, ClientError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            let next = std::pin::Pin::new(&mut self.inner).poll_next(cx);
            let item = match next {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(self.chunks.finish().err().map(|e| Err(e.into())));
                }
                Poll::Ready(Some(Err(s))) => Err(ClientError::from(s)),
                Poll::Ready(Some(Ok(c))) => self.chunks.push(c).map_err(ClientError::from),
            };
            match item.and_then(|b| b.map(typed_batch).transpose()) {
                Ok(None) => continue,
                Ok(Some(b)) => return Poll::Ready(Some(Ok(b))),
                Err(e) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}
