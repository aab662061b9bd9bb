//! From a parsed pickle to the dataset's tensors: checks the layout of
//! deeplearning.net's `mnist.pkl.gz`, `((train_x, train_y), (valid_x,
//! valid_y), (test_x, test_y))`, and normalizes every array to little-endian
//! C order.
//!
//! Arrays stay in the decompressed buffer: big-endian payloads are byte-swapped
//! where they lie. Only what cannot be served from where it lies gets its own
//! buffer: Fortran-order arrays (transposed to C order) and the tutorial's
//! other form, lists of 1-D images (stacked) and lists of Python int labels.
use std::collections::HashSet;

use crate::load::error::At;
use crate::load::pickle::{ArrayObj, DTypeObj, Object, Parsed, Span, Value};
use crate::load::work::Work;
use crate::memory::{Backing, HostBuffer};
use crate::store::DType;

/// Names given to the three pairs, in file order, as the tutorial does.
pub const SET_NAMES: [&str; 3] = ["train", "valid", "test"];

/// Where a planned tensor's bytes are.
#[derive(Debug)]
pub enum Storage {
    /// A span of the decompressed buffer (already little-endian, C order).
    Main(Span),
    /// A buffer of its own (transposed, stacked or built from Python values).
    Own(HostBuffer),
}

#[derive(Debug)]
pub struct PlannedTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub storage: Storage,
}

#[derive(Debug)]
pub struct PlannedSet {
    pub name: &'static str,
    pub x: PlannedTensor,
    pub y: PlannedTensor,
}

/// Checks the layout and normalizes arrays. May rewrite `buf` in place
/// (byte swaps); never copies an array that is already little-endian C order.
/// Swaps, transposes and stacks are counted against `work`.
pub fn plan(
    p: &Parsed,
    buf: &mut [u8],
    work: &mut Work,
    backing: Backing,
) -> Result<Vec<PlannedSet>, At> {
    let mut cx = Cx {
        p,
        buf,
        work,
        backing,
        swapped: HashSet::new(),
    };
    let top = cx.items(
        p.root,
        3,
        "the top level: expected a tuple of 3 (x, y) pairs (train, valid, test)",
    )?;
    let mut sets = Vec::with_capacity(3);
    for (name, &pair) in SET_NAMES.iter().zip(top) {
        let ctx = format!("set {name}: expected an (x, y) pair");
        let xy = cx.items(pair, 2, &ctx)?;
        let x = cx.tensor(xy[0], name, "x", false)?;
        let y = cx.tensor(xy[1], name, "y", true)?;
        if x.shape[0] != y.shape[0] {
            return Err(At::new(
                cx.offset(pair),
                format!(
                    "set {name}: x has {} examples but y has {}",
                    x.shape[0], y.shape[0]
                ),
            ));
        }
        if y.shape.len() != 1 {
            return Err(At::new(
                cx.offset(xy[1]),
                format!(
                    "set {name}: y must be 1-D (one label per example), found shape {:?}",
                    y.shape
                ),
            ));
        }
        sets.push(PlannedSet { name, x, y });
    }
    Ok(sets)
}

struct Cx<'a> {
    p: &'a Parsed,
    buf: &'a mut [u8],
    work: &'a mut Work,
    /// Where arrays that must be copied (transposed, stacked) go.
    backing: Backing,
    /// Spans already byte-swapped (an array referenced twice is swapped once).
    swapped: HashSet<usize>,
}

/// One item of a list of arrays (or numpy scalars): what it holds and where
/// its bytes are, borrowed from the parsed pickle.
struct Row<'a> {
    dtype: DType,
    shape: &'a [usize],
    span: Span,
    byteorder: u8,
}

impl<'a> Cx<'a> {
    fn offset(&self, v: Value) -> usize {
        match v {
            Value::Obj(id) => self.p.offset(id),
            Value::Bytes(s) | Value::Str(s, _) => s.start,
            _ => 0,
        }
    }

