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

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;

pub use error::{At, LoadError, Stream};

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

/// 3/4 of the memory this process may use: physical memory, or its
/// cgroup's memory limit when lower (a container's limit, where the kernel
/// OOM-kills instead of refusing: a 6.3 MB gzip that inflated to 6.3 GB
/// was killed in a 512 MiB pod rather than refused). A dataset larger than
/// that could not be served from RAM anyway.
pub fn default_max_bytes() -> usize {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let physical = if pages > 0 && size > 0 {
        (pages as usize).saturating_mul(size as usize)
    } else {
        usize::MAX / 4 * 3
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let cgroup = cgroup::memory_limit(&own, |p| std::fs::read_to_string(p).ok());
    let usable = cgroup.map_or(physical, |c| {
        physical.min(c.try_into().unwrap_or(usize::MAX))
    });
    usable / 4 * 3
}

/// The memory limit of this process's cgroup, for [`default_max_bytes`].
mod cgroup {
    use std::path::{Path, PathBuf};

    /// Where cgroup hierarchies are mounted (v2 unified at the top, v1 one
    /// directory per controller).
    const ROOT: &str = "/sys/fs/cgroup";

    /// The lowest memory limit that applies, given `/proc/self/cgroup`'s
    /// text and a file reader: v2 `memory.max` or v1
    /// `memory.limit_in_bytes` in the process's cgroup and every ancestor
    /// up to the mount point (a parent's limit binds its children, and
    /// inside a container the mount point is the container's own cgroup,
    /// whatever path `/proc/self/cgroup` names). `None`: no limit found.
    pub(super) fn memory_limit(
        proc_self_cgroup: &str,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Option<u64> {
        let mut limits = Vec::new();
        for line in proc_self_cgroup.lines() {
            // hierarchy-id:controllers:path
            let mut f = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let (mount, file) = if id == "0" && controllers.is_empty() {
                (PathBuf::from(ROOT), "memory.max")
            } else if controllers.split(',').any(|c| c == "memory") {
                (Path::new(ROOT).join("memory"), "memory.limit_in_bytes")
            } else {
                continue;
            };
            let mut dir = Some(Path::new(path.trim_start_matches('/')));
            while let Some(d) = dir {
                if let Some(text) = read(&mount.join(d).join(file)) {
                    limits.extend(parse_limit(&text));
                }
                dir = d.parent();
            }
        }
        limits.into_iter().min()
    }

    /// A limit file's content: bytes, or `max` (v2: no limit). v1 says "no
    /// limit" with a huge number, which the minimum with physical memory
    /// absorbs.
    fn parse_limit(text: &str) -> Option<u64> {
        match text.trim() {
            "max" => None,
            t => t.parse().ok(),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn files<'a>(f: &'a [(&'a str, &'a str)]) -> impl Fn(&Path) -> Option<String> + 'a {
            move |p| {
                f.iter()
                    .find(|(k, _)| Path::new(k) == p)
                    .map(|(_, v)| v.to_string())
            }
        }

        #[test]
        fn cgroup_v2_limit_of_the_container_or_an_ancestor() {
            // A pod with 512 MiB, cgroup namespace: the mount is its cgroup.
            let f = [("/sys/fs/cgroup/memory.max", "536870912\n")];
            assert_eq!(memory_limit("0::/\n", files(&f)), Some(536_870_912));
            // No namespace: the own cgroup says max, its parent 1 GiB.
            let f = [
                ("/sys/fs/cgroup/kubepods/pod1/c1/memory.max", "max\n"),
                ("/sys/fs/cgroup/kubepods/pod1/memory.max", "1073741824\n"),
                ("/sys/fs/cgroup/kubepods/memory.max", "max\n"),
            ];
            assert_eq!(
                memory_limit("0::/kubepods/pod1/c1\n", files(&f)),
                Some(1 << 30)
            );
            // Unlimited everywhere, or no files at all.
            let f = [("/sys/fs/cgroup/memory.max", "max\n")];
            assert_eq!(memory_limit("0::/\n", files(&f)), None);
            assert_eq!(memory_limit("0::/x\n", files(&[])), None);
            assert_eq!(memory_limit("", files(&[])), None);
        }

        #[test]
        fn cgroup_v1_limit_in_bytes() {
            let own =
                "12:pids:/docker/abc\n4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n";
            // Docker without a cgroup namespace: the host path does not
            // exist inside; the mount point holds the container's limit.
            let f = [("/sys/fs/cgroup/memory/memory.limit_in_bytes", "268435456\n")];
            assert_eq!(memory_limit(own, files(&f)), Some(256 << 20));
            // "No limit" in v1 is a huge number, kept (physical memory is lower).
            let f = [(
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712\n",
            )];
            assert_eq!(
                memory_limit(own, files(&f)),
                Some(9_223_372_036_854_771_712)
            );
            // Garbage is no limit, not a panic.
            let f = [("/sys/fs/cgroup/memory/memory.limit_in_bytes", "lots\n")];
            assert_eq!(memory_limit(own, files(&f)), None);
            assert_eq!(memory_limit("4:memory:/a:b\nnonsense\n", files(&[])), None);
        }
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
    let t1 = Instant::now();
    let parsed = pickle::parse(buf.as_mut_slice()).map_err(|at| LoadError::Pickle {
        path: path.into(),
        stream,
        at,
    })?;
    let planned = layout::plan(&parsed, buf.as_mut_slice()).map_err(|at| LoadError::Layout {
        path: path.into(),
        stream,
        at,
    })?;
    tracing::debug!(
        ms = t1.elapsed().as_millis() as u64,
        protocol = parsed.protocol,
        "pickle read and laid out"
    );
    drop(parsed);
    let mut owned = Vec::new();
    let mut specs = Vec::new();
    for s in planned {
        let mut tensor = |t: layout::PlannedTensor| -> (crate::store::DType, Vec<usize>, Piece) {
            let piece = match t.bytes {
                layout::Bytes::Main(span) => Piece::Main(span.start, span.end),
                layout::Bytes::Own(b) => {
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
