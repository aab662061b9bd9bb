//! CIFAR-10 and CIFAR-100, "python version": the `.tar.gz` as downloaded
//! (`cifar-10-python.tar.gz`, `cifar-100-python.tar.gz`) or its extracted
//! folder.
//!
//! Each batch is a pickled dict: `data`, a uint8 array [n, 3072] whose row is
//! one image's 1,024 red, 1,024 green and 1,024 blue bytes (channels, rows,
//! columns: CHW), and the labels as a list of ints (`labels` for CIFAR-10;
//! `fine_labels` and `coarse_labels` for CIFAR-100); `batch_label` and
//! `filenames` are read by the restricted pickle reader like everything else
//! and then ignored. The originals are Python 2 cPickle streams; re-pickled
//! copies (Python 3, protocols 2-5, bytes or str keys, numpy 1.x or 2.x names)
//! read the same.
//!
//! Memory: the batches are read into one buffer (the inflated archive, or
//! the batch files read back to back), each pickle is read where it lies,
//! and the image bytes are then moved together to the front of that same
//! buffer in serving order, which is shrunk to them: the images are held
//! once, and the peak is the archive's size (Python's loaders hold the
//! pickles and the stacked copy at once).
//!
//! Sets: `train` (every training batch in order: data_batch_1..5, or
//! `train`) and `test`, the official split, and `valid` only when
//! `--valid-split N` asks for the last N training images. x is uint8 [n, 3, 32, 32] with scale 1/255
//! (served as floats, byte b is b/255: torchvision's `ToTensor`); y is
//! int64. CIFAR-100 adds `train_coarse` and `test_coarse` (and
//! `valid_coarse`): the same x
//! tensors (the same bytes, not a copy) with the 20 coarse labels.
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::load::error::{At, LoadError, Stream};
use crate::load::pickle::{self, Object, Parsed, Value};
use crate::load::tar;
use crate::load::work::Work;
use crate::load::{assemble, LoadOptions, SetSpec, TensorSpec};
use crate::memory::HostBuffer;
use crate::store::{DType, Dataset, Format};

/// Bytes of one image: 3 channels of 32 x 32.
pub const ROW_BYTES: usize = 3 * 32 * 32;
/// The shape x is served in, per example: the file's own CHW order.
pub const IMAGE_SHAPE: [usize; 3] = [3, 32, 32];
/// Pixel scale when served as floats: value = byte / 255, what
/// torchvision's `ToTensor` gives for CIFAR (MNIST's pickle uses k/256, see
/// [`crate::load::idx::PIXEL_DIVISOR`]).
pub const PIXEL_DIVISOR: u32 = 255;
/// Most directory entries looked at for a batches folder in a folder given
/// as `--data` (an extracted top folder holds one, beside the archive).
const MAX_SUBDIRS: usize = 64;

/// Which of the two datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cifar10,
    Cifar100,
}

impl Kind {
    /// The training batches, in the order their rows are served.
    pub fn train_batches(self) -> &'static [&'static str] {
        match self {
            Kind::Cifar10 => &[
                "data_batch_1",
                "data_batch_2",
                "data_batch_3",
                "data_batch_4",
                "data_batch_5",
            ],
            Kind::Cifar100 => &["train"],
        }
    }

    pub fn test_batch(self) -> &'static str {
        match self {
            Kind::Cifar10 => "test_batch",
            Kind::Cifar100 => "test",
        }
    }

    /// Every file a batches folder of this kind must hold. CIFAR-100's
    /// batch names are generic words, so its `meta` must be there too
    /// before a folder is taken for CIFAR-100 (it is not read).
    fn required(self) -> Vec<&'static str> {
        let mut v = self.train_batches().to_vec();
        v.push(self.test_batch());
        if self == Kind::Cifar100 {
            v.push("meta");
        }
        v
    }

    pub fn format(self) -> Format {
        match self {
            Kind::Cifar10 => Format::Cifar10,
            Kind::Cifar100 => Format::Cifar100,
        }
    }

    /// The label lists of a batch and how many classes each has.
    fn label_keys(self) -> &'static [(&'static str, i64)] {
        match self {
            Kind::Cifar10 => &[("labels", 10)],
            Kind::Cifar100 => &[("fine_labels", 100), ("coarse_labels", 20)],
        }
    }
}

