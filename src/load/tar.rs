//! A minimal tar reader (POSIX ustar, pax and GNU headers) over an archive
//! that is already in memory, for the CIFAR "python version" downloads.
//!
//! Why our own: the archive is inflated once into the buffer the dataset is
//! then served from (`gzip.rs`), so the reader only has to say where each
//! member's bytes lie in that buffer; nothing is extracted, copied or
//! written to disk, and a member's size can never cause an allocation (it
//! must lie inside the bytes already held, which `--max-dataset-bytes`
//! bounded when they were inflated).
//!
//! Only regular files and directories are members a dataset can use. Links,
//! devices, fifos, sparse files, absolute paths and `..` components are
//! refused, naming the member and the byte offset of its header, rather than
//! skipped: an archive that holds them is not one of the datasets this
//! reader knows, and a silent skip would hide what it is.
use std::ops::Range;

use crate::load::error::At;

/// Tar's unit: every header and every member's padded data is whole blocks.
pub const BLOCK: usize = 512;

/// Most headers read from one archive. CIFAR-10's holds 8 members and
/// CIFAR-100's 5 (plus a directory each, and a pax header per member when
/// Python's tarfile rewrote it); 4,096 leaves room for any re-packing while
/// bounding the work and the entry list of an archive of empty members
/// (a 1 MB file could otherwise hold 2,048 headers per MB, 400,000 per
/// inflated 100 MB).
pub const MAX_MEMBERS: usize = 4096;

/// Largest pax extended header or GNU long-name member read. Real ones hold
/// a path and a few numbers (under 1 kB); a larger one is refused before its
/// records are scanned.
pub const MAX_META: usize = 64 << 10;

/// Longest member name kept (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// One regular file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The member's path as stored (pax `path`, GNU long name or ustar
    /// prefix/name), without a leading `./`.
    pub name: String,
    /// Where its (first) header starts in the archive: what errors name.
    pub header: usize,
    /// Its bytes in the archive.
    pub data: Range<usize>,
}

/// Whether `b` starts with a tar header: a valid header checksum and the
/// `ustar` magic (POSIX `ustar\0` or GNU `ustar  \0`), or no magic at all
/// (the old V7 format, whose magic bytes are zero). Content, not the file's
/// name, tells a tar from the other formats: a pickle, zip or IDX file
/// whose first 512 bytes happen to sum to the octal number at bytes
/// 148-155 is not a risk worth guessing around.
pub fn is_tar(b: &[u8]) -> bool {
    b.len() >= BLOCK
        && b[..BLOCK].iter().any(|&c| c != 0)
        && (&b[257..262] == b"ustar" || b[257..265].iter().all(|&c| c == 0))
        && checksum_ok(&b[..BLOCK])
}

/// What a pax extended header or a GNU long-name member says about the next
/// header.
#[derive(Default)]
struct Pending {
    path: Option<String>,
    size: Option<usize>,
}

