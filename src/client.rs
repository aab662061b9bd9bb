//! The Rust client: connects with the transport settings measured fastest
//! here, reassembles chunked tensors, and verifies every chunk's CRC-32C.
//!
//! Connection settings, the GetBatch / StreamBatches calls, the bounds every
//! response is held to and the errors are `minibatch-client-core`
//! (crates/), which the Python client's native transport shares; this
//! module adds the typed API (dtypes as [`DType`], GetInfo and health
//! through tonic). Every size the server sends is bounded by the request:
//! rows by `size`, each example by the dataset's shape once [`Client::info`]
//! has been called (else by [`DEFAULT_MAX_EXAMPLE_BYTES`]), the number of
//! minibatches by the call, each message by [`DEFAULT_MAX_MESSAGE_BYTES`]
//! or the server's advertised limit. A stream beyond them ends in
//! [`ClientError::Chunk`] (what and where) before the client holds more.
//!
//! ```no_run
//! # async fn demo() -> Result<(), minibatchd::client::ClientError> {
//! use minibatchd::client::{Client, BatchRequest};
//! let mut c = Client::connect("http://127.0.0.1:50051").await?;
//! let b = c.get_batch(&BatchRequest::new("train", 2, 500)).await?;
//! assert_eq!(b.x.shape, vec![500, 784]);
//! # Ok(()) }
//! ```
use std::pin::Pin;
use std::task::{Context, Poll};

use minibatch_client_core::{proto as pb, BatchStream, ChunkError, Connection, Request};
use tokio_stream::Stream;
use tonic::transport::Channel;

use crate::proto;
use crate::proto::batch_service_client::BatchServiceClient;
use crate::store::DType;

pub use crate::attach::client::{AttachError, AttachOptions, Attachment, View};
pub use minibatch_client_core::{
    ClientError, Config, Tls, CONNECTION_WINDOW, DEFAULT_MAX_EXAMPLE_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES, MAX_FRAME_SIZE, STREAM_WINDOW, WHOLE_MESSAGES,
};

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
    /// Which dataset of the daemon; empty = its only one.
    pub dataset: String,
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

impl BatchRequest {
    fn order(&self) -> Option<pb::Order> {
        Some(self.order)
    }

    fn get_batch(&self) -> pb::GetBatchRequest {
        pb::GetBatchRequest {
            dataset: self.dataset.clone(),
            set: self.set.clone(),
            index: self.index,
            size: self.size,
            order: self.order(),
            x_dtype: dt(self.x_dtype),
            y_dtype: dt(self.y_dtype),
            with_indices: self.with_indices,
            max_chunk_bytes: self.max_chunk_bytes.unwrap_or(WHOLE_MESSAGES),
        }
    }

    fn stream_batches(&self) -> pb::StreamBatchesRequest {
        pb::StreamBatchesRequest {
            dataset: self.dataset.clone(),
            set: self.set.clone(),
            size: self.size,
            order: self.order(),
            start: self.index,
            count: self.count,
            x_dtype: dt(self.x_dtype),
            y_dtype: dt(self.y_dtype),
            with_indices: self.with_indices,
            max_chunk_bytes: self.max_chunk_bytes.unwrap_or(WHOLE_MESSAGES),
        }
    }
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
    /// Opt-in busy polling during each GetBatch, at most this long per call
    /// (zero: never; [`Config::busy_poll`]).
    pub busy_poll: std::time::Duration,
}

impl ClientOptions {
    /// The core's settings for `addr`, with these credentials (the PEM
    /// files read now) and the default bounds.
    pub fn config(&self, addr: &str) -> Result<Config, ClientError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| ClientError::Config(format!("cannot read {}: {e}", p.display())))
        };
        let tls = match &self.tls_ca {
            // Without a CA the connection is plaintext, and a client
            // certificate would silently go unused: a mistake, not a choice.
            None if self.tls_identity.is_some() => {
                return Err(ClientError::Config(
                    "a client certificate needs a CA to verify the server (--tls-ca, MINIBATCHD_TLS_CA): without it the connection is plaintext and the certificate would not be sent".into(),
                ))
            }
            None => None,
            Some(ca) => Some(Tls {
                ca_pem: Some(read(ca)?),
                identity_pem: match &self.tls_identity {
                    Some((cert, key)) => Some((read(cert)?, read(key)?)),
                    None => None,
                },
                domain: self.tls_domain.clone(),
            }),
        };
        let mut c = Config::new(addr);
        c.tls = tls;
        c.token = self.token.clone();
        c.busy_poll = self.busy_poll;
        Ok(c)
    }
}

