//! File → tensors. One path: read (or inflate) the file into one page-aligned
//! host buffer, read the pickle in place, normalize arrays in place, pin the
//! buffer, and hand out zero-copy slices of it.
//!
//! Formats are told apart by content, never by name: gzip magic `1f 8b`,
//! then what it inflates to is told apart the same way; zip magic
//! `PK 03 04`, an `.npz`; the `ustar` magic of a tar header, CIFAR's python
//! version; anything else a pickle (opcode stream). A directory holding
//! `x_train.npy` is read as `.npy` files, one holding CIFAR's batch files
//! (or a folder of them) as CIFAR, any other as IDX files.
pub mod cifar;
pub mod error;
pub mod gzip;
pub mod idx;
pub mod layout;
pub mod npz;
pub mod pickle;
pub mod tar;
pub mod work;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use error::{At, LoadError, Stream};
pub use work::Work;

use crate::memory::{Backing, HostBuffer, PinState};
use crate::store::{DType, Dataset, Format, Set, Tensor};

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
    /// How many of the training examples (the last ones) become the
    /// validation set, for formats without one (IDX, `.npz`, `.npy`, CIFAR).
    /// None: the format's default, [`DEFAULT_VALID_SPLIT`] for IDX, `.npz`
    /// and `.npy` (deeplearning.net's 50,000 / 10,000 split of MNIST), none
    /// for CIFAR (its official train/test split).
    pub valid_split: Option<usize>,
    pub pin: PinPolicy,
    /// Where the dataset's memory lives: memfds that same-host clients can
    /// attach to (the default), or the daemon's private memory, cheaper to
    /// fill, when nothing will attach (`serve` without `--uds`, `inspect`).
    /// Tensors are moved to aligned offsets only in shared memory, where
    /// clients see them.
    pub backing: Backing,
}

/// `--valid-split`'s default: the last 10,000 of MNIST's 60,000 training
/// images, deeplearning.net's split.
pub const DEFAULT_VALID_SPLIT: usize = 10_000;

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_bytes: default_max_bytes(),
            valid_split: None,
            pin: PinPolicy::Try,
            backing: Backing::Shared,
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

/// Most member names an error lists of an archive's contents: enough to
/// see what the archive is, and an error stays a line.
const MAX_LISTED: usize = 8;

/// An archive's member names for an error: the first [`MAX_LISTED`], then
/// `...` if there are more.
fn listing<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut out: Vec<&str> = Vec::new();
    for (i, n) in names.enumerate() {
        if i == MAX_LISTED {
            out.push("...");
            break;
        }
        out.push(n);
    }
    out.join(", ")
}

/// Loads a dataset file (gzip'd or plain pickle, `.npz`, gzip'd `.npz`,
/// CIFAR's tar archive) or directory (`.npy` files, CIFAR's batches, IDX
/// files).
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Dataset, LoadError> {
    if path.is_dir() {
        if path.join("x_train.npy").is_file() {
            return load_npy_dir(path, opts);
        }
        if let Some(kind) = cifar::kind_of(path) {
            return cifar::load_dir(path, path, kind, opts, Instant::now());
        }
        // IDX files in the folder itself come before a CIFAR subfolder.
        if idx::find(path, &idx::TRAIN_IMAGES).is_none() {
            if let Some((dir, kind)) = cifar::find_subdir(path)? {
                return cifar::load_dir(path, &dir, kind, opts, Instant::now());
            }
        }
        return load_idx_dir(path, opts);
    }
    let raw = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.into(),
        source,
    })?;
    load_bytes(path, &raw, opts)
}

