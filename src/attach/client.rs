//! The Rust client's side of attach: one exchange on the daemon's Unix
//! socket, then every tensor is a read-only mapping of the daemon's sealed
//! memory, and a minibatch of the tutorial's rule is a slice of it.
//!
//! It trusts the daemon no more than the gRPC client does: the reply is
//! bounded ([`MAX_REPLY_BYTES`], [`MAX_FILES`]); each descriptor must be a
//! sealed file (no shrinking, growing or writing, so the mapping can never
//! fault or change), at least as large as declared; every region must lie
//! within its file and hold exactly its shape.
//!
//! ```no_run
//! # fn demo() -> Result<(), minibatchd::attach::client::AttachError> {
//! use minibatchd::attach::client::{Attachment, AttachOptions};
//! let a = Attachment::open("/run/minibatchd/minibatchd.sock", &AttachOptions::default())?;
//! let (x, y) = a.batch("train", 2, 500)?;
//! assert_eq!(x.shape, vec![500, 784]);
//! # Ok(()) }
//! ```
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;

use super::{fds, header, parse_header, HEADER_BYTES, MAX_FILES, MAX_REPLY_BYTES};
use crate::order::{OrderError, OrderSpec, PermCache, Plan, Selection};
use crate::proto;
use crate::store::DType;

/// How to attach.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    pub token: Option<String>,
    /// Which dataset of the daemon; empty = its only one.
    pub dataset: String,
    /// Extra dtypes of x to map (the daemon's uint8 mirrors).
    pub x_dtypes: Vec<DType>,
    /// For the exchange (connect, request, reply).
    pub timeout: Duration,
}

