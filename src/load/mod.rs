//! File → tensors. One path: read (or inflate) the file into one page-aligned
//! host buffer, read the pickle in place, normalize arrays in place, pin the
//! buffer, and hand out zero-copy slices of it.
//!
//! Formats are told apart by content, never by name: gzip magic `1f 8b`, then
//! a pickle (opcode stream); a directory is read as IDX files.
pub mod error;
pub mod gzip;
pub mod idx;
pub mod layout;
pub mod pickle;
pub mod work;

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;

pub use error::{At, LoadError, Stream};
pub use work::Work;

use crate::memory::{HostBuffer, PinState};
use crate::store::{Dataset, Format, Set, Tensor};

/// What to do when the memory cannot be locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PinPolicy {
    /// Lock if the memlock limit allows, else warn once and go on.
    #[default]
    Try,
    /// Fail the load if the memory cannot be locked.
    Require,
    /// Do not lock (tests, tools like `inspect`).
    Off,
}

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Refuse datasets that inflate beyond this (a gzip bomb stops here, not
    /// at the OOM killer). Defaults to 3/4 of physical memory.
    pub max_bytes: usize,
    /// For IDX directories: how many of the 60,000 official training images
    /// (the last ones) become the validation set. 10,000 reproduces
    /// deeplearning.net's 50,000 / 10,000 split.
    pub valid_split: usize,
    pub pin: PinPolicy,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_bytes: default_max_bytes(),
            valid_split: 10_000,
            pin: PinPolicy::Try,
        }
    }
}

/// 3/4 of physical memory: a dataset larger than that could not be served
/// from RAM anyway.
pub fn default_max_bytes() -> usize {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        (pages as usize).saturating_mul(size as usize) / 4 * 3
    } else {
        usize::MAX / 2
    }
}

/// Loads a dataset file (gzip'd or plain pickle) or an IDX directory.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Dataset, LoadError> {
    if path.is_dir() {
        return load_idx_dir(path, opts);
    }
    let raw = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.into(),
        source,
    })?;
    load_bytes(path, &raw, opts)
}

/// Loads a dataset from the bytes of a gzip'd or plain pickle file; `path`
/// names it in messages and in GetInfo.
pub fn load_bytes(path: &Path, raw: &[u8], opts: &LoadOptions) -> Result<Dataset, LoadError> {
    let t0 = Instant::now();
    let (buf, format) = decode_container(path, raw, opts)?;
    let stream = if format == Format::PickleGzip {
        Stream::Decompressed
    } else {
        Stream::File
    };
    tracing::info!(path = %path.display(), format = format.name(), bytes = buf.len(), ms = t0.elapsed().as_millis() as u64, "read");
    if buf.as_slice().starts_with(&[0, 0])
        && buf.len() >= 4
        && (8..=0x0e).contains(&buf.as_slice()[2])
    {
        return Err(LoadError::Format {
            path: path.into(),
            what: "this is a single IDX file; pass the directory holding the four MNIST IDX files"
                .into(),
        });
    }
    let mut buf = buf;
    let mut work = Work::for_input(buf.len());
    let planned = read_pickle(path, buf.as_mut_slice(), stream, &mut work)?;
    let mut owned = Vec::new();
    let mut specs = Vec::new();
    for s in planned {
        let mut tensor = |t: layout::PlannedTensor| -> (crate::store::DType, Vec<usize>, Piece) {
            let piece = match t.storage {
                layout::Storage::Main(span) => Piece::Main(span.start, span.end),
                layout::Storage::Own(b) => {
                    owned.push(b);
                    Piece::Own(owned.len() - 1)
                }
            };
            (t.dtype, t.shape, piece)
        };
        let x = tensor(s.x);
        let y = tensor(s.y);
        specs.push((s.name.to_string(), x, y));
    }
    let pin = pin_all(std::iter::once(&mut buf).chain(owned.iter_mut()), opts.pin)?;
    let memory_bytes = buf.capacity() + owned.iter().map(|b| b.capacity()).sum::<usize>();
    let main = Bytes::from_owner(buf);
    let owned: Vec<Bytes> = owned.into_iter().map(Bytes::from_owner).collect();
    let bytes_of = |p: &Piece| match *p {
        Piece::Main(a, b) => main.slice(a..b),
        Piece::Own(i) => owned[i].clone(),
    };
    let mut sets = Vec::new();
    for (name, (xd, xs, xp), (yd, ys, yp)) in specs {
        let mk = |d, s, p: &Piece| {
            Tensor::new(d, s, bytes_of(p)).map_err(|what| LoadError::Dataset {
                path: path.into(),
                what,
            })
        };
        sets.push(Set {
            name,
            x: mk(xd, xs, &xp)?,
            y: mk(yd, ys, &yp)?,
        });
    }
    let ds = Dataset {
        source: path.display().to_string(),
        format,
        sets,
        memory_bytes,
        pin,
    };
    tracing::info!(
        ms = t0.elapsed().as_millis() as u64,
        tensor_bytes = ds.tensor_bytes(),
        "loaded"
    );
    Ok(ds)
}

