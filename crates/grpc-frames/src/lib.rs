//! gRPC response messages read straight from HTTP/2 DATA frames.
//!
//! Why: tonic's response decoder copies every DATA frame into one growing
//! buffer before it cuts messages out of it. For minibatchd's tensors that
//! copy was the largest user-space cost of a client (19 % of the Rust
//! client's CPU samples for GetBatch(500), more than the CRC checks). h2
//! already hands each DATA frame over as its own `Bytes` (a slice of the
//! socket read buffer); this crate keeps those frames as they are and
//! describes a message as the list of frame slices that hold it
//! ([`Segments`]). minibatchd's server sends a tensor chunk as two frames,
//! the message's other fields and the tensor bytes, so the tensor bytes of a
//! decoded message are the received frame itself, with no copy.
//!
//! Used by the daemon's Rust client (`minibatchd::client`) and by the Python
//! client's native transport (`clients/python/native`); both send requests
//! through a `tonic::transport::Channel` and read responses with
//! [`MessageReader`]. Status handling follows tonic's own client: a
//! `grpc-status` in the response headers (trailers-only response), else in
//! the trailers, else one inferred from the HTTP status; a stream that ends
//! without one is UNKNOWN, a message cut short INTERNAL.
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};
use tonic::{Code, Status};

/// gRPC's per-message prefix: a compression flag and a big-endian length.
pub const PREFIX: usize = 5;

/// One message's prefix (gRPC over HTTP/2, "Length-Prefixed-Message"): the
/// one place its layout is written down, for both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// The Compressed-Flag byte: 0 for an uncompressed message (all this
    /// project sends or accepts), 1 for a compressed one.
    pub flag: u8,
    /// The message's length in bytes, prefix excluded.
    pub len: u32,
}

impl Prefix {
    /// The prefix of an uncompressed message of `len` bytes; None when
    /// `len` does not fit the prefix's 32 bits.
    pub fn uncompressed(len: usize) -> Option<Self> {
        Some(Self {
            flag: 0,
            len: u32::try_from(len).ok()?,
        })
    }

    /// Reads a prefix from its 5 bytes.
    pub fn parse(b: [u8; PREFIX]) -> Self {
        Self {
            flag: b[0],
            len: u32::from_be_bytes([b[1], b[2], b[3], b[4]]),
        }
    }

    /// The prefix's 5 bytes.
    pub fn to_bytes(self) -> [u8; PREFIX] {
        let l = self.len.to_be_bytes();
        [self.flag, l[0], l[1], l[2], l[3]]
    }
}

/// Bytes held as a queue of received frames (or parts of frames).
///
/// As a [`Buf`], `copy_to_bytes` returns a slice of the front frame when
/// the requested bytes lie in it, so prost decodes a `bytes::Bytes` field
/// that fills a frame without copying it.
#[derive(Debug, Default, Clone)]
pub struct Segments {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl Segments {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a frame (empty ones are dropped).
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts.push_back(b);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The frames (or parts of frames) in order.
    pub fn parts(&self) -> impl ExactSizeIterator<Item = &Bytes> {
        self.parts.iter()
    }

    /// The first `n` bytes as their own `Segments` (whole frames moved, at
    /// most one frame split; no bytes copied).
    ///
    /// Panics if `n > self.len()`.
    pub fn split_to(&mut self, n: usize) -> Segments {
        assert!(n <= self.len, "split_to({n}) of {} bytes", self.len);
        let mut out = Segments::new();
        while out.len < n {
            let front = self.parts.front_mut().expect("length accounted");
            let want = n - out.len;
            if front.len() <= want {
                let b = self.parts.pop_front().expect("front exists");
                out.len += b.len();
                out.parts.push_back(b);
            } else {
                out.push(front.split_to(want));
            }
        }
        self.len -= n;
        out
    }

    /// The bytes as one contiguous buffer: the frame itself when there is
    /// one, else a copy.
    pub fn into_contiguous(mut self) -> Bytes {
        match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts.pop_front().expect("one part"),
            _ => self.copy_to_bytes(self.len),
        }
    }
}

