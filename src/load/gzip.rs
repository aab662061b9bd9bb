//! gzip (RFC 1952) container parsing and whole-buffer inflation.
//!
//! Why not a streaming decoder: libdeflate inflates a whole member about 3x
//! faster than zlib and 2x faster than zlib-rs here (see BENCHMARKS.md), and
//! writing straight into the buffer the dataset is then served from means the
//! decompressed stream exists exactly once. The output size comes from the
//! last member's ISIZE trailer; when that guess is short (multi-member files,
//! members over 4 GiB whose ISIZE wrapped) the buffer grows with `mremap` and
//! the member is inflated again.
use crate::load::error::At;
use crate::memory::{Backing, HostBuffer, Prefaulter};

/// gzip magic bytes.
pub const MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Growth step when the ISIZE guess is too small: large enough that a 4 GiB
/// wrap needs one retry, small enough to stay well under RAM on small hosts.
const GROW_STEP: usize = 1 << 30;

/// Parses the member header at `pos`; returns where the deflate data starts.
fn parse_header(input: &[u8], pos: usize) -> Result<usize, At> {
    let need = |p: usize, n: usize, what: &str| -> Result<(), At> {
        if p + n > input.len() {
            Err(At::new(
                p,
                format!(
                    "truncated gzip header: expected {what}, the file ends at byte {}",
                    input.len()
                ),
            ))
        } else {
            Ok(())
        }
    };
    need(pos, 10, "a 10-byte member header")?;
    let h = &input[pos..];
    if h[0..2] != MAGIC {
        return Err(At::new(
            pos,
            format!("expected gzip magic 1f 8b, found {:02x} {:02x}", h[0], h[1]),
        ));
    }
    if h[2] != 8 {
        return Err(At::new(
            pos + 2,
            format!("unsupported compression method {} (only 8, deflate)", h[2]),
        ));
    }
    let flg = h[3];
    if flg & 0xe0 != 0 {
        return Err(At::new(
            pos + 3,
            format!("reserved gzip flag bits set (FLG = {flg:#04x})"),
        ));
    }
    let mut p = pos + 10;
    if flg & 0x04 != 0 {
        need(p, 2, "the FEXTRA length")?;
        let xlen = u16::from_le_bytes([input[p], input[p + 1]]) as usize;
        need(p + 2, xlen, "FEXTRA data")?;
        p += 2 + xlen;
    }
    for (bit, name) in [
        (0x08u8, "the zero-terminated FNAME"),
        (0x10, "the zero-terminated FCOMMENT"),
    ] {
        if flg & bit != 0 {
            match input[p.min(input.len())..].iter().position(|&b| b == 0) {
                Some(z) => p += z + 1,
                None => {
                    return Err(At::new(
                        p,
                        format!("truncated gzip header: expected {name}, the file ends first"),
                    ))
                }
            }
        }
    }
    if flg & 0x02 != 0 {
        need(p, 2, "the header CRC16")?;
        p += 2;
    }
    Ok(p)
}

/// Inflates one raw deflate stream into `out[at..]`, growing `out` until it
/// fits. Returns (input bytes consumed, output bytes written).
fn inflate_member(
    dec: &mut Decompressor,
    input: &[u8],
    start: usize,
    out: &mut HostBuffer,
    at: usize,
    max_bytes: usize,
    prefault: &mut Option<Prefaulter>,
) -> Result<(usize, usize), At> {
    loop {
        let dst = &mut out.as_mut_slice()[at..];
        let (mut used, mut wrote) = (0usize, 0usize);
        // SAFETY: pointers and lengths describe live slices; libdeflate
        // writes at most dst.len() bytes and reads at most the input slice.
        let r = unsafe {
            libdeflate_sys::libdeflate_deflate_decompress_ex(
                dec.0,
                input[start..].as_ptr() as *const _,
                input.len() - start,
                dst.as_mut_ptr() as *mut _,
                dst.len(),
                &mut used,
                &mut wrote,
            )
        };
        match r {
            libdeflate_sys::libdeflate_result_LIBDEFLATE_SUCCESS => return Ok((used, wrote)),
            libdeflate_sys::libdeflate_result_LIBDEFLATE_INSUFFICIENT_SPACE => {
                let len = out.len();
                if len >= max_bytes {
                    return Err(At::new(
                        start,
                        format!(
                            "decompressed data exceeds the limit of {max_bytes} bytes (--max-dataset-bytes)"
                        ),
                    ));
                }
                let grown = len.saturating_add(len.clamp(64 << 20, GROW_STEP)).min(max_bytes);
                if let Some(p) = prefault.take() {
                    p.stop(); // before the mapping moves
                }
                out.resize(grown)
                    .map_err(|e| At::new(start, format!("cannot grow output to {grown} bytes: {e}")))?;
            }
            _ => {
                return Err(At::new(
                    start,
                    format!(
                        "deflate data starting here is corrupt or ends early (the file has {} bytes; a truncated download looks like this)",
                        input.len()
                    ),
                ))
            }
        }
    }
}