/// The pickle passes of [`load_bytes`] on an already decompressed buffer:
/// reads the pickle in place and plans its tensors, both passes counting
/// their steps against `work` (a [`Work::for_input`] of the buffer's length
/// when loading). `stream` says what the buffer's offsets count in errors.
pub fn read_pickle(
    path: &Path,
    buf: &mut [u8],
    stream: Stream,
    work: &mut Work,
) -> Result<Vec<layout::PlannedSet>, LoadError> {
    let t0 = Instant::now();
    let fail = |stage: &'static str, at: At, work: &Work| {
        let path = path.into();
        if work.exceeded() {
            LoadError::WorkBudget {
                path,
                stage,
                stream,
                at,
            }
        } else if stage == "pickle" {
            LoadError::Pickle { path, stream, at }
        } else {
            LoadError::Layout { path, stream, at }
        }
    };
    let parsed = pickle::parse(buf, work).map_err(|at| fail("pickle", at, work))?;
    let planned = layout::plan(&parsed, buf, work).map_err(|at| fail("layout", at, work))?;
    tracing::debug!(
        ms = t0.elapsed().as_millis() as u64,
        protocol = parsed.protocol,
        work = work.used(),
        "pickle read and laid out"
    );
    Ok(planned)
}

enum Piece {
    Main(usize, usize),
    Own(usize),
}

/// Reads a file whole into a host buffer, inflating it if it is gzip.
fn read_maybe_gzip(path: &Path, opts: &LoadOptions) -> Result<(HostBuffer, Format), LoadError> {
    let raw = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.into(),
        source,
    })?;
    decode_container(path, &raw, opts)
}

/// The file's bytes in a host buffer: inflated if gzip, else copied.
fn decode_container(
    path: &Path,
    raw: &[u8],
    opts: &LoadOptions,
) -> Result<(HostBuffer, Format), LoadError> {
    if raw.starts_with(&gzip::MAGIC) {
        let buf = gzip::inflate(raw, opts.max_bytes).map_err(|at| LoadError::Gzip {
            path: path.into(),
            at,
        })?;
        Ok((buf, Format::PickleGzip))
    } else {
        if raw.len() > opts.max_bytes {
            return Err(LoadError::Dataset {
                path: path.into(),
                what: format!(
                    "{} bytes exceed the limit of {} (--max-dataset-bytes)",
                    raw.len(),
                    opts.max_bytes
                ),
            });
        }
        let buf = HostBuffer::from_slice(raw).map_err(|source| LoadError::Memory {
            bytes: raw.len(),
            source,
        })?;
        Ok((buf, Format::Pickle))
    }
}

fn pin_all<'a>(
    bufs: impl Iterator<Item = &'a mut HostBuffer>,
    policy: PinPolicy,
) -> Result<PinState, LoadError> {
    if policy == PinPolicy::Off {
        return Ok(PinState::NotPinned("pinning off".into()));
    }
    let mut state = PinState::Pinned;
    for b in bufs {
        if let PinState::NotPinned(reason) = b.lock() {
            state = PinState::NotPinned(reason);
        }
    }
    match (&state, policy) {
        (PinState::NotPinned(reason), PinPolicy::Require) => Err(LoadError::NotPinned {
            reason: reason.clone(),
        }),
        (PinState::NotPinned(reason), _) => {
            tracing::warn!(%reason, "dataset memory is NOT pinned (mlock failed); it may be swapped out. Raise the memlock limit (ulimit -l / --ulimit memlock=-1) or grant CAP_IPC_LOCK");
            Ok(state)
        }
        _ => {
            tracing::info!("dataset memory pinned (mlock)");
            Ok(state)
        }
    }
}