impl Buf for Segments {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| &b[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance({cnt}) past {} bytes", self.len);
        self.len -= cnt;
        while cnt > 0 {
            let front = self.parts.front_mut().expect("length accounted");
            if front.len() <= cnt {
                cnt -= front.len();
                self.parts.pop_front();
            } else {
                front.advance(cnt);
                cnt = 0;
            }
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(
            len <= self.len,
            "copy_to_bytes({len}) of {} bytes",
            self.len
        );
        if let Some(front) = self.parts.front_mut() {
            if front.len() >= len {
                let b = front.split_to(len);
                if front.is_empty() {
                    self.parts.pop_front();
                }
                self.len -= len;
                return b;
            }
        }
        let mut out = BytesMut::with_capacity(len);
        out.put(self.take(len));
        out.freeze()
    }
}

/// A body that yields queued frames in order (a request: one data frame
/// holding its one message).
struct Queued(VecDeque<Frame<Bytes>>);

impl Body for Queued {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let data = self.0.iter().filter_map(Frame::data_ref);
        http_body::SizeHint::with_exact(data.map(|b| b.len() as u64).sum())
    }
}

/// A unary-request gRPC call to `path` (e.g. `/pkg.Service/Method`) carrying
/// the encoded `message`, with `metadata` added to the headers. The URI holds
/// only the path: a `tonic::transport::Channel` sets scheme and authority.
pub fn request(
    path: &str,
    message: &[u8],
    metadata: HeaderMap,
) -> Result<http::Request<tonic::body::Body>, Status> {
    let prefix = Prefix::uncompressed(message.len())
        .ok_or_else(|| Status::out_of_range("request message over 4 GiB"))?;
    let mut body = BytesMut::with_capacity(PREFIX + message.len());
    body.put_slice(&prefix.to_bytes());
    body.put_slice(message);
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(tonic::body::Body::new(Queued(VecDeque::from([
            Frame::data(body.freeze()),
        ]))))
        .map_err(|e| Status::invalid_argument(format!("bad request path {path:?}: {e}")))?;
    req.headers_mut().extend(metadata);
    Ok(req)
}

/// Sends `req` on `service` (e.g. a `tonic::transport::Channel`) and
/// returns the reader of its response messages.
///
/// Failing to get a response at all (connection refused or lost, TLS
/// handshake refused, stream refused) is UNAVAILABLE, as in other gRPC
/// clients: the server did not process the call, so retrying elsewhere is
/// safe.
pub async fn call<S, B>(
    service: &mut S,
    req: http::Request<tonic::body::Body>,
    max_message: usize,
) -> Result<MessageReader<B>, Status>
where
    S: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Error: std::error::Error,
    B: Body<Data = Bytes, Error = Status> + Unpin,
{
    let unavailable = |e: S::Error| Status::unavailable(format!("{NO_RESPONSE}{}", causes(&e)));
    std::future::poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(unavailable)?;
    let (head, body) = service.call(req).await.map_err(unavailable)?.into_parts();
    Ok(if check_head(&head)? {
        MessageReader::new(body, max_message)
    } else {
        MessageReader::ended(body)
    })
}

/// How [`call`]'s errors begin when no response came at all: the
/// connection failed (refused, reset, closed by the server while idle)
/// before a response head arrived.
pub const NO_RESPONSE: &str = "no response: ";

/// Whether `st` is [`call`]'s error for a call that got no response at all
/// (see [`NO_RESPONSE`]), which a client may retry on a new connection when
/// the call is idempotent.
pub fn no_response(st: &Status) -> bool {
    st.code() == tonic::Code::Unavailable && st.message().starts_with(NO_RESPONSE)
}

/// An error and its sources, "outer: inner: root" (transport errors say
/// little at the top: "transport error").
fn causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let c_s = c.to_string();
        if !s.ends_with(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        next = c.source();
    }
    s
}

/// Checks a response's head: the HTTP status, and a `grpc-status` sent in
/// the headers (a trailers-only response: an error, or an empty stream).
/// `Ok(true)` means messages may follow; `Ok(false)` that the call ended OK
/// with none.
pub fn check_head(head: &http::response::Parts) -> Result<bool, Status> {
    if let Some(st) = Status::from_header_map(&head.headers) {
        return if st.code() == Code::Ok {
            Ok(false)
        } else {
            Err(st)
        };
    }
    if head.status != http::StatusCode::OK {
        return Err(from_http_status(head.status));
    }
    Ok(true)
}

/// gRPC's mapping of HTTP statuses for responses without a `grpc-status`.
fn from_http_status(s: http::StatusCode) -> Status {
    use http::StatusCode as H;
    let code = match s {
        H::BAD_REQUEST => Code::Internal,
        H::UNAUTHORIZED => Code::Unauthenticated,
        H::FORBIDDEN => Code::PermissionDenied,
        H::NOT_FOUND => Code::Unimplemented,
        H::TOO_MANY_REQUESTS | H::BAD_GATEWAY | H::SERVICE_UNAVAILABLE | H::GATEWAY_TIMEOUT => {
            Code::Unavailable
        }
        _ => Code::Unknown,
    };
    Status::new(code, format!("HTTP status {s} without a gRPC status"))
}