/// A connection to one minibatchd server.
#[derive(Clone)]
pub struct Client {
    conn: Connection,
    /// GetInfo through tonic's generated client.
    inner: BatchServiceClient<Channel>,
    /// The token as metadata for `inner`.
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    /// Attaches to the daemon whose Unix socket is `path`, on this host:
    /// the dataset's memory mapped read-only, minibatches as zero-copy
    /// slices (README "Attach"; [`crate::attach::client`]). Blocking: one
    /// short exchange, then no I/O at all.
    pub fn attach(
        path: impl AsRef<std::path::Path>,
        opts: &AttachOptions,
    ) -> Result<Attachment, AttachError> {
        Attachment::open(path, opts)
    }

    /// Connects to `addr` (`http://host:port`, or bare `host:port`).
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_with(addr, &ClientOptions::default()).await
    }

    /// Connects with credentials and/or TLS.
    pub async fn connect_with(addr: &str, o: &ClientOptions) -> Result<Self, ClientError> {
        Self::connect_config(&o.config(addr)?).await
    }

    /// Connects with every setting of the core's [`Config`] (bounds
    /// included).
    pub async fn connect_config(cfg: &Config) -> Result<Self, ClientError> {
        let conn = Connection::connect(cfg).await?;
        let token = match conn.auth() {
            Some(a) => Some(
                a.to_str()
                    .ok()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| {
                        ClientError::Config("the token is not valid header text".into())
                    })?,
            ),
            None => None,
        };
        Ok(Self {
            inner: BatchServiceClient::new(conn.channel().clone())
                .max_decoding_message_size(conn.max_message_bytes()),
            conn,
            token,
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    /// The dataset and the server's limits. The client (and its clones)
    /// then holds every minibatch to the dataset's exact shapes and dtypes
    /// and the server's message limit.
    /// With several datasets the answer's `datasets` lists them, and its
    /// per-dataset fields are empty (see [`Client::info_of`]).
    pub async fn info(&mut self) -> Result<proto::DatasetInfo, ClientError> {
        self.info_of("").await
    }

    /// As [`Client::info`], describing dataset `dataset` (empty: the only one).
    pub async fn info_of(&mut self, dataset: &str) -> Result<proto::DatasetInfo, ClientError> {
        let req = proto::GetInfoRequest {
            dataset: dataset.into(),
        };
        let info = self.inner.get_info(self.request(req)).await?.into_inner();
        self.conn.learn(info.clone());
        Ok(info)
    }

    /// gRPC health of the BatchService (`grpc.health.v1`).
    pub async fn health(&mut self) -> Result<bool, ClientError> {
        let mut h = tonic_health::pb::health_client::HealthClient::new(self.conn.channel().clone());
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: minibatch_client_core::BATCH_SERVICE.into(),
            })
            .await?;
        Ok(r.into_inner().status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    }

    /// One minibatch.
    pub async fn get_batch(&mut self, r: &BatchRequest) -> Result<Batch, ClientError> {
        let req = r.get_batch();
        let b = self
            .conn
            .one_batch(Request::GetBatch(&req), http::HeaderMap::new(), true)
            .await?;
        typed_batch(b)
    }

    /// Minibatches `r.index ..` (`r.count` of them, 0 = to the end of the epoch).
    pub async fn stream_batches(
        &mut self,
        r: &BatchRequest,
    ) -> Result<impl Stream<Item = Result<Batch, ClientError>>, ClientError> {
        let req = r.stream_batches();
        let inner = self
            .conn
            .stream(Request::StreamBatches(&req), http::HeaderMap::new(), true)
            .await?;
        Ok(Batches {
            inner,
            failed: false,
        })
    }
}

/// A reassembled tensor with its dtype typed (the assembler accepted only
/// known dtypes, and shapes that make `total_bytes`).
fn typed(index: u64, t: tensor_chunks::Tensor) -> Result<TensorData, ClientError> {
    let Some(dtype) = proto::Dtype::try_from(t.dtype)
        .ok()
        .and_then(DType::from_proto)
    else {
        return Err(ChunkError::Dtype {
            index,
            tensor: t.name,
            got: t.dtype,
            expected: None,
        }
        .into());
    };
    Ok(TensorData {
        data: t.contiguous(),
        name: t.name,
        dtype,
        shape: t.shape,
        scale_divisor: t.scale_divisor,
    })
}

fn typed_batch(mut b: tensor_chunks::Batch) -> Result<Batch, ClientError> {
    let i = b.index;
    let mut take = |name: &'static str| {
        b.take(name).ok_or(ChunkError::Missing {
            index: i,
            tensor: name,
        })
    };
    let (x, y) = (take("x")?, take("y")?);
    Ok(Batch {
        index: i,
        x: typed(i, x)?,
        y: typed(i, y)?,
        indices: b.take("indices").map(|t| typed(i, t)).transpose()?,
    })
}

/// StreamBatches' minibatches, typed; ends after the first error.
struct Batches {
    inner: BatchStream,
    failed: bool,
}

impl Stream for Batches {
    type Item = Result<Batch, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        let got = match this.inner.poll_batch(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(got) => got.map(|r| r.and_then(typed_batch)),
        };
        this.failed = matches!(got, Some(Err(_)));
        Poll::Ready(got)
    }
}
