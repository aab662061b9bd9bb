//! The daemon's side of attach: read the request (bounded, under the
//! handshake deadline), check the token and the `--max-attached` limit,
//! describe the dataset's memory, send the description with the
//! descriptors, then hold the connection as the attachment until the
//! client closes it.
//!
//! Abuse stays bounded: a request is at most [`MAX_REQUEST_BYTES`] and must
//! arrive within the handshake timeout; the reply is one `sendmsg` of a few
//! KiB, so a client that never reads it holds only its own socket buffer
//! (and the descriptors in flight, which the kernel closes with its socket);
//! an attachment is one descriptor of the daemon's until it closes, and
//! there are at most `max_attached` of them. Any byte a client sends after
//! its request ends its attachment.
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use super::{fds, header, parse_header, HeaderError, HEADER_BYTES, MAGIC, MAX_CLIENT_NAME};
use super::{MAX_FILES, MAX_REQUEST_BYTES};
use crate::access::BearerAuth;
use crate::batch::convert;
use crate::catalog::Catalog;
use crate::error::ServeError;
use crate::memory::Resident;
use crate::metrics::Metrics;
use crate::proto;
use crate::store::DType;

/// Default `--max-attached`: a host runs a few hundred trainer processes at
/// most (8 GPUs, each rank with a dozen data-loader workers is 104); each
/// attachment costs the daemon one descriptor and no memory.
pub const DEFAULT_MAX_ATTACHED: usize = 512;

/// The attach side of one daemon.
pub struct Attacher {
    catalog: Arc<Catalog>,
    auth: Option<BearerAuth>,
    /// This start of the daemon (see [`generation`]).
    generation: u64,
    max_attached: usize,
    attached: Arc<AtomicUsize>,
    /// For the request to arrive whole (the handshake timeout).
    timeout: Duration,
    /// Attachments to device memory now: id → "pid P client C".
    device_holders: std::sync::Mutex<std::collections::BTreeMap<u64, String>>,
    next_hold: std::sync::atomic::AtomicU64,
}

/// A process attached to device memory, counted until it detaches.
struct DeviceHold<'a> {
    attacher: &'a Attacher,
    id: u64,
}

impl Drop for DeviceHold<'_> {
    fn drop(&mut self) {
        self.attacher
            .device_holders
            .lock()
            .unwrap()
            .remove(&self.id);
    }
}

/// A number that differs for each start of a daemon on a host: the start
/// time in nanoseconds since the Unix epoch, mixed with the pid (two
/// daemons started in the same nanosecond differ by pid).
pub fn generation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 48)
}

/// A place among the attached, released when the attachment ends.
struct AttachSlot {
    attached: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for AttachSlot {
    fn drop(&mut self) {
        let now = self.attached.fetch_sub(1, Ordering::Relaxed) - 1;
        self.metrics
            .attach
            .attached
            .store(now as u64, Ordering::Relaxed);
    }
}

impl Attacher {
    pub fn new(
        catalog: Arc<Catalog>,
        auth: Option<BearerAuth>,
        max_attached: usize,
        timeout: Duration,
    ) -> Self {
        Self {
            catalog,
            auth,
            generation: generation(),
            max_attached,
            attached: Arc::new(AtomicUsize::new(0)),
            timeout,
            device_holders: Default::default(),
            next_hold: Default::default(),
        }
    }

    /// Attachments open now.
    pub fn attached(&self) -> usize {
        self.attached.load(Ordering::Relaxed)
    }

