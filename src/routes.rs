//! BatchService's HTTP/2 routes. GetInfo goes through tonic's generated
//! server; GetBatch and StreamBatches, which carry the tensor bytes, are
//! framed here by hand so that those bytes go from the resident dataset to
//! the socket without a copy in user space.
//!
//! Why: tonic's codec encodes every message into one buffer, copying the
//! whole `data` field, and that buffer then grows (a second copy) when the
//! fields after `data` are appended. Profiles of GetBatch(500) showed the two
//! copies as 21 % of the server's CPU samples. Here each `TensorChunk` becomes
//! two HTTP/2 body frames: a small header (the gRPC length prefix and every
//! field but `data`, then `data`'s tag and length) and `data` itself as the
//! same `Bytes` the store handed out; h2 writes such large frames with
//! `writev` straight from those bytes.
//!
//! The handlers themselves are the ones tonic calls
//! ([`crate::service::BatchService`]'s trait methods): only the framing of
//! requests and responses differs, so status codes, limits and metrics stay
//! in one place. Field order on the wire differs from prost's (`data`, field
//! 6, comes after fields 7–10); protobuf parsers accept fields in any order.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use prost::Message;
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::access::BearerAuth;
use crate::proto;
use crate::proto::batch_service_server::{BatchService as _, BatchServiceServer};
use crate::service::{BatchService, BatchStream};

const GET_BATCH: &str = "/minibatch.v1.BatchService/GetBatch";
const STREAM_BATCHES: &str = "/minibatch.v1.BatchService/StreamBatches";

/// gRPC's per-message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// The BatchService as one routable tower service (see the module docs).
#[derive(Clone)]
pub struct BatchRoutes {
    svc: BatchService,
    tonic: BatchServiceServer<BatchService>,
    auth: Option<BearerAuth>,
    max_request: usize,
}

impl BatchRoutes {
    pub fn new(svc: BatchService, auth: Option<BearerAuth>, max_message_bytes: usize) -> Self {
        let tonic = BatchServiceServer::new(svc.clone())
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        Self {
            svc,
            tonic,
            auth,
            max_request: max_message_bytes,
        }
    }
}

impl NamedService for BatchRoutes {
    const NAME: &'static str = <BatchServiceServer<BatchService> as NamedService>::NAME;
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl tower_service::Service<http::Request<Body>> for BatchRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> BoxFuture {
        if let Some(auth) = &self.auth {
            if let Err(st) = auth.authorize(req.headers()) {
                return Box::pin(async move { Ok(st.into_http()) });
            }
        }
        let path = req.uri().path();
        if path != GET_BATCH && path != STREAM_BATCHES {
            return Box::pin(self.tonic.call(req));
        }
        let this = self.clone();
        Box::pin(async move { Ok(this.stream(req).await.unwrap_or_else(Status::into_http)) })
    }
}

impl BatchRoutes {
    /// Decodes the request, opens the stream and frames its messages.
    async fn stream(self, req: http::Request<Body>) -> Result<http::Response<Body>, Status> {
        let get = req.uri().path() == GET_BATCH;
        let msg = read_request(req.into_body(), self.max_request).await?;
        let bad = |e: prost::DecodeError| {
            Status::invalid_argument(format!("request message is not valid protobuf: {e}"))
        };
        let stream = if get {
            let r = proto::GetBatchRequest::decode(msg).map_err(bad)?;
            self.svc.get_batch(tonic::Request::new(r)).await?
        } else {
            let r = proto::StreamBatchesRequest::decode(msg).map_err(bad)?;
            self.svc.stream_batches(tonic::Request::new(r)).await?
        }
        .into_inner();
        Ok(http::Response::builder()
            .status(200)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(Body::new(ChunkBody {
                stream,
                data: None,
                done: false,
            }))
            .expect("static response parts are valid"))
    }
}

