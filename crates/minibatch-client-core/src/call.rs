//! The calls that return minibatches, on one connection.
//!
//! A GetBatch may busy-poll its socket while it waits ([`Config::busy_poll`],
//! off by default).
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use grpc_frames::MessageReader;
use prost::Message as _;
use tensor_chunks::{proto, Assembler, Batch, ChunkError, Expect, Known, TensorChunk};
use tonic::body::Body;
use tonic::transport::Channel;
use tonic::Status;

use crate::{ClientError, Config, GET_BATCH, STREAM_BATCHES};

/// A GetBatch or StreamBatches call.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    GetBatch(&'a proto::GetBatchRequest),
    StreamBatches(&'a proto::StreamBatchesRequest),
    /// A call given as its method path and encoded request (as the Python
    /// client hands it to the native transport); the request is decoded
    /// only to learn its bounds, and sent as given.
    Encoded {
        path: &'a str,
        request: &'a [u8],
    },
}

/// What the client knows about the server beyond its configuration.
#[derive(Debug)]
struct Learned {
    /// The configured message limit, and the one in force (lowered to the
    /// server's advertised limit once known).
    configured_max_message: usize,
    max_message: usize,
    max_example_bytes: u64,
    info: Option<Arc<proto::DatasetInfo>>,
}

/// One HTTP/2 connection to a server (a tonic channel) with the client's
/// bounds. Clones share the connection and what was learned about the
/// server ([`Connection::learn`]).
#[derive(Clone)]
pub struct Connection {
    channel: Channel,
    uri: String,
    auth: Option<http::HeaderValue>,
    learned: Arc<RwLock<Learned>>,
    /// [`Config::busy_poll`].
    busy_poll: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("uri", &self.uri)
            .field("max_message_bytes", &self.max_message_bytes())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects now: a server that cannot be reached is an error here.
    pub async fn connect(cfg: &Config) -> Result<Self, ClientError> {
        let ep = cfg.endpoint()?;
        let channel = ep.connect().await.map_err(|source| ClientError::Connect {
            addr: cfg.uri(),
            source,
        })?;
        Self::with_channel(cfg, channel)
    }

    /// Connects on first use (a server that cannot be reached fails that
    /// call with UNAVAILABLE, as grpcio does). Must be called within a
    /// tokio runtime's context.
    pub fn lazy(cfg: &Config) -> Result<Self, ClientError> {
        let channel = cfg.endpoint()?.connect_lazy();
        Self::with_channel(cfg, channel)
    }

    fn with_channel(cfg: &Config, channel: Channel) -> Result<Self, ClientError> {
        Ok(Self {
            channel,
            uri: cfg.uri(),
            auth: cfg.auth()?,
            busy_poll: cfg.busy_poll,
            learned: Arc::new(RwLock::new(Learned {
                configured_max_message: cfg.max_message_bytes,
                max_message: cfg.max_message_bytes,
                max_example_bytes: cfg.max_example_bytes,
                info: None,
            })),
        })
    }

    /// The channel, for calls made with tonic (GetInfo, health).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The URI dialed.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The `authorization` header sent on every call, if a token was set.
    pub fn auth(&self) -> Option<&http::HeaderValue> {
        self.auth.as_ref()
    }

    fn learned(&self) -> std::sync::RwLockReadGuard<'_, Learned> {
        self.learned.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Largest response message accepted now.
    pub fn max_message_bytes(&self) -> usize {
        self.learned().max_message
    }

    /// The server's GetInfo answer, if learned.
    pub fn info(&self) -> Option<Arc<proto::DatasetInfo>> {
        self.learned().info.clone()
    }

    /// Learns the server's GetInfo answer: from then on minibatches are
    /// held to the dataset's exact shapes, stored dtypes and epoch lengths,
    /// and messages to the server's advertised limit (never above the
    /// configured one).
    pub fn learn(&self, info: proto::DatasetInfo) {
        let mut l = self.learned.write().unwrap_or_else(|e| e.into_inner());
        let advertised = info
            .limits
            .as_ref()
            .map_or(0, |l| l.max_message_bytes as usize);
        l.max_message = match advertised {
            0 => l.configured_max_message,
            n => n.min(l.configured_max_message),
        };
        l.info = Some(Arc::new(info));
    }

    /// The bounds of `req`, from what is known now.
    pub fn expect(&self, req: &Request<'_>) -> Result<Expect, ClientError> {
        let l = self.learned();
        let known = Known {
            info: l.info.as_deref(),
            max_example_bytes: l.max_example_bytes,
        };
        Ok(match *req {
            Request::GetBatch(r) => Expect::get_batch(r, known),
            Request::StreamBatches(r) => Expect::stream_batches(r, known),
            Request::Encoded { path, request } => Expect::for_call(path, request, known)
                .map_err(|e| {
                    ClientError::Config(format!("the {path} request is not valid protobuf: {e}"))
                })?
                .ok_or_else(|| {
                    ClientError::Config(format!(
                        "{path} is not a method that returns minibatches \
                         (GetBatch or StreamBatches)"
                    ))
                })?,
        })
    }

