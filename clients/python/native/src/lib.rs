//! Native gRPC transport for `minibatch_client` (clients/python).
//!
//! Why: a pure-grpcio client tops out near 1 GB/s on this project's 2-core
//! machines (thread hand-offs and copies inside grpc core; see
//! shared/notes). This module moves only the transport into Rust: tonic over
//! one HTTP/2 connection, driven on the calling thread by a current-thread
//! tokio runtime with the GIL released. Responses are read with
//! `grpc_frames` (crates/grpc-frames): each message is handed to Python as
//! the HTTP/2 DATA frames that carried it, without a copy (tonic's own
//! decoder copies every frame into one buffer first). The Python client
//! parses, checks CRCs, assembles and fails over exactly as it does with
//! grpcio, so both transports share one code path above this one.
//!
//! Surface (mirrors the grpcio calls the client makes):
//! `Channel(address, max_frame_size=..)` and
//! `Channel.unary_stream(path, request: bytes, metadata, timeout) -> Call`,
//! an iterator of `Message`s with `cancel()`. A `Message` is a read-only
//! buffer (contiguous: a copy only when the message spans frames) and
//! `Message.parts()` its frames as buffers (never a copy). Failures raise
//! `RpcError` whose `code()` is the gRPC status code as an int and
//! `details()` the server's message. `crc32c(buffer)` is the CRC-32C the
//! client checks chunks with (crc-fast: AVX-512 carry-less multiplication
//! where the CPU has it).
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use grpc_frames::{MessageReader, Segments};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::ffi;
use pyo3::prelude::*;
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tonic::transport::{Certificate, Channel as TonicChannel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

/// HTTP/2 settings of the Rust client (src/client.rs, where the measurements
/// are): the server's DATA frames are bounded by the max frame size the
/// client advertises; 2 MiB carries a 500-image minibatch in one frame.
const MAX_FRAME_SIZE: u32 = 2 << 20;
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest response message accepted: the server decides its message size
/// (as grpcio's `max_receive_message_length = -1` in the pure client), this
/// only bounds memory against a broken peer.
const MAX_DECODE: usize = 1 << 30;

/// Receive buffers are a megabyte or more each and short-lived; glibc's
/// malloc serves such sizes with fresh mappings (page faults on every
/// message), mimalloc reuses them (as the daemon and the Rust CLI do).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

create_exception!(
    minibatch_client_native,
    RpcError,
    PyException,
    "A failed call: code() is the gRPC status code (int), details() the message."
);

fn rpc_error(st: &Status) -> PyErr {
    // tonic reports a lost connection (server killed, reset, refused) as
    // UNKNOWN with the I/O error as its source; grpcio, and the Python
    // client's failover, call that UNAVAILABLE. A status the server sent
    // has no source and keeps its code.
    let code = match st.code() {
        Code::Unknown if std::error::Error::source(st).is_some() => Code::Unavailable,
        c => c,
    };
    RpcError::new_err((code as i32, st.message().to_string()))
}

/// One HTTP/2 connection (opened on first use) and the runtime that drives it.
#[pyclass(module = "minibatch_client_native")]
struct Channel {
    rt: Arc<Runtime>,
    channel: TonicChannel,
    address: String,
}

#[pymethods]
impl Channel {
    /// `tls_ca` (PEM bytes) turns TLS on; `tls_cert` and `tls_key` (PEM)
    /// add a client identity (mutual TLS); `tls_domain` is the name to
    /// verify (default: the address's host).
    #[new]
    #[pyo3(signature = (address, connect_timeout = 5.0, max_frame_size = MAX_FRAME_SIZE,
                        tls_ca = None, tls_cert = None, tls_key = None, tls_domain = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        address: &str,
        connect_timeout: f64,
        max_frame_size: u32,
        tls_ca: Option<Vec<u8>>,
        tls_cert: Option<Vec<u8>>,
        tls_key: Option<Vec<u8>>,
        tls_domain: Option<String>,
    ) -> PyResult<Self> {
        let scheme = if tls_ca.is_some() { "https" } else { "http" };
        let uri = if address.contains("://") {
            address.to_string()
        } else {
            format!("{scheme}://{address}")
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PyException::new_err(format!("cannot start the I/O runtime: {e}")))?;
        let mut ep = Endpoint::from_shared(uri).map_err(|e| {
            pyo3::exceptions::PyValueError::new_err(format!("invalid address {address:?}: {e}"))
        })?;
        if let Some(ca) = tls_ca {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(cert, key)),
                (None, None) => {}
                _ => {
                    return Err(pyo3::exceptions::PyValueError::new_err(
                        "tls_cert and tls_key go together (mutual TLS)",
                    ))
                }
            }
            if let Some(d) = tls_domain {
                tls = tls.domain_name(d);
            }
            ep = ep.tls_config(tls).map_err(|e| {
                pyo3::exceptions::PyValueError::new_err(format!("TLS settings refused: {e}"))
            })?;
        }
        let ep = ep
            .tcp_nodelay(true)
            .connect_timeout(seconds(connect_timeout).unwrap_or(Duration::from_secs(5)))
            .max_frame_size(max_frame_size.clamp(16 << 10, (16 << 20) - 1))
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
        // Lazy: the connection (and any connect error, as UNAVAILABLE on
        // the first call) comes with the first request, as with grpcio.
        let channel = {
            let _guard = rt.enter();
            ep.connect_lazy()
        };
        Ok(Self {
            rt: Arc::new(rt),
            channel,
            address: address.to_string(),
        })
    }

    /// Starts a server-streaming call; the first message is awaited by the
    /// first `next()`.
    #[pyo3(signature = (path, request, metadata = None, timeout = None))]
    fn unary_stream(
        &self,
        py: Python<'_>,
        path: &str,
        request: &[u8],
        metadata: Option<Vec<(String, String)>>,
        timeout: Option<f64>,
    ) -> PyResult<Call> {
        let mut headers = http::HeaderMap::new();
        for (k, v) in metadata.unwrap_or_default() {
            let key: http::HeaderName = k.parse().map_err(|_| {
                pyo3::exceptions::PyValueError::new_err(format!("bad metadata key {k:?}"))
            })?;
            let val = http::HeaderValue::from_str(&v).map_err(|_| {
                pyo3::exceptions::PyValueError::new_err(format!("bad metadata value for {k:?}"))
            })?;
            headers.insert(key, val);
        }
        let req = grpc_frames::request(path, request, headers)
            .map_err(|st| pyo3::exceptions::PyValueError::new_err(st.message().to_string()))?;
        // Enforced here, on every wait (tonic's own grpc-timeout handling
        // would end the call as CANCELLED, not DEADLINE_EXCEEDED).
        let deadline = timeout
            .and_then(seconds)
            .and_then(|d| tokio::time::Instant::now().checked_add(d));
        let mut channel = self.channel.clone();
        let rt = self.rt.clone();
        let stream = py.detach(|| {
            rt.block_on(within(deadline, async {
                grpc_frames::call(&mut channel, req, MAX_DECODE).await
            }))
        });
        match stream {
            Ok(s) => Ok(Call {
                rt: self.rt.clone(),
                stream: Mutex::new(Some(s)),
                cancel: Arc::new(Notify::new()),
                cancelled: AtomicBool::new(false),
                deadline,
            }),
            Err(st) => Err(rpc_error(&st)),
        }
    }

    fn __repr__(&self) -> String {
        format!("minibatch_client_native.Channel({:?})", self.address)
    }
}