    /// Serves an attach exchange on the Unix socket whose first
    /// [`MAGIC`] bytes were read, then holds the attachment until the
    /// client closes it (or the serving thread ends). `pending` is the
    /// connection's slot among the server's connections, held until the
    /// request is read and checked; if `evicted` resolves first (a newcomer
    /// took the slot) the connection is closed.
    pub async fn serve(
        &self,
        mut sock: UnixStream,
        pending: impl Send,
        evicted: impl std::future::Future<Output = ()>,
    ) {
        let t0 = Instant::now();
        let peer = sock.peer_cred().ok();
        // SO_PEERCRED's pid is 0 for a peer in another PID namespace (a
        // trainer in its own container): logged as absent; the client's
        // name (its host name, i.e. container id, and pid) says who it is.
        let pid = peer.and_then(|c| c.pid()).filter(|&p| p != 0);
        let uid = peer.map(|c| c.uid());
        let req = tokio::select! {
            r = self.read_request(&mut sock) => r,
            _ = evicted => return,
        };
        let answered = async {
            let req = req?;
            self.check_token(&req)?;
            let slot = self.take_slot()?;
            drop(pending);
            let (reply, files) = self.describe(&req).await?;
            Ok::<_, ServeError>((req, slot, reply, files))
        }
        .await;
        let (req, _slot, reply, files) = match answered {
            Ok(a) => a,
            Err(e) => {
                tracing::info!(pid, uid, error = %e, "attach refused");
                self.refuse(&mut sock, e).await;
                return;
            }
        };
        let client: String = req
            .client
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_CLIENT_NAME)
            .collect();
        // Held before the reply goes: the client may open the handles at once.
        let _device_hold = reply.device.as_ref().map(|d| {
            let id = self.next_hold.fetch_add(1, Ordering::Relaxed);
            let who = format!(
                "pid {} client {client:?} on {}",
                pid.map_or_else(|| "?".into(), |p| p.to_string()),
                d.uuid
            );
            self.device_holders.lock().unwrap().insert(id, who);
            DeviceHold { attacher: self, id }
        });
        let device = reply.device.as_ref().map(|d| d.uuid.clone());
        let msg = proto::AttachResponse {
            result: Some(proto::attach_response::Result::Attached(reply)),
        };
        let fds: Vec<BorrowedFd<'_>> = files.iter().filter_map(|f| f.fd()).collect();
        if let Err(e) = send(&sock, &msg, &fds, self.timeout).await {
            tracing::info!(pid, uid, error = %e, "attach reply not delivered");
            return;
        }
        let m = &self.catalog.metrics.attach;
        m.accepted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            pid,
            uid,
            client,
            dataset = %req.dataset,
            device,
            files = fds.len(),
            attached = self.attached(),
            us = t0.elapsed().as_micros() as u64,
            "attached"
        );
        // The attachment: until the client closes (or sends anything).
        let dataset = self.catalog.get(&req.dataset).map(|p| p.name.as_str());
        let board = &self.catalog.metrics.status;
        let mut shown = board.attached(dataset.unwrap_or(&req.dataset), pid, &client);
        let mut b = [0u8; 64];
        let why = match sock.read(&mut b).await {
            Ok(0) => "closed by the client",
            Ok(_) => "the client sent bytes after its request",
            Err(_) => "connection error",
        };
        tracing::debug!(pid, uid, why, "detached");
        shown.finish("detached");
    }

    /// Answers an attach request that came over TCP (or TLS): refused,
    /// after reading it, so the reply is not lost to a reset.
    /// `pending` and `evicted` as in [`serve`](Self::serve).
    pub async fn refuse_remote(
        &self,
        mut io: impl AsyncRead + AsyncWrite + Unpin,
        pending: impl Send,
        evicted: impl std::future::Future<Output = ()>,
    ) {
        let e = tokio::select! {
            r = self.read_request(&mut io) => match r {
                Ok(_) => ServeError::AttachNeedsUnixSocket,
                Err(e) => e,
            },
            _ = evicted => return,
        };
        self.refuse(&mut io, e).await;
        drop(pending);
    }

    /// Reads the request after its magic: version, length, message.
    async fn read_request(
        &self,
        io: &mut (impl AsyncRead + Unpin),
    ) -> Result<proto::AttachRequest, ServeError> {
        let read = async {
            let mut h = [0u8; HEADER_BYTES];
            h[..MAGIC.len()].copy_from_slice(MAGIC);
            io.read_exact(&mut h[MAGIC.len()..]).await?;
            let len = match parse_header(&h, MAX_REQUEST_BYTES) {
                Ok(n) => n,
                Err(HeaderError::Version(v)) => return Ok(Err(ServeError::AttachVersion(v))),
                Err(e) => return Ok(Err(ServeError::BadRequest(format!("attach request: {e}")))),
            };
            let mut body = vec![0u8; len];
            io.read_exact(&mut body).await?;
            Ok::<_, std::io::Error>(proto::AttachRequest::decode(&body[..]).map_err(|e| {
                ServeError::BadRequest(format!(
                    "attach request: bytes 16..{} are not an AttachRequest message: {e}",
                    16 + len
                ))
            }))
        };
        match tokio::time::timeout(self.timeout, read).await {
            Err(_) => Err(ServeError::RequestTimeout(self.timeout)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(ServeError::BadRequest(
                    "attach request: the connection ended before the 16-byte header and the \
                     message length it announces arrived"
                        .into(),
                ))
            }
            Ok(Err(e)) => Err(ServeError::Transport(e.to_string())),
            Ok(Ok(r)) => r,
        }
    }

    fn check_token(&self, req: &proto::AttachRequest) -> Result<(), ServeError> {
        match &self.auth {
            Some(_) if req.token.is_empty() => Err(ServeError::Unauthenticated(
                "missing bearer token: this daemon needs one (AttachRequest.token)",
            )),
            Some(a) if !a.check(req.token.as_bytes()) => {
                Err(ServeError::Unauthenticated("invalid bearer token"))
            }
            _ => Ok(()),
        }
    }

    fn take_slot(&self) -> Result<AttachSlot, ServeError> {
        let max = self.max_attached;
        self.attached
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|attached| ServeError::AttachLimit { attached, max })?;
        self.catalog
            .metrics
            .attach
            .attached
            .store(self.attached() as u64, Ordering::Relaxed);
        Ok(AttachSlot {
            attached: self.attached.clone(),
            metrics: self.catalog.metrics.clone(),
        })
    }

    /// The description of every region and the files they lie in.
    async fn describe(
        &self,
        req: &proto::AttachRequest,
    ) -> Result<(proto::AttachReply, Vec<Resident>), ServeError> {
        let p = self.catalog.get(&req.dataset)?;
        let ds = &p.dataset;
        let stats = p.stats().await.map_err(ServeError::Stats)?;
        let mut files: Vec<Resident> = Vec::new();
        let mut regions = Vec::new();
        let not_shared = || {
            ServeError::NotShareable(
                "it is not in memfds (memfd_create was refused at load; see the daemon's log)"
                    .into(),
            )
        };
        for r in &ds.memory {
            if r.fd().is_none() {
                return Err(not_shared());
            }
            files.push(r.clone());
        }
        let device = self.device_copy(p, req)?;
        let mut mirrors = Vec::new();
        for &d in &req.x_dtypes {
            let dt = proto::Dtype::try_from(d).map_err(|_| ServeError::BadDType(d))?;
            if let Some(to) = DType::from_proto(dt).filter(|to| !mirrors.contains(to)) {
                mirrors.push(to);
            }
        }
        for s in &p.sets {
            for t in s.tensors() {
                let (file, offset) = ds.locate(&t.tensor).ok_or_else(not_shared)?;
                let st = stats
                    .get(&s.name, t.name)
                    .expect("stats cover every tensor");
                regions.push(region(&s.name, t.name, &t.tensor, file, offset, &st.sha256));
            }
            for &to in &mirrors {
                if to == s.x.tensor.dtype {
                    continue;
                }
                let st = stats.get(&s.name, "x").expect("stats cover every tensor");
                let conv = convert::conversion(&s.x.tensor, st, to).map_err(|why| {
                    ServeError::Conversion {
                        tensor: format!("{}.x", s.name),
                        from: s.x.tensor.dtype,
                        to,
                        why,
                    }
                })?;
                if !crate::batch::mirror::Mirrors::wanted(&conv) {
                    return Err(ServeError::NotShareable(format!(
                        "{}.x has no {to} copy to share (the daemon keeps uint8 copies of x only)",
                        s.name
                    )));
                }
                let m =
                    s.x.mirror(&s.name, conv, p)
                        .await
                        .map_err(ServeError::NotShareable)?;
                files.push(m.memory.clone());
                let file = files.len() - 1;
                regions.push(region(&s.name, "x", &m.tensor, file, 0, &m.sha256));
            }
        }
        if files.len() > MAX_FILES {
            return Err(ServeError::NotShareable(format!(
                "it is {} files, more than the {MAX_FILES} one reply may pass",
                files.len()
            )));
        }
        let reply = proto::AttachReply {
            fingerprint: stats.fingerprint.clone(),
            generation: self.generation,
            server_version: env!("CARGO_PKG_VERSION").into(),
            files: files
                .iter()
                .map(|f| proto::SharedFile {
                    bytes: f.file_len() as u64,
                })
                .collect(),
            regions,
            dataset: p.name.clone(),
            device: device.map(|c| proto::DeviceCopy {
                uuid: c.device.uuid().into(),
                name: c.device.name().into(),
                backend: c.backend.into(),
                allocations: c
                    .allocations
                    .iter()
                    .map(|a| proto::DeviceAllocation {
                        ipc_handle: a.ipc_handle(),
                        bytes: a.len() as u64,
                    })
                    .collect(),
            }),
        };
        Ok((reply, files))
    }

    /// The device copy an attach request asks for, if any: one of the
    /// dataset's, named by UUID; with only the stored dtypes (the device
    /// copies hold x as stored, no mirrors).
    fn device_copy<'a>(
        &self,
        p: &'a crate::batch::prepared::Prepared,
        req: &proto::AttachRequest,
    ) -> Result<Option<&'a Arc<crate::device::Copy>>, ServeError> {
        if req.device.is_empty() {
            return Ok(None);
        }
        if p.devices.is_empty() {
            return Err(ServeError::NotShareable(
                "this daemon holds no copy in device memory (serve --device cuda:N)".into(),
            ));
        }
        if req
            .x_dtypes
            .iter()
            .any(|&d| DType::from_proto(proto::Dtype::try_from(d).unwrap_or_default()).is_some())
        {
            return Err(ServeError::NotShareable(
                "device copies hold x as stored: attach to a device without x_dtypes".into(),
            ));
        }
        p.devices
            .iter()
            .find(|c| crate::device::same_device(c.device.uuid(), &req.device))
            .map(Some)
            .ok_or_else(|| ServeError::UnknownDevice {
                asked: req
                    .device
                    .chars()
                    .take(crate::error::MAX_ECHOED_NAME)
                    .collect(),
                served: p
                    .devices
                    .iter()
                    .map(|c| format!("{} ({})", c.device.uuid(), c.device.name()))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Processes attached to device memory now, as "pid P client C" (the
    /// daemon keeps its device copies until they are gone).
    pub fn device_holders(&self) -> Vec<String> {
        self.device_holders
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect()
    }

    /// Sends `e` as the reply (best effort: the client may be gone) and
    /// counts the refusal.
    async fn refuse(&self, io: &mut (impl AsyncWrite + Unpin), e: ServeError) {
        self.catalog
            .metrics
            .attach
            .refused
            .fetch_add(1, Ordering::Relaxed);
        let st = tonic::Status::from(e);
        let msg = proto::AttachResponse {
            result: Some(proto::attach_response::Result::Error(proto::AttachError {
                code: st.code() as i32,
                message: st.message().to_string(),
            })),
        };
        let mut out = header(msg.encoded_len()).to_vec();
        msg.encode(&mut out).expect("a Vec grows");
        let _ = tokio::time::timeout(self.timeout, async {
            io.write_all(&out).await?;
            io.shutdown().await
        })
        .await;
    }
}

fn region(
    set: &str,
    tensor: &str,
    t: &crate::store::Tensor,
    file: usize,
    offset: usize,
    sha256: &str,
) -> proto::Region {
    proto::Region {
        set: set.into(),
        tensor: tensor.into(),
        dtype: t.dtype.to_proto() as i32,
        shape: t.shape.iter().map(|&d| d as u64).collect(),
        file: file as u32,
        offset: offset as u64,
        length: t.data.len() as u64,
        sha256: sha256.into(),
        scale_divisor: t.scale_divisor.unwrap_or(0),
    }
}

/// Sends `msg` with `fds` riding on its first byte, within `timeout`.
async fn send(
    sock: &UnixStream,
    msg: &proto::AttachResponse,
    fds: &[BorrowedFd<'_>],
    timeout: Duration,
) -> std::io::Result<()> {
    let mut out = header(msg.encoded_len()).to_vec();
    msg.encode(&mut out).expect("a Vec grows");
    let write = async {
        let mut sent = 0;
        while sent < out.len() {
            let with = if sent == 0 { fds } else { &[] };
            sent += sock
                .async_io(Interest::WRITABLE, || {
                    fds::send_with_fds(sock.as_raw_fd(), &out[sent..], with)
                })
                .await?;
        }
        Ok(())
    };
    tokio::time::timeout(timeout, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
