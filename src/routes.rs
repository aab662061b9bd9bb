//! BatchService over HTTP/2: one tower service that checks the bearer
//! token, reads the one request message (bounded in size, time and
//! memory), calls [`BatchService`] and frames its answer: GetInfo as one
//! message, GetBatch and StreamBatches as the [`BatchStream`]'s frames, so
//! tensor bytes go from the resident dataset to the socket without a copy
//! in user space (see `batch::frame`). Errors leave as gRPC statuses
//! through the one `ServeError` → `Status` table.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::Frame as BodyFrame;
use prost::Message;
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;

use std::sync::Arc;
use std::time::Instant;

use crate::access::BearerAuth;
use crate::batch::budget::{Holder, MAX_CONNECTION_REQUEST_BYTES};
use crate::batch::frame::{self, PREFIX};
use crate::batch::stream::BatchStream;
use crate::error::ServeError;
use crate::proto;
use crate::service::BatchService;

/// The gRPC service name and method paths, generated from the .proto
/// (crates/tensor-chunks), as both clients use them.
pub use tensor_chunks::BATCH_SERVICE as SERVICE;
use tensor_chunks::{GET_BATCH, GET_INFO, STREAM_BATCHES};

/// Largest request message: BatchService requests are a set name and a
/// few integers (under 100 bytes in practice). 64 KiB leaves room for any
/// sane name while bounding what a connection's streams can make the
/// server buffer (an audit held 640 MB with 2 connections × 64 streams ×
/// 4 MiB partial requests when the message limit applied).
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// The BatchService as one routable tower service (see the module docs).
#[derive(Clone)]
pub struct BatchRoutes {
    svc: BatchService,
    auth: Option<BearerAuth>,
}

impl BatchRoutes {
    pub fn new(svc: BatchService, auth: Option<BearerAuth>) -> Self {
        Self { svc, auth }
    }
}

impl NamedService for BatchRoutes {
    const NAME: &'static str = SERVICE;
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
        let this = self.clone();
        Box::pin(async move { Ok(this.answer(req).await.unwrap_or_else(Status::into_http)) })
    }
}

impl BatchRoutes {
    async fn answer(self, req: http::Request<Body>) -> Result<http::Response<Body>, Status> {
        let path = req.uri().path().to_string();
        if ![GET_INFO, GET_BATCH, STREAM_BATCHES].contains(&path.as_str()) {
            return Err(Status::unimplemented(format!(
                "{SERVICE} has no method {:?}",
                path.rsplit('/').next().unwrap_or_default()
            )));
        }
        // The connection, as the server registered it (see `server`).
        let conn = req.extensions().get::<crate::server::ConnInfo>().cloned();
        let holder = conn.as_ref().map(|c| c.holder.clone());
        let caller = crate::status::Caller::of(conn.as_ref().map(|c| &c.peer), req.headers());
        let t0 = Instant::now();
        let limit = self.svc.catalog().limits.request_timeout;
        let msg = tokio::time::timeout(limit, read_request(req.into_body(), holder.as_ref()))
            .await
            .map_err(|_| ServeError::RequestTimeout(limit))
            .and_then(|r| r)
            .inspect_err(|e| {
                // Refused before the service saw it: counted here.
                let method = path.rsplit('/').next().unwrap_or_default();
                self.svc.record(method, t0, Some(e));
            })?;
        let bad = |e: prost::DecodeError| {
            ServeError::BadRequest(format!("request message is not valid protobuf: {e}"))
        };
        let body = match path.as_str() {
            GET_INFO => {
                let r = proto::GetInfoRequest::decode(msg).map_err(bad)?;
                let info = self.svc.info(r).await?;
                Body::new(ChunkBody::unary(frame::message(&info)))
            }
            GET_BATCH => {
                let r = proto::GetBatchRequest::decode(msg).map_err(bad)?;
                let shown = caller.stream("GetBatch", &r.set, r.size, r.order.as_ref());
                let s = self.svc.get_batch(r, holder).await?.shown(shown);
                Body::new(ChunkBody::stream(s))
            }
            _ => {
                let r = proto::StreamBatchesRequest::decode(msg).map_err(bad)?;
                let shown = caller.stream("StreamBatches", &r.set, r.size, r.order.as_ref());
                let s = self.svc.stream_batches(r, holder).await?.shown(shown);
                Body::new(ChunkBody::stream(s))
            }
        };
        Ok(http::Response::builder()
            .status(200)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(body)
            .expect("static response parts are valid"))
    }
}