    /// Starts a unary-request, server-streaming call and returns the reader
    /// of its response messages (each at most
    /// [`Connection::max_message_bytes`]). `metadata` goes into the request
    /// headers, with the configured token.
    pub async fn messages(
        &mut self,
        path: &str,
        request: &[u8],
        mut metadata: http::HeaderMap,
    ) -> Result<MessageReader<Body>, Status> {
        if let Some(a) = &self.auth {
            metadata.insert(http::header::AUTHORIZATION, a.clone());
        }
        let max = self.max_message_bytes();
        let req = grpc_frames::request(path, request, metadata.clone())?;
        match grpc_frames::call(&mut self.channel, req, max).await {
            // Once, on a new connection: every call here is an idempotent
            // read, and a connection can die while idle without the client
            // noticing. The server closes connections that leave its
            // keepalive pings unanswered (30 s + 10 s), and the native
            // transport's runtime runs only during calls, so a trainer that
            // paused longer (an evaluation between epochs) found its next
            // call failing with "broken pipe" (seen in CI).
            Err(st) if grpc_frames::no_response(&st) => {
                let req = grpc_frames::request(path, request, metadata)?;
                grpc_frames::call(&mut self.channel, req, max).await
            }
            r => r,
        }
    }

    /// Starts a GetBatch or StreamBatches call: its minibatches, checked
    /// against what `req` asked for.
    pub async fn stream(
        &mut self,
        req: Request<'_>,
        metadata: http::HeaderMap,
        verify_crc: bool,
    ) -> Result<BatchStream, ClientError> {
        let expect = self.expect(&req)?;
        let (path, body): (&str, Cow<'_, [u8]>) = match req {
            Request::GetBatch(r) => (GET_BATCH, r.encode_to_vec().into()),
            Request::StreamBatches(r) => (STREAM_BATCHES, r.encode_to_vec().into()),
            Request::Encoded { path, request } => (path, request.into()),
        };
        let reader = self.messages(path, &body, metadata).await?;
        Ok(BatchStream::new(reader, expect, verify_crc))
    }

    /// A call that returns exactly one minibatch (GetBatch): the minibatch,
    /// once the stream has ended OK after it.
    pub async fn one_batch(
        &mut self,
        req: Request<'_>,
        metadata: http::HeaderMap,
        verify_crc: bool,
    ) -> Result<Batch, ClientError> {
        let budget = self.busy_poll;
        let call = async { self.stream(req, metadata, verify_crc).await?.one().await };
        if budget.is_zero() {
            call.await
        } else {
            busy_poll(call, budget).await
        }
    }
}

/// Runs `fut`, yielding to the runtime rather than sleeping while it is
/// pending, for at most `budget` (see the module docs); then awaits it.
async fn busy_poll<F: Future>(fut: F, budget: Duration) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let until = Instant::now() + budget;
    loop {
        let polled = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
        if let Poll::Ready(out) = polled {
            return out;
        }
        if Instant::now() >= until {
            return fut.await;
        }
        // Lets the server run first when it shares this core.
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
}

/// The minibatches of one call, each checked and reassembled by
/// `tensor_chunks::Assembler` from the messages read by `grpc_frames` (a
/// chunk's `data` that came in a DATA frame of its own, as minibatchd sends
/// it, is that frame's bytes, not a copy). Ends after the first error;
/// dropping it cancels the call (RST_STREAM).
pub struct BatchStream {
    reader: MessageReader<Body>,
    chunks: Assembler,
    done: bool,
}

impl BatchStream {
    /// Reassembles the messages `reader` yields, bounded by `expect`.
    pub fn new(reader: MessageReader<Body>, expect: Expect, verify_crc: bool) -> Self {
        Self {
            reader,
            chunks: Assembler::new(expect, verify_crc),
            done: false,
        }
    }

    /// The reassembly state (what was asked, minibatches so far).
    pub fn assembler(&self) -> &Assembler {
        &self.chunks
    }

    /// The next minibatch; None once the call ended OK (or after an error).
    pub fn poll_batch(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Batch, ClientError>>> {
        while !self.done {
            let m = match self.reader.poll_message(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(m) => m,
            };
            let got = match m {
                None => {
                    self.done = true;
                    return Poll::Ready(self.chunks.finish().err().map(|e| Err(e.into())));
                }
                Some(Err(st)) => Err(ClientError::Status(st)),
                Some(Ok(m)) => TensorChunk::decode(m)
                    .map_err(|e| ChunkError::Decode(e.to_string()))
                    .and_then(|c| self.chunks.push(c))
                    .map_err(ClientError::Chunk),
            };
            match got {
                Ok(None) => continue,
                Ok(Some(b)) => return Poll::Ready(Some(Ok(b))),
                Err(e) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
        Poll::Ready(None)
    }

    /// Awaits the next minibatch (see [`BatchStream::poll_batch`]).
    pub async fn next_batch(&mut self) -> Option<Result<Batch, ClientError>> {
        std::future::poll_fn(|cx| self.poll_batch(cx)).await
    }

    /// The call's one minibatch, once the stream has ended OK after it: the
    /// "exactly one minibatch" rule of GetBatch.
    pub async fn one(mut self) -> Result<Batch, ClientError> {
        let first = match self.next_batch().await {
            Some(b) => b?,
            None => return Err(ChunkError::TooFewBatches { got: 0, min: 1 }.into()),
        };
        match self.next_batch().await {
            None => Ok(first),
            Some(Err(e)) => Err(e),
            Some(Ok(b)) => Err(ChunkError::TooManyBatches {
                index: b.index,
                max: 1,
            }
            .into()),
        }
    }
}

impl futures_core::Stream for BatchStream {
    type Item = Result<Batch, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_batch(cx)
    }
}