/// Reads the one request message of a unary-request call, refusing a
/// declared length over `limit` before buffering it.
async fn read_request(mut body: Body, limit: usize) -> Result<Bytes, Status> {
    let mut buf = BytesMut::new();
    let mut want = PREFIX;
    while buf.len() < want {
        let frame = std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx))
            .await
            .transpose()?;
        let Some(frame) = frame else {
            return Err(Status::invalid_argument(if buf.is_empty() {
                "the request holds no message".to_string()
            } else {
                format!(
                    "the request message ends early: {} of {want} bytes (gRPC prefix included)",
                    buf.len()
                )
            }));
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
        if want == PREFIX && buf.len() >= PREFIX {
            if buf[0] != 0 {
                return Err(Status::unimplemented(
                    "compressed request messages are not supported: send them uncompressed",
                ));
            }
            let len = u32::from_be_bytes(buf[1..PREFIX].try_into().unwrap()) as usize;
            if len > limit {
                return Err(Status::new(
                    Code::OutOfRange,
                    format!("request message of {len} bytes exceeds the limit of {limit} bytes"),
                ));
            }
            want = PREFIX + len;
        }
    }
    Ok(buf.freeze().slice(PREFIX..want))
}

/// The response body of a streaming call: each `TensorChunk` of the
/// [`BatchStream`] as a header frame and a data frame, then the trailers.
struct ChunkBody {
    stream: BatchStream,
    /// The `data` of the message whose header went out last.
    data: Option<Bytes>,
    done: bool,
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(d) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        let status = match Pin::new(&mut this.stream).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                let (head, data) = encode(chunk);
                this.data = (!data.is_empty()).then_some(data);
                return Poll::Ready(Some(Ok(Frame::data(head))));
            }
            Poll::Ready(Some(Err(st))) => st,
            Poll::Ready(None) => Status::ok(""),
        };
        this.done = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(e) = status.add_header(&mut trailers) {
            trailers.clear();
            let _ = Status::internal(format!("unsendable status: {e}")).add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        false
    }
}

/// Splits `chunk` into the bytes before its `data` (gRPC prefix, the other
/// fields, `data`'s key and length) and `data` itself, untouched.
fn encode(mut chunk: proto::TensorChunk) -> (Bytes, Bytes) {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    const DATA_FIELD: u32 = 6;
    let data = std::mem::take(&mut chunk.data);
    let data_len = if data.is_empty() {
        0
    } else {
        key_len(DATA_FIELD) + encoded_len_varint(data.len() as u64) + data.len()
    };
    let len = chunk.encoded_len() + data_len;
    let mut head = BytesMut::with_capacity(PREFIX + len - data.len());
    head.put_u8(0);
    head.put_u32(len as u32);
    chunk
        .encode(&mut head)
        .expect("capacity reserved for the encoded length");
    if !data.is_empty() {
        encode_key(DATA_FIELD, WireType::LengthDelimited, &mut head);
        encode_varint(data.len() as u64, &mut head);
    }
    (head.freeze(), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two parts, joined, are a message prost (any protobuf parser)
    /// decodes to the chunk that went in.
    #[test]
    fn hand_framed_chunks_decode_as_the_original() {
        for data in [
            Bytes::new(),
            Bytes::from_static(b"x"),
            Bytes::from(vec![7u8; 300_000]),
        ] {
            let chunk = proto::TensorChunk {
                index: 3,
                name: "x".into(),
                dtype: proto::Dtype::Float32 as i32,
                shape: vec![2, 784],
                offset: 12,
                data: data.clone(),
                crc32c: 99,
                total_bytes: 1 << 40,
                scale_divisor: 256,
                last: true,
            };
            let (head, d) = encode(chunk.clone());
            assert_eq!(d, data);
            assert_eq!(head[0], 0, "uncompressed");
            let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
            let mut msg = head[5..].to_vec();
            msg.extend_from_slice(&d);
            assert_eq!(msg.len(), len, "prefix length covers header and data");
            assert_eq!(proto::TensorChunk::decode(&msg[..]).unwrap(), chunk);
            // ... and so does the clients' hand-written mirror of the message.
            let mirror = tensor_chunks::TensorChunk::decode(&msg[..]).unwrap();
            assert_eq!(
                (
                    mirror.index,
                    mirror.name.as_str(),
                    mirror.dtype,
                    &mirror.shape[..]
                ),
                (
                    chunk.index,
                    chunk.name.as_str(),
                    chunk.dtype,
                    &chunk.shape[..]
                )
            );
            assert_eq!(
                (
                    mirror.offset,
                    &mirror.data,
                    mirror.crc32c,
                    mirror.total_bytes
                ),
                (chunk.offset, &chunk.data, chunk.crc32c, chunk.total_bytes)
            );
            assert_eq!(
                (mirror.scale_divisor, mirror.last),
                (chunk.scale_divisor, chunk.last)
            );
        }
    }
}