/// Reads the one request message of a unary-request call: refuses a
/// declared length over [`MAX_REQUEST_BYTES`] before buffering it, and
/// holds the buffer against the connection's request allowance.
async fn read_request(mut body: Body, holder: Option<&Arc<Holder>>) -> Result<Bytes, ServeError> {
    let mut buf = BytesMut::new();
    let mut want = PREFIX;
    let mut _lease = None;
    while buf.len() < want {
        let frame = std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx))
            .await
            .transpose()
            .map_err(|e| ServeError::Transport(e.message().to_string()))?;
        let Some(frame) = frame else {
            return Err(ServeError::BadRequest(if buf.is_empty() {
                "the request holds no message".to_string()
            } else {
                format!(
                    "the request message ends early: {} of {want} bytes (gRPC prefix included)",
                    buf.len()
                )
            }));
        };
        if let Ok(data) = frame.into_data() {
            // Bounded: h2 caps a DATA frame at the server's max frame size
            // (16 KiB), and bytes past the message are dropped below.
            buf.extend_from_slice(&data);
        }
        if want == PREFIX && buf.len() >= PREFIX {
            let prefix = grpc_frames::Prefix::parse(buf[..PREFIX].try_into().unwrap());
            if prefix.flag != 0 {
                return Err(ServeError::Compressed);
            }
            let len = prefix.len as usize;
            if len > MAX_REQUEST_BYTES {
                return Err(ServeError::RequestTooLarge {
                    len,
                    limit: MAX_REQUEST_BYTES,
                });
            }
            want = PREFIX + len;
            if let Some(h) = holder {
                _lease = Some(h.take_request(want).ok_or(ServeError::ConnectionRequests {
                    limit: MAX_CONNECTION_REQUEST_BYTES,
                })?);
            }
        }
        buf.truncate(want);
    }
    Ok(buf.freeze().slice(PREFIX..want))
}

/// A response body: each message as its frames, then the trailers.
struct ChunkBody {
    messages: Messages,
    /// The `data` of the message whose head went out last.
    data: Option<Bytes>,
    done: bool,
}

enum Messages {
    One(Option<Bytes>),
    Stream(Box<BatchStream>),
}

impl ChunkBody {
    fn unary(message: Bytes) -> Self {
        Self {
            messages: Messages::One(Some(message)),
            data: None,
            done: false,
        }
    }

    fn stream(s: BatchStream) -> Self {
        Self {
            messages: Messages::Stream(Box::new(s)),
            data: None,
            done: false,
        }
    }
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(d) = this.data.take() {
            return Poll::Ready(Some(Ok(BodyFrame::data(d))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        let status = match &mut this.messages {
            Messages::One(m) => match m.take() {
                Some(m) => return Poll::Ready(Some(Ok(BodyFrame::data(m)))),
                None => Status::ok(""),
            },
            Messages::Stream(s) => match Pin::new(s.as_mut()).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(f))) => {
                    this.data = (!f.data.is_empty()).then_some(f.data);
                    return Poll::Ready(Some(Ok(BodyFrame::data(f.head))));
                }
                Poll::Ready(Some(Err(e))) => Status::from(e),
                Poll::Ready(None) => Status::ok(""),
            },
        };
        this.done = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(e) = status.add_header(&mut trailers) {
            trailers.clear();
            let _ = Status::internal(format!("unsendable status: {e}")).add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(BodyFrame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: Vec<&'static [u8]>) -> Body {
        let frames = parts
            .into_iter()
            .map(|p| Ok::<_, Status>(BodyFrame::data(Bytes::from_static(p))));
        Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    #[tokio::test]
    async fn reads_a_message_split_across_frames_and_drops_extra_bytes() {
        let msg = read_request(
            body(vec![b"\x00\x00\x00", b"\x00\x03ab", b"cTRAILING"]),
            None,
        )
        .await
        .unwrap();
        assert_eq!(&msg[..], b"abc");
    }

    #[tokio::test]
    async fn refuses_bad_requests_with_their_reason() {
        let cases: Vec<(Vec<&'static [u8]>, &str)> = vec![
            (vec![], "holds no message"),
            (vec![b"\x00\x00\x00\x00\x09ab"], "ends early: 7 of 14"),
            (vec![b"\x01\x00\x00\x00\x01a"], "compressed"),
            (vec![b"\x00\x7f\xff\xff\xff"], "exceeds the limit of 65536"),
        ];
        for (parts, text) in cases {
            let e = read_request(body(parts), None).await.unwrap_err();
            assert!(e.to_string().contains(text), "{e} lacks {text:?}");
        }
        // Past the connection's allowance for requests being read: refused,
        // not buffered.
        let h = Arc::new(Holder::default());
        let held = h.take_request(MAX_CONNECTION_REQUEST_BYTES - 8).unwrap();
        let e = read_request(body(vec![b"\x00\x00\x00\x00\x10"]), Some(&h))
            .await
            .unwrap_err();
        assert!(matches!(e, ServeError::ConnectionRequests { .. }), "{e}");
        drop(held);
        let msg = read_request(body(vec![b"\x00\x00\x00\x00\x01", b"z"]), Some(&h))
            .await
            .unwrap();
        assert_eq!(&msg[..], b"z");
    }
}
