//! numpy's `.npz` (a zip archive of `.npy` members, as `np.savez` and
//! `np.savez_compressed` write it, and Keras's `mnist.npz`) and the `.npy`
//! header.
//!
//! The zip reader is small and bounded: the end-of-central-directory record,
//! the central directory (sizes, CRCs and offsets come from there, so members
//! written with data descriptors read fine), and each needed member's local
//! header to find its data. Stored (0) and deflated (8) members only; no
//! encryption, no multi-disk archives, no zip64 end records (zip64 extra
//! fields in central-directory entries are read). Each member inflates with
//! libdeflate straight into its own page-aligned buffer of the size the
//! central directory declares, counted against `--max-dataset-bytes` before
//! it is allocated; a member that inflates to more than it declares, or
//! whose CRC-32 differs, is refused.
use crate::load::error::At;
use crate::load::gzip;
use crate::memory::{Backing, HostBuffer};
use crate::store::DType;

/// A zip local file header's signature, the archive's first bytes.
pub const MAGIC: [u8; 4] = *b"PK\x03\x04";
/// An empty archive starts with its end record.
pub const EMPTY_MAGIC: [u8; 4] = *b"PK\x05\x06";

const EOCD_SIG: u32 = 0x0605_4b50;
const CDH_SIG: u32 = 0x0201_4b50;
const LFH_SIG: u32 = 0x0403_4b50;
/// Member names longer than this are refused (numpy writes `key.npy`).
const MAX_NAME: usize = 1024;
/// numpy's own default limit on a `.npy` header's length (`max_header_size`).
pub const MAX_HEADER: usize = 10_000;

/// One archive member, from the central directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub method: u16,
    pub crc32: u32,
    pub compressed: u64,
    pub size: u64,
    /// Where its local header starts in the file.
    pub local_header: u64,
    /// Where its central-directory entry starts (for errors).
    pub entry: usize,
}

fn u16_at(b: &[u8], p: usize) -> u16 {
    u16::from_le_bytes([b[p], b[p + 1]])
}