/// Reads gRPC messages from a response body, each as the [`Segments`] of
/// the DATA frames that carried it, then the call's final status.
pub struct MessageReader<B> {
    body: B,
    buf: Segments,
    /// Length of the message being read, once its prefix is in.
    want: Option<usize>,
    max_message: usize,
    done: bool,
}

impl<B> MessageReader<B>
where
    B: Body<Data = Bytes, Error = Status> + Unpin,
{
    /// `max_message` bounds one message's length (RESOURCE_EXHAUSTED above it,
    /// as gRPC clients do), so a broken peer cannot make the reader buffer
    /// without limit.
    pub fn new(body: B, max_message: usize) -> Self {
        Self {
            body,
            buf: Segments::new(),
            want: None,
            max_message,
            done: false,
        }
    }

    /// A reader for a response whose head [`check_head`] found final.
    pub fn ended(body: B) -> Self {
        let mut r = Self::new(body, 0);
        r.done = true;
        r
    }

    /// The next message, `None` at the end of a call that ended OK, or the
    /// call's error status (after which it returns `None`).
    pub fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Segments, Status>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match self.take_message() {
                Ok(Some(m)) => return Poll::Ready(Some(Ok(m))),
                Ok(None) => {}
                Err(st) => return Poll::Ready(Some(Err(self.fail(st)))),
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(f) => f,
            };
            match frame {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => self.buf.push(data),
                    Err(f) => {
                        let trailers = f.into_trailers().unwrap_or_default();
                        let end = self.end(Some(&trailers));
                        return Poll::Ready(end.err().map(Err));
                    }
                },
                Some(Err(st)) => return Poll::Ready(Some(Err(self.fail(st)))),
                None => {
                    let end = self.end(None);
                    return Poll::Ready(end.err().map(Err));
                }
            }
        }
    }

    /// Awaits the next message (see [`Self::poll_message`]).
    pub async fn message(&mut self) -> Option<Result<Segments, Status>> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    fn fail(&mut self, st: Status) -> Status {
        self.done = true;
        st
    }

    /// Cuts the next whole message out of the buffered frames, if it is in.
    fn take_message(&mut self) -> Result<Option<Segments>, Status> {
        if self.want.is_none() && self.buf.len() >= PREFIX {
            let mut prefix = [0u8; PREFIX];
            self.buf.copy_to_slice(&mut prefix);
            let prefix = Prefix::parse(prefix);
            if prefix.flag != 0 {
                return Err(Status::internal(format!(
                    "protocol error: response message with compression flag {} \
                     (this client asks for uncompressed messages)",
                    prefix.flag
                )));
            }
            let len = prefix.len as usize;
            if len > self.max_message {
                return Err(Status::resource_exhausted(format!(
                    "response message of {len} bytes exceeds this client's limit of {} bytes",
                    self.max_message
                )));
            }
            self.want = Some(len);
        }
        match self.want {
            Some(len) if self.buf.len() >= len => {
                self.want = None;
                Ok(Some(self.buf.split_to(len)))
            }
            _ => Ok(None),
        }
    }

    /// The body ended (with these trailers, or none): the call's status.
    fn end(&mut self, trailers: Option<&HeaderMap>) -> Result<(), Status> {
        self.done = true;
        if let Some(st) = trailers.and_then(Status::from_header_map) {
            if st.code() != Code::Ok {
                return Err(st);
            }
            if self.want.is_some() || !self.buf.is_empty() {
                return Err(Status::internal(format!(
                    "protocol error: the response ended inside a message ({} bytes of {})",
                    self.buf.len(),
                    self.want.map_or(PREFIX, |w| w + PREFIX)
                )));
            }
            return Ok(());
        }
        Err(Status::unknown(
            "the response ended without a gRPC status (stream reset or connection closed)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_trailers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "0".parse().unwrap());
        h
    }

    fn framed(msg: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        v.extend_from_slice(msg);
        v
    }

    fn read_all(frames: Vec<Bytes>, trailers: Option<HeaderMap>) -> Vec<Result<Segments, Status>> {
        let mut q: VecDeque<_> = frames.into_iter().map(Frame::data).collect();
        if let Some(t) = trailers {
            q.push_back(Frame::trailers(t));
        }
        let mut r = MessageReader::new(Queued(q), 1 << 20);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut out = Vec::new();
        while let Poll::Ready(Some(m)) = r.poll_message(&mut cx) {
            out.push(m);
        }
        out
    }

    /// Messages split across frames at every possible point come out whole
    /// and in order, whatever the framing.
    #[test]
    fn messages_survive_every_frame_split() {
        let a: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let b = b"second".to_vec();
        let mut wire = framed(&a);
        wire.extend(framed(&b));
        wire.extend(framed(b""));
        for cut1 in 0..wire.len() {
            for cut2 in [cut1, (cut1 + 7).min(wire.len()), wire.len()] {
                let frames = vec![
                    Bytes::copy_from_slice(&wire[..cut1]),
                    Bytes::copy_from_slice(&wire[cut1..cut2]),
                    Bytes::copy_from_slice(&wire[cut2..]),
                ];
                let got: Vec<Vec<u8>> = read_all(frames, Some(ok_trailers()))
                    .into_iter()
                    .map(|m| m.unwrap().into_contiguous().to_vec())
                    .collect();
                assert_eq!(
                    got,
                    vec![a.clone(), b.clone(), vec![]],
                    "cuts {cut1} {cut2}"
                );
            }
        }
    }

    /// A payload that fills its own frame is handed out as that frame's
    /// bytes: the same memory, not a copy.
    #[test]
    fn a_field_in_its_own_frame_is_not_copied() {
        let payload = Bytes::from(vec![7u8; 100_000]);
        let head = {
            let mut h = vec![0];
            h.extend_from_slice(&(4 + payload.len() as u32).to_be_bytes());
            h.extend_from_slice(&[0x32, 0xa0, 0x8d, 0x06]); // field 6, varint 100000 (3 bytes)
            h
        };
        let mut msgs = read_all(
            vec![Bytes::from(head), payload.clone()],
            Some(ok_trailers()),
        );
        let mut m = msgs.remove(0).unwrap();
        assert_eq!(m.len(), 4 + payload.len());
        assert_eq!(m.parts().len(), 2);
        m.advance(4);
        let got = m.copy_to_bytes(payload.len());
        assert_eq!(got.as_ptr(), payload.as_ptr(), "same memory");
    }

    #[test]
    fn status_in_trailers_ends_the_call() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "5".parse().unwrap());
        t.insert("grpc-message", "no%20such%20set".parse().unwrap());
        let got = read_all(vec![Bytes::from(framed(b"m"))], Some(t));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_ref().unwrap().len(), 1);
        let st = got[1].as_ref().unwrap_err();
        assert_eq!(st.code(), Code::NotFound);
        assert_eq!(st.message(), "no such set");
    }

    #[test]
    fn missing_status_or_cut_message_is_an_error() {
        let got = read_all(vec![Bytes::from(framed(b"m"))], None);
        assert_eq!(got[1].as_ref().unwrap_err().code(), Code::Unknown);
        let wire = framed(b"hello");
        let got = read_all(
            vec![Bytes::copy_from_slice(&wire[..7])],
            Some(ok_trailers()),
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap_err().code(), Code::Internal);
    }

    #[test]
    fn oversized_or_compressed_messages_are_refused() {
        let mut big = vec![0u8];
        big.extend_from_slice(&(2u32 << 20).to_be_bytes());
        let got = read_all(vec![Bytes::from(big)], Some(ok_trailers()));
        assert_eq!(got[0].as_ref().unwrap_err().code(), Code::ResourceExhausted);
        let mut comp = framed(b"x");
        comp[0] = 1;
        let got = read_all(vec![Bytes::from(comp)], Some(ok_trailers()));
        assert_eq!(got[0].as_ref().unwrap_err().code(), Code::Internal);
        assert_eq!(got.len(), 1, "nothing after the error");
    }

    #[test]
    fn prefixes_round_trip() {
        let p = Prefix::uncompressed(0x0102_0304).unwrap();
        assert_eq!(p.to_bytes(), [0, 1, 2, 3, 4]);
        assert_eq!(Prefix::parse(p.to_bytes()), p);
        assert_eq!(Prefix::parse([1, 0, 0, 0, 9]), Prefix { flag: 1, len: 9 });
        assert_eq!(Prefix::uncompressed(1 << 32), None);
        assert_eq!(
            framed(b"ab")[..PREFIX],
            Prefix::uncompressed(2).unwrap().to_bytes()
        );
    }

    #[test]
    fn trailers_only_response_heads() {
        let (mut head, ()) = http::Response::new(()).into_parts();
        assert!(check_head(&head).unwrap());
        head.headers.insert("grpc-status", "16".parse().unwrap());
        assert_eq!(check_head(&head).unwrap_err().code(), Code::Unauthenticated);
        head.headers.insert("grpc-status", "0".parse().unwrap());
        assert!(!check_head(&head).unwrap());
        let (mut head, ()) = http::Response::new(()).into_parts();
        head.status = http::StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(check_head(&head).unwrap_err().code(), Code::Unavailable);
    }
}