    /// The items of a tuple or list of exactly `n` values.
    fn items(&self, v: Value, n: usize, ctx: &str) -> Result<&'a [Value], At> {
        let p: &'a Parsed = self.p;
        if let Value::Obj(id) = v {
            if let Object::Tuple(items) | Object::List(items) = p.obj(id) {
                if items.len() == n {
                    return Ok(items);
                }
            }
        }
        Err(At::new(
            self.offset(v),
            format!("{ctx}, found {}", crate::load::pickle::describe(p, &v)),
        ))
    }

    fn tensor(
        &mut self,
        v: Value,
        set: &str,
        name: &str,
        labels: bool,
    ) -> Result<PlannedTensor, At> {
        let at = self.offset(v);
        let what = format!("set {set}: {name}");
        let p: &'a Parsed = self.p;
        let Value::Obj(id) = v else {
            return Err(At::new(
                at,
                format!(
                    "{what}: expected a numpy array or a list, found {}",
                    crate::load::pickle::describe(p, &v)
                ),
            ));
        };
        match p.obj(id) {
            Object::Array(a) => self.array(a, at, &what),
            Object::List(items) | Object::Tuple(items) => self.stack(items, at, &what, labels),
            o => Err(At::new(
                at,
                format!(
                    "{what}: expected a numpy array or a list, found a {}",
                    o.kind()
                ),
            )),
        }
    }

    fn dtype(&self, d: &DTypeObj, at: usize, what: &str) -> Result<DType, At> {
        DType::from_numpy_code(&d.code).ok_or_else(|| {
            At::new(
                at,
                format!(
                    "{what}: numpy dtype {:?} is not supported (numeric and bool types are)",
                    d.code
                ),
            )
        })
    }

    /// Swaps a big-endian payload to little-endian where it lies, once per
    /// payload however many arrays share it.
    fn swap_once(&mut self, span: Span, dtype: DType, at: usize) -> Result<(), At> {
        if dtype.size() > 1 && self.swapped.insert(span.start) {
            self.work.charge(span.len() / dtype.size(), at)?;
            swap_in_place(&mut self.buf[span.start..span.end], dtype.size());
        }
        Ok(())
    }

    /// Checks an array's payload against its shape; swaps big-endian data in
    /// place; transposes Fortran order into a buffer of its own.
    fn array(&mut self, a: &ArrayObj, at: usize, what: &str) -> Result<PlannedTensor, At> {
        let (Some(d), Some(span)) = (&a.dtype, a.data) else {
            return Err(At::new(
                at,
                format!("{what}: numpy array was never given its state (BUILD)"),
            ));
        };
        let dtype = self.dtype(d, at, what)?;
        self.work.charge(a.shape.len(), at)?;
        let need = dtype
            .array_bytes(&a.shape)
            .ok_or_else(|| At::new(at, format!("{what}: shape {:?} overflows", a.shape)))?;
        if need != span.len() {
            return Err(At::new(
                span.start,
                format!(
                    "{what}: shape {:?} of {dtype} needs {need} bytes, but the payload holds {}",
                    a.shape,
                    span.len()
                ),
            ));
        }
        if a.shape.is_empty() {
            return Err(At::new(
                at,
                format!("{what}: a 0-d array cannot hold examples"),
            ));
        }
        if d.byteorder == b'>' {
            self.swap_once(span, dtype, at)?;
        }
        let storage = if a.fortran && a.shape.len() > 1 {
            self.work.charge(need / dtype.size() + a.shape.len(), at)?;
            let mut out = HostBuffer::zeroed(need, self.backing)
                .map_err(|e| At::new(at, format!("{what}: cannot allocate {need} bytes: {e}")))?;
            fortran_to_c(
                &self.buf[span.start..span.end],
                out.as_mut_slice(),
                &a.shape,
                dtype.size(),
            );
            Storage::Own(out)
        } else {
            Storage::Main(span)
        };
        Ok(PlannedTensor {
            dtype,
            shape: a.shape.clone(),
            storage,
        })
    }

    /// The tutorial's list form: a list of 1-D arrays (stacked into one
    /// tensor) or, for labels, a list of ints or numpy scalars.
    fn stack(
        &mut self,
        items: &'a [Value],
        at: usize,
        what: &str,
        labels: bool,
    ) -> Result<PlannedTensor, At> {
        self.work.charge(items.len(), at)?;
        if items
            .iter()
            .all(|v| matches!(v, Value::Int(_) | Value::Bool(_)))
            && labels
        {
            return self.int_labels(items, at, what);
        }
        // Arrays or numpy scalars, all of one dtype and shape.
        let n = items.len();
        let mut first: Option<Row<'a>> = None;
        let mut parts = Vec::with_capacity(n);
        for (i, &v) in items.iter().enumerate() {
            let el_at = self.offset(v);
            let row = self.row(v, i, at, what, labels)?;
            self.work.charge(1 + row.shape.len(), el_at)?;
            match &first {
                None => {
                    // Each item of a real file has its own payload in the
                    // input, so the stacked result can never outgrow the
                    // input; a list of N references to one array (a memo
                    // bomb) can, and is refused here, before its other items.
                    let total = row.span.len().saturating_mul(n);
                    if total > self.buf.len() {
                        return Err(At::new(
                            at,
                            format!("{what}: stacking {n} items of {} bytes would need {total} bytes, more than the whole input holds (repeated references?)", row.span.len()),
                        ));
                    }
                }
                Some(f) if f.dtype == row.dtype && f.shape == row.shape => {}
                Some(f) => {
                    return Err(At::new(
                        el_at,
                        format!("{what}[{i}]: {} {:?} differs from item 0's {} {:?}; a list must hold arrays of one dtype and shape", row.dtype, row.shape, f.dtype, f.shape),
                    ))
                }
            }
            parts.push((row.span, row.byteorder));
            first.get_or_insert(row);
        }
        let Some(first) = first else {
            return Err(At::new(at, format!("{what}: empty list (no examples)")));
        };
        let row_bytes = first.span.len();
        let total = row_bytes * n;
        self.work.charge(total / first.dtype.size(), at)?;
        let mut out = HostBuffer::zeroed(total, self.backing)
            .map_err(|e| At::new(at, format!("{what}: cannot allocate {total} bytes: {e}")))?;
        for (i, (span, order)) in parts.iter().enumerate() {
            let dst = &mut out.as_mut_slice()[i * row_bytes..(i + 1) * row_bytes];
            dst.copy_from_slice(&self.buf[span.start..span.end]);
            if *order == b'>' && first.dtype.size() > 1 {
                swap_in_place(dst, first.dtype.size());
            }
        }
        let mut shape = vec![n];
        shape.extend(first.shape);
        Ok(PlannedTensor {
            dtype: first.dtype,
            shape,
            storage: Storage::Own(out),
        })
    }

    /// Labels as a list of Python ints (or bools): int64, one per item.
    fn int_labels(&mut self, items: &[Value], at: usize, what: &str) -> Result<PlannedTensor, At> {
        let n = items.len();
        let mut out = HostBuffer::zeroed(n * 8, self.backing)
            .map_err(|e| At::new(at, format!("{what}: cannot allocate: {e}")))?;
        for (i, v) in items.iter().enumerate() {
            let x = match *v {
                Value::Int(x) => x,
                Value::Bool(b) => b as i64,
                _ => unreachable!(),
            };
            out.as_mut_slice()[i * 8..i * 8 + 8].copy_from_slice(&x.to_le_bytes());
        }
        Ok(PlannedTensor {
            dtype: DType::I64,
            shape: vec![n],
            storage: Storage::Own(out),
        })
    }

    /// Item `i` of a list to stack: an array with its state, or a numpy
    /// scalar, whose payload matches its shape (C order only).
    fn row(&self, v: Value, i: usize, at: usize, what: &str, labels: bool) -> Result<Row<'a>, At> {
        let p: &'a Parsed = self.p;
        let el_at = self.offset(v);
        let (d, shape, span, fortran): (&DTypeObj, &'a [usize], Span, bool) = match v {
            Value::Obj(id) => match p.obj(id) {
                Object::Array(a) => match (&a.dtype, a.data) {
                    (Some(d), Some(s)) => (d, a.shape.as_slice(), s, a.fortran),
                    _ => {
                        return Err(At::new(
                            el_at,
                            format!("{what}[{i}]: numpy array without state"),
                        ))
                    }
                },
                Object::Scalar(d, s) => (d, &[][..], *s, false),
                o => {
                    return Err(At::new(
                        el_at,
                        format!("{what}[{i}]: expected a numpy array, found a {}", o.kind()),
                    ))
                }
            },
            other => {
                return Err(At::new(
                    el_at.max(at),
                    format!(
                        "{what}[{i}]: expected a numpy array{}, found {}",
                        if labels { " or an int" } else { "" },
                        crate::load::pickle::describe(p, &other)
                    ),
                ))
            }
        };
        let dtype = self.dtype(d, el_at, what)?;
        let row: usize = shape.iter().product::<usize>() * dtype.size();
        if row != span.len() {
            return Err(At::new(span.start, format!("{what}[{i}]: shape {shape:?} of {dtype} needs {row} bytes, the payload holds {}", span.len())));
        }
        if fortran && shape.len() > 1 {
            return Err(At::new(
                el_at,
                format!("{what}[{i}]: Fortran-order items in a list are not supported"),
            ));
        }
        Ok(Row {
            dtype,
            shape,
            span,
            byteorder: d.byteorder,
        })
    }
}