fn u32_at(b: &[u8], p: usize) -> u32 {
    u32::from_le_bytes(b[p..p + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], p: usize) -> u64 {
    u64::from_le_bytes(b[p..p + 8].try_into().unwrap())
}

/// Reads the central directory. Offsets in errors count bytes of the file.
pub fn members(raw: &[u8]) -> Result<Vec<Member>, At> {
    // The end record is the last 22 bytes plus a comment of up to 65535.
    let low = raw.len().saturating_sub(22 + 0xffff);
    let eocd = (low..=raw.len().saturating_sub(22))
        .rev()
        .find(|&p| raw.len() >= 22 && u32_at(raw, p) == EOCD_SIG)
        .ok_or_else(|| {
            At::new(
                raw.len(),
                "no zip end-of-central-directory record (PK 05 06) in the last 64 kB: truncated or not a zip archive",
            )
        })?;
    let (disk, cd_disk) = (u16_at(raw, eocd + 4), u16_at(raw, eocd + 6));
    let (on_disk, total) = (u16_at(raw, eocd + 8), u16_at(raw, eocd + 10));
    let cd_size = u32_at(raw, eocd + 12) as usize;
    let cd_off = u32_at(raw, eocd + 16) as usize;
    if disk != 0 || cd_disk != 0 || on_disk != total {
        return Err(At::new(
            eocd + 4,
            "multi-disk zip archives are not supported",
        ));
    }
    if total == 0xffff || cd_size == 0xffff_ffff || cd_off == 0xffff_ffff {
        return Err(At::new(
            eocd + 8,
            "zip64 end record (over 65535 members or 4 GiB of directory) is not supported",
        ));
    }
    if cd_off.checked_add(cd_size).is_none_or(|e| e > eocd) {
        return Err(At::new(
            eocd + 12,
            format!("central directory of {cd_size} bytes at byte {cd_off} does not end before the end record at byte {eocd}"),
        ));
    }
    let total = total as usize;
    if total.saturating_mul(46) > cd_size {
        return Err(At::new(
            eocd + 10,
            format!("{total} members cannot fit in a central directory of {cd_size} bytes"),
        ));
    }
    let mut out: Vec<Member> = Vec::with_capacity(total);
    let mut p = cd_off;
    let end = cd_off + cd_size;
    for _ in 0..total {
        if p + 46 > end || u32_at(raw, p) != CDH_SIG {
            return Err(At::new(p, "expected a central-directory entry (PK 01 02)"));
        }
        let flags = u16_at(raw, p + 8);
        let method = u16_at(raw, p + 10);
        let (n, e, c) = (
            u16_at(raw, p + 28) as usize,
            u16_at(raw, p + 30) as usize,
            u16_at(raw, p + 32) as usize,
        );
        if p + 46 + n + e + c > end {
            return Err(At::new(
                p + 28,
                "central-directory entry runs past the directory",
            ));
        }
        if n > MAX_NAME {
            return Err(At::new(p + 28, format!("member name of {n} bytes")));
        }
        let name = String::from_utf8_lossy(&raw[p + 46..p + 46 + n]).into_owned();
        if flags & 0x41 != 0 {
            return Err(At::new(p + 8, format!("member {name} is encrypted")));
        }
        let mut compressed = u32_at(raw, p + 20) as u64;
        let mut size = u32_at(raw, p + 24) as u64;
        let mut local = u32_at(raw, p + 42) as u64;
        // zip64 extra field: the 0xffffffff fields, in this order.
        let mut x = p + 46 + n;
        let xend = x + e;
        while x + 4 <= xend {
            let (id, len) = (u16_at(raw, x), u16_at(raw, x + 2) as usize);
            if x + 4 + len > xend {
                return Err(At::new(
                    x,
                    format!("member {name}: extra field runs past its entry"),
                ));
            }
            if id == 1 {
                let mut q = x + 4;
                for f in [&mut size, &mut compressed, &mut local] {
                    if *f == 0xffff_ffff {
                        if q + 8 > x + 4 + len {
                            return Err(At::new(
                                q,
                                format!("member {name}: zip64 extra field too short"),
                            ));
                        }
                        *f = u64_at(raw, q);
                        q += 8;
                    }
                }
            }
            x += 4 + len;
        }
        if out.iter().any(|m| m.name == name) {
            return Err(At::new(p + 46, format!("member {name} appears twice")));
        }
        out.push(Member {
            name,
            method,
            crc32: u32_at(raw, p + 16),
            compressed,
            size,
            local_header: local,
            entry: p,
        });
        p += 46 + n + e + c;
    }
    Ok(out)
}

/// Reads one member's bytes into a buffer of their own, inflating if
/// deflated and checking the CRC-32. `budget`: bytes the load may still
/// allocate; a member declaring more is refused before any allocation.
/// Offsets in errors count bytes of the file.
pub fn extract(raw: &[u8], m: &Member, budget: usize, backing: Backing) -> Result<HostBuffer, At> {
    let lh = usize::try_from(m.local_header).unwrap_or(usize::MAX);
    if lh.checked_add(30).is_none_or(|e| e > raw.len()) {
        return Err(At::new(
            m.entry + 42,
            format!(
                "the local header offset {} lies past the end of the file at byte {} (truncated archive)",
                m.local_header,
                raw.len()
            ),
        ));
    }
    if u32_at(raw, lh) != LFH_SIG {
        return Err(At::new(lh, "expected a local file header (PK 03 04)"));
    }
    let data = lh + 30 + u16_at(raw, lh + 26) as usize + u16_at(raw, lh + 28) as usize;
    if data > raw.len() {
        return Err(At::new(
            lh + 26,
            format!(
                "the local header's name and extra field run past the end of the file at byte {} (truncated archive)",
                raw.len()
            ),
        ));
    }
    let csize = usize::try_from(m.compressed).unwrap_or(usize::MAX);
    if data.checked_add(csize).is_none_or(|e| e > raw.len()) {
        return Err(At::new(
            data,
            format!(
                "member data of {} bytes runs past the end of the file at byte {} (truncated archive)",
                m.compressed,
                raw.len()
            ),
        ));
    }
    let input = &raw[data..data + csize];
    let size = usize::try_from(m.size).unwrap_or(usize::MAX);
    if size > budget {
        return Err(At::new(
            data,
            format!(
                "member declares {} bytes, over what the limit leaves ({budget} bytes; --max-dataset-bytes)",
                m.size
            ),
        ));
    }
    if size == 0 {
        return Err(At::new(data, "empty member"));
    }
    let alloc = |n: usize| {
        HostBuffer::zeroed(n, backing)
            .map_err(|e| At::new(data, format!("cannot allocate {n} bytes: {e}")))
    };
    let out = match m.method {
        0 => {
            if csize != size {
                return Err(At::new(
                    m.entry + 20,
                    format!(
                        "stored member: compressed size {} differs from size {}",
                        m.compressed, m.size
                    ),
                ));
            }
            let mut b = alloc(size)?;
            b.as_mut_slice()[..size].copy_from_slice(input);
            b
        }
        8 => {
            let mut b = alloc(size)?;
            let wrote = gzip::inflate_raw(input, &mut b.as_mut_slice()[..size]).map_err(|e| {
                At::new(
                    data,
                    match e {
                        gzip::RawError::TooBig => format!(
                            "deflate data inflates to more than the {} bytes the member declares",
                            m.size
                        ),
                        gzip::RawError::Corrupt => {
                            "deflate data is corrupt or ends early (truncated archive?)".into()
                        }
                    },
                )
            })?;
            if wrote != size {
                return Err(At::new(
                    data,
                    format!("member inflates to {wrote} bytes, it declares {}", m.size),
                ));
            }
            b
        }
        k => {
            return Err(At::new(
                m.entry + 10,
                format!("compression method {k} (only 0, stored, and 8, deflate)"),
            ))
        }
    };
    let got = gzip::crc32(&out.as_slice()[..size]);
    if got != m.crc32 {
        return Err(At::new(
            m.entry + 16,
            format!("CRC-32 mismatch: the directory says {:08x}, the data gives {got:08x} (corrupt archive)", m.crc32),
        ));
    }
    Ok(out)
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    pub dtype: DType,
    /// `>` in the descr: elements need swapping to little-endian.
    pub big_endian: bool,
    pub shape: Vec<usize>,
    pub data_start: usize,
}

/// `.npy` magic.
pub const NPY_MAGIC: [u8; 6] = *b"\x93NUMPY";

/// Parses a `.npy` header (versions 1.0, 2.0, 3.0) and checks the data's
/// length against it. Offsets count bytes of `b`.
pub fn npy_header(b: &[u8]) -> Result<NpyHeader, At> {
    if b.len() >= 6 && b[..6] == NPY_MAGIC && b.len() < 10 {
        return Err(At::new(
            b.len(),
            format!("truncated .npy header: the data ends at byte {}", b.len()),
        ));
    }
    if b.len() < 10 || b[..6] != NPY_MAGIC {
        return Err(At::new(
            0,
            format!(
                "expected the .npy magic 93 'NUMPY', found {:02x?}",
                &b[..b.len().min(6)]
            ),
        ));
    }
    let (len, start) = match b[6] {
        1 => (u16_at(b, 8) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32_at(b, 8) as usize, 12),
        v => {
            return Err(At::new(
                6,
                format!(".npy version {v}.{} (expected 1.0, 2.0 or 3.0)", b[7]),
            ))
        }
    };
    if len > MAX_HEADER {
        return Err(At::new(
            8,
            format!(".npy header of {len} bytes (numpy's limit is {MAX_HEADER})"),
        ));
    }
    if start + len > b.len() {
        return Err(At::new(
            8,
            format!(
                "the .npy header of {len} bytes runs past the data's end at byte {}",
                b.len()
            ),
        ));
    }
    let text = std::str::from_utf8(&b[start..start + len])
        .map_err(|e| At::new(start + e.valid_up_to(), "the .npy header is not UTF-8"))?;
    let mut p = Lit {
        s: text.as_bytes(),
        i: 0,
        base: start,
    };
    let (descr, fortran, shape) = p.dict()?;
    let (descr, at) = descr.ok_or_else(|| At::new(start, "the .npy header has no 'descr'"))?;
    let fortran =
        fortran.ok_or_else(|| At::new(start, "the .npy header has no 'fortran_order'"))?;
    let shape = shape.ok_or_else(|| At::new(start, "the .npy header has no 'shape'"))?;
    if fortran {
        return Err(At::new(
            start,
            "fortran_order True is not supported: save the array in C order (np.ascontiguousarray)",
        ));
    }
    let (order, code) = descr.split_at(descr.len().min(1));
    if code == "O" {
        return Err(At::new(
            at,
            "object arrays (descr '|O', pickled Python objects, allow_pickle) are refused",
        ));
    }
    let dtype = match (order, DType::from_numpy_code(code)) {
        ("<" | ">" | "|" | "=", Some(d)) => d,
        _ => {
            return Err(At::new(
                at,
                format!("unsupported dtype descr {descr:?} (expected e.g. '<f4', '|u1', '<i8')"),
            ))
        }
    };
    let data_start = start + len;
    let need = dtype.array_bytes(&shape).unwrap_or(usize::MAX);
    let have = b.len() - data_start;
    if need != have {
        return Err(At::new(
            data_start,
            format!(
                "shape {shape:?} of {descr} needs {need} bytes of data, the member holds {have}"
            ),
        ));
    }
    Ok(NpyHeader {
        dtype,
        big_endian: order == ">" && dtype.size() > 1,
        shape,
        data_start,
    })
}

/// The header dict's Python-literal subset: `{'descr': '<f4',
/// 'fortran_order': False, 'shape': (3, 4), }`.
struct Lit<'a> {
    s: &'a [u8],
    i: usize,
    /// Offset of `s` in the member, for errors.
    base: usize,
}

