//! The Rust client against a hostile server: every size it may receive is
//! bounded by what it asked for, and a stream that goes beyond is refused
//! with a typed error at the first chunk past the bound, after which the
//! client cancels the call (the server sees its stream dropped).
//!
//! The server here is a real gRPC server on 127.0.0.1 (tonic, the daemon's
//! generated service trait) whose answers are scripted per test.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use minibatchd::client::{BatchRequest, Client, ClientError};
use minibatchd::proto::batch_service_server::{BatchService, BatchServiceServer};
use minibatchd::proto::{self, Dtype, TensorChunk};
use minibatchd::store::DType;
use tensor_chunks::ChunkError;
use tokio::sync::Notify;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

type Chunks = Pin<Box<dyn Stream<Item = Result<TensorChunk, Status>> + Send>>;

/// Scripted answers: the chunks for a call starting at minibatch `first`
/// of `size` examples.
type Script = dyn Fn(u64, u32) -> Box<dyn Iterator<Item = TensorChunk> + Send> + Send + Sync;

struct Hostile {
    info: proto::DatasetInfo,
    script: Arc<Script>,
    /// Notified when a response stream is dropped (the client cut it, or
    /// it ended).
    dropped: Arc<Notify>,
}

/// Notifies when dropped.
struct Guarded<S> {
    inner: S,
    dropped: Arc<Notify>,
}

impl<S: Stream + Unpin> Stream for Guarded<S> {
    type Item = S::Item;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl<S> Drop for Guarded<S> {
    fn drop(&mut self) {
        self.dropped.notify_one();
    }
}

impl Hostile {
    fn answer(&self, first: u64, size: u32) -> Chunks {
        let chunks = tokio_stream::iter((self.script)(first, size).map(Ok));
        Box::pin(Guarded {
            inner: chunks,
            dropped: self.dropped.clone(),
        })
    }
}

#[tonic::async_trait]
impl BatchService for Hostile {
    async fn get_info(
        &self,
        _: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::DatasetInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    type GetBatchStream = Chunks;

    async fn get_batch(
        &self,
        req: Request<proto::GetBatchRequest>,
    ) -> Result<Response<Chunks>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.answer(r.index, r.size)))
    }

    type StreamBatchesStream = Chunks;

    async fn stream_batches(
        &self,
        req: Request<proto::StreamBatchesRequest>,
    ) -> Result<Response<Chunks>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.answer(r.start, r.size)))
    }
}

/// GetInfo's answer: set "train" of 25 examples, x float32 [4], y int64,
/// messages up to 64 KiB.
fn info() -> proto::DatasetInfo {
    let t = |dtype: Dtype, shape: Vec<u64>| proto::TensorInfo {
        dtype: dtype as i32,
        shape,
        ..Default::default()
    };
    proto::DatasetInfo {
        sets: vec![proto::SetInfo {
            name: "train".into(),
            examples: 25,
            x: Some(t(Dtype::Float32, vec![4])),
            y: Some(t(Dtype::Int64, vec![])),
            classes: vec![],
        }],
        limits: Some(proto::Limits {
            max_batch_size: 1000,
            max_message_bytes: 64 << 10,
            chunk_bytes: 32 << 10,
        }),
        ..Default::default()
    }
}

/// A tensor as one chunk.
fn tensor(index: u64, name: &str, dtype: Dtype, shape: Vec<u64>, last: bool) -> TensorChunk {
    let size = if dtype == Dtype::Float32 { 4 } else { 8 };
    let n = shape.iter().product::<u64>() * size;
    let data = bytes::Bytes::from(vec![index as u8; n as usize]);
    TensorChunk {
        index,
        name: name.into(),
        dtype: dtype as i32,
        shape,
        offset: 0,
        crc32c: minibatchd::batch::crc::checksum(&data),
        data,
        total_bytes: n,
        scale_divisor: 0,
        last,
    }
}

/// A valid minibatch of `rows` examples: x float32 [rows, 4], y int64 [rows].
fn batch(index: u64, rows: u64) -> Vec<TensorChunk> {
    vec![
        tensor(index, "x", Dtype::Float32, vec![rows, 4], false),
        tensor(index, "y", Dtype::Int64, vec![rows], true),
    ]
}