/// Seconds from Python as a Duration: None (no limit) for infinity or
/// anything too large to represent; negative or NaN counts as zero.
fn seconds(t: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(t.max(0.0)).ok()
}

/// Runs `f` until `deadline`, then gives up with DEADLINE_EXCEEDED (what a
/// grpcio call with a timeout raises).
async fn within<T>(
    deadline: Option<tokio::time::Instant>,
    f: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match deadline {
        None => f.await,
        Some(d) => tokio::time::timeout_at(d, f)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("deadline exceeded"))),
    }
}

/// A server-streaming call: iterate for its messages. `cancel()` may come
/// from another thread while one is blocked in `next()` (the Python client's
/// prefetch thread iterates, its consumer cancels), as with grpcio.
#[pyclass(module = "minibatch_client_native")]
struct Call {
    rt: Arc<Runtime>,
    stream: Mutex<Option<MessageReader<tonic::body::Body>>>,
    cancel: Arc<Notify>,
    cancelled: AtomicBool,
    deadline: Option<tokio::time::Instant>,
}

#[pymethods]
impl Call {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Message>> {
        // The lock is taken with the GIL released: a thread waiting for it
        // must not hold the GIL the holder needs to return.
        let next = py.detach(|| {
            let mut guard = self.stream.lock().unwrap_or_else(|e| e.into_inner());
            if self.cancelled.load(Ordering::Acquire) {
                *guard = None;
                return Err(Status::cancelled("call cancelled by the client"));
            }
            let Some(stream) = guard.as_mut() else {
                return Ok(None);
            };
            let r = self.rt.block_on(async {
                tokio::select! {
                    r = within(self.deadline, async { stream.message().await.transpose() }) => r,
                    _ = self.cancel.notified() => Err(Status::cancelled("call cancelled by the client")),
                }
            });
            if !matches!(r, Ok(Some(_))) {
                *guard = None; // ended, failed or cancelled: free the stream
            }
            r
        });
        match next {
            Ok(m) => Ok(m.map(|parts| Message {
                parts,
                joined: OnceLock::new(),
            })),
            Err(st) => Err(rpc_error(&st)),
        }
    }

