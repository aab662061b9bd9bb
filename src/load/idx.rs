//! Yann LeCun's IDX files (`train-images-idx3-ubyte[.gz]` and friends).
//!
//! Pixels stay uint8, in the buffer they were read or inflated into, with a
//! scale of 1/256: byte b stands for b/256, which is exactly what
//! deeplearning.net's `mnist.pkl.gz` holds (its floats are k/256, k = 0..255),
//! so an IDX directory served as float32 gives the same values as that file.
//! Labels are widened to int64, as in `mnist.pkl.gz`.
use std::path::{Path, PathBuf};

use crate::load::error::At;
use crate::memory::{Backing, HostBuffer};
use crate::store::DType;

/// Pixel scale of IDX uint8 images when served as floats: value = byte / 256.
pub const PIXEL_DIVISOR: u32 = 256;

/// The training files the official distribution ships (both the common
/// hyphenated and the dotted names some mirrors use).
pub const TRAIN_IMAGES: [&str; 2] = ["train-images-idx3-ubyte", "train-images.idx3-ubyte"];
pub const TRAIN_LABELS: [&str; 2] = ["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"];
pub const TEST_IMAGES: [&str; 2] = ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"];
pub const TEST_LABELS: [&str; 2] = ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"];

/// Finds `names[i]` or `names[i].gz` in `dir`.
pub fn find(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().find_map(|n| {
        [dir.join(n), dir.join(format!("{n}.gz"))]
            .into_iter()
            .find(|p| p.is_file())
    })
}

/// A parsed IDX header: element type, shape and where the data starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data_start: usize,
}

/// Parses the header and checks the payload length against the shape.
pub fn header(b: &[u8]) -> Result<Header, At> {
    if b.len() < 4 {
        return Err(At::new(
            0,
            format!(
                "expected a 4-byte IDX magic, the data has {} bytes",
                b.len()
            ),
        ));
    }
    if b[0] != 0 || b[1] != 0 {
        return Err(At::new(
            0,
            format!("expected IDX magic 00 00, found {:02x} {:02x}", b[0], b[1]),
        ));
    }
    let dtype = match b[2] {
        0x08 => DType::U8,
        0x09 => DType::I8,
        0x0b => DType::I16,
        0x0c => DType::I32,
        0x0d => DType::F32,
        0x0e => DType::F64,
        t => {
            return Err(At::new(
                2,
                format!("unknown IDX element type {t:#04x} (expected 08, 09, 0b, 0c, 0d or 0e)"),
            ))
        }
    };
    let nd = b[3] as usize;
    if nd == 0 {
        return Err(At::new(3, "IDX with 0 dimensions"));
    }
    let data_start = 4 + 4 * nd;
    if b.len() < data_start {
        return Err(At::new(
            4,
            format!(
                "truncated IDX header: {nd} dimensions need {data_start} bytes, the data has {}",
                b.len()
            ),
        ));
    }
    let shape: Vec<usize> = (0..nd)
        .map(|i| u32::from_be_bytes(b[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let need = dtype.array_bytes(&shape).unwrap_or(usize::MAX);
    let have = b.len() - data_start;
    if need != have {
        return Err(At::new(
            data_start,
            format!("shape {shape:?} of {dtype} needs {need} bytes of data, the file holds {have}"),
        ));
    }
    Ok(Header {
        dtype,
        shape,
        data_start,
    })
}

/// Converts big-endian elements to little-endian in place.
pub fn to_little_endian(b: &mut [u8], dtype: DType) {
    if dtype.size() > 1 {
        crate::load::layout::swap_in_place(b, dtype.size());
    }
}

/// Widens uint8 (or int8) labels to int64 in a buffer of their own.
pub fn widen_labels(b: &[u8], dtype: DType, backing: Backing) -> std::io::Result<HostBuffer> {
    let mut out = HostBuffer::zeroed(b.len() * 8, backing)?;
    for (i, &v) in b.iter().enumerate() {
        let x = if dtype == DType::I8 {
            v as i8 as i64
        } else {
            v as i64
        };
        out.as_mut_slice()[i * 8..i * 8 + 8].copy_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_header_and_checks_length() {
        let mut f = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        f.extend([1u8; 8]);
        let h = header(&f).unwrap();
        assert_eq!(h.shape, vec![2, 2, 2]);
        assert_eq!(h.dtype, DType::U8);
        f.pop();
        let e = header(&f).unwrap_err();
        assert_eq!(e.offset, 16);
        assert!(e.what.contains("needs 8 bytes"), "{}", e.what);
        assert!(header(&[0, 0, 0x42, 1])
            .unwrap_err()
            .what
            .contains("element type"));
    }
}