/// Lists the regular files of an archive held in `b`, in archive order
/// (directories are skipped; a name that appears twice is listed twice, and
/// extraction would keep the last). Offsets in errors count bytes of `b`.
pub fn entries(b: &[u8]) -> Result<Vec<Entry>, At> {
    let mut out = Vec::new();
    let mut pending = Pending::default();
    let mut pos = 0usize;
    let mut headers = 0usize;
    loop {
        if pos == b.len() {
            // No end-of-archive blocks: Python's tarfile and GNU tar accept
            // that (only a header or data cut short is truncation).
            return Ok(out);
        }
        if b.len() - pos < BLOCK {
            return Err(At::new(
                pos,
                format!(
                    "truncated archive: {} bytes where a 512-byte header or the end-of-archive blocks are expected",
                    b.len() - pos
                ),
            ));
        }
        let h = &b[pos..pos + BLOCK];
        if h.iter().all(|&c| c == 0) {
            // End of archive (a second zero block and any record padding
            // may follow; nothing after it is read).
            return Ok(out);
        }
        headers += 1;
        if headers > MAX_MEMBERS {
            return Err(At::new(
                pos,
                format!("more than {MAX_MEMBERS} headers: not a dataset archive"),
            ));
        }
        if !checksum_ok(h) {
            return Err(At::new(
                pos,
                format!(
                    "tar header checksum mismatch{}: a corrupt archive, or the previous member's size field lies and this is not where a header starts",
                    out.last()
                        .map(|e: &Entry| format!(" after member {}", e.name))
                        .unwrap_or_default()
                ),
            ));
        }
        let raw_name = header_name(h);
        let name = pending.path.take().unwrap_or(raw_name);
        let size = match pending.size.take() {
            Some(s) => s,
            None => octal_or_base256(&h[124..136]).ok_or_else(|| {
                At::new(
                    pos + 124,
                    format!("member {name}: size field is not an octal or base-256 number"),
                )
            })?,
        };
        let data = pos + BLOCK;
        let end = data.checked_add(size).filter(|&e| e <= b.len()).ok_or_else(|| {
            At::new(
                pos + 124,
                format!(
                    "member {name}: declares {size} bytes from byte {data}, but the archive ends at byte {} (truncated, or a size field that lies)",
                    b.len()
                ),
            )
        })?;
        let next = end
            .checked_next_multiple_of(BLOCK)
            .ok_or_else(|| At::new(pos + 124, format!("member {name}: size overflows")))?
            .min(b.len());
        let kind = h[156];
        match kind {
            b'x' | b'g' | b'L' | b'K' => {
                if size > MAX_META {
                    return Err(At::new(
                        pos,
                        format!(
                            "member {name}: a {} of {size} bytes (at most {MAX_META})",
                            if kind == b'L' || kind == b'K' {
                                "GNU long name"
                            } else {
                                "pax header"
                            }
                        ),
                    ));
                }
                let meta = &b[data..end];
                match kind {
                    b'x' => pending = pax(meta, data)?,
                    b'L' => {
                        let n = meta.iter().position(|&c| c == 0).unwrap_or(meta.len());
                        pending.path = Some(String::from_utf8_lossy(&meta[..n]).into_owned());
                    }
                    // A global pax header sets defaults for the whole archive
                    // (Python writes one only when asked to); a GNU long link
                    // name belongs to a link, which is refused at its header.
                    _ => {}
                }
            }
            b'0' | 0 | b'7' | b'5' => {
                let name = clean_name(&name, pos)?;
                if kind != b'5' {
                    out.push(Entry {
                        name,
                        header: pos,
                        data: data..end,
                    });
                }
            }
            _ => {
                let what = match kind {
                    b'1' => format!("a hard link to {}", header_link(h)),
                    b'2' => format!("a symbolic link to {}", header_link(h)),
                    b'3' => "a character device".into(),
                    b'4' => "a block device".into(),
                    b'6' => "a fifo".into(),
                    b'S' => "a GNU sparse file".into(),
                    k => format!("of type {:?}", k as char),
                };
                return Err(At::new(
                    pos,
                    format!("member {name} is {what}: only regular files and directories are read"),
                ));
            }
        }
        pos = next;
    }
}

/// The header's checksum field against the sum of its bytes with that
/// field read as spaces (unsigned, as POSIX; some old tars summed signed
/// bytes, also accepted).
fn checksum_ok(h: &[u8]) -> bool {
    let Some(want) = octal_or_base256(&h[148..156]) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &c) in h.iter().enumerate() {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned += c as u64;
        signed += c as i8 as i64;
    }
    want as u64 == unsigned || want as i64 == signed
}

/// A numeric header field: octal digits padded with spaces or NULs, or
/// GNU's base-256 (high bit of the first byte set, big-endian after it;
/// negative values are refused). None if it is neither or does not fit.
fn octal_or_base256(f: &[u8]) -> Option<usize> {
    if f[0] & 0x80 != 0 {
        if f[0] == 0xff {
            return None;
        }
        let mut v: usize = (f[0] & 0x7f) as usize;
        for &c in &f[1..] {
            v = v.checked_mul(256)?.checked_add(c as usize)?;
        }
        return Some(v);
    }
    let t: Vec<u8> = f
        .iter()
        .copied()
        .skip_while(|&c| c == b' ')
        .take_while(|&c| c != 0 && c != b' ')
        .collect();
    if t.is_empty() {
        // An all-blank field is 0 (some writers leave unused fields so).
        return f.iter().all(|&c| c == 0 || c == b' ').then_some(0);
    }
    let mut v: usize = 0;
    for c in t {
        if !(b'0'..=b'7').contains(&c) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add((c - b'0') as usize)?;
    }
    Some(v)
}

/// A NUL-terminated text field.
fn field(f: &[u8]) -> String {
    let n = f.iter().position(|&c| c == 0).unwrap_or(f.len());
    String::from_utf8_lossy(&f[..n]).into_owned()
}

/// The name a header gives: POSIX ustar joins `prefix/name`; GNU headers
/// use the prefix field for other things and never for the name.
fn header_name(h: &[u8]) -> String {
    let name = field(&h[0..100]);
    let posix = &h[257..263] == b"ustar\0";
    let prefix = if posix {
        field(&h[345..500])
    } else {
        String::new()
    };
    if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    }
}

fn header_link(h: &[u8]) -> String {
    field(&h[157..257])
}