/// Loads a dataset from the bytes of a file (every format [`load`] reads
/// from a file); `path` names it in messages and in GetInfo.
pub fn load_bytes(path: &Path, raw: &[u8], opts: &LoadOptions) -> Result<Dataset, LoadError> {
    if is_npz(raw) {
        return load_npz(path, raw, opts.max_bytes, Stream::File, opts);
    }
    let t0 = Instant::now();
    let (mut buf, container) = decode_container(path, raw, opts)?;
    if tar::is_tar(buf.as_slice()) {
        return cifar::load_tar(path, buf, container.stream(), opts, t0);
    }
    if container == Container::Gzip && is_npz(buf.as_slice()) {
        // A gzip'd .npz: its members are extracted from the inflated
        // archive, within what the inflated bytes left of the limit.
        let budget = opts.max_bytes.saturating_sub(buf.len());
        return load_npz(path, buf.as_slice(), budget, Stream::Decompressed, opts);
    }
    let format = match container {
        Container::Gzip => Format::PickleGzip,
        Container::Plain => Format::Pickle,
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
    let mut work = Work::for_input(buf.len());
    let planned = read_pickle(
        path,
        buf.as_mut_slice(),
        container.stream(),
        &mut work,
        opts.backing,
    )?;
    // Buffer 0 is the decompressed stream; tensors that could not be served
    // from it (transposed, stacked) follow in buffers of their own.
    let mut bufs = vec![buf];
    let mut sets = Vec::new();
    for s in planned {
        let mut tensor = |t: layout::PlannedTensor| {
            let (buf, range) = match t.storage {
                layout::Storage::Main(span) => (0, span.start..span.end),
                layout::Storage::Own(b) => {
                    let len = b.len();
                    bufs.push(b);
                    (bufs.len() - 1, 0..len)
                }
            };
            TensorSpec {
                dtype: t.dtype,
                shape: t.shape,
                buf,
                range,
                scale_divisor: None,
                file: path.into(),
            }
        };
        let (x, y) = (tensor(s.x), tensor(s.y));
        sets.push(SetSpec {
            name: s.name.to_string(),
            x,
            y,
        });
    }
    assemble(path, format, bufs, sets, opts, t0)
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
    backing: Backing,
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
    let planned =
        layout::plan(&parsed, buf, work, backing).map_err(|at| fail("layout", at, work))?;
    tracing::debug!(
        ms = t0.elapsed().as_millis() as u64,
        protocol = parsed.protocol,
        work = work.used(),
        "pickle read and laid out"
    );
    Ok(planned)
}

/// How a file's bytes were stored: told apart by content (gzip magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Plain,
    Gzip,
}

impl Container {
    /// What a decoding error's offset counts in.
    fn stream(self) -> Stream {
        match self {
            Container::Gzip => Stream::Decompressed,
            Container::Plain => Stream::File,
        }
    }
}

/// A tensor to cut out of one of a load's buffers.
struct TensorSpec {
    dtype: DType,
    shape: Vec<usize>,
    /// Index of the buffer, and the tensor's bytes in it.
    buf: usize,
    range: Range<usize>,
    scale_divisor: Option<u32>,
    /// The file named if the tensor does not fit its shape.
    file: PathBuf,
}

struct SetSpec {
    name: String,
    x: TensorSpec,
    y: TensorSpec,
}

/// Where tensors start in their buffers, when the room allows: a cache line,
/// so every dtype is aligned and SIMD loads do not straddle lines.
/// Why: a pickle puts an array's bytes wherever its framing ends (MNIST's
/// train x at byte 133, its y at an odd offset), and clients that map the
/// buffers (attach) got numpy views flagged unaligned: summing one was 40 %
/// slower, gathering its rows 8× slower (867 against 112 µs per 500 rows).
pub const TENSOR_ALIGN: usize = 64;

/// Moves each tensor down to the next [`TENSOR_ALIGN`] boundary after the
/// one before it (the pickle framing between them is no longer needed), in
/// place, and updates the ranges. A tensor with no room below it stays
/// where it is; a buffer whose tensors overlap without being the same bytes
/// (never made by the loader) is left alone.
fn align_tensors(bufs: &mut [HostBuffer], sets: &mut [SetSpec]) {
    for (b, buf) in bufs.iter_mut().enumerate() {
        let mut specs: Vec<&mut TensorSpec> = sets
            .iter_mut()
            .flat_map(|s| [&mut s.x, &mut s.y])
            .filter(|t| t.buf == b)
            .collect();
        let mut ranges: Vec<Range<usize>> = specs.iter().map(|t| t.range.clone()).collect();
        ranges.sort_by_key(|r| (r.start, r.end));
        ranges.dedup();
        if ranges.windows(2).any(|w| w[1].start < w[0].end) {
            continue;
        }
        let mut cursor = 0usize;
        let mut moved = Vec::with_capacity(ranges.len());
        for r in ranges {
            let to = cursor.next_multiple_of(TENSOR_ALIGN).min(r.start);
            if to != r.start {
                buf.as_mut_slice().copy_within(r.clone(), to);
            }
            cursor = to + r.len();
            moved.push((r, to));
        }
        for t in specs.iter_mut() {
            let to = moved
                .iter()
                .find(|(r, _)| *r == t.range)
                .expect("every range was placed")
                .1;
            t.range = to..to + t.range.len();
        }
    }
}