impl Default for AttachOptions {
    fn default() -> Self {
        Self {
            token: None,
            dataset: String::new(),
            x_dtypes: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// Why attaching or reading failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("attach to {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon refused to attach: {code:?}: {message}", code = .0.code(), message = .0.message())]
    Refused(tonic::Status),
    #[error("the daemon's attach reply is invalid: {0}")]
    Protocol(String),
    #[error("no tensor {0} in the attached dataset")]
    Unknown(String),
    #[error("{0}")]
    Order(#[from] OrderError),
    #[error("{region}: sha256 {found} differs from the daemon's {expected}")]
    Checksum {
        region: String,
        expected: String,
        found: String,
    },
}

/// One read-only mapping of a sealed file.
struct Mapping {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a read-only mapping of a sealed file: its bytes never change.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn bytes(&self) -> &[u8] {
        // SAFETY: mapped for len bytes for the life of self (len > 0).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// One tensor's place in the mappings.
#[derive(Debug, Clone)]
struct Placed {
    set: String,
    tensor: String,
    dtype: DType,
    shape: Vec<usize>,
    file: usize,
    offset: usize,
    length: usize,
    sha256: String,
    scale_divisor: u32,
}

/// A tensor (or a minibatch of one) as bytes of the mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct View<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Little-endian, C order; borrowed from the mapping (zero-copy).
    pub data: &'a [u8],
    /// For uint8 standing for floats: value = float32(byte) / divisor.
    pub scale_divisor: u32,
}

/// A gathered minibatch (a shuffled or sharded order).
#[derive(Debug, Clone, PartialEq)]
pub struct Gathered {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
    pub scale_divisor: u32,
}

/// The daemon's dataset, mapped (see the module docs).
pub struct Attachment {
    /// The dataset's name on the daemon.
    pub dataset: String,
    pub fingerprint: String,
    pub generation: u64,
    pub server_version: String,
    maps: Vec<Mapping>,
    regions: Vec<Placed>,
    perms: PermCache,
    /// The attachment itself: the daemon counts it until it closes.
    _sock: UnixStream,
}

impl Attachment {
    /// Attaches to the daemon whose Unix socket is `path`.
    pub fn open(path: impl AsRef<Path>, opts: &AttachOptions) -> Result<Self, AttachError> {
        let path = path.as_ref();
        let io = |source| AttachError::Io {
            path: path.into(),
            source,
        };
        let mut sock = UnixStream::connect(path).map_err(io)?;
        sock.set_read_timeout(Some(opts.timeout)).map_err(io)?;
        sock.set_write_timeout(Some(opts.timeout)).map_err(io)?;
        let req = proto::AttachRequest {
            token: opts.token.clone().unwrap_or_default(),
            x_dtypes: opts.x_dtypes.iter().map(|d| d.to_proto() as i32).collect(),
            client: format!("rust {} pid {}", hostname(), std::process::id()),
            dataset: opts.dataset.clone(),
        };
        let mut out = header(req.encoded_len()).to_vec();
        req.encode(&mut out).expect("a Vec grows");
        sock.write_all(&out).map_err(io)?;
        let (msg, fds) = receive(&mut sock).map_err(|e| match e {
            Recv::Io(e) => io(e),
            Recv::Bad(why) => AttachError::Protocol(why),
        })?;
        let reply = match msg.result {
            Some(proto::attach_response::Result::Attached(r)) => r,
            Some(proto::attach_response::Result::Error(e)) => {
                return Err(AttachError::Refused(tonic::Status::new(
                    tonic::Code::from(e.code),
                    e.message,
                )))
            }
            None => return Err(AttachError::Protocol("AttachResponse has no result".into())),
        };
        let maps = map_files(&reply, fds)?;
        let regions = check_regions(&reply, &maps)?;
        if !opts.dataset.is_empty() && reply.dataset != opts.dataset {
            return Err(AttachError::Protocol(format!(
                "asked for dataset {:?}, the daemon described {:?}",
                opts.dataset, reply.dataset
            )));
        }
        Ok(Self {
            dataset: reply.dataset,
            fingerprint: reply.fingerprint,
            generation: reply.generation,
            server_version: reply.server_version,
            maps,
            regions,
            perms: PermCache::default(),
            _sock: sock,
        })
    }

    fn placed(
        &self,
        set: &str,
        tensor: &str,
        dtype: Option<DType>,
    ) -> Result<&Placed, AttachError> {
        self.regions
            .iter()
            .find(|r| r.set == set && r.tensor == tensor && dtype.is_none_or(|d| d == r.dtype))
            .ok_or_else(|| {
                AttachError::Unknown(match dtype {
                    Some(d) => format!("{set}.{tensor} as {d}"),
                    None => format!("{set}.{tensor}"),
                })
            })
    }

    /// A whole tensor: `dtype` None is the stored one (the first listed).
    pub fn tensor(
        &self,
        set: &str,
        tensor: &str,
        dtype: Option<DType>,
    ) -> Result<View<'_>, AttachError> {
        let r = self.placed(set, tensor, dtype)?;
        Ok(View {
            dtype: r.dtype,
            shape: r.shape.clone(),
            data: &self.maps[r.file].bytes()[r.offset..r.offset + r.length],
            scale_divisor: r.scale_divisor,
        })
    }

    /// Rows [start, end) of a tensor view, zero-copy.
    fn rows<'a>(v: &View<'a>, start: usize, end: usize) -> View<'a> {
        let rb = v.data.len() / v.shape[0].max(1);
        let mut shape = v.shape.clone();
        shape[0] = end - start;
        View {
            dtype: v.dtype,
            shape,
            data: &v.data[start * rb..end * rb],
            scale_divisor: v.scale_divisor,
        }
    }

    /// Minibatch `index` of `size` by the tutorial's rule (examples
    /// `[index*size, min((index+1)*size, n))`): zero-copy views of x (as
    /// `x_dtype`, None = stored) and y.
    pub fn batch_as(
        &self,
        set: &str,
        index: u64,
        size: usize,
        x_dtype: Option<DType>,
    ) -> Result<(View<'_>, View<'_>), AttachError> {
        let (x, y) = (
            self.tensor(set, "x", x_dtype)?,
            self.tensor(set, "y", None)?,
        );
        let plan = Plan::new(
            x.shape[0],
            size,
            usize::MAX,
            &OrderSpec::default(),
            &self.perms,
        )?;
        let Selection::Range(a, b) = plan.batch(index)? else {
            unreachable!("an unshuffled, unsharded order is contiguous")
        };
        Ok((Self::rows(&x, a, b), Self::rows(&y, a, b)))
    }

    /// [`batch_as`](Self::batch_as) with x as stored.
    pub fn batch(
        &self,
        set: &str,
        index: u64,
        size: usize,
    ) -> Result<(View<'_>, View<'_>), AttachError> {
        self.batch_as(set, index, size, None)
    }

    /// Minibatch `index` of `size` in `order` (README "Order"), gathered
    /// into new buffers: the same bytes StreamBatches sends.
    pub fn gather(
        &self,
        set: &str,
        index: u64,
        size: usize,
        order: &OrderSpec,
        x_dtype: Option<DType>,
    ) -> Result<(Gathered, Gathered), AttachError> {
        let (x, y) = (
            self.tensor(set, "x", x_dtype)?,
            self.tensor(set, "y", None)?,
        );
        let plan = Plan::new(x.shape[0], size, usize::MAX, order, &self.perms)?;
        let sel = plan.batch(index)?;
        let take = |v: &View<'_>| {
            let rb = v.data.len() / v.shape[0].max(1);
            let mut data = Vec::with_capacity(sel.len() * rb);
            for k in 0..sel.len() {
                let i = sel.get(k);
                data.extend_from_slice(&v.data[i * rb..(i + 1) * rb]);
            }
            let mut shape = v.shape.clone();
            shape[0] = sel.len();
            Gathered {
                dtype: v.dtype,
                shape,
                data,
                scale_divisor: v.scale_divisor,
            }
        };
        Ok((take(&x), take(&y)))
    }