struct Decompressor(*mut libdeflate_sys::libdeflate_decompressor);

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: allocated by libdeflate_alloc_decompressor, freed once.
        unsafe { libdeflate_sys::libdeflate_free_decompressor(self.0) }
    }
}

/// Why [`inflate_raw`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawError {
    /// The stream inflates to more than the output holds.
    TooBig,
    /// Corrupt or truncated deflate data.
    Corrupt,
}

/// Inflates one raw deflate stream (a zip member's data) into `out`, which
/// it may not outgrow. Returns the bytes written.
pub(crate) fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<usize, RawError> {
    // SAFETY: plain allocation; checked for null below.
    let dec = Decompressor(unsafe { libdeflate_sys::libdeflate_alloc_decompressor() });
    if dec.0.is_null() {
        return Err(RawError::Corrupt);
    }
    let (mut used, mut wrote) = (0usize, 0usize);
    // SAFETY: pointers and lengths describe live slices; libdeflate writes
    // at most out.len() bytes and reads at most input.len().
    let r = unsafe {
        libdeflate_sys::libdeflate_deflate_decompress_ex(
            dec.0,
            input.as_ptr() as *const _,
            input.len(),
            out.as_mut_ptr() as *mut _,
            out.len(),
            &mut used,
            &mut wrote,
        )
    };
    match r {
        libdeflate_sys::libdeflate_result_LIBDEFLATE_SUCCESS => Ok(wrote),
        libdeflate_sys::libdeflate_result_LIBDEFLATE_INSUFFICIENT_SPACE => Err(RawError::TooBig),
        _ => Err(RawError::Corrupt),
    }
}

/// CRC-32 (the gzip one) with libdeflate's carry-less-multiply kernels.
pub fn crc32(data: &[u8]) -> u32 {
    // SAFETY: pointer and length of a live slice.
    unsafe { libdeflate_sys::libdeflate_crc32(0, data.as_ptr() as *const _, data.len()) }
}