/// The end of every load: aligns the tensors, pins the buffers, freezes
/// them, cuts the tensors out of them (zero-copy) and describes the
/// dataset.
fn assemble(
    source: &Path,
    format: Format,
    mut bufs: Vec<HostBuffer>,
    mut sets: Vec<SetSpec>,
    opts: &LoadOptions,
    t0: Instant,
) -> Result<Dataset, LoadError> {
    if opts.backing == Backing::Shared {
        align_tensors(&mut bufs, &mut sets);
    }
    let pin = pin_all(bufs.iter_mut(), opts.pin)?;
    let memory_bytes = bufs.iter().map(|b| b.capacity()).sum();
    let memory = bufs
        .into_iter()
        .map(|b| {
            let bytes = b.len();
            b.freeze()
                .map_err(|source| LoadError::Memory { bytes, source })
        })
        .collect::<Result<Vec<_>, LoadError>>()?;
    let tensor = |t: TensorSpec| -> Result<Tensor, LoadError> {
        let mut tensor = Tensor::new(t.dtype, t.shape, memory[t.buf].bytes().slice(t.range))
            .map_err(|what| LoadError::Dataset { path: t.file, what })?;
        tensor.scale_divisor = t.scale_divisor;
        Ok(tensor)
    };
    let sets = sets
        .into_iter()
        .map(|s| {
            Ok(Set {
                name: s.name,
                x: tensor(s.x)?,
                y: tensor(s.y)?,
            })
        })
        .collect::<Result<Vec<_>, LoadError>>()?;
    let ds = Dataset {
        source: source.display().to_string(),
        format,
        sets,
        memory_bytes,
        pin,
        memory,
    };
    tracing::info!(
        format = format.name(),
        ms = t0.elapsed().as_millis() as u64,
        tensor_bytes = ds.tensor_bytes(),
        shared = ds.backing() == Backing::Shared,
        "loaded"
    );
    Ok(ds)
}

/// The file's bytes in a host buffer: inflated if gzip, else copied.
fn decode_container(
    path: &Path,
    raw: &[u8],
    opts: &LoadOptions,
) -> Result<(HostBuffer, Container), LoadError> {
    if raw.starts_with(&gzip::MAGIC) {
        let buf =
            gzip::inflate(raw, opts.max_bytes, opts.backing).map_err(|at| LoadError::Gzip {
                path: path.into(),
                at,
            })?;
        Ok((buf, Container::Gzip))
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
        let buf =
            HostBuffer::from_slice(raw, opts.backing).map_err(|source| LoadError::Memory {
                bytes: raw.len(),
                source,
            })?;
        Ok((buf, Container::Plain))
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

/// One IDX file, read (inflated if gzip'd) and little-endian.
struct IdxPart {
    buf: HostBuffer,
    dtype: DType,
    /// Images: [n, pixels per image]; labels: [n].
    shape: Vec<usize>,
    /// Where the data starts in `buf`.
    start: usize,
}

/// Reads one IDX file. Labels must be 1-D; uint8 / int8 labels are widened
/// to int64, and every label array gets a buffer of its own.
fn read_idx(path: &Path, labels: bool, opts: &LoadOptions) -> Result<IdxPart, LoadError> {
    let raw = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.into(),
        source,
    })?;
    let (mut buf, container) = decode_container(path, &raw, opts)?;
    drop(raw);
    let idx_err = |at: At| LoadError::Idx {
        path: path.into(),
        stream: container.stream(),
        at,
    };
    let h = idx::header(buf.as_slice()).map_err(idx_err)?;
    idx::to_little_endian(&mut buf.as_mut_slice()[h.data_start..], h.dtype);
    if !labels {
        return Ok(IdxPart {
            buf,
            dtype: h.dtype,
            shape: examples_shape(&h.shape),
            start: h.data_start,
        });
    }
    if h.shape.len() != 1 {
        return Err(idx_err(At::new(
            3,
            format!("labels must be 1-D, found shape {:?}", h.shape),
        )));
    }
    label_part(
        &buf.as_slice()[h.data_start..],
        h.dtype,
        h.shape,
        opts.backing,
    )
}

/// A label array in a buffer of its own, uint8 / int8 widened to int64.
fn label_part(
    data: &[u8],
    dtype: DType,
    shape: Vec<usize>,
    backing: Backing,
) -> Result<IdxPart, LoadError> {
    let (own, dtype) = if matches!(dtype, DType::U8 | DType::I8) {
        let w = idx::widen_labels(data, dtype, backing).map_err(|source| LoadError::Memory {
            bytes: data.len() * 8,
            source,
        })?;
        (w, DType::I64)
    } else {
        let b = HostBuffer::from_slice(data, backing).map_err(|source| LoadError::Memory {
            bytes: data.len(),
            source,
        })?;
        (b, dtype)
    };
    Ok(IdxPart {
        buf: own,
        dtype,
        shape,
        start: 0,
    })
}