/// What one batch holds once read.
#[derive(Debug)]
struct Batch {
    /// The image bytes, relative to the batch's own bytes.
    data: Range<usize>,
    rows: usize,
    /// One list per [`Kind::label_keys`] entry.
    labels: Vec<Vec<i64>>,
}

/// Where a batch's bytes came from: what its errors name.
enum Origin {
    /// A member of an archive whose bytes count in `stream`.
    Member {
        archive: PathBuf,
        name: String,
        stream: Stream,
    },
    /// A file of its own.
    File(PathBuf),
}

/// One batch to read: its origin and its bytes in the load's buffer.
struct Part {
    origin: Origin,
    range: Range<usize>,
}

impl Part {
    /// The load error for a failure of `stage` at `at` (relative to the
    /// batch's bytes).
    fn error(&self, stage: &'static str, at: At, budget_spent: bool) -> LoadError {
        match &self.origin {
            Origin::Member {
                archive,
                name,
                stream,
            } => LoadError::Member {
                path: archive.clone(),
                member: name.clone(),
                stage,
                stream: *stream,
                base: self.range.start as u64,
                at,
            },
            Origin::File(path) => {
                let (path, stream) = (path.clone(), Stream::File);
                match (budget_spent, stage) {
                    (true, _) => LoadError::WorkBudget {
                        path,
                        stage,
                        stream,
                        at,
                    },
                    (_, "pickle") => LoadError::Pickle { path, stream, at },
                    _ => LoadError::Layout { path, stream, at },
                }
            }
        }
    }
}

/// Loads CIFAR from a tar archive held in `buf` (inflated when it was
/// gzip'd: `stream` says what its offsets count).
pub(super) fn load_tar(
    path: &Path,
    buf: HostBuffer,
    stream: Stream,
    opts: &LoadOptions,
    t0: Instant,
) -> Result<Dataset, LoadError> {
    let entries = tar::entries(buf.as_slice()).map_err(|at| LoadError::Tar {
        path: path.into(),
        stream,
        at,
    })?;
    // By name, the last of two members of one name winning (as extraction
    // would keep it): one pass, so a hostile archive of thousands of
    // look-alike names costs no more than it takes to list them.
    let by_name: std::collections::HashMap<&str, &tar::Entry> =
        entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let find = |name: &str| by_name.get(name).copied();
    let found = entries.iter().find_map(|e| {
        let (dir, base) = match e.name.rsplit_once('/') {
            Some((d, b)) => (format!("{d}/"), b),
            None => (String::new(), e.name.as_str()),
        };
        [Kind::Cifar10, Kind::Cifar100]
            .into_iter()
            .find(|k| {
                k.train_batches()[0] == base
                    && k.required()
                        .iter()
                        .all(|n| find(&format!("{dir}{n}")).is_some())
            })
            .map(|k| (k, dir))
    });
    let Some((kind, dir)) = found else {
        return Err(LoadError::Format {
            path: path.into(),
            what: format!(
                "a tar archive, but not CIFAR's python version (expected a folder holding data_batch_1..5 and test_batch, or train, test and meta); it holds [{}]",
                super::listing(entries.iter().map(|e| e.name.as_str()))
            ),
        });
    };
    let parts = kind
        .train_batches()
        .iter()
        .chain([&kind.test_batch()])
        .map(|n| {
            let e = find(&format!("{dir}{n}")).expect("checked above");
            Part {
                origin: Origin::Member {
                    archive: path.into(),
                    name: e.name.clone(),
                    stream,
                },
                range: e.data.clone(),
            }
        })
        .collect();
    tracing::info!(path = %path.display(), format = kind.format().name(), members = entries.len(), "tar read");
    build(path, kind, buf, parts, opts, t0)
}

/// The kind of CIFAR batches folder `dir` is, if it is one.
pub(super) fn kind_of(dir: &Path) -> Option<Kind> {
    [Kind::Cifar10, Kind::Cifar100]
        .into_iter()
        .find(|k| k.required().iter().all(|n| dir.join(n).is_file()))
}