/// Inflates a whole gzip file (one or more members) into a new host buffer,
/// checking every member's CRC-32 and ISIZE, and refusing trailing bytes
/// other than zero padding (which gzip and Python's gzip module accept).
pub fn inflate(input: &[u8], max_bytes: usize, backing: Backing) -> Result<HostBuffer, At> {
    let guess = if input.len() >= 18 {
        u32::from_le_bytes(input[input.len() - 4..].try_into().unwrap()) as usize
    } else {
        0
    };
    let mut out = HostBuffer::zeroed(guess.clamp(1, max_bytes.max(1)), backing).map_err(|e| {
        At::new(
            0,
            format!("cannot allocate {guess} bytes for the output: {e}"),
        )
    })?;
    // SAFETY: plain allocation; checked for null below.
    let dec = Decompressor(unsafe { libdeflate_sys::libdeflate_alloc_decompressor() });
    if dec.0.is_null() {
        return Err(At::new(0, "cannot allocate a decompressor"));
    }
    let mut dec = dec;
    let mut prefault = Some(Prefaulter::start(&out));
    let mut pos = 0;
    let mut filled = 0;
    loop {
        let data = parse_header(input, pos)?;
        let (used, wrote) = inflate_member(
            &mut dec,
            input,
            data,
            &mut out,
            filled,
            max_bytes,
            &mut prefault,
        )?;
        let trailer = data + used;
        if trailer + 8 > input.len() {
            return Err(At::new(
                trailer,
                format!(
                    "truncated: expected the 8-byte gzip trailer (CRC-32, ISIZE), the file ends at byte {}",
                    input.len()
                ),
            ));
        }
        let want_crc = u32::from_le_bytes(input[trailer..trailer + 4].try_into().unwrap());
        let want_size = u32::from_le_bytes(input[trailer + 4..trailer + 8].try_into().unwrap());
        let got_crc = crc32(&out.as_slice()[filled..filled + wrote]);
        if got_crc != want_crc {
            return Err(At::new(
                trailer,
                format!("CRC-32 mismatch: the trailer says {want_crc:08x}, the data gives {got_crc:08x} (corrupt file)"),
            ));
        }
        if wrote as u32 != want_size {
            return Err(At::new(
                trailer + 4,
                format!("ISIZE mismatch: the trailer says {want_size} bytes, the member inflated to {wrote} (mod 2^32)"),
            ));
        }
        filled += wrote;
        pos = trailer + 8;
        if pos == input.len() {
            break;
        }
        if input[pos..].starts_with(&MAGIC) {
            continue;
        }
        if let Some(bad) = input[pos..].iter().position(|&b| b != 0) {
            return Err(At::new(
                pos + bad,
                format!(
                    "trailing garbage after the gzip member ending at byte {pos}: expected end of file or another member (1f 8b), found {:02x}",
                    input[pos + bad]
                ),
            ));
        }
        break;
    }
    drop(prefault);
    out.resize(filled)
        .map_err(|e| At::new(0, format!("cannot shrink output: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stored-block (uncompressed) gzip member, enough to test the container.
    fn member(data: &[u8]) -> Vec<u8> {
        let mut v = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        v.push(1); // BFINAL=1, BTYPE=00
        let n = data.len() as u16;
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&(!n).to_le_bytes());
        v.extend_from_slice(data);
        v.extend_from_slice(&crc32(data).to_le_bytes());
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v
    }

    #[test]
    fn inflates_one_and_several_members() {
        assert_eq!(
            inflate(&member(b"hello"), 1 << 20, Backing::Private)
                .unwrap()
                .as_slice(),
            b"hello"
        );
        let mut two = member(b"hello ");
        two.extend(member(b"world, a longer second member"));
        assert_eq!(
            inflate(&two, 1 << 20, Backing::Private).unwrap().as_slice(),
            b"hello world, a longer second member"
        );
    }

    #[test]
    fn zero_padding_is_accepted_garbage_is_not() {
        let mut f = member(b"abc");
        f.extend([0, 0, 0]);
        assert_eq!(
            inflate(&f, 1 << 20, Backing::Private).unwrap().as_slice(),
            b"abc"
        );
        let mut g = member(b"abc");
        let end = g.len();
        g.extend(b"xyz");
        let e = inflate(&g, 1 << 20, Backing::Private).unwrap_err();
        assert_eq!(e.offset, end as u64);
        assert!(e.what.contains("trailing garbage"), "{}", e.what);
    }

    #[test]
    fn bad_crc_and_truncation_are_reported_with_offsets() {
        let mut f = member(b"abcdef");
        let n = f.len();
        f[n - 8] ^= 1;
        let e = inflate(&f, 1 << 20, Backing::Private).unwrap_err();
        assert_eq!(e.offset, (n - 8) as u64);
        assert!(e.what.contains("CRC-32 mismatch"), "{}", e.what);

        let f = member(b"abcdef");
        let e = inflate(&f[..f.len() - 3], 1 << 20, Backing::Private).unwrap_err();
        assert!(
            e.what.contains("truncated") || e.what.contains("ends early"),
            "{}",
            e.what
        );
        let e = inflate(&f[..5], 1 << 20, Backing::Private).unwrap_err();
        assert!(e.what.contains("truncated gzip header"), "{}", e.what);
    }

    #[test]
    fn limit_stops_a_bomb() {
        let f = member(&[7u8; 5000]);
        let e = inflate(&f, 100, Backing::Private).unwrap_err();
        assert!(e.what.contains("exceeds the limit"), "{}", e.what);
    }
}
