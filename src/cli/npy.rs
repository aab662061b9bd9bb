//! NumPy `.npy` files (format 1.0), for `minibatchd get --out`.
use crate::store::DType;

/// The `.npy` bytes of a C-order tensor of `dtype` and `shape` holding
/// `data` (little-endian).
pub fn npy(dtype: DType, shape: &[u64], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        dtype.npy_descr()
    );
    // Magic (6) + version (2) + header length (2) + header + '\n' is a
    // multiple of 64, so the data starts aligned (the format's rule).
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte-for-byte what `numpy.save` writes for the same arrays
    /// (`np.save(f, np.arange(6, dtype='<f4').reshape(2, 3))` and
    /// `np.save(f, np.array([7], dtype='u1'))`).
    #[test]
    fn headers_match_numpy_save() {
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let f = npy(DType::F32, &[2, 3], &data);
        let head = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        let mut want = b"\x93NUMPY\x01\x00\x76\x00".to_vec();
        want.extend_from_slice(head.as_bytes());
        want.extend(std::iter::repeat_n(b' ', 128 - 10 - head.len() - 1));
        want.push(b'\n');
        want.extend_from_slice(&data);
        assert_eq!(f, want);
        let u = npy(DType::U8, &[1], &[7]);
        assert_eq!(u.len(), 129);
        assert!(String::from_utf8_lossy(&u[10..128])
            .starts_with("{'descr': '|u1', 'fortran_order': False, 'shape': (1,), }"));
        assert_eq!(u[127], b'\n');
        assert_eq!(u[128], 7);
    }
}