/// The one batches folder among `dir`'s subfolders (the folder an archive
/// was extracted into, torchvision's `root`), and its kind. Two of them
/// side by side are an error: which one was meant is not ours to guess.
pub(super) fn find_subdir(dir: &Path) -> Result<Option<(PathBuf, Kind)>, LoadError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let found: Vec<(PathBuf, Kind)> = entries
        .take(MAX_SUBDIRS)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter_map(|p| kind_of(&p).map(|k| (p, k)))
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        [a, b, ..] => Err(LoadError::Format {
            path: dir.into(),
            what: format!(
                "holds more than one CIFAR batches folder ({} and {}): pass the one to serve",
                a.0.display(),
                b.0.display()
            ),
        }),
    }
}

/// Loads CIFAR from an extracted batches folder `dir` of `kind` (found at
/// or under `source`, the path as given): the batch files are read back to
/// back into one buffer, their total size counted against
/// `--max-dataset-bytes` before it is allocated.
pub(super) fn load_dir(
    source: &Path,
    dir: &Path,
    kind: Kind,
    opts: &LoadOptions,
    t0: Instant,
) -> Result<Dataset, LoadError> {
    let files: Vec<PathBuf> = kind
        .train_batches()
        .iter()
        .chain([&kind.test_batch()])
        .map(|n| dir.join(n))
        .collect();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { path, source }
    };
    let mut sizes = Vec::with_capacity(files.len());
    let mut total = 0usize;
    for f in &files {
        let len = std::fs::metadata(f).map_err(io(f))?.len();
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        total = total.saturating_add(len);
        if total > opts.max_bytes {
            return Err(LoadError::Dataset {
                path: dir.into(),
                what: format!(
                    "the batch files hold more than the limit of {} bytes (--max-dataset-bytes)",
                    opts.max_bytes
                ),
            });
        }
        sizes.push(len);
    }
    let mut buf =
        HostBuffer::zeroed(total.max(1), opts.backing).map_err(|source| LoadError::Memory {
            bytes: total,
            source,
        })?;
    let mut parts = Vec::with_capacity(files.len());
    let mut at = 0usize;
    for (f, &len) in files.iter().zip(&sizes) {
        read_exactly(f, &mut buf.as_mut_slice()[at..at + len]).map_err(io(f))?;
        parts.push(Part {
            origin: Origin::File(f.clone()),
            range: at..at + len,
        });
        at += len;
    }
    tracing::info!(path = %dir.display(), format = kind.format().name(), bytes = total, ms = t0.elapsed().as_millis() as u64, "read");
    build(source, kind, buf, parts, opts, t0)
}

/// Fills `dst` from the file, which must hold exactly that many bytes (it
/// could have changed since its size was taken).
fn read_exactly(path: &Path, dst: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    f.read_exact(dst)?;
    if f.read(&mut [0u8; 1])? != 0 {
        return Err(std::io::Error::other("the file grew while it was read"));
    }
    Ok(())
}