/// The arrays an `.npz` (or a directory of `.npy` files) must hold, in
/// `split_sets`' order: Keras's `mnist.npz` / `fashion_mnist` keys.
pub const NPZ_KEYS: [&str; 4] = ["x_train", "y_train", "x_test", "y_test"];

/// A validation pair an `.npz` or `.npy` directory may add: with both
/// present, they are the "valid" set and `--valid-split` does not apply
/// (the file already says which examples validate).
pub const NPZ_VALID_KEYS: [&str; 2] = ["x_valid", "y_valid"];

/// Whether `b` starts as a zip archive (an `.npz`) does.
fn is_npz(b: &[u8]) -> bool {
    b.starts_with(&npz::MAGIC) || b.starts_with(&npz::EMPTY_MAGIC)
}

/// The arrays to read, in `split_sets`' order: [`NPZ_KEYS`], then
/// [`NPZ_VALID_KEYS`] when `has(key)` says both are there.
fn npz_keys(has: impl Fn(&str) -> bool) -> Vec<&'static str> {
    let mut keys = NPZ_KEYS.to_vec();
    if NPZ_VALID_KEYS.iter().all(|k| has(k)) {
        keys.extend(NPZ_VALID_KEYS);
    }
    keys
}

/// Loads an `.npz` archive holding [`NPZ_KEYS`] as `.npy` members (and
/// [`NPZ_VALID_KEYS`] when it has them), extracting at most `budget` bytes.
/// `stream`: what the archive's offsets count (the file, or the inflated
/// stream of a gzip'd `.npz`).
fn load_npz(
    path: &Path,
    raw: &[u8],
    mut budget: usize,
    stream: Stream,
    opts: &LoadOptions,
) -> Result<Dataset, LoadError> {
    let t0 = Instant::now();
    let zip_err = |member: Option<&str>, at: At| LoadError::Zip {
        path: path.into(),
        member: member.map(Into::into),
        stream,
        at,
    };
    let members = npz::members(raw).map_err(|at| zip_err(None, at))?;
    let keys = npz_keys(|k| members.iter().any(|m| m.name == format!("{k}.npy")));
    let mut parts = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    for (k, key) in keys.iter().enumerate() {
        let name = format!("{key}.npy");
        let Some(m) = members.iter().find(|m| m.name == name) else {
            return Err(LoadError::Format {
                path: path.into(),
                what: format!(
                    "npz has no member {name} (expected x_train, y_train, x_test, y_test as np.savez writes them; it holds [{}])",
                    listing(members.iter().map(|m| m.name.as_str()))
                ),
            });
        };
        let buf =
            npz::extract(raw, m, budget, opts.backing).map_err(|at| zip_err(Some(&m.name), at))?;
        budget -= buf.len();
        parts.push(npy_part(
            path,
            Some(&m.name),
            buf,
            k % 2 == 1,
            opts.backing,
        )?);
        files.push(PathBuf::from(format!("{}:{}", path.display(), m.name)));
    }
    tracing::info!(path = %path.display(), format = "npz", ms = t0.elapsed().as_millis() as u64, "read");
    split_sets(path, Format::Npz, &files, parts, opts, t0)
}

/// Loads a directory holding [`NPZ_KEYS`] (and maybe [`NPZ_VALID_KEYS`])
/// as `.npy` files (what `np.save` writes), by the `.npz` rules.
fn load_npy_dir(dir: &Path, opts: &LoadOptions) -> Result<Dataset, LoadError> {
    let t0 = Instant::now();
    let file = |k: &str| dir.join(format!("{k}.npy"));
    if let Some(key) = NPZ_KEYS.iter().find(|k| !file(k).is_file()) {
        return Err(LoadError::Format {
            path: dir.into(),
            what: format!(
                "directory has x_train.npy but no {key}.npy (expected x_train, y_train, x_test, y_test .npy files)"
            ),
        });
    }
    let keys = npz_keys(|k| file(k).is_file());
    let mut budget = opts.max_bytes;
    let mut parts = Vec::new();
    let mut files = Vec::new();
    for (k, key) in keys.iter().enumerate() {
        let path = file(key);
        let io = |source| LoadError::Io {
            path: path.clone(),
            source,
        };
        let len = std::fs::metadata(&path).map_err(io)?.len();
        if len > budget as u64 {
            return Err(LoadError::Dataset {
                path: path.clone(),
                what: format!(
                    "{len} bytes exceed what the limit leaves ({budget} bytes; --max-dataset-bytes)"
                ),
            });
        }
        let raw = std::fs::read(&path).map_err(io)?;
        if raw.is_empty() {
            return Err(LoadError::Npy {
                path,
                member: None,
                at: At::new(0, "empty file"),
            });
        }
        let buf =
            HostBuffer::from_slice(&raw, opts.backing).map_err(|source| LoadError::Memory {
                bytes: raw.len(),
                source,
            })?;
        budget -= raw.len().min(budget);
        parts.push(npy_part(&path, None, buf, k % 2 == 1, opts.backing)?);
        files.push(path);
    }
    split_sets(dir, Format::Npy, &files, parts, opts, t0)
}