type Dict = (Option<(String, usize)>, Option<bool>, Option<Vec<usize>>);

impl Lit<'_> {
    fn err(&self, what: impl Into<String>) -> At {
        At::new(self.base + self.i, format!(".npy header: {}", what.into()))
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), At> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.err(format!("expected '{}'", c as char)))
        }
    }

    fn string(&mut self) -> Result<String, At> {
        self.ws();
        let q = match self.s.get(self.i) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(self.err("expected a quoted string")),
        };
        let from = self.i + 1;
        let len = self.s[from..]
            .iter()
            .position(|&c| c == q || c == b'\\')
            .ok_or_else(|| self.err("unterminated string"))?;
        if self.s[from + len] == b'\\' {
            self.i = from + len;
            return Err(self.err("escapes in strings are not supported"));
        }
        self.i = from + len + 1;
        Ok(String::from_utf8_lossy(&self.s[from..from + len]).into_owned())
    }

    fn int(&mut self) -> Result<usize, At> {
        self.ws();
        let from = self.i;
        while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
            self.i += 1;
        }
        let v = std::str::from_utf8(&self.s[from..self.i])
            .unwrap()
            .parse::<usize>()
            .map_err(|_| {
                self.i = from;
                self.err("expected a non-negative integer")
            })?;
        // Python 2 longs
        if self.s.get(self.i) == Some(&b'L') {
            self.i += 1;
        }
        Ok(v)
    }

    fn dict(&mut self) -> Result<Dict, At> {
        let mut d: Dict = (None, None, None);
        self.expect(b'{')?;
        loop {
            if self.eat(b'}') {
                break;
            }
            let at = self.base + self.i;
            let key = self.string()?;
            self.expect(b':')?;
            self.ws();
            let dup = match key.as_str() {
                "descr" => {
                    if self.s.get(self.i) == Some(&b'[') {
                        return Err(self.err("structured dtypes (a descr list) are not supported"));
                    }
                    let v_at = self.base + self.i;
                    d.0.replace((self.string()?, v_at)).is_some()
                }
                "fortran_order" => {
                    let v = if self.s[self.i..].starts_with(b"True") {
                        true
                    } else if self.s[self.i..].starts_with(b"False") {
                        false
                    } else {
                        return Err(self.err("expected True or False"));
                    };
                    self.i += if v { 4 } else { 5 };
                    d.1.replace(v).is_some()
                }
                "shape" => {
                    self.expect(b'(')?;
                    let mut shape = Vec::new();
                    while !self.eat(b')') {
                        if shape.len() >= crate::load::pickle::MAX_DIMS {
                            return Err(self.err("more dimensions than numpy's limit"));
                        }
                        shape.push(self.int()?);
                        if !self.eat(b',') {
                            self.expect(b')')?;
                            break;
                        }
                    }
                    d.2.replace(shape).is_some()
                }
                _ => return Err(At::new(at, format!(".npy header: unexpected key {key:?}"))),
            };
            if dup {
                return Err(At::new(at, format!(".npy header: key {key:?} twice")));
            }
            if !self.eat(b',') {
                self.expect(b'}')?;
                break;
            }
        }
        self.ws();
        if self.i != self.s.len() {
            return Err(self.err("unexpected text after the header dict"));
        }
        Ok(d)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A `.npy` member (version 1.0) with `header` as its dict.
    pub(crate) fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut h = dict.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut v = NPY_MAGIC.to_vec();
        v.extend([1, 0]);
        v.extend((h.len() as u16).to_le_bytes());
        v.extend(h.as_bytes());
        v.extend(data);
        v
    }

    /// A zip of stored members.
    pub(crate) fn zip(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut cd = Vec::new();
        for (name, data) in members {
            let off = out.len() as u32;
            let crc = gzip::crc32(data);
            let mut common = Vec::new();
            common.extend([20u8, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method, time, date
            common.extend(crc.to_le_bytes());
            common.extend((data.len() as u32).to_le_bytes());
            common.extend((data.len() as u32).to_le_bytes());
            common.extend((name.len() as u16).to_le_bytes());
            common.extend(0u16.to_le_bytes());
            out.extend(LFH_SIG.to_le_bytes());
            out.extend(&common);
            out.extend(name.as_bytes());
            out.extend(*data);
            cd.extend(CDH_SIG.to_le_bytes());
            cd.extend([20u8, 0]);
            cd.extend(&common);
            cd.extend([0u8; 8]); // comment len, disk, int attr, ext attr (part)
            cd.extend([0u8; 2]);
            cd.extend(off.to_le_bytes());
            cd.extend(name.as_bytes());
        }
        let cd_off = out.len() as u32;
        out.extend(&cd);
        out.extend(EOCD_SIG.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend((members.len() as u16).to_le_bytes());
        out.extend((members.len() as u16).to_le_bytes());
        out.extend((cd.len() as u32).to_le_bytes());
        out.extend(cd_off.to_le_bytes());
        out.extend([0u8; 2]);
        out
    }

    #[test]
    fn parses_headers_of_every_version() {
        let m = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &[0; 24],
        );
        let h = npy_header(&m).unwrap();
        assert_eq!(
            (h.dtype, h.shape.clone(), h.data_start),
            (DType::F32, vec![2, 3], 128)
        );
        assert!(!h.big_endian);
        let m = npy(
            "{\"descr\":\">i8\",\"shape\":(3,),\"fortran_order\":False}",
            &[0; 24],
        );
        let h = npy_header(&m).unwrap();
        assert!(h.big_endian && h.dtype == DType::I64 && h.shape == vec![3]);
        let m = npy(
            "{'descr': '|u1', 'fortran_order': False, 'shape': (), }",
            &[7],
        );
        assert_eq!(npy_header(&m).unwrap().shape, Vec::<usize>::new());
        // version 2.0: 4-byte length
        let h = "{'descr': '|u1', 'fortran_order': False, 'shape': (2L,), }\n";
        let mut v = NPY_MAGIC.to_vec();
        v.extend([2, 0]);
        v.extend((h.len() as u32).to_le_bytes());
        v.extend(h.as_bytes());
        v.extend([1, 2]);
        assert_eq!(npy_header(&v).unwrap().shape, vec![2]);
    }

    #[test]
    fn refuses_lying_and_hostile_headers() {
        let bad = |dict: &str, data: &[u8], want: &str| {
            let e = npy_header(&npy(dict, data)).unwrap_err();
            assert!(e.what.contains(want), "{dict}: {}", e.what);
            e
        };
        let e = bad(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &[0; 23],
            "needs 24 bytes",
        );
        assert_eq!(e.offset, 128);
        bad(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &[0; 25],
            "holds 25",
        );
        let e = bad(
            "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
            &[0; 16],
            "object arrays",
        );
        assert_eq!(e.offset, 20);
        bad(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }",
            &[0; 8],
            "fortran_order",
        );
        bad(
            "{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }",
            &[0; 16],
            "unsupported dtype",
        );
        bad(
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }",
            &[0; 8],
            "structured",
        );
        bad(
            "{'descr': '<f4', 'shape': (2,), }",
            &[0; 8],
            "no 'fortran_order'",
        );
        bad(
            "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,)}",
            &[0; 8],
            "twice",
        );
        bad(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
            &[0; 8],
            "unexpected key",
        );
        bad(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}",
            &[0; 8],
            "non-negative",
        );
        bad(
            "{'descr': '|u1', 'fortran_order': False, 'shape': (99999999999, 99999999999, 99999999999)}",
            &[0; 8],
            "needs",
        );
        let e = npy_header(b"\x93NUMPZ\x01\x00\x00\x00").unwrap_err();
        assert!(e.what.contains("magic"), "{}", e.what);
        let mut m = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
            &[0; 8],
        );
        m[8] = 0xff; // header length past the end
        assert!(npy_header(&m).unwrap_err().what.contains("runs past"));
        m[6] = 9;
        assert!(npy_header(&m).unwrap_err().what.contains("version 9"));
    }

    #[test]
    fn reads_stored_members_and_refuses_broken_archives() {
        let z = zip(&[("a.npy", b"hello"), ("b.npy", b"world!")]);
        let ms = members(&z).unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[1].name, "b.npy");
        let b = extract(&z, &ms[1], 1 << 20, Backing::Private).unwrap();
        assert_eq!(&b.as_slice()[..6], b"world!");
        // over the budget: refused before allocating
        let e = extract(&z, &ms[1], 5, Backing::Private).unwrap_err();
        assert!(e.what.contains("--max-dataset-bytes"), "{}", e.what);
        // truncated: no end record
        let e = members(&z[..z.len() - 10]).unwrap_err();
        assert!(e.what.contains("end-of-central-directory"), "{}", e.what);
        // truncated data: the directory points past the data
        let mut t = z.clone();
        t[ms[1].entry + 20] = 200; // compressed size
        t[ms[1].entry + 24] = 200;
        let e = extract(&t, &members(&t).unwrap()[1], 1 << 20, Backing::Private).unwrap_err();
        assert!(e.what.contains("truncated archive"), "{}", e.what);
        // corrupt data: CRC
        let mut c = z.clone();
        c[30 + 5] ^= 1;
        let e = extract(&c, &ms[0], 1 << 20, Backing::Private).unwrap_err();
        assert!(e.what.contains("CRC-32"), "{}", e.what);
        // encrypted
        let mut enc = z.clone();
        enc[ms[0].entry + 8] = 1;
        assert!(members(&enc).unwrap_err().what.contains("encrypted"));
        // duplicate names
        let d = zip(&[("a.npy", b"x"), ("a.npy", b"y")]);
        assert!(members(&d).unwrap_err().what.contains("twice"));
        // absurd member count
        let mut n = z.clone();
        let at = n.len() - 12;
        n[at] = 0xff;
        n[at - 2] = 0xff;
        assert!(members(&n).is_err());
    }

    #[test]
    fn a_deflated_bomb_stops_at_its_declared_size() {
        // 1 MB of zeros deflated (fixed Huffman, one block), declared as 1000 bytes.
        let data = vec![0u8; 1 << 20];
        let deflated = deflate(&data);
        let mut z = zip(&[("x.npy", &deflated)]);
        let ms = members(&z).unwrap();
        let e = ms[0].entry;
        z[e + 10] = 8; // method
        z[e + 24..e + 28].copy_from_slice(&1000u32.to_le_bytes());
        let m = &members(&z).unwrap()[0];
        let err = extract(&z, m, 1 << 30, Backing::Private).unwrap_err();
        assert!(
            err.what.contains("more than the 1000 bytes"),
            "{}",
            err.what
        );
        // declared honestly but over the limit
        z[e + 24..e + 28].copy_from_slice(&(1u32 << 20).to_le_bytes());
        let m = &members(&z).unwrap()[0];
        let err = extract(&z, m, 1 << 16, Backing::Private).unwrap_err();
        assert!(
            err.what.contains("over what the limit leaves"),
            "{}",
            err.what
        );
        // and within the limit it inflates (with the right CRC)
        z[e + 16..e + 20].copy_from_slice(&gzip::crc32(&data).to_le_bytes());
        let m = &members(&z).unwrap()[0];
        assert_eq!(
            extract(&z, m, 1 << 30, Backing::Private)
                .unwrap()
                .as_slice(),
            &data[..]
        );
    }

    /// Raw deflate with libdeflate's compressor.
    fn deflate(data: &[u8]) -> Vec<u8> {
        // SAFETY: plain FFI with live slices; the compressor is freed.
        unsafe {
            let c = libdeflate_sys::libdeflate_alloc_compressor(6);
            let mut out = vec![0u8; data.len() + 1024];
            let n = libdeflate_sys::libdeflate_deflate_compress(
                c,
                data.as_ptr() as *const _,
                data.len(),
                out.as_mut_ptr() as *mut _,
                out.len(),
            );
            libdeflate_sys::libdeflate_free_compressor(c);
            out.truncate(n);
            out
        }
    }
}