/// Reads every batch where it lies in `buf`, gathers the images at the
/// front of `buf` in serving order, and describes the sets.
fn build(
    source: &Path,
    kind: Kind,
    mut buf: HostBuffer,
    parts: Vec<Part>,
    opts: &LoadOptions,
    t0: Instant,
) -> Result<Dataset, LoadError> {
    let mut batches = Vec::with_capacity(parts.len());
    for p in &parts {
        let bytes = &mut buf.as_mut_slice()[p.range.clone()];
        let mut work = Work::for_input(bytes.len());
        let b = read_batch(bytes, kind, &mut work)
            .map_err(|(stage, at)| p.error(stage, at, work.exceeded()))?;
        batches.push(b);
    }
    // Every label is copied out and every image located: the rest of the
    // pickles is no longer needed, and the images move over it.
    let spans: Vec<Range<usize>> = batches
        .iter()
        .zip(&parts)
        .map(|(b, p)| p.range.start + b.data.start..p.range.start + b.data.end)
        .collect();
    let parsed_ms = t0.elapsed().as_millis() as u64;
    gather_in_place(buf.as_mut_slice(), &spans);
    tracing::debug!(
        parsed_ms,
        gathered_ms = t0.elapsed().as_millis() as u64,
        "batches read and images gathered"
    );
    let n_test = batches.last().expect("a test batch").rows;
    let n_train: usize = batches[..batches.len() - 1].iter().map(|b| b.rows).sum();
    let x_bytes = (n_train + n_test) * ROW_BYTES;
    buf.resize(x_bytes).map_err(|source| LoadError::Memory {
        bytes: x_bytes,
        source,
    })?;
    let x = |rows: Range<usize>| TensorSpec {
        dtype: DType::U8,
        shape: [&[rows.len()][..], &IMAGE_SHAPE].concat(),
        buf: 0,
        range: rows.start * ROW_BYTES..rows.end * ROW_BYTES,
        scale_divisor: Some(PIXEL_DIVISOR),
        file: source.into(),
    };
    // CIFAR has no validation set: none unless --valid-split asks for the
    // last N training images (in data_batch order).
    let v = opts.valid_split.unwrap_or(0);
    if v > 0 && v >= n_train {
        return Err(LoadError::Dataset {
            path: source.into(),
            what: format!(
                "--valid-split {v} leaves no training examples (the training batches hold {n_train})"
            ),
        });
    }
    let mut bufs = vec![buf];
    let mut sets = Vec::new();
    let mut splits = vec![("train", 0..n_train - v, false)];
    if v > 0 {
        splits.push(("valid", n_train - v..n_train, false));
    }
    splits.push(("test", n_train..n_train + n_test, true));
    let n_batches = batches.len();
    for (k, (key, _)) in kind.label_keys().iter().enumerate() {
        for (name, range, test) in &splits {
            // Rows of the training batches (or of the test batch) in order;
            // `range` counts rows of x, where test rows follow train's.
            let first = if *test { n_train } else { 0 };
            let picked = batches
                .iter()
                .enumerate()
                .filter(|(i, _)| (*i == n_batches - 1) == *test)
                .flat_map(|(_, b)| b.labels[k].iter().copied())
                .skip(range.start - first)
                .take(range.len());
            let y = labels_buffer(picked, range.len(), opts)?;
            bufs.push(y);
            let name = if k == 0 {
                name.to_string()
            } else {
                format!("{name}_{}", key.trim_end_matches("_labels"))
            };
            sets.push(SetSpec {
                name,
                x: x(range.clone()),
                y: TensorSpec {
                    dtype: DType::I64,
                    shape: vec![range.len()],
                    buf: bufs.len() - 1,
                    range: 0..range.len() * 8,
                    scale_divisor: None,
                    file: source.into(),
                },
            });
        }
    }
    assemble(source, kind.format(), bufs, sets, opts, t0)
}

/// `n` labels as little-endian int64 in a buffer of their own.
fn labels_buffer(
    labels: impl Iterator<Item = i64>,
    n: usize,
    opts: &LoadOptions,
) -> Result<HostBuffer, LoadError> {
    let mut b = HostBuffer::zeroed(n * 8, opts.backing).map_err(|source| LoadError::Memory {
        bytes: n * 8,
        source,
    })?;
    for (dst, v) in b.as_mut_slice().chunks_exact_mut(8).zip(labels) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    Ok(b)
}

/// Moves the disjoint byte ranges `spans` to the front of `buf`, one after
/// another in the order given, in place.
///
/// Why in place: a second buffer for the stacked images would double the
/// peak (CIFAR-10's images are 184 MB). First every range slides down, in
/// the order they lie in the buffer, to where the previous one ended (a
/// range only ever moves down, over bytes already moved or no longer
/// needed); then ranges that lie out of order are rotated into place
/// (CIFAR-10's archive holds data_batch_4 first and data_batch_1 last).
/// Ranges already in order, as an extracted folder's are, only slide.
fn gather_in_place(buf: &mut [u8], spans: &[Range<usize>]) {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| spans[i].start);
    let mut cursor = 0;
    for &i in &order {
        buf.copy_within(spans[i].clone(), cursor);
        cursor += spans[i].len();
    }
    // `order[k]`: the span that now lies k-th. Bring span k to position k.
    let mut start = 0;
    for k in 0..spans.len() {
        let j = order[k..]
            .iter()
            .position(|&i| i == k)
            .expect("every span is placed")
            + k;
        if j > k {
            let end = start + order[k..=j].iter().map(|&i| spans[i].len()).sum::<usize>();
            buf[start..end].rotate_right(spans[k].len());
            let moved = order.remove(j);
            order.insert(k, moved);
        }
        start += spans[k].len();
    }
}