/// One `.npy` array (a whole `.npz` member or file in `buf`), little-endian:
/// images flattened to [n, values per example], labels 1-D, uint8 / int8
/// labels widened to int64.
fn npy_part(
    path: &Path,
    member: Option<&str>,
    mut buf: HostBuffer,
    labels: bool,
    backing: Backing,
) -> Result<IdxPart, LoadError> {
    let err = |at: At| LoadError::Npy {
        path: path.into(),
        member: member.map(Into::into),
        at,
    };
    let h = npz::npy_header(buf.as_slice()).map_err(err)?;
    if h.big_endian {
        idx::to_little_endian(&mut buf.as_mut_slice()[h.data_start..], h.dtype);
    }
    if h.shape.is_empty() || (labels && h.shape.len() != 1) {
        return Err(err(At::new(
            8,
            format!(
                "{} must be {}, found shape {:?}",
                if labels { "labels" } else { "examples" },
                if labels { "1-D" } else { "at least 1-D" },
                h.shape
            ),
        )));
    }
    if labels {
        return label_part(&buf.as_slice()[h.data_start..], h.dtype, h.shape, backing);
    }
    Ok(IdxPart {
        dtype: h.dtype,
        shape: examples_shape(&h.shape),
        start: h.data_start,
        buf,
    })
}