/// Reverses the bytes of each `size`-byte element.
pub fn swap_in_place(b: &mut [u8], size: usize) {
    for el in b.chunks_exact_mut(size) {
        el.reverse();
    }
}

/// Copies a Fortran-order (column-major) array into C order in
/// O(elements + dimensions): dimensions of size 1 are dropped (they change no
/// offset), then the C-order index advances like an odometer and the Fortran
/// offset moves with it, one stride per digit that turns. Every remaining
/// dimension has at least 2 values, so an advance turns fewer than 2 digits
/// on average.
fn fortran_to_c(src: &[u8], dst: &mut [u8], shape: &[usize], size: usize) {
    let total: usize = shape.iter().product();
    if total == 0 {
        return;
    }
    // Fortran strides (in elements, first axis fastest) of the dimensions
    // that are not 1, in C order.
    let mut dims = Vec::new();
    let mut stride = 1usize;
    for &n in shape {
        if n != 1 {
            dims.push((n, stride));
        }
        stride *= n;
    }
    let mut idx = vec![0usize; dims.len()];
    let mut f = 0usize;
    for c in 0..total {
        dst[c * size..(c + 1) * size].copy_from_slice(&src[f * size..(f + 1) * size]);
        // advance the C-order index (last axis fastest)
        for (k, &(n, s)) in dims.iter().enumerate().rev() {
            idx[k] += 1;
            f += s;
            if idx[k] < n {
                break;
            }
            idx[k] = 0;
            f -= n * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortran_transpose() {
        // 2x3 array [[0,1,2],[3,4,5]] in Fortran order is 0,3,1,4,2,5
        let src: Vec<u8> = vec![0, 3, 1, 4, 2, 5];
        let mut dst = vec![0u8; 6];
        fortran_to_c(&src, &mut dst, &[2, 3], 1);
        assert_eq!(dst, vec![0, 1, 2, 3, 4, 5]);
    }

    /// The transposition as first written: elements x dimensions.
    fn naive_fortran_to_c(src: &[u8], dst: &mut [u8], shape: &[usize], size: usize) {
        let nd = shape.len();
        let total: usize = shape.iter().product();
        let mut fstride = vec![1usize; nd];
        for k in 1..nd {
            fstride[k] = fstride[k - 1] * shape[k - 1];
        }
        let mut idx = vec![0usize; nd];
        for c in 0..total {
            let f: usize = idx.iter().zip(&fstride).map(|(i, s)| i * s).sum();
            dst[c * size..(c + 1) * size].copy_from_slice(&src[f * size..(f + 1) * size]);
            for k in (0..nd).rev() {
                idx[k] += 1;
                if idx[k] < shape[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
    }

    #[test]
    fn fortran_transpose_matches_the_naive_one() {
        let mut many = vec![1; 63];
        many.push(7);
        let mut many_first = vec![5];
        many_first.extend([1; 63]);
        let shapes: Vec<Vec<usize>> = vec![
            vec![2, 3],
            vec![3, 1, 4],
            vec![1, 5, 1, 2, 1],
            vec![4, 3, 2],
            vec![2, 2, 2, 2, 3],
            vec![0, 3],
            vec![2, 1],
            vec![1, 1],
            many,
            many_first,
        ];
        for shape in &shapes {
            for size in [1, 2, 4, 8] {
                let n: usize = shape.iter().product::<usize>() * size;
                let src: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
                let (mut want, mut got) = (vec![0u8; n], vec![0u8; n]);
                naive_fortran_to_c(&src, &mut want, shape, size);
                fortran_to_c(&src, &mut got, shape, size);
                assert_eq!(got, want, "shape {shape:?}, {size}-byte elements");
            }
        }
    }

    #[test]
    fn byte_swap() {
        let mut b = vec![1, 2, 3, 4, 5, 6, 7, 8];
        swap_in_place(&mut b, 4);
        assert_eq!(b, vec![4, 3, 2, 1, 8, 7, 6, 5]);
    }
}