/// Reads one batch's pickle in place and checks it: a dict whose `data` is
/// a uint8 array of whole CIFAR rows and whose label lists (per `kind`)
/// hold one label per row, each a valid class. Errors carry the stage
/// ("pickle" or "layout") and the offset in the batch's bytes.
fn read_batch(bytes: &mut [u8], kind: Kind, work: &mut Work) -> Result<Batch, (&'static str, At)> {
    let p = pickle::parse(bytes, work).map_err(|at| ("pickle", at))?;
    let bytes: &[u8] = bytes;
    let lay = |at: At| ("layout", at);
    let Value::Obj(id) = p.root else {
        return Err(lay(At::new(
            0,
            format!(
                "expected a dict (a CIFAR batch: data, labels, ...), found {}",
                pickle::describe(&p, &p.root)
            ),
        )));
    };
    let dict_at = p.offset(id);
    let Object::Dict(items) = p.obj(id) else {
        return Err(lay(At::new(
            dict_at,
            format!(
                "expected a dict (a CIFAR batch: data, labels, ...), found a {}",
                p.obj(id).kind()
            ),
        )));
    };
    // Python keeps the last value of a key given twice.
    let get = |key: &str, work: &mut Work| -> Result<Value, At> {
        work.charge(items.len(), dict_at)?;
        items
            .iter()
            .rev()
            .find(|(k, _)| {
                matches!(k, Value::Bytes(s) | Value::Str(s, _) if &bytes[s.start..s.end] == key.as_bytes())
            })
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                At::new(
                    dict_at,
                    format!(
                        "the batch dict has no key {key:?} (a {} batch holds data, {})",
                        kind.format().name(),
                        kind.label_keys()
                            .iter()
                            .map(|(k, _)| *k)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    };
    let data = get("data", work).map_err(lay)?;
    let (data, rows) = images(&p, data).map_err(lay)?;
    let mut labels = Vec::new();
    for &(key, classes) in kind.label_keys() {
        let v = get(key, work).map_err(lay)?;
        labels.push(label_list(&p, v, key, rows, classes, work).map_err(lay)?);
    }
    Ok(Batch { data, rows, labels })
}

/// The `data` array: uint8, [n, 3072] (or [n, 3, 32, 32]), C order, its
/// payload exactly n rows. Returns the payload and n.
fn images(p: &Parsed, v: Value) -> Result<(Range<usize>, usize), At> {
    let found = || pickle::describe(p, &v);
    let Value::Obj(id) = v else {
        return Err(At::new(
            0,
            format!("data: expected a numpy uint8 array, found {}", found()),
        ));
    };
    let at = p.offset(id);
    let Object::Array(a) = p.obj(id) else {
        return Err(At::new(
            at,
            format!("data: expected a numpy uint8 array, found a {}", found()),
        ));
    };
    let (Some(d), Some(span)) = (&a.dtype, a.data) else {
        return Err(At::new(
            at,
            "data: numpy array was never given its state (BUILD)",
        ));
    };
    if DType::from_numpy_code(&d.code) != Some(DType::U8) {
        return Err(At::new(
            at,
            format!("data: numpy dtype {:?}, expected uint8 pixels", d.code),
        ));
    }
    let rows = match a.shape.as_slice() {
        [n, r] if *r == ROW_BYTES => *n,
        [n, 3, 32, 32] => *n,
        s => {
            return Err(At::new(
                at,
                format!("data: shape {s:?}, expected (n, 3072): rows of 1,024 red, 1,024 green and 1,024 blue bytes"),
            ))
        }
    };
    if rows == 0 {
        return Err(At::new(at, "data: a batch with no images"));
    }
    if a.fortran {
        return Err(At::new(
            at,
            "data: a Fortran-order array (CIFAR rows are C order)",
        ));
    }
    if span.len() != rows * ROW_BYTES {
        return Err(At::new(
            span.start,
            format!(
                "data: shape {:?} needs {} bytes, the payload holds {}",
                a.shape,
                rows * ROW_BYTES,
                span.len()
            ),
        ));
    }
    Ok((span.start..span.end, rows))
}

/// A label list: a list (or tuple) of exactly `rows` Python ints, each in
/// `0..classes`.
fn label_list(
    p: &Parsed,
    v: Value,
    key: &str,
    rows: usize,
    classes: i64,
    work: &mut Work,
) -> Result<Vec<i64>, At> {
    let (items, at) = match v {
        Value::Obj(id) => match p.obj(id) {
            Object::List(items) | Object::Tuple(items) => (items, p.offset(id)),
            o => {
                return Err(At::new(
                    p.offset(id),
                    format!("{key}: expected a list of ints, found a {}", o.kind()),
                ))
            }
        },
        _ => {
            return Err(At::new(
                0,
                format!(
                    "{key}: expected a list of ints, found {}",
                    pickle::describe(p, &v)
                ),
            ))
        }
    };
    if items.len() != rows {
        return Err(At::new(
            at,
            format!("{key}: {} labels for {rows} images", items.len()),
        ));
    }
    work.charge(items.len(), at)?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match *v {
            Value::Int(c) if (0..classes).contains(&c) => Ok(c),
            Value::Int(c) => Err(At::new(
                at,
                format!(
                    "{key}[{i}] is {c}: outside the {classes} classes 0..{}",
                    classes - 1
                ),
            )),
            other => Err(At::new(
                at,
                format!(
                    "{key}[{i}]: expected an int, found {}",
                    pickle::describe(p, &other)
                ),
            )),
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::load::tar::tests::archive;
    use crate::load::PinPolicy;

    /// A protocol-2 CIFAR batch in cPickle's form: `{'data': uint8 [n,
    /// 3072], key: [labels...], 'batch_label': '...'}`, every str a
    /// SHORT_BINSTRING, the array via `_reconstruct` + BUILD.
    pub(crate) fn batch(n: usize, first: u8, keys: &[(&str, &[i64])]) -> Vec<u8> {
        let mut p = b"\x80\x02}q\x01(U\x04dataq\x02".to_vec();
        p.extend(b"cnumpy.core.multiarray\n_reconstruct\nq\x03cnumpy\nndarray\nq\x04K\x00\x85U\x01b\x87Rq\x05");
        p.extend(b"(K\x01J");
        p.extend((n as i32).to_le_bytes());
        p.extend(b"M\x00\x0c\x86cnumpy\ndtype\nq\x06U\x02u1K\x00K\x01\x87Rq\x07");
        p.extend(b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T");
        p.extend(((n * ROW_BYTES) as i32).to_le_bytes());
        p.extend((0..n * ROW_BYTES).map(|i| first.wrapping_add((i / ROW_BYTES) as u8)));
        p.extend(b"tb");
        for (key, labels) in keys {
            p.push(b'U');
            p.push(key.len() as u8);
            p.extend(key.as_bytes());
            p.extend(b"](");
            for l in *labels {
                p.push(b'J');
                p.extend((*l as i32).to_le_bytes());
            }
            p.extend(b"e");
        }
        p.extend(b"U\x0bbatch_labelU\x05hellou.");
        p
    }

    fn opts() -> LoadOptions {
        LoadOptions {
            pin: PinPolicy::Off,
            ..Default::default()
        }
    }

    /// CIFAR-10's members in the order the real archive holds them.
    fn cifar10_tar(rows: usize) -> Vec<u8> {
        let b = |k: u8| batch(rows, 10 * k, &[("labels", &vec![k as i64; rows])]);
        let (b1, b2, b3, b4, b5, t) = (b(1), b(2), b(3), b(4), b(5), b(9));
        archive(&[
            ("cifar-10-batches-py/data_batch_4", &b4),
            ("cifar-10-batches-py/readme.html", b"<html/>"),
            ("cifar-10-batches-py/test_batch", &t),
            ("cifar-10-batches-py/data_batch_3", &b3),
            ("cifar-10-batches-py/batches.meta", b"not read"),
            ("cifar-10-batches-py/data_batch_2", &b2),
            ("cifar-10-batches-py/data_batch_5", &b5),
            ("cifar-10-batches-py/data_batch_1", &b1),
        ])
    }

    #[test]
    fn cifar10_archive_in_its_own_member_order_serves_batches_in_order() {
        let raw = cifar10_tar(3);
        let ds = crate::load::load_bytes(Path::new("c10.tar"), &raw, &opts()).unwrap();
        assert_eq!(ds.format, Format::Cifar10);
        let names: Vec<&str> = ds.sets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["train", "test"]);
        let train = &ds.sets[0];
        assert_eq!(train.x.shape, vec![15, 3, 32, 32]);
        assert_eq!(train.x.scale_divisor, Some(255));
        for (i, k) in [1u8, 2, 3, 4, 5].iter().enumerate() {
            for r in 0..3 {
                let row = train.x.row(3 * i + r);
                assert!(
                    row.iter().all(|&v| v == 10 * k + r as u8),
                    "batch {k} row {r}"
                );
                let y = &train.y.data[(3 * i + r) * 8..(3 * i + r + 1) * 8];
                assert_eq!(y, &(*k as i64).to_le_bytes());
            }
        }
        assert_eq!(ds.sets[1].x.row(2)[0], 92);
        // The images are all that is left of the archive.
        assert_eq!(ds.tensor_bytes(), 18 * ROW_BYTES + 18 * 8);
    }

    #[test]
    fn a_member_given_twice_is_read_from_its_last_copy() {
        let mut raw = cifar10_tar(1);
        raw.truncate(raw.len() - 2 * tar::BLOCK);
        let again = batch(1, 200, &[("labels", &[7])]);
        raw.extend(archive(&[("cifar-10-batches-py/data_batch_1", &again)]));
        let ds = crate::load::load_bytes(Path::new("d.tar"), &raw, &opts()).unwrap();
        assert_eq!(ds.sets[0].x.row(0)[0], 200);
        assert_eq!(&ds.sets[0].y.data[..8], &7i64.to_le_bytes());
        assert_eq!(ds.sets[0].x.row(1)[0], 20, "data_batch_2 follows");
    }

    #[test]
    fn cifar100_coarse_sets_share_the_images() {
        let fine: Vec<i64> = (0..4).map(|i| i * 33).collect();
        let coarse: Vec<i64> = (0..4).map(|i| i * 6).collect();
        let tr = batch(4, 0, &[("coarse_labels", &coarse), ("fine_labels", &fine)]);
        let te = batch(1, 7, &[("fine_labels", &[99]), ("coarse_labels", &[19])]);
        let raw = archive(&[
            ("cifar-100-python/train", &tr),
            ("cifar-100-python/test", &te),
            ("cifar-100-python/meta", b""),
        ]);
        let ds = crate::load::load_bytes(Path::new("c100.tar"), &raw, &opts()).unwrap();
        assert_eq!(ds.format, Format::Cifar100);
        let names: Vec<&str> = ds.sets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["train", "test", "train_coarse", "test_coarse"]);
        assert_eq!(ds.sets[0].x.data.as_ptr(), ds.sets[2].x.data.as_ptr());
        assert_eq!(ds.sets[1].x.data.as_ptr(), ds.sets[3].x.data.as_ptr());
        assert_eq!(&ds.sets[0].y.data[8..16], &33i64.to_le_bytes());
        assert_eq!(&ds.sets[2].y.data[8..16], &6i64.to_le_bytes());
        assert_eq!(&ds.sets[3].y.data[..], &19i64.to_le_bytes());
    }

    #[test]
    fn extracted_folders_top_or_batches() {
        let top = tempfile::tempdir().unwrap();
        let raw = cifar10_tar(2);
        let mut files = Vec::new();
        for e in tar::entries(&raw).unwrap() {
            files.push((e.name.clone(), raw[e.data.clone()].to_vec()));
        }
        std::fs::create_dir(top.path().join("cifar-10-batches-py")).unwrap();
        for (name, data) in &files {
            std::fs::write(top.path().join(name), data).unwrap();
        }
        let from_tar = crate::load::load_bytes(Path::new("t"), &raw, &opts()).unwrap();
        for dir in [
            top.path().to_path_buf(),
            top.path().join("cifar-10-batches-py"),
        ] {
            let ds = crate::load::load(&dir, &opts()).unwrap();
            assert_eq!(ds.format, Format::Cifar10);
            for (a, b) in ds.sets.iter().zip(&from_tar.sets) {
                assert_eq!((&a.x.data, &a.y.data), (&b.x.data, &b.y.data));
            }
        }
        // A broken batch file is named with its own offset.
        std::fs::write(
            top.path().join("cifar-10-batches-py/data_batch_3"),
            b"\x80\x02cos\nsystem\n.",
        )
        .unwrap();
        let msg = crate::load::load(top.path(), &opts())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("data_batch_3: pickle: byte 2: refusing global os.system"),
            "{msg}"
        );
        // Two batches folders side by side: which one is not guessed.
        std::fs::create_dir(top.path().join("second")).unwrap();
        for (name, data) in &files {
            let base = name.rsplit_once('/').unwrap().1;
            std::fs::write(top.path().join("second").join(base), data).unwrap();
        }
        let msg = crate::load::load(top.path(), &opts())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("more than one CIFAR batches folder"), "{msg}");
    }

    #[test]
    fn batch_errors_name_member_and_offsets() {
        let mut raw = cifar10_tar(2);
        let e = tar::entries(&raw).unwrap();
        let b2 = e
            .iter()
            .find(|e| e.name.ends_with("data_batch_2"))
            .unwrap()
            .data
            .clone();
        // labels list one short: rewrite data_batch_2 with 1 label
        let bad = batch(2, 0, &[("labels", &[1])]);
        assert_eq!(bad.len() + 5, b2.len());
        raw[b2.start..b2.start + bad.len()].copy_from_slice(&bad);
        // the member's size field still says the old length: patch the tail to be "after STOP"
        let msg = crate::load::load_bytes(Path::new("c.tar"), &raw, &opts())
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("c.tar: member cifar-10-batches-py/data_batch_2: pickle: byte "),
            "{msg}"
        );
        assert!(msg.contains("bytes after the pickle's STOP"), "{msg}");

        let cases: [(Vec<u8>, &str); 4] = [
            (
                batch(2, 0, &[("labels", &[1])]),
                "labels: 1 labels for 2 images",
            ),
            (
                batch(2, 0, &[("labels", &[1, 10])]),
                "labels[1] is 10: outside the 10 classes 0..9",
            ),
            (
                batch(2, 0, &[("fine_labels", &[1, 1])]),
                "no key \"labels\"",
            ),
            (
                b"\x80\x02}q\x01(U\x04datacposix\nsystem\nu.".to_vec(),
                "refusing global posix.system",
            ),
        ];
        for (bad, want) in cases {
            let mut m: Vec<(String, Vec<u8>)> = tar::entries(&cifar10_tar(2))
                .unwrap()
                .into_iter()
                .map(|e| (e.name.clone(), cifar10_tar(2)[e.data].to_vec()))
                .collect();
            m[3].1 = bad;
            let refs: Vec<(&str, &[u8])> =
                m.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
            let raw = archive(&refs);
            let e = crate::load::load_bytes(Path::new("c.tar"), &raw, &opts()).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("member cifar-10-batches-py/data_batch_3: "),
                "{msg}"
            );
            assert!(msg.contains(want), "{msg}");
            assert!(e.offset().unwrap() < raw.len() as u64, "{msg}");
        }
    }

    #[test]
    fn other_archives_and_mismatched_rows_are_refused() {
        let raw = archive(&[("x/readme", b"hi")]);
        let msg = crate::load::load_bytes(Path::new("o.tar"), &raw, &opts())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("not CIFAR's python version") && msg.contains("[x/readme]"),
            "{msg}"
        );
        // wrong shape: 3071 bytes a row
        let mut b = batch(1, 0, &[("labels", &[0])]);
        let p = b.windows(3).position(|w| w == b"M\x00\x0c").unwrap();
        b[p + 1..p + 3].copy_from_slice(&3071u16.to_le_bytes());
        let mut work = Work::for_input(b.len());
        let (stage, at) = read_batch(&mut b, Kind::Cifar10, &mut work).unwrap_err();
        assert_eq!(stage, "layout");
        assert!(
            at.what.contains("shape [1, 3071], expected (n, 3072)"),
            "{}",
            at.what
        );
    }

    #[test]
    fn gather_moves_spans_to_the_front_in_the_order_given() {
        let mut rng = 12345u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..200 {
            let n = 1 + (next() % 6) as usize;
            let mut spans = Vec::new();
            let mut at = 0;
            for _ in 0..n {
                at += (next() % 5) as usize;
                let len = 1 + (next() % 9) as usize;
                spans.push(at..at + len);
                at += len;
            }
            // a random serving order
            for i in (1..n).rev() {
                spans.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            let mut buf: Vec<u8> = (0..at + 3).map(|i| i as u8).collect();
            let want: Vec<u8> = spans.iter().flat_map(|r| buf[r.clone()].to_vec()).collect();
            gather_in_place(&mut buf, &spans);
            assert_eq!(&buf[..want.len()], &want[..], "{spans:?}");
        }
    }
}