/// Checks a member's path and returns it without a leading `./`: relative,
/// no `..` component, not empty (what extraction could write outside its
/// folder is refused even though nothing is extracted here: such an archive
/// is not a dataset download).
fn clean_name(name: &str, header: usize) -> Result<String, At> {
    if name.len() > MAX_PATH {
        return Err(At::new(
            header,
            format!("member name of {} bytes (at most {MAX_PATH})", name.len()),
        ));
    }
    if name.starts_with('/') {
        return Err(At::new(
            header,
            format!("member {name} has an absolute path"),
        ));
    }
    if name.split('/').any(|c| c == "..") {
        return Err(At::new(
            header,
            format!("member {name} has a '..' component (it would leave the archive's folder)"),
        ));
    }
    let mut n = name;
    while let Some(rest) = n.strip_prefix("./") {
        n = rest;
    }
    Ok(n.trim_end_matches('/').to_string())
}

/// The records of a pax extended header (`"<len> <key>=<value>\n"`) that
/// matter here: `path` and `size`. `at` is where its data starts.
fn pax(meta: &[u8], at: usize) -> Result<Pending, At> {
    let mut p = Pending::default();
    let mut pos = 0usize;
    while pos < meta.len() {
        if meta[pos..].iter().all(|&c| c == 0) {
            break;
        }
        let bad = |what: &str| At::new(at + pos, format!("pax header: {what}"));
        let sp = meta[pos..]
            .iter()
            .position(|&c| c == b' ')
            .ok_or_else(|| bad("record without a length"))?;
        let len: usize = std::str::from_utf8(&meta[pos..pos + sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("record length is not a number"))?;
        if len <= sp + 1 || pos + len > meta.len() || meta[pos + len - 1] != b'\n' {
            return Err(bad("record length does not fit the header"));
        }
        let rec = &meta[pos + sp + 1..pos + len - 1];
        let eq = rec
            .iter()
            .position(|&c| c == b'=')
            .ok_or_else(|| bad("record without '='"))?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        match key {
            b"path" => p.path = Some(String::from_utf8_lossy(value).into_owned()),
            b"size" => {
                p.size = Some(
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| bad("size is not a number"))?,
                )
            }
            _ => {}
        }
        pos += len;
    }
    Ok(p)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One ustar header block for `name` of type `kind` with `size` bytes
    /// (`gnu`: the GNU magic instead of POSIX's).
    pub(crate) fn header(name: &str, kind: u8, size: usize, link: &str, gnu: bool) -> Vec<u8> {
        let mut h = vec![0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        let s = format!("{size:011o}");
        h[124..135].copy_from_slice(s.as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        if gnu {
            h[257..265].copy_from_slice(b"ustar  \0");
        } else {
            h[257..265].copy_from_slice(b"ustar\x0000");
        }
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&c| c as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    /// An archive of regular files, ended by two zero blocks.
    pub(crate) fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (name, data) in files {
            v.extend(header(name, b'0', data.len(), "", false));
            v.extend(*data);
            v.resize(v.len().next_multiple_of(BLOCK), 0);
        }
        v.extend([0u8; 2 * BLOCK]);
        v
    }

    #[test]
    fn lists_regular_files_where_their_bytes_lie() {
        let mut a = header("top", b'5', 0, "", true);
        a.extend(archive(&[("./top/a", b"hello"), ("top/b", &[7u8; 600])]));
        assert!(is_tar(&a));
        let e = entries(&a).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].name, "top/a");
        assert_eq!(&a[e[0].data.clone()], b"hello");
        assert_eq!(e[1].header, 3 * BLOCK);
        assert_eq!(e[1].data.len(), 600);
        // The V7 format (no magic) reads the same.
        let mut v7 = a.clone();
        for h in [0, BLOCK, 3 * BLOCK] {
            v7[h + 257..h + 265].fill(0);
            v7[h + 148..h + 156].copy_from_slice(b"        ");
            let sum: u32 = v7[h..h + BLOCK].iter().map(|&c| c as u32).sum();
            v7[h + 148..h + 156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        }
        assert!(is_tar(&v7));
        assert_eq!(entries(&v7).unwrap(), e);
        assert!(!is_tar(&[0u8; 1024]));
        // No end blocks at all is the end too.
        let cut = &a[..a.len() - 2 * BLOCK];
        assert_eq!(entries(cut).unwrap(), e);
    }

    #[test]
    fn pax_and_gnu_long_names_and_sizes() {
        let long = "d/".repeat(80) + "file";
        let rec = format!("path={long}\n");
        let mut rec = format!("{} {rec}", rec.len() + 4);
        assert_eq!(
            rec.len(),
            rec.split(' ').next().unwrap().parse::<usize>().unwrap()
        );
        rec.push_str("10 size=3\n");
        let mut a = header("PaxHeaders/x", b'x', rec.len(), "", false);
        a.extend(rec.as_bytes());
        a.resize(a.len().next_multiple_of(BLOCK), 0);
        // the ustar size says 9; the pax size (3) wins
        a.extend(header("short", b'0', 9, "", false));
        a.extend(b"abc");
        a.resize(a.len().next_multiple_of(BLOCK), 0);
        a.extend(header("././@LongLink", b'L', long.len() + 1, "", true));
        a.extend(long.as_bytes());
        a.push(0);
        a.resize(a.len().next_multiple_of(BLOCK), 0);
        a.extend(header("trunc", b'0', 2, "", true));
        a.extend(b"xy");
        a.resize(a.len().next_multiple_of(BLOCK), 0);
        let e = entries(&a).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(
            (e[0].name.as_str(), &a[e[0].data.clone()]),
            (long.as_str(), &b"abc"[..])
        );
        assert_eq!(
            (e[1].name.as_str(), &a[e[1].data.clone()]),
            (long.as_str(), &b"xy"[..])
        );
    }

    #[test]
    fn refuses_links_devices_and_escaping_paths_naming_member_and_offset() {
        let cases: [(Vec<u8>, &str); 7] = [
            (
                header("x/evil", b'2', 0, "/etc/passwd", false),
                "x/evil is a symbolic link to /etc/passwd",
            ),
            (
                header("x/hard", b'1', 0, "x/a", true),
                "x/hard is a hard link to x/a",
            ),
            (
                header("dev", b'3', 0, "", false),
                "dev is a character device",
            ),
            (header("blk", b'4', 0, "", false), "blk is a block device"),
            (header("fifo", b'6', 0, "", false), "fifo is a fifo"),
            (
                header("/etc/x", b'0', 0, "", false),
                "member /etc/x has an absolute path",
            ),
            (
                header("a/../../x", b'0', 0, "", false),
                "member a/../../x has a '..' component",
            ),
        ];
        for (h, msg) in cases {
            let mut a = archive(&[("ok", b"fine")]);
            a.truncate(2 * BLOCK);
            a.extend(h);
            a.extend([0u8; 2 * BLOCK]);
            let e = entries(&a).unwrap_err();
            assert_eq!(e.offset, 2 * BLOCK as u64, "{}", e.what);
            assert!(e.what.contains(msg), "{}", e.what);
        }
    }

    #[test]
    fn sizes_that_lie_and_truncation_are_errors() {
        let a = archive(&[("a", &[1u8; 100]), ("b", &[2u8; 100])]);
        // a says 2000 bytes: past the end of the archive
        let mut lie = a.clone();
        lie[..BLOCK].copy_from_slice(&header("a", b'0', 20000, "", false));
        let e = entries(&lie).unwrap_err();
        assert_eq!(e.offset, 124);
        assert!(
            e.what.contains("member a: declares 20000 bytes"),
            "{}",
            e.what
        );
        // a says 600: the next "header" is a's data, whose checksum fails
        let mut lie = a.clone();
        lie[..BLOCK].copy_from_slice(&header("a", b'0', 600, "", false));
        lie.splice(BLOCK..BLOCK, [3u8; 1024]);
        let e = entries(&lie).unwrap_err();
        assert_eq!(e.offset, 3 * BLOCK as u64);
        assert!(
            e.what.contains("checksum mismatch after member a"),
            "{}",
            e.what
        );
        // cut inside b's data
        let e = entries(&a[..3 * BLOCK + 50]).unwrap_err();
        assert!(
            e.what.contains("member b: declares 100 bytes"),
            "{}",
            e.what
        );
        // cut inside a header
        let e = entries(&a[..BLOCK + 512 + 100]).unwrap_err();
        assert_eq!(e.offset, 2 * BLOCK as u64);
        assert!(e.what.contains("truncated archive"), "{}", e.what);
    }

    #[test]
    fn header_count_is_bounded() {
        let mut a = Vec::new();
        for i in 0..=MAX_MEMBERS {
            a.extend(header(&format!("d{i}"), b'5', 0, "", false));
        }
        let e = entries(&a).unwrap_err();
        assert_eq!(e.offset, (MAX_MEMBERS * BLOCK) as u64);
        assert!(e.what.contains("more than 4096 headers"), "{}", e.what);
    }

    #[test]
    fn numeric_fields() {
        assert_eq!(octal_or_base256(b"00000000644\0"), Some(0o644));
        assert_eq!(octal_or_base256(b"   644 \0\0\0\0\0"), Some(0o644));
        assert_eq!(octal_or_base256(b"\0\0\0\0"), Some(0));
        assert_eq!(octal_or_base256(b"0009"), None);
        let mut b = [0u8; 12];
        b[0] = 0x80;
        b[11] = 5;
        b[10] = 1;
        assert_eq!(octal_or_base256(&b), Some(261));
        b[0] = 0xff;
        assert_eq!(octal_or_base256(&b), None);
        assert_eq!(
            octal_or_base256(&[
                0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
            ]),
            None
        );
    }
}