/// The shape x is served with, from an IDX or `.npy` array's: a grayscale
/// image ([n, H, W]) becomes its row of H·W values, as `mnist.pkl.gz` holds
/// MNIST ([n, 784]: the same digits serve alike from every format); 1-D
/// examples become [n, 1]; examples with channels ([n, C, H, W] or
/// [n, H, W, C], e.g. Keras's CIFAR-10 [n, 32, 32, 3]) keep their shape,
/// because flattening would lose which of the two layouts they are in.
fn examples_shape(shape: &[usize]) -> Vec<usize> {
    match shape {
        [n] => vec![*n, 1],
        [n, rest @ ..] if rest.len() <= 2 => vec![*n, rest.iter().product()],
        _ => shape.to_vec(),
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
    let paths = [
        file(&idx::TRAIN_IMAGES)?,
        file(&idx::TRAIN_LABELS)?,
        file(&idx::TEST_IMAGES)?,
        file(&idx::TEST_LABELS)?,
    ];
    // Buffer k holds file k: train images, train labels, test images, test labels.
    let mut parts = Vec::new();
    for (k, p) in paths.iter().enumerate() {
        parts.push(read_idx(p, k % 2 == 1, opts)?);
    }
    split_sets(dir, Format::Idx, &paths, parts, opts, t0)
}

/// The sets of four arrays (train x, train y, test x, test y, each named by
/// its `paths` entry in errors): train minus the last `--valid-split`
/// examples, those as valid, and test; uint8 images get the IDX pixel scale.
/// With six arrays (valid x, valid y last) those are the valid set and
/// train is not split.
fn split_sets(
    dir: &Path,
    format: Format,
    paths: &[PathBuf],
    parts: Vec<IdxPart>,
    opts: &LoadOptions,
    t0: Instant,
) -> Result<Dataset, LoadError> {
    let n_train = parts[0].shape[0];
    let given_valid = parts.len() == 6;
    let pairs: &[(usize, usize)] = if given_valid {
        &[(1, n_train), (3, parts[2].shape[0]), (5, parts[4].shape[0])]
    } else {
        &[(1, n_train), (3, parts[2].shape[0])]
    };
    for &(k, want) in pairs {
        if parts[k].shape[0] != want {
            return Err(LoadError::Dataset {
                path: paths[k].clone(),
                what: format!("{} labels for {} images", parts[k].shape[0], want),
            });
        }
    }
    // Every set's examples look alike: one model reads them all.
    for k in (2..parts.len()).step_by(2) {
        if parts[k].shape[1..] != parts[0].shape[1..] || parts[k].dtype != parts[0].dtype {
            return Err(LoadError::Dataset {
                path: paths[k].clone(),
                what: format!(
                    "examples of {} {:?}, the training examples are {} {:?}",
                    parts[k].dtype,
                    &parts[k].shape[1..],
                    parts[0].dtype,
                    &parts[0].shape[1..]
                ),
            });
        }
    }
    let asked = opts.valid_split.unwrap_or(DEFAULT_VALID_SPLIT);
    let valid_split = if given_valid { 0 } else { asked };
    if valid_split >= n_train {
        return Err(LoadError::Dataset {
            path: dir.into(),
            what: format!(
                "--valid-split {asked} leaves no training examples (the training files hold {n_train})"
            ),
        });
    }
    // Examples [from, to) of file k.
    let slice = |k: usize, from: usize, to: usize| {
        let IdxPart {
            dtype,
            shape,
            start,
            ..
        } = &parts[k];
        let row = shape[1..].iter().product::<usize>() * dtype.size();
        let mut s = shape.clone();
        s[0] = to - from;
        let images = k.is_multiple_of(2);
        TensorSpec {
            dtype: *dtype,
            shape: s,
            buf: k,
            range: start + from * row..start + to * row,
            scale_divisor: (images && *dtype == DType::U8).then_some(idx::PIXEL_DIVISOR),
            file: paths[k].clone(),
        }
    };
    let cut = n_train - valid_split;
    let n_test = parts[2].shape[0];
    let mut sets = vec![SetSpec {
        name: "train".into(),
        x: slice(0, 0, cut),
        y: slice(1, 0, cut),
    }];
    if given_valid {
        let n_valid = parts[4].shape[0];
        sets.push(SetSpec {
            name: "valid".into(),
            x: slice(4, 0, n_valid),
            y: slice(5, 0, n_valid),
        });
    } else if valid_split > 0 {
        sets.push(SetSpec {
            name: "valid".into(),
            x: slice(0, cut, n_train),
            y: slice(1, cut, n_train),
        });
    }
    sets.push(SetSpec {
        name: "test".into(),
        x: slice(2, 0, n_test),
        y: slice(3, 0, n_test),
    });
    let bufs = parts.into_iter().map(|p| p.buf).collect();
    assemble(dir, format, bufs, sets, opts, t0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gzip member of `data` in one stored block.
    fn gz(data: &[u8]) -> Vec<u8> {
        let mut v = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1];
        v.extend((data.len() as u16).to_le_bytes());
        v.extend((!(data.len() as u16)).to_le_bytes());
        v.extend(data);
        v.extend(gzip::crc32(data).to_le_bytes());
        v.extend((data.len() as u32).to_le_bytes());
        v
    }

    fn spec(buf: usize, range: Range<usize>) -> TensorSpec {
        TensorSpec {
            dtype: DType::U8,
            shape: vec![range.len()],
            buf,
            range,
            scale_divisor: None,
            file: "t".into(),
        }
    }

    #[test]
    fn tensors_move_down_to_aligned_offsets_keeping_their_bytes() {
        let mut b = HostBuffer::zeroed(400, Backing::Private).unwrap();
        for (i, v) in b.as_mut_slice().iter_mut().enumerate() {
            *v = i as u8;
        }
        let before = b.as_slice().to_vec();
        // x at 133 (as MNIST's), y right after it with 3 bytes of framing;
        // the second set shares the first's y (the same bytes twice); a
        // last tensor with no room below it stays.
        let mut sets = vec![
            SetSpec {
                name: "a".into(),
                x: spec(0, 133..233),
                y: spec(0, 236..246),
            },
            SetSpec {
                name: "b".into(),
                x: spec(0, 250..300),
                y: spec(0, 236..246),
            },
        ];
        let mut bufs = vec![b];
        align_tensors(&mut bufs, &mut sets);
        let got = |t: &TensorSpec| bufs[0].as_slice()[t.range.clone()].to_vec();
        assert_eq!(sets[0].x.range, 0..100);
        assert_eq!(got(&sets[0].x), before[133..233]);
        assert_eq!(sets[0].y.range, 128..138);
        assert_eq!(got(&sets[0].y), before[236..246]);
        assert_eq!(sets[1].y.range, 128..138, "shared bytes stay shared");
        assert_eq!(sets[1].x.range, 192..242);
        assert_eq!(got(&sets[1].x), before[250..300]);
        // No room: a tensor at 70 after one ending at 65 stays at 70.
        let mut sets = vec![SetSpec {
            name: "c".into(),
            x: spec(0, 0..65),
            y: spec(0, 70..80),
        }];
        align_tensors(&mut bufs, &mut sets);
        assert_eq!(
            (sets[0].x.range.clone(), sets[0].y.range.clone()),
            (0..65, 70..80)
        );
    }

    #[test]
    fn the_bundled_samples_tensors_are_aligned() {
        let ds = load_bytes(
            Path::new("sample.pkl.gz"),
            crate::BUNDLED_SAMPLE,
            &LoadOptions {
                pin: PinPolicy::Off,
                ..Default::default()
            },
        )
        .unwrap();
        for s in &ds.sets {
            for t in [&s.x, &s.y] {
                assert_eq!(t.data.as_ptr() as usize % TENSOR_ALIGN, 0, "{}", s.name);
            }
        }
    }

    #[test]
    fn idx_errors_count_in_the_stream_the_file_holds() {
        // train images with a payload one byte short of their shape
        let mut short = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        short.extend([0u8; 7]);
        let opts = LoadOptions {
            pin: PinPolicy::Off,
            ..Default::default()
        };
        for (zipped, stream) in [(false, Stream::File), (true, Stream::Decompressed)] {
            let dir = tempfile::tempdir().unwrap();
            for n in [
                idx::TRAIN_IMAGES[0],
                idx::TRAIN_LABELS[0],
                idx::TEST_IMAGES[0],
                idx::TEST_LABELS[0],
            ] {
                let (name, data) = if zipped {
                    (format!("{n}.gz"), gz(&short))
                } else {
                    (n.to_string(), short.clone())
                };
                std::fs::write(dir.path().join(name), data).unwrap();
            }
            match load(dir.path(), &opts).unwrap_err() {
                LoadError::Idx { stream: s, at, .. } => {
                    assert_eq!(s, stream);
                    assert_eq!(at.offset, 16);
                }
                e => panic!("expected an IDX error, got {e}"),
            }
        }
    }

    fn keras_members(y_train: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
        let u8s = |n: usize, shape: &str| {
            npz::tests::npy(
                &format!("{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"),
                &(0..n).map(|i| i as u8).collect::<Vec<_>>(),
            )
        };
        vec![
            ("x_train.npy", u8s(5 * 4, "(5, 2, 2)")),
            (
                "y_train.npy",
                npz::tests::npy(
                    "{'descr': '|u1', 'fortran_order': False, 'shape': (5,), }",
                    y_train,
                ),
            ),
            ("x_test.npy", u8s(2 * 4, "(2, 2, 2)")),
            ("y_test.npy", u8s(2, "(2,)")),
        ]
    }

    #[test]
    fn npz_in_keras_layout_splits_flattens_and_widens() {
        let m = keras_members(&[9, 8, 7, 6, 5]);
        let refs: Vec<(&str, &[u8])> = m.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        let opts = LoadOptions {
            pin: PinPolicy::Off,
            valid_split: Some(2),
            ..Default::default()
        };
        let ds = load_bytes(Path::new("k.npz"), &npz::tests::zip(&refs), &opts).unwrap();
        assert_eq!(ds.format, Format::Npz);
        let names: Vec<&str> = ds.sets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["train", "valid", "test"]);
        let train = &ds.sets[0];
        assert_eq!(
            (train.x.dtype, train.x.shape.clone()),
            (DType::U8, vec![3, 4])
        );
        assert_eq!(train.x.scale_divisor, Some(idx::PIXEL_DIVISOR));
        assert_eq!(&train.x.data[..], &(0..12).collect::<Vec<u8>>()[..]);
        assert_eq!(
            (train.y.dtype, train.y.shape.clone()),
            (DType::I64, vec![3])
        );
        assert_eq!(&ds.sets[1].y.data[..8], &6i64.to_le_bytes());
        // a lying label header: named by file, member and offset
        let mut m = keras_members(&[9, 8, 7, 6]);
        m[1].1 = npz::tests::npy(
            "{'descr': '|u1', 'fortran_order': False, 'shape': (5,), }",
            &[1, 2, 3, 4],
        );
        let refs: Vec<(&str, &[u8])> = m.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        let e = load_bytes(Path::new("k.npz"), &npz::tests::zip(&refs), &opts).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("k.npz: npy member y_train.npy: member byte 128"),
            "{msg}"
        );
        assert_eq!(e.offset(), Some(128));
    }

    #[test]
    fn gzipd_npz_loads_like_the_npz_and_counts_offsets_inflated() {
        let m = keras_members(&[9, 8, 7, 6, 5]);
        let refs: Vec<(&str, &[u8])> = m.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        let zip = npz::tests::zip(&refs);
        let opts = LoadOptions {
            pin: PinPolicy::Off,
            valid_split: Some(2),
            ..Default::default()
        };
        let plain = load_bytes(Path::new("k.npz"), &zip, &opts).unwrap();
        let gzd = load_bytes(Path::new("k.npz.gz"), &gz(&zip), &opts).unwrap();
        assert_eq!(gzd.format, Format::Npz);
        for (a, b) in plain.sets.iter().zip(&gzd.sets) {
            assert_eq!(
                (&a.name, &a.x.data, &a.y.data),
                (&b.name, &b.x.data, &b.y.data)
            );
        }
        // a cut archive inside an intact gzip: the zip reader's offsets count
        // the inflated bytes
        let msg = load_bytes(Path::new("k.npz.gz"), &gz(&zip[..zip.len() - 30]), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("k.npz.gz: zip: decompressed byte "),
            "{msg}"
        );
        // the members share the limit with the inflated archive
        let tight = LoadOptions {
            max_bytes: zip.len() + 100,
            ..opts
        };
        let msg = load_bytes(Path::new("k.npz.gz"), &gz(&zip), &tight)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("over what the limit leaves"), "{msg}");
    }

    #[test]
    fn a_given_validation_pair_is_the_valid_set_and_nothing_is_split() {
        let mut m = keras_members(&[9, 8, 7, 6, 5]);
        m.push((
            "x_valid.npy",
            npz::tests::npy(
                "{'descr': '|u1', 'fortran_order': False, 'shape': (3, 4), }",
                &[200; 12],
            ),
        ));
        m.push((
            "y_valid.npy",
            npz::tests::npy(
                "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }",
                &[3u8; 24],
            ),
        ));
        let opts = LoadOptions {
            pin: PinPolicy::Off,
            valid_split: Some(2),
            ..Default::default()
        };
        let refs: Vec<(&str, &[u8])> = m.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        let from_npz = load_bytes(Path::new("v.npz"), &npz::tests::zip(&refs), &opts).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (name, data) in &m {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let from_dir = load(dir.path(), &opts).unwrap();
        for ds in [from_npz, from_dir] {
            let got: Vec<(&str, usize)> = ds
                .sets
                .iter()
                .map(|s| (s.name.as_str(), s.examples()))
                .collect();
            assert_eq!(got, [("train", 5), ("valid", 3), ("test", 2)]);
            assert_eq!(ds.sets[1].x.shape, vec![3, 4]);
            assert_eq!(ds.sets[1].x.scale_divisor, Some(idx::PIXEL_DIVISOR));
            assert_eq!(&ds.sets[1].x.data[..], &[200; 12]);
            assert_eq!(&ds.sets[1].y.data[..], &[3u8; 24]);
        }
        // a valid pair whose lengths disagree
        m[5].1 = npz::tests::npy(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }",
            &[3u8; 16],
        );
        let refs: Vec<(&str, &[u8])> = m.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        let msg = load_bytes(Path::new("v.npz"), &npz::tests::zip(&refs), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("v.npz:y_valid.npy: 2 labels for 3 images"),
            "{msg}"
        );
    }

    #[test]
    fn npy_directory_loads_like_the_npz() {
        let dir = tempfile::tempdir().unwrap();
        for (name, data) in keras_members(&[1, 2, 3, 4, 5]) {
            std::fs::write(dir.path().join(name), data).unwrap();
        }
        let opts = LoadOptions {
            pin: PinPolicy::Off,
            valid_split: Some(0),
            ..Default::default()
        };
        let ds = load(dir.path(), &opts).unwrap();
        assert_eq!(ds.format, Format::Npy);
        assert_eq!(ds.sets.len(), 2);
        assert_eq!(ds.sets[0].x.shape, vec![5, 4]);
        std::fs::write(dir.path().join("x_test.npy"), b"\x93NUMPY").unwrap();
        let msg = load(dir.path(), &opts).unwrap_err().to_string();
        assert!(msg.contains("x_test.npy: npy: byte 6: truncated"), "{msg}");
        std::fs::remove_file(dir.path().join("y_test.npy")).unwrap();
        let msg = load(dir.path(), &opts).unwrap_err().to_string();
        assert!(msg.contains("no y_test.npy"), "{msg}");
    }
}