    /// Recomputes every region's sha256 and compares it with the daemon's.
    pub fn verify(&self) -> Result<(), AttachError> {
        for r in &self.regions {
            let found = crate::analyze::sha256_hex(
                &self.maps[r.file].bytes()[r.offset..r.offset + r.length],
            );
            if found != r.sha256 {
                return Err(AttachError::Checksum {
                    region: format!("{}.{} ({})", r.set, r.tensor, r.dtype),
                    expected: r.sha256.clone(),
                    found,
                });
            }
        }
        Ok(())
    }

    /// (set, tensor, dtype, shape) of every region, in the daemon's order.
    pub fn regions(&self) -> impl Iterator<Item = (&str, &str, DType, &[usize])> {
        self.regions.iter().map(|r| {
            (
                r.set.as_str(),
                r.tensor.as_str(),
                r.dtype,
                r.shape.as_slice(),
            )
        })
    }
}

/// This host's name (a container's id in Docker), for the daemon's log: a
/// daemon in another PID namespace sees no pid of ours.
fn hostname() -> String {
    let mut b = [0u8; 256];
    // SAFETY: gethostname writes at most b.len() bytes into b.
    let r = unsafe { libc::gethostname(b.as_mut_ptr() as *mut libc::c_char, b.len()) };
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    if r == 0 {
        String::from_utf8_lossy(&b[..end]).into_owned()
    } else {
        "?".into()
    }
}

enum Recv {
    Io(std::io::Error),
    Bad(String),
}

/// Reads the reply: header, message, and the descriptors on its first byte.
fn receive(sock: &mut UnixStream) -> Result<(proto::AttachResponse, Vec<OwnedFd>), Recv> {
    let mut h = [0u8; HEADER_BYTES];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < HEADER_BYTES {
        let r = fds::recv_with_fds(sock.as_raw_fd(), &mut h[got..], MAX_FILES).map_err(Recv::Io)?;
        if r.truncated {
            return Err(Recv::Bad(format!("more than {MAX_FILES} descriptors")));
        }
        if r.bytes == 0 {
            return Err(Recv::Bad(format!(
                "the daemon closed the connection after {got} bytes of the reply"
            )));
        }
        if !r.fds.is_empty() && got > 0 {
            return Err(Recv::Bad("descriptors after the reply's first byte".into()));
        }
        fds.extend(r.fds);
        got += r.bytes;
    }
    let len =
        parse_header(&h, MAX_REPLY_BYTES).map_err(|e| Recv::Bad(format!("reply header: {e}")))?;
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body).map_err(Recv::Io)?;
    let msg = proto::AttachResponse::decode(&body[..]).map_err(|e| {
        Recv::Bad(format!(
            "bytes 16..{} are not an AttachResponse: {e}",
            16 + len
        ))
    })?;
    Ok((msg, fds))
}