/// Starts a server answering with `script`; returns its address and the
/// notifier of its dropped streams.
async fn serve(
    script: impl Fn(u64, u32) -> Box<dyn Iterator<Item = TensorChunk> + Send> + Send + Sync + 'static,
) -> (String, Arc<Notify>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let dropped = Arc::new(Notify::new());
    let svc = Hostile {
        info: info(),
        script: Arc::new(script),
        dropped: dropped.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BatchServiceServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    (addr, dropped)
}

/// Endless valid minibatches from `first` on.
fn endless(first: u64, size: u32) -> Box<dyn Iterator<Item = TensorChunk> + Send> {
    Box::new((first..).flat_map(move |i| batch(i, size as u64)))
}

fn chunk_error(e: ClientError) -> ChunkError {
    match e {
        ClientError::Chunk(c) => c,
        other => panic!("expected a chunk error, got {other}"),
    }
}

/// Minibatch `index` of `size` examples of "train" fails with a chunk error.
async fn get_batch_error(c: &mut Client, index: u64, size: u32) -> ChunkError {
    chunk_error(
        c.get_batch(&BatchRequest::new("train", index, size))
            .await
            .unwrap_err(),
    )
}

/// `head`, then chunks of its bytes at ever later offsets, forever.
fn endless_tensor(head: TensorChunk) -> Box<dyn Iterator<Item = TensorChunk> + Send> {
    Box::new(std::iter::successors(Some(head), |c| {
        let mut next = c.clone();
        next.offset += c.data.len() as u64;
        Some(next)
    }))
}

/// The server ended (dropped) the response stream: the client cancelled it.
async fn cut(dropped: &Notify) {
    // Not a timing assertion: a bound so that a regression fails instead
    // of hanging the test run.
    tokio::time::timeout(Duration::from_secs(60), dropped.notified())
        .await
        .expect("the client cancelled the stream");
}

#[tokio::test]
async fn total_bytes_of_2_pow_40_is_refused_before_any_bytes_are_kept() {
    let (addr, dropped) = serve(|first, size| {
        // x claims 2^40 bytes, then sends its "bytes" forever.
        let mut head = tensor(first, "x", Dtype::Float32, vec![size as u64, 4], false);
        head.total_bytes = 1 << 40;
        endless_tensor(head)
    })
    .await;
    let mut c = Client::connect(&addr).await.unwrap();
    let e = get_batch_error(&mut c, 0, 10).await;
    assert_eq!(
        e,
        ChunkError::TooLarge {
            index: 0,
            tensor: "x".into(),
            total_bytes: 1 << 40,
            rows: 10,
            row_bytes: minibatchd::client::DEFAULT_MAX_EXAMPLE_BYTES,
        },
        "{e}"
    );
    cut(&dropped).await;
    // Once GetInfo gave the shapes, the bound is the exact size: 10 rows of
    // 16 bytes.
    c.info().await.unwrap();
    let e = get_batch_error(&mut c, 0, 10).await;
    assert!(
        matches!(
            e,
            ChunkError::TooLarge {
                rows: 10,
                row_bytes: 16,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn an_endless_get_batch_is_cut_after_its_one_minibatch() {
    let (addr, dropped) = serve(endless).await;
    let mut c = Client::connect(&addr).await.unwrap();
    let e = get_batch_error(&mut c, 3, 5).await;
    assert_eq!(e, ChunkError::TooManyBatches { index: 4, max: 1 });
    cut(&dropped).await;
}

#[tokio::test]
async fn an_endless_stream_is_cut_after_the_requested_count() {
    let (addr, dropped) = serve(endless).await;
    let mut c = Client::connect(&addr).await.unwrap();
    let mut r = BatchRequest::new("train", 2, 5);
    r.count = 3;
    let got: Vec<_> = c.stream_batches(&r).await.unwrap().collect().await;
    assert_eq!(got.len(), 4, "three minibatches, one error, then the end");
    for (b, i) in got.iter().zip(2..5) {
        let b = b.as_ref().unwrap();
        assert_eq!((b.index, b.x.shape.as_slice()), (i, &[5, 4][..]));
    }
    let e = chunk_error(got.into_iter().last().unwrap().unwrap_err());
    assert_eq!(e, ChunkError::TooManyBatches { index: 5, max: 3 });
    cut(&dropped).await;

    // To the end of the epoch (count 0): unbounded in length while the
    // epoch is unknown, cut at its end once GetInfo told it (25 examples
    // in minibatches of 5: 5, 3 of them from minibatch 2 on).
    c.info().await.unwrap();
    let mut r = BatchRequest::new("train", 2, 5);
    r.count = 0;
    let got: Vec<_> = c.stream_batches(&r).await.unwrap().collect().await;
    assert_eq!(got.len(), 4);
    let e = chunk_error(got.into_iter().last().unwrap().unwrap_err());
    assert_eq!(e, ChunkError::TooManyBatches { index: 5, max: 3 });
    cut(&dropped).await;
}

#[tokio::test]
async fn endless_chunks_of_one_tensor_are_cut_at_its_total_bytes() {
    let (addr, dropped) = serve(|first, size| {
        let head = tensor(first, "x", Dtype::Float32, vec![size as u64, 4], false);
        endless_tensor(head)
    })
    .await;
    let mut c = Client::connect(&addr).await.unwrap();
    let e = get_batch_error(&mut c, 0, 10).await;
    assert_eq!(
        e,
        ChunkError::PastEnd {
            index: 0,
            tensor: "x".into(),
            offset: 160,
            len: 160,
            total_bytes: 160
        }
    );
    cut(&dropped).await;
}

#[tokio::test]
async fn shapes_and_dtypes_disagreeing_with_the_request_are_refused() {
    // Twice the rows asked for.
    let (addr, _) = serve(|first, size| Box::new(batch(first, 2 * size as u64).into_iter())).await;
    let mut c = Client::connect(&addr).await.unwrap();
    let e = get_batch_error(&mut c, 0, 10).await;
    assert!(
        matches!(
            e,
            ChunkError::Rows {
                rows: 20,
                expected: 10,
                exact: false,
                ..
            }
        ),
        "{e}"
    );

    // float32 where uint8 was asked for (and minibatch 2 always of 3 rows).
    let (addr, _) = serve(|first, size| {
        let rows = if first == 2 { 3 } else { size as u64 };
        Box::new(batch(first, rows).into_iter())
    })
    .await;
    let mut c = Client::connect(&addr).await.unwrap();
    let mut r = BatchRequest::new("train", 0, 10);
    r.x_dtype = Some(DType::U8);
    let e = chunk_error(c.get_batch(&r).await.unwrap_err());
    assert!(
        matches!(e, ChunkError::Dtype { got, expected: Some(want), .. }
            if got == Dtype::Float32 as i32 && want == Dtype::Uint8 as i32),
        "{e}"
    );
    // The same minibatch as asked is accepted, before and after GetInfo
    // (25 examples: minibatch 2 of 10 has exactly 5).
    let b = c
        .get_batch(&BatchRequest::new("train", 0, 10))
        .await
        .unwrap();
    assert_eq!(b.x.shape, vec![10, 4]);
    c.info().await.unwrap();
    let e = get_batch_error(&mut c, 2, 10).await;
    assert!(
        matches!(
            e,
            ChunkError::Rows {
                rows: 3,
                expected: 5,
                exact: true,
                ..
            }
        ),
        "{e}"
    );

    // An example shape other than GetInfo's.
    let (addr, _) = serve(|first, size| {
        let mut b = batch(first, size as u64);
        b[0].shape = vec![size as u64, 2, 2];
        Box::new(b.into_iter())
    })
    .await;
    let mut c = Client::connect(&addr).await.unwrap();
    c.get_batch(&BatchRequest::new("train", 0, 10))
        .await
        .expect("without GetInfo any example shape within the bound passes");
    c.info().await.unwrap();
    let e = get_batch_error(&mut c, 0, 10).await;
    assert_eq!(
        e,
        ChunkError::Shape {
            index: 0,
            tensor: "x".into(),
            shape: "[10, 2, 2]".into(),
            expected: "[10, 4]".into()
        }
    );
}

#[tokio::test]
async fn messages_are_bounded_by_the_servers_advertised_limit() {
    // One x of 8,192 float32 examples of 4: a 128 KiB message.
    let (addr, _) = serve(|first, size| Box::new(batch(first, size as u64).into_iter())).await;
    let mut c = Client::connect(&addr).await.unwrap();
    let r = BatchRequest::new("train", 0, 8192);
    c.get_batch(&r).await.expect("under the default 64 MiB");
    // GetInfo advertises 64 KiB messages: the client holds the server to it.
    c.info().await.unwrap();
    match c.get_batch(&r).await.unwrap_err() {
        ClientError::Status(s) => {
            assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s}")
        }
        other => panic!("expected RESOURCE_EXHAUSTED, got {other}"),
    }
}