/// Loads the four MNIST IDX files from a directory.
fn load_idx_dir(dir: &Path, opts: &LoadOptions) -> Result<Dataset, LoadError> {
    let t0 = Instant::now();
    let file = |names: &[&str]| {
        idx::find(dir, names).ok_or_else(|| LoadError::Format {
            path: dir.into(),
            what: format!(
                "directory has no {0} or {0}.gz (expected the four MNIST IDX files)",
                names[0]
            ),
        })
    };
    let read = |p: &Path| -> Result<(HostBuffer, idx::Header, Stream), LoadError> {
        let (mut buf, format) = read_maybe_gzip(p, opts)?;
        let stream = if format == Format::PickleGzip {
            Stream::Decompressed
        } else {
            Stream::File
        };
        let h = idx::header(buf.as_slice()).map_err(|at| LoadError::Idx {
            path: p.into(),
            stream,
            at,
        })?;
        idx::to_little_endian(&mut buf.as_mut_slice()[h.data_start..], h.dtype);
        Ok((buf, h, stream))
    };
    let paths = [
        file(&idx::TRAIN_IMAGES)?,
        file(&idx::TRAIN_LABELS)?,
        file(&idx::TEST_IMAGES)?,
        file(&idx::TEST_LABELS)?,
    ];
    let mut parts = Vec::new();
    for p in &paths {
        parts.push(read(p)?);
    }
    // Labels: widen uint8 to int64 in their own small buffers.
    let mut bufs: Vec<HostBuffer> = Vec::new();
    let mut tensors = Vec::new();
    for (i, (buf, h, stream)) in parts.into_iter().enumerate() {
        let p = &paths[i];
        let images = i % 2 == 0;
        if images {
            let n = h.shape[0];
            let row: usize = h.shape[1..].iter().product();
            tensors.push((h.dtype, vec![n, row], h.data_start, bufs.len()));
            bufs.push(buf);
        } else {
            if h.shape.len() != 1 {
                return Err(LoadError::Idx {
                    path: p.into(),
                    stream,
                    at: At::new(3, format!("labels must be 1-D, found shape {:?}", h.shape)),
                });
            }
            let (buf, dtype) =
                if matches!(h.dtype, crate::store::DType::U8 | crate::store::DType::I8) {
                    let w = idx::widen_labels(&buf.as_slice()[h.data_start..], h.dtype).map_err(
                        |source| LoadError::Memory {
                            bytes: h.shape[0] * 8,
                            source,
                        },
                    )?;
                    (w, crate::store::DType::I64)
                } else {
                    let b = HostBuffer::from_slice(&buf.as_slice()[h.data_start..]).map_err(
                        |source| LoadError::Memory {
                            bytes: buf.len(),
                            source,
                        },
                    )?;
                    (b, h.dtype)
                };
            tensors.push((dtype, vec![h.shape[0]], 0, bufs.len()));
            bufs.push(buf);
        }
    }
    let pin = pin_all(bufs.iter_mut(), opts.pin)?;
    let memory_bytes = bufs.iter().map(|b| b.capacity()).sum();
    let frozen: Vec<Bytes> = bufs.into_iter().map(Bytes::from_owner).collect();
    let mk = |k: usize, from: usize, to: usize| -> Result<Tensor, LoadError> {
        let (dtype, shape, start, b) = &tensors[k];
        let row = shape[1..].iter().product::<usize>() * dtype.size();
        let mut s = shape.clone();
        s[0] = to - from;
        let mut t = Tensor::new(
            *dtype,
            s,
            frozen[*b].slice(start + from * row..start + to * row),
        )
        .map_err(|what| LoadError::Dataset {
            path: paths[k].clone(),
            what,
        })?;
        if *dtype == crate::store::DType::U8 && k.is_multiple_of(2) {
            t.scale_divisor = Some(idx::PIXEL_DIVISOR);
        }
        Ok(t)
    };
    let n_train = tensors[0].1[0];
    for (k, want) in [(1usize, n_train), (3, tensors[2].1[0])] {
        if tensors[k].1[0] != want {
            return Err(LoadError::Dataset {
                path: paths[k].clone(),
                what: format!("{} labels for {} images", tensors[k].1[0], want),
            });
        }
    }
    if opts.valid_split >= n_train {
        return Err(LoadError::Dataset {
            path: dir.into(),
            what: format!(
                "--valid-split {} leaves no training examples (the training files hold {n_train})",
                opts.valid_split
            ),
        });
    }
    let cut = n_train - opts.valid_split;
    let n_test = tensors[2].1[0];
    let mut sets = vec![Set {
        name: "train".into(),
        x: mk(0, 0, cut)?,
        y: mk(1, 0, cut)?,
    }];
    if opts.valid_split > 0 {
        sets.push(Set {
            name: "valid".into(),
            x: mk(0, cut, n_train)?,
            y: mk(1, cut, n_train)?,
        });
    }
    sets.push(Set {
        name: "test".into(),
        x: mk(2, 0, n_test)?,
        y: mk(3, 0, n_test)?,
    });
    let ds = Dataset {
        source: dir.display().to_string(),
        format: Format::Idx,
        sets,
        memory_bytes,
        pin,
    };
    tracing::info!(
        ms = t0.elapsed().as_millis() as u64,
        tensor_bytes = ds.tensor_bytes(),
        "loaded IDX directory"
    );
    Ok(ds)
}
