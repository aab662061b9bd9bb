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
use crate::memory::HostBuffer;
use crate::store::DType;

/// Names given to the three pairs, in file order, as the tutorial does.
pub const SET_NAMES: [&str; 3] = ["train", "valid", "test"];

/// Where a planned tensor's bytes are.
#[derive(Debug)]
pub enum Bytes {
    /// A span of the decompressed buffer (already little-endian, C order).
    Main(Span),
    /// A buffer of its own (transposed, stacked or built from Python values).
    Own(HostBuffer),
}

#[derive(Debug)]
pub struct PlannedTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Bytes,
}

#[derive(Debug)]
pub struct PlannedSet {
    pub name: &'static str,
    pub x: PlannedTensor,
    pub y: PlannedTensor,
}

/// Checks the layout and normalizes arrays. May rewrite `buf` in place
/// (byte swaps); never copies an array that is already little-endian C order.
pub fn plan(p: &Parsed, buf: &mut [u8]) -> Result<Vec<PlannedSet>, At> {
    let mut cx = Cx {
        p,
        buf,
        swapped: HashSet::new(),
    };
    let top = cx.items(
        p.root,
        3,
        "the top level: expected a tuple of 3 (x, y) pairs (train, valid, test)",
    )?;
    let mut sets = Vec::with_capacity(3);
    for (name, pair) in SET_NAMES.iter().zip(top) {
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
    /// Spans already byte-swapped (an array referenced twice is swapped once).
    swapped: HashSet<usize>,
}

impl Cx<'_> {
    fn offset(&self, v: Value) -> usize {
        match v {
            Value::Obj(id) => self.p.offset(id),
            Value::Bytes(s) | Value::Str(s, _) => s.start,
            _ => 0,
        }
    }

    /// The items of a tuple or list of exactly `n` values.
    fn items(&self, v: Value, n: usize, ctx: &str) -> Result<Vec<Value>, At> {
        if let Value::Obj(id) = v {
            if let Object::Tuple(items) | Object::List(items) = self.p.obj(id) {
                if items.len() == n {
                    return Ok(items.clone());
                }
            }
        }
        Err(At::new(
            self.offset(v),
            format!("{ctx}, found {}", crate::load::pickle::describe(self.p, &v)),
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
        let Value::Obj(id) = v else {
            return Err(At::new(
                at,
                format!(
                    "{what}: expected a numpy array or a list, found {}",
                    crate::load::pickle::describe(self.p, &v)
                ),
            ));
        };
        match self.p.obj(id) {
            Object::Array(a) => {
                let a = a.clone();
                self.array(&a, at, &what)
            }
            Object::List(items) | Object::Tuple(items) => {
                let items = items.clone();
                self.stack(&items, at, &what, labels)
            }
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
        let need = a
            .shape
            .iter()
            .try_fold(dtype.size(), |acc, &x| acc.checked_mul(x))
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
        if d.byteorder == b'>' && dtype.size() > 1 && self.swapped.insert(span.start) {
            swap_in_place(&mut self.buf[span.start..span.end], dtype.size());
        }
        let bytes = if a.fortran && a.shape.len() > 1 {
            let mut out = HostBuffer::zeroed(need)
                .map_err(|e| At::new(at, format!("{what}: cannot allocate {need} bytes: {e}")))?;
            fortran_to_c(
                &self.buf[span.start..span.end],
                out.as_mut_slice(),
                &a.shape,
                dtype.size(),
            );
            Bytes::Own(out)
        } else {
            Bytes::Main(span)
        };
        Ok(PlannedTensor {
            dtype,
            shape: a.shape.clone(),
            bytes,
        })
    }

    /// The tutorial's list form: a list of 1-D arrays (stacked into one
    /// tensor) or, for labels, a list of ints or numpy scalars.
    fn stack(
        &mut self,
        items: &[Value],
        at: usize,
        what: &str,
        labels: bool,
    ) -> Result<PlannedTensor, At> {
        let n = items.len();
        if items
            .iter()
            .all(|v| matches!(v, Value::Int(_) | Value::Bool(_)))
            && labels
        {
            let mut out = HostBuffer::zeroed(n * 8)
                .map_err(|e| At::new(at, format!("{what}: cannot allocate: {e}")))?;
            for (i, v) in items.iter().enumerate() {
                let x = match *v {
                    Value::Int(x) => x,
                    Value::Bool(b) => b as i64,
                    _ => unreachable!(),
                };
                out.as_mut_slice()[i * 8..i * 8 + 8].copy_from_slice(&x.to_le_bytes());
            }
            return Ok(PlannedTensor {
                dtype: DType::I64,
                shape: vec![n],
                bytes: Bytes::Own(out),
            });
        }
        // Arrays or numpy scalars, all of one dtype and shape.
        let mut first: Option<(DType, Vec<usize>, u8)> = None;
        let mut parts = Vec::with_capacity(n);
        for (i, v) in items.iter().enumerate() {
            let el_at = self.offset(*v);
            let (d, shape, span, fortran) = match v {
                Value::Obj(id) => match self.p.obj(*id) {
                    Object::Array(a) => match (&a.dtype, a.data) {
                        (Some(d), Some(s)) => (d.clone(), a.shape.clone(), s, a.fortran),
                        _ => {
                            return Err(At::new(
                                el_at,
                                format!("{what}[{i}]: numpy array without state"),
                            ))
                        }
                    },
                    Object::Scalar(d, s) => (d.clone(), vec![], *s, false),
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
                            crate::load::pickle::describe(self.p, other)
                        ),
                    ))
                }
            };
            let dtype = self.dtype(&d, el_at, what)?;
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
            match &first {
                None => first = Some((dtype, shape, d.byteorder)),
                Some((d0, s0, _)) if *d0 == dtype && *s0 == shape => {}
                Some((d0, s0, _)) => {
                    return Err(At::new(
                        el_at,
                        format!("{what}[{i}]: {dtype} {shape:?} differs from item 0's {d0} {s0:?}; a list must hold arrays of one dtype and shape"),
                    ))
                }
            }
            parts.push((span, d.byteorder));
        }
        let Some((dtype, row_shape, _)) = first else {
            return Err(At::new(at, format!("{what}: empty list (no examples)")));
        };
        let row_bytes: usize = row_shape.iter().product::<usize>() * dtype.size();
        let total = row_bytes.saturating_mul(n);
        // Each item of a real file has its own payload in the input, so the
        // stacked result can never outgrow the input; a list of N references
        // to one array (a memo bomb) can, and is refused here.
        if total > self.buf.len() {
            return Err(At::new(
                at,
                format!("{what}: stacking {n} items of {row_bytes} bytes would need {total} bytes, more than the whole input holds (repeated references?)"),
            ));
        }
        let mut out = HostBuffer::zeroed(total)
            .map_err(|e| At::new(at, format!("{what}: cannot allocate {total} bytes: {e}")))?;
        for (i, (span, order)) in parts.iter().enumerate() {
            let dst = &mut out.as_mut_slice()[i * row_bytes..(i + 1) * row_bytes];
            dst.copy_from_slice(&self.buf[span.start..span.end]);
            if *order == b'>' && dtype.size() > 1 {
                swap_in_place(dst, dtype.size());
            }
        }
        let mut shape = vec![n];
        shape.extend(row_shape);
        Ok(PlannedTensor {
            dtype,
            shape,
            bytes: Bytes::Own(out),
        })
    }
}

/// Reverses the bytes of each `size`-byte element.
pub fn swap_in_place(b: &mut [u8], size: usize) {
    for el in b.chunks_exact_mut(size) {
        el.reverse();
    }
}

/// Copies a Fortran-order (column-major) array into C order.
fn fortran_to_c(src: &[u8], dst: &mut [u8], shape: &[usize], size: usize) {
    let nd = shape.len();
    let total: usize = shape.iter().product();
    // Fortran strides (in elements): first axis fastest.
    let mut fstride = vec![1usize; nd];
    for k in 1..nd {
        fstride[k] = fstride[k - 1] * shape[k - 1];
    }
    let mut idx = vec![0usize; nd];
    for c in 0..total {
        let f: usize = idx.iter().zip(&fstride).map(|(i, s)| i * s).sum();
        dst[c * size..(c + 1) * size].copy_from_slice(&src[f * size..(f + 1) * size]);
        // advance the C-order index (last axis fastest)
        for k in (0..nd).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
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

    #[test]
    fn byte_swap() {
        let mut b = vec![1, 2, 3, 4, 5, 6, 7, 8];
        swap_in_place(&mut b, 4);
        assert_eq!(b, vec![4, 3, 2, 1, 8, 7, 6, 5]);
    }
}