    /// Ends the call: `next()`, now or blocked in another thread, raises
    /// CANCELLED (as grpcio's calls do).
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        // Wakes a `next()` blocked on the stream (or, as a stored permit,
        // one about to block).
        self.cancel.notify_one();
        if let Ok(mut g) = self.stream.try_lock() {
            *g = None; // not in use: drop it now (RST_STREAM to the server)
        }
    }
}

/// One response message: a read-only buffer (memoryview, numpy) over the
/// received bytes, and `parts()`, the frames that carried it.
#[pyclass(module = "minibatch_client_native", frozen)]
struct Message {
    parts: Segments,
    /// The message as one buffer: its frame when it came in one, else a
    /// copy made on the first buffer request.
    joined: OnceLock<Bytes>,
}

impl Message {
    fn contiguous(&self) -> &Bytes {
        self.joined
            .get_or_init(|| self.parts.clone().into_contiguous())
    }
}

#[pymethods]
impl Message {
    fn __len__(&self) -> usize {
        self.parts.len()
    }

    /// The message's bytes as the frames (or parts of frames) that carried
    /// them, in order: read-only buffers, none of them a copy.
    fn parts(&self, py: Python<'_>) -> PyResult<Vec<Py<Frame>>> {
        self.parts
            .parts()
            .map(|b| Py::new(py, Frame { data: b.clone() }))
            .collect()
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        // SAFETY: as for Frame: the bytes live as long as this object.
        unsafe { fill_buffer(slf.as_any(), slf.get().contiguous(), view, flags) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// One received frame's bytes as a read-only buffer.
#[pyclass(module = "minibatch_client_native", frozen)]
struct Frame {
    data: Bytes,
}

#[pymethods]
impl Frame {
    fn __len__(&self) -> usize {
        self.data.len()
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        // SAFETY: the bytes live as long as this object.
        unsafe { fill_buffer(slf.as_any(), &slf.get().data, view, flags) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Fills a read-only buffer view of `data`, owned by `owner`.
///
/// # Safety
/// `view` must come from the interpreter's buffer request on `owner`, and
/// `data` must live as long as `owner` (the view holds a reference to it).
unsafe fn fill_buffer(
    owner: &Bound<'_, PyAny>,
    data: &Bytes,
    view: *mut ffi::Py_buffer,
    flags: c_int,
) -> PyResult<()> {
    // SAFETY: see the function's contract; readonly = 1.
    let rc = unsafe {
        ffi::PyBuffer_FillInfo(
            view,
            owner.as_ptr(),
            data.as_ptr() as *mut c_void,
            data.len() as ffi::Py_ssize_t,
            1,
            flags,
        )
    };
    if rc == -1 {
        return Err(PyErr::fetch(owner.py()));
    }
    Ok(())
}

/// CRC-32C of a buffer (what every TensorChunk carries), computed without
/// the GIL.
#[pyfunction]
fn crc32c(py: Python<'_>, data: pyo3::buffer::PyBuffer<u8>) -> PyResult<u32> {
    if !data.is_c_contiguous() {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "crc32c needs a C-contiguous buffer",
        ));
    }
    // SAFETY: a C-contiguous buffer of len_bytes() bytes at buf_ptr(), held
    // (and so valid) until `data` drops at the end of this call; read only.
    let bytes: &[u8] =
        unsafe { std::slice::from_raw_parts(data.buf_ptr() as *const u8, data.len_bytes()) };
    Ok(if bytes.len() < (256 << 10) {
        checksum(bytes)
    } else {
        py.detach(|| checksum(bytes))
    })
}

fn checksum(b: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b) as u32
}

#[pymodule]
fn minibatch_client_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Channel>()?;
    m.add_class::<Call>()?;
    m.add_class::<Message>()?;
    m.add_class::<Frame>()?;
    m.add_function(wrap_pyfunction!(crc32c, m)?)?;
    m.add("RpcError", m.py().get_type::<RpcError>())?;
    m.add("MAX_FRAME_SIZE", MAX_FRAME_SIZE)?;
    Ok(())
}