/// Seals a file must carry for its mapping to stay valid and unchanged.
const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
const WRITE_SEALS: libc::c_int = libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE;

/// Checks each descriptor's seals and size and maps it read-only.
fn map_files(reply: &proto::AttachReply, fds: Vec<OwnedFd>) -> Result<Vec<Mapping>, AttachError> {
    let bad = |s: String| AttachError::Protocol(s);
    if fds.len() != reply.files.len() {
        return Err(bad(format!(
            "{} descriptors came for {} files",
            fds.len(),
            reply.files.len()
        )));
    }
    let mut maps = Vec::with_capacity(fds.len());
    for (i, (fd, f)) in fds.iter().zip(&reply.files).enumerate() {
        // SAFETY: fcntl and fstat on a descriptor we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & REQUIRED_SEALS != REQUIRED_SEALS || seals & WRITE_SEALS == 0 {
            return Err(bad(format!(
                "file {i} is not sealed against shrinking, growing and writing (seals {seals:#x})"
            )));
        }
        // SAFETY: as above; stat is plain data.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(bad(format!(
                "file {i}: fstat failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        let len =
            usize::try_from(f.bytes).map_err(|_| bad(format!("file {i}: {} bytes", f.bytes)))?;
        if (st.st_size as u64) < f.bytes || len == 0 {
            return Err(bad(format!(
                "file {i} holds {} bytes, the reply says {}",
                st.st_size, f.bytes
            )));
        }
        // SAFETY: a new read-only shared mapping of a sealed file at least
        // `len` bytes long (checked above), so it cannot fault or change.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(bad(format!(
                "file {i}: mmap failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        maps.push(Mapping {
            ptr: p as *const u8,
            len,
        });
    }
    Ok(maps)
}

/// Checks every region against its file and its own shape.
fn check_regions(reply: &proto::AttachReply, maps: &[Mapping]) -> Result<Vec<Placed>, AttachError> {
    let mut out = Vec::with_capacity(reply.regions.len());
    for r in &reply.regions {
        let name = format!("region {}.{}", r.set, r.tensor);
        let bad = |why: String| AttachError::Protocol(format!("{name}: {why}"));
        let dtype = proto::Dtype::try_from(r.dtype)
            .ok()
            .and_then(DType::from_proto)
            .ok_or_else(|| bad(format!("unknown dtype {}", r.dtype)))?;
        let shape: Vec<usize> = r.shape.iter().map(|&d| d as usize).collect();
        let want = dtype
            .array_bytes(&shape)
            .filter(|_| !shape.is_empty())
            .ok_or_else(|| bad(format!("shape {shape:?} is empty or overflows")))?;
        let map = maps
            .get(r.file as usize)
            .ok_or_else(|| bad(format!("file {} of {}", r.file, maps.len())))?;
        let (offset, length) = (r.offset as usize, r.length as usize);
        if length as u64 != r.length || want != length {
            return Err(bad(format!(
                "{length} bytes cannot hold shape {shape:?} of {dtype}"
            )));
        }
        if offset.checked_add(length).is_none_or(|end| end > map.len) {
            return Err(bad(format!(
                "bytes {offset}..+{length} lie beyond file {} ({} bytes)",
                r.file, map.len
            )));
        }
        out.push(Placed {
            set: r.set.clone(),
            tensor: r.tensor.clone(),
            dtype,
            shape,
            file: r.file as usize,
            offset,
            length,
            sha256: r.sha256.clone(),
            scale_divisor: r.scale_divisor,
        });
    }
    for x in out.iter().filter(|r| r.tensor == "x") {
        let y = out.iter().find(|r| r.set == x.set && r.tensor == "y");
        if y.is_none_or(|y| y.shape[0] != x.shape[0]) {
            return Err(AttachError::Protocol(format!(
                "set {}: y is missing or has not x's {} examples",
                x.set, x.shape[0]
            )));
        }
    }
    Ok(out)
}
