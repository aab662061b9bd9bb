//! Mutation fuzzing of the pickle, gzip and IDX readers, bounded in time for
//! CI, and the hostile inputs that once burned minutes of CPU. Every mutated
//! input must end in a dataset that holds together or a LoadError that names
//! the file and an offset inside it: never a panic, a hang or an allocation
//! beyond the input's size. `FUZZ_ITERS` raises the count for a long session,
//! e.g. `FUZZ_ITERS=200000 cargo test --release --test fuzz_loader`.
//!
//! The hostile inputs are checked in work units (`load::Work`), never by the
//! clock: each must fail with its own error after work linear in its size.
mod common;

use minibatchd::memory::Backing;
use std::path::Path;

use common::{py2_cifar_batch, rng, ustar};

use minibatchd::load::pickle::MAX_DIMS;
use minibatchd::load::{self, LoadError, LoadOptions, PinPolicy, Stream, Work};
use minibatchd::store::{Dataset, Format};

/// A protocol-2 pickle in the original mnist.pkl.gz form, 3 sets of 2 x 3 float32.
fn py2_pickle() -> Vec<u8> {
    let mut p = b"\x80\x02".to_vec();
    for (i, _) in ["train", "valid", "test"].iter().enumerate() {
        if i == 0 {
            p.extend(b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02");
        } else {
            p.extend(b"h\x01h\x02");
        }
        p.extend(b"K\x00\x85U\x01b\x87Rq\x03(K\x01K\x02K\x03\x86");
        p.extend(b"cnumpy\ndtype\nq\x04U\x02f4K\x00K\x01\x87Rq\x05(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb");
        p.extend(b"\x89T\x18\x00\x00\x00");
        p.extend((0..6).flat_map(|k| (k as f32 / 256.0).to_le_bytes()));
        p.extend(b"tb");
        // y: int64 [2]
        p.extend(b"h\x01h\x02K\x00\x85U\x01b\x87Rq\x06(K\x01K\x02\x85h\x04U\x02i8K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x10");
        p.extend((0..2).flat_map(|k| (k as i64).to_le_bytes()));
        p.extend(b"tb\x86");
    }
    p.extend(b"\x87q\x07.");
    p
}

/// A protocol-5 style pickle: FRAME, STACK_GLOBAL, MEMOIZE, _frombuffer + BYTEARRAY8.
fn py3_p5_pickle() -> Vec<u8> {
    let mut body = Vec::new();
    let arr = |body: &mut Vec<u8>, code: &[u8], data: &[u8], dims: &[u8]| {
        body.extend(b"\x8c\x13numpy._core.numeric\x94\x8c\x0b_frombuffer\x94\x93\x94(");
        body.push(0x96);
        body.extend((data.len() as u64).to_le_bytes());
        body.extend(data);
        body.extend(b"\x94\x8c\x05numpy\x94\x8c\x05dtype\x94\x93\x94");
        body.push(0x8c);
        body.push(code.len() as u8);
        body.extend(code);
        body.extend(b"\x89\x88\x87\x94R\x94(K\x03\x8c\x01<\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b");
        body.extend(dims);
        body.extend(b"\x8c\x01C\x94t\x94R\x94");
    };
    for _ in 0..3 {
        let x: Vec<u8> = (0..6)
            .flat_map(|k| (k as f32 / 256.0).to_le_bytes())
            .collect();
        arr(&mut body, b"f4", &x, b"K\x02K\x03\x86\x94");
        let y: Vec<u8> = (0..2i64).flat_map(|k| k.to_le_bytes()).collect();
        arr(&mut body, b"i8", &y, b"K\x02\x85\x94");
        body.extend(b"\x86\x94");
    }
    body.extend(b"\x87\x94.");
    let mut p = b"\x80\x05\x95".to_vec();
    p.extend((body.len() as u64).to_le_bytes());
    p.extend(body);
    p
}

fn mutate(seed: &[u8], r: &mut impl FnMut() -> u64) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + r() % 4 {
        if v.is_empty() {
            v.push(r() as u8);
        }
        let i = (r() as usize) % v.len();
        match r() % 7 {
            0 => v[i] ^= 1 << (r() % 8),
            1 => v[i] = r() as u8,
            2 => v.truncate(i),
            3 => {
                let b = [0x00, 0xff, 0x7f, 0x80, b'(', b'.', b'h', 0x8e, 0x96][(r() % 9) as usize];
                v.insert(i, b);
            }
            4 => {
                v.remove(i);
            }
            5 => {
                // Big declared lengths where a length might be.
                let n = (r() % 4) as usize;
                for k in 0..n.min(v.len() - i) {
                    v[i + k] = 0xff;
                }
            }
            _ => {
                let j = (r() as usize) % v.len();
                let (a, b) = (i.min(j), i.max(j));
                let piece = v[a..b.min(a + 64)].to_vec();
                v.splice(i..i, piece);
            }
        }
    }
    v
}

fn iters() -> usize {
    std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000)
}

fn opts() -> LoadOptions {
    LoadOptions {
        max_bytes: 1 << 26,
        valid_split: Some(1),
        pin: PinPolicy::Off,
        backing: Backing::Private,
    }
}

/// Checks what a load of `input` (named `name`) ended in: a dataset that
/// holds together, or an error naming the file with an offset inside the
/// stream it counts in.
fn check_outcome(name: &str, input: &[u8], r: Result<Dataset, LoadError>) {
    let e = match r {
        Ok(ds) => {
            let names: Vec<&str> = ds.sets.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["train", "valid", "test"]);
            let gz = input.starts_with(&load::gzip::MAGIC);
            assert_eq!(
                ds.format,
                if gz {
                    Format::PickleGzip
                } else {
                    Format::Pickle
                }
            );
            for s in &ds.sets {
                assert_eq!(s.y.shape.len(), 1, "set {}: y is 1-D", s.name);
                assert_eq!(
                    s.x.shape[0], s.y.shape[0],
                    "set {}: x and y examples",
                    s.name
                );
                for t in [&s.x, &s.y] {
                    let numel: usize = t.shape.iter().product();
                    assert_eq!(t.data.len(), numel * t.dtype.size(), "set {}", s.name);
                }
            }
            return;
        }
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("{name}: ")),
        "error names the file: {msg}"
    );
    let (stream, offset) = match &e {
        LoadError::Gzip { at, .. } => (Stream::File, at.offset),
        LoadError::Pickle { stream, at, .. }
        | LoadError::Layout { stream, at, .. }
        | LoadError::WorkBudget { stream, at, .. } => (*stream, at.offset),
        // A mutation can make the data look like an IDX file, or a shape
        // that does not fit its tensor.
        LoadError::Format { .. } | LoadError::Dataset { .. } => return,
        other => panic!("unexpected error for {name}: {other}"),
    };
    let len = match stream {
        Stream::File => input.len(),
        Stream::Decompressed => load::gzip::inflate(input, opts().max_bytes, Backing::Private)
            .expect("an error in the decompressed stream means it inflated")
            .len(),
    };
    assert!(
        offset <= len as u64,
        "offset {offset} lies outside the {len} bytes it counts in: {msg}"
    );
}

#[test]
fn seeds_are_valid() {
    for seed in [py2_pickle(), py3_p5_pickle()] {
        let ds = load::load_bytes(Path::new("seed"), &seed, &opts()).unwrap();
        assert_eq!(ds.sets.len(), 3);
        assert_eq!(ds.sets[2].x.shape, vec![2, 3]);
        assert_eq!(&ds.sets[0].x.data[4..8], &(1.0f32 / 256.0).to_le_bytes());
    }
}

#[test]
fn mutated_pickles_never_panic() {
    let mut r = rng(0x5eed);
    let seeds = [py2_pickle(), py3_p5_pickle()];
    let (mut ok, mut err) = (0, 0);
    for i in 0..iters() {
        let input = mutate(&seeds[i % 2], &mut r);
        let res = load::load_bytes(Path::new("fuzz"), &input, &opts());
        match &res {
            Ok(_) => ok += 1,
            Err(e) => {
                err += 1;
                let msg = e.to_string();
                assert!(msg.starts_with("fuzz: "), "error names the file: {msg}");
            }
        }
        check_outcome("fuzz", &input, res);
    }
    assert!(
        err > ok,
        "most mutations must be caught ({ok} ok, {err} errors)"
    );
}

/// A single-member gzip of `data` in stored (uncompressed) blocks.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut v = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    let mut blocks = data.chunks(0xffff).peekable();
    if blocks.peek().is_none() {
        v.extend([1, 0, 0, 0xff, 0xff]);
    }
    while let Some(b) = blocks.next() {
        v.push(blocks.peek().is_none() as u8); // BFINAL on the last, BTYPE=00
        v.extend((b.len() as u16).to_le_bytes());
        v.extend((!(b.len() as u16)).to_le_bytes());
        v.extend(b);
    }
    v.extend(load::gzip::crc32(data).to_le_bytes());
    v.extend((data.len() as u32).to_le_bytes());
    v
}

/// gzip at libdeflate's strongest level: how a hostile file gets tiny.
fn gzip_best(data: &[u8]) -> Vec<u8> {
    // SAFETY: the compressor is checked for null and freed once; pointers
    // and lengths describe live buffers.
    unsafe {
        let c = libdeflate_sys::libdeflate_alloc_compressor(12);
        assert!(!c.is_null());
        let mut out = vec![0u8; libdeflate_sys::libdeflate_gzip_compress_bound(c, data.len())];
        let n = libdeflate_sys::libdeflate_gzip_compress(
            c,
            data.as_ptr() as *const _,
            data.len(),
            out.as_mut_ptr() as *mut _,
            out.len(),
        );
        libdeflate_sys::libdeflate_free_compressor(c);
        assert!(n > 0);
        out.truncate(n);
        out
    }
}

#[test]
fn mutated_gzip_never_panics() {
    let mut r = rng(0x9e37);
    // stored-block gzip of the p5 pickle
    let gz = gzip_stored(&py3_p5_pickle());
    load::load_bytes(Path::new("seed.gz"), &gz, &opts()).unwrap();
    let (mut ok, mut err) = (0, 0);
    for _ in 0..iters() {
        let input = mutate(&gz, &mut r);
        let res = load::load_bytes(Path::new("fuzz.gz"), &input, &opts());
        if res.is_ok() {
            ok += 1
        } else {
            err += 1
        }
        check_outcome("fuzz.gz", &input, res);
    }
    // The CRC-32 catches nearly every change to the data.
    assert!(
        err > 10 * ok,
        "most mutations must be caught ({ok} ok, {err} errors)"
    );
}

#[test]
fn mutated_idx_headers_never_panic() {
    let mut r = rng(77);
    let mut seed = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
    seed.extend([9u8; 8]);
    for _ in 0..iters() {
        let input = mutate(&seed, &mut r);
        if let Ok(h) = load::idx::header(&input) {
            let need: usize = h.shape.iter().product::<usize>() * h.dtype.size();
            assert_eq!(need, input.len() - h.data_start);
        }
    }
}

// --- hostile inputs: tiny files built to burn CPU ---------------------------
//
// The same streams as scripts/make_fixtures.py's hostile corpus
// (hostile/build-state-bomb.pkl.gz, shape-bomb, fortran-dims, set-copies),
// at sizes that ran for minutes before the reader shared memoized tuples,
// capped shapes at numpy's 64 dimensions and counted its work.

/// The 8-item state numpy pickles a plain dtype with, `|` byte order.
const DTYPE_STATE: &[u8] = b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t";

/// `numpy.dtype('f4')` whose state tuple is padded (DUP) to `width` items,
/// memoized, then BUILT onto the dtype `builds` more times through BINGET:
/// 3 input bytes per BUILD, each of which once copied the whole tuple.
fn build_state_bomb(width: usize, builds: usize) -> Vec<u8> {
    let mut p = b"\x80\x02cnumpy\ndtype\nq\x00U\x02f4\x89\x88\x87Rq\x01".to_vec();
    p.extend(b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00");
    p.extend(std::iter::repeat_n(b'2', width - 8));
    p.extend(b"tq\x02b");
    p.extend(b"h\x02b".repeat(builds));
    p.push(b'.');
    p
}

/// An array whose memoized state nests a shape of `dims` 1s, BUILT
/// `builds + 1` times: each BUILD once copied and converted the whole shape.
fn shape_bomb(dims: usize, builds: usize) -> Vec<u8> {
    let mut p =
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            .to_vec();
    p.extend(b"(K\x01(K\x01");
    p.extend(std::iter::repeat_n(b'2', dims - 1));
    p.extend(b"tcnumpy\ndtype\nU\x02u1\x89\x88\x87R");
    p.extend(DTYPE_STATE);
    p.extend(b"b\x89U\x00tq\x00b");
    p.extend(b"h\x00b".repeat(builds));
    p.push(b'.');
    p
}

/// `((x, None), (x, None), (x, None))` where x is a Fortran-order uint8
/// array of shape `(1,) * (dims - 1) + (n,)` through numpy's
/// `_reconstruct` + BUILD: transposing it once cost n * dims steps.
fn fortran_dims(dims: usize, n: u16) -> Vec<u8> {
    let mut p =
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            .to_vec();
    p.extend(b"(K\x01(K\x01");
    p.extend(std::iter::repeat_n(b'2', dims - 2));
    p.push(b'M');
    p.extend(n.to_le_bytes());
    p.extend(b"tcnumpy\ndtype\nU\x02u1\x89\x88\x87R");
    p.extend(DTYPE_STATE);
    p.extend(b"b\x88T");
    p.extend((n as u32).to_le_bytes());
    p.extend((0..n).map(|i| i as u8));
    p.extend(b"tbN\x86q\x00h\x00h\x00\x87.");
    p
}

/// `set(l)` called `calls` times on one memoized list of `width` ints: each
/// 6-byte REDUCE copies the whole list, so only the work budget (before the
/// 4M-value memory cap) bounds it.
fn set_copies(width: usize, calls: usize) -> Vec<u8> {
    let mut p = b"\x80\x02c__builtin__\nset\nq\x000(K\x00".to_vec();
    p.extend(std::iter::repeat_n(b'2', width - 1));
    p.extend(b"l\x85q\x010");
    p.extend(b"h\x00h\x01R0".repeat(calls));
    p.extend(b"N.");
    p
}

/// Offset of byte `k` of the last occurrence of `pat` in `p`.
fn offset_of(p: &[u8], pat: &[u8], k: usize) -> u64 {
    (p.windows(pat.len()).rposition(|w| w == pat).unwrap() + k) as u64
}

/// Runs the pickle passes of a load on `p` with a load's budget; returns
/// the outcome and the work it took.
fn read_counting(name: &str, p: &[u8]) -> (Result<(), LoadError>, u64) {
    let mut buf = p.to_vec();
    let mut work = Work::for_input(buf.len());
    let r = load::read_pickle(
        Path::new(name),
        &mut buf,
        Stream::Decompressed,
        &mut work,
        Backing::Private,
    );
    (r.map(drop), work.used())
}

#[test]
fn repeated_build_of_a_shared_state_costs_constant_work() {
    let p = build_state_bomb(1_000_000, 100_000);
    let gz = gzip_best(&p);
    assert!(gz.len() < 2048, "a tiny file: {} bytes", gz.len());
    // 100,000 BUILDs of a 1,000,008-item state: a dtype, not a dataset.
    let e = load::load_bytes(Path::new("build-bomb.pkl.gz"), &gz, &opts()).unwrap_err();
    let LoadError::Layout { at, .. } = &e else {
        panic!("expected the layout error, got {e}")
    };
    assert!(at.what.contains("found numpy dtype"), "{e}");
    // Work: about 3 steps per DUP building the tuple and a handful per BUILD,
    // however wide the state (a copy per BUILD would be 10^11).
    let (_, used) = read_counting("build-bomb", &p);
    assert!(
        used < 4 * p.len() as u64,
        "{used} steps for {} bytes",
        p.len()
    );
    let (_, wider) = read_counting("w", &build_state_bomb(1_000_000, 200_000));
    let per_build = (wider - used) / 100_000;
    assert!(per_build <= 8, "{per_build} steps per BUILD");
}

#[test]
fn shapes_beyond_numpys_limit_are_refused_at_their_build() {
    let shapes = shape_bomb(1_000_000, 100_000);
    let fortran = fortran_dims(1_000_000, 2000);
    for (name, p, build) in [
        // the array's first BUILD (after the state's BINPUT)
        (
            "shape-bomb.pkl.gz",
            &shapes,
            offset_of(&shapes, b"tq\x00b", 3),
        ),
        // the array's BUILD, after its payload
        (
            "fortran-dims.pkl.gz",
            &fortran,
            offset_of(&fortran, b"tbN", 1),
        ),
    ] {
        let gz = gzip_best(p);
        assert!(gz.len() < 2048, "{name}: a tiny file: {} bytes", gz.len());
        let e = load::load_bytes(Path::new(name), &gz, &opts()).unwrap_err();
        let LoadError::Pickle { stream, at, .. } = &e else {
            panic!("{name}: expected the dimensions error, got {e}")
        };
        assert_eq!(*stream, Stream::Decompressed);
        assert_eq!(
            at.what,
            format!("array shape has 1000000 dimensions, more than numpy's limit of {MAX_DIMS}")
        );
        assert_eq!(p[build as usize], b'b');
        assert_eq!(at.offset, build, "{name}: {e}");
        assert!(e
            .to_string()
            .starts_with(&format!("{name}: pickle: decompressed byte {}", at.offset)));
        let (_, used) = read_counting(name, p);
        assert!(
            used < 4 * p.len() as u64,
            "{name}: {used} steps for {} bytes",
            p.len()
        );
    }
    // At the limit, 64 dimensions, the array is read and transposed: one
    // step per element (the transposition is O(elements + dims)).
    let p = fortran_dims(MAX_DIMS, 60_000);
    let (r, used) = read_counting("fortran-64", &p);
    let e = r.unwrap_err();
    assert!(
        e.to_string()
            .contains("set train: y: expected a numpy array"),
        "{e}"
    );
    assert!(
        used < 4 * p.len() as u64,
        "{used} steps for {} bytes",
        p.len()
    );
    let (r, _) = read_counting("fortran-65", &fortran_dims(MAX_DIMS + 1, 10));
    let e = r.unwrap_err();
    assert!(
        e.to_string().contains("array shape has 65 dimensions"),
        "{e}"
    );
}

#[test]
fn work_budget_stops_repeated_copies_with_file_and_offset() {
    // 400 copies of a 10,000-item list: 4M steps, over the budget of a
    // 12 kB input (64 per byte + 2^20) and under the memory cap of 2^22
    // values, so only the budget stops it.
    let p = set_copies(10_000, 400);
    let e = load::load_bytes(Path::new("set-copies.pkl"), &p, &opts()).unwrap_err();
    let LoadError::WorkBudget {
        stage, stream, at, ..
    } = &e
    else {
        panic!("expected the work budget error, got {e}")
    };
    assert_eq!((*stage, *stream), ("pickle", Stream::File));
    // At one of the REDUCEs, past the list.
    assert!(at.offset > 10_000 && at.offset < p.len() as u64, "{e}");
    assert_eq!(p[at.offset as usize], b'R', "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "set-copies.pkl: pickle: byte {}: work budget of ",
            at.offset
        )),
        "{msg}"
    );
    // The budget also covers the layout pass: a valid file with a budget
    // that its pickle pass just fits in stops in layout.
    let seed = py2_pickle();
    let mut parse_work = Work::for_input(seed.len());
    load::pickle::parse(&mut seed.clone(), &mut parse_work).unwrap();
    let mut work = Work::with_limit(parse_work.used());
    let e = load::read_pickle(
        Path::new("seed"),
        &mut seed.clone(),
        Stream::File,
        &mut work,
        Backing::Private,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            LoadError::WorkBudget {
                stage: "layout",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.offset().unwrap() < seed.len() as u64, "{e}");
    // ... and with a load's budget it loads, in a few steps per byte.
    let mut work = Work::for_input(seed.len());
    load::read_pickle(
        Path::new("seed"),
        &mut seed.clone(),
        Stream::File,
        &mut work,
        Backing::Private,
    )
    .unwrap();
    assert!(work.used() < 4 * seed.len() as u64, "{} steps", work.used());
}

#[test]
fn the_bundled_sample_needs_a_small_fraction_of_its_budget() {
    let mut buf = load::gzip::inflate(
        minibatchd::BUNDLED_SAMPLE,
        opts().max_bytes,
        Backing::Private,
    )
    .unwrap()
    .as_slice()
    .to_vec();
    let mut work = Work::for_input(buf.len());
    load::read_pickle(
        Path::new("sample"),
        &mut buf,
        Stream::Decompressed,
        &mut work,
        Backing::Private,
    )
    .unwrap();
    // WORK_PER_BYTE's doc comment quotes this: little-endian C-order
    // payloads are served untouched, so the 15 MB take a few hundred steps.
    assert!(
        work.used() < buf.len() as u64 / 1000,
        "{} steps for {} bytes",
        work.used(),
        buf.len()
    );
}

#[test]
fn mutated_hostile_pickles_stay_linear() {
    // Small versions of the hostile streams, mutated: whatever a mutation
    // makes of them ends as a load does, and never needs the work budget
    // (reaching it would mean a mutation found work that grows faster than
    // the input, which the budget stopped but the reader should not do).
    let mut r = rng(0xb0b);
    let seeds = [
        build_state_bomb(2_000, 200),
        shape_bomb(100, 20),
        fortran_dims(100, 64),
        fortran_dims(MAX_DIMS, 300),
    ];
    for i in 0..iters() {
        let input = mutate(&seeds[i % seeds.len()], &mut r);
        let res = load::load_bytes(Path::new("hostile"), &input, &opts());
        if let Err(e @ LoadError::WorkBudget { .. }) = &res {
            panic!(
                "mutation {i} of seed {} needs the work budget: {e}",
                i % seeds.len()
            );
        }
        check_outcome("hostile", &input, res);
    }
}

/// A `.npy` (version 1.0) of `data` under the header dict `dict`.
fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut h = dict.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend((h.len() as u16).to_le_bytes());
    v.extend(h.as_bytes());
    v.extend(data);
    v
}

/// Raw deflate at libdeflate's level 6.
fn deflate(data: &[u8]) -> Vec<u8> {
    // SAFETY: as in gzip_best.
    unsafe {
        let c = libdeflate_sys::libdeflate_alloc_compressor(6);
        assert!(!c.is_null());
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

/// A zip archive, as `np.savez` (stored) or `np.savez_compressed` (deflated) lays it out.
fn zip(members: &[(&str, Vec<u8>)], deflated: bool) -> Vec<u8> {
    let (mut out, mut cd) = (Vec::new(), Vec::new());
    for (name, data) in members {
        let off = out.len() as u32;
        let body = if deflated {
            deflate(data)
        } else {
            data.clone()
        };
        let mut common = vec![20u8, 0, 0, 0, if deflated { 8 } else { 0 }, 0, 0, 0, 0, 0];
        common.extend(load::gzip::crc32(data).to_le_bytes());
        common.extend((body.len() as u32).to_le_bytes());
        common.extend((data.len() as u32).to_le_bytes());
        common.extend((name.len() as u16).to_le_bytes());
        common.extend(0u16.to_le_bytes());
        out.extend(b"PK\x03\x04");
        out.extend(&common);
        out.extend(name.as_bytes());
        out.extend(&body);
        cd.extend(b"PK\x01\x02\x14\x00");
        cd.extend(&common);
        cd.extend([0u8; 10]);
        cd.extend(off.to_le_bytes());
        cd.extend(name.as_bytes());
    }
    let cd_off = out.len() as u32;
    out.extend(&cd);
    out.extend(b"PK\x05\x06\x00\x00\x00\x00");
    out.extend((members.len() as u16).to_le_bytes());
    out.extend((members.len() as u16).to_le_bytes());
    out.extend((cd.len() as u32).to_le_bytes());
    out.extend(cd_off.to_le_bytes());
    out.extend([0u8; 2]);
    out
}

/// Keras's mnist.npz layout: uint8 [3, 2, 2] / [2, 2, 2] images, uint8 labels.
fn keras_members() -> Vec<(&'static str, Vec<u8>)> {
    let u8s = |shape: &str, n: usize| {
        npy(
            &format!("{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"),
            &(0..n as u8).collect::<Vec<_>>(),
        )
    };
    vec![
        ("x_train.npy", u8s("(3, 2, 2)", 12)),
        ("y_train.npy", u8s("(3,)", 3)),
        ("x_test.npy", u8s("(2, 2, 2)", 8)),
        ("y_test.npy", u8s("(2,)", 2)),
    ]
}

#[test]
fn mutated_npz_never_panic() {
    let mut r = rng(0x2a7);
    let members = keras_members();
    for deflated in [false, true] {
        let ds =
            load::load_bytes(Path::new("seed.npz"), &zip(&members, deflated), &opts()).unwrap();
        assert_eq!(ds.format, Format::Npz);
        assert_eq!(ds.sets[0].x.shape, vec![2, 4]);
    }
    let (mut ok, mut err) = (0, 0);
    for i in 0..iters() {
        let deflated = i % 2 == 0;
        // Half mutate the archive's bytes (caught by the zip reader or the
        // CRC), half one member's .npy bytes in a well-formed archive.
        let input = if i % 4 < 2 {
            mutate(&zip(&members, deflated), &mut r)
        } else {
            let mut m = members.clone();
            let k = (r() as usize) % m.len();
            m[k].1 = mutate(&m[k].1, &mut r);
            zip(&m, deflated)
        };
        match load::load_bytes(Path::new("fuzz.npz"), &input, &opts()) {
            Ok(ds) => {
                ok += 1;
                assert_eq!(ds.format, Format::Npz);
                for s in &ds.sets {
                    assert_eq!(s.x.shape[0], s.y.shape[0], "set {}", s.name);
                    for t in [&s.x, &s.y] {
                        let numel: usize = t.shape.iter().product();
                        assert_eq!(t.data.len(), numel * t.dtype.size());
                    }
                }
            }
            Err(e) => {
                err += 1;
                let msg = e.to_string();
                assert!(msg.starts_with("fuzz.npz"), "error names the file: {msg}");
                match &e {
                    LoadError::Zip { at, .. } => assert!(at.offset <= input.len() as u64, "{msg}"),
                    LoadError::Npy { member, at, .. } => {
                        assert!(member.is_some(), "{msg}");
                        assert!(at.offset <= 1 << 20, "{msg}");
                    }
                    LoadError::Format { .. } | LoadError::Dataset { .. } => {}
                    // a mutated magic: no longer a zip, read as a pickle
                    LoadError::Pickle { .. }
                    | LoadError::Layout { .. }
                    | LoadError::WorkBudget { .. }
                        if !input.starts_with(&load::npz::MAGIC) => {}
                    other => panic!("unexpected error: {other}"),
                }
            }
        }
    }
    assert!(
        err > ok,
        "most mutations must be caught ({ok} ok, {err} errors)"
    );
}

// --- CIFAR: the tar reader and the batch reader -----------------------------

/// A CIFAR-10 batch of `n` images whose bytes start at `first`.
fn cifar_batch(n: usize, first: u8) -> Vec<u8> {
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    py2_cifar_batch(n, |i| first.wrapping_add(i as u8), &[("labels", &labels)])
}

/// CIFAR-10's members (2 images a batch), in the real archive's order.
fn cifar_members() -> Vec<(String, Vec<u8>)> {
    [4, 0, 3, 2, 5, 1]
        .iter()
        .map(|&k| {
            let name = if k == 0 {
                "test_batch".to_string()
            } else {
                format!("data_batch_{k}")
            };
            (
                format!("cifar-10-batches-py/{name}"),
                cifar_batch(2, 40 * k as u8),
            )
        })
        .collect()
}

#[test]
fn mutated_cifar_archives_never_panic() {
    let mut r = rng(0xc1fa);
    let members = cifar_members();
    let seed = ustar(&members);
    for input in [seed.clone(), gzip_stored(&seed)] {
        let ds = load::load_bytes(Path::new("seed.tar"), &input, &opts()).unwrap();
        assert_eq!(ds.format, Format::Cifar10);
        // 10 training images, the last one split off by opts()'s --valid-split 1.
        assert_eq!(ds.sets[0].x.shape, vec![9, 3, 32, 32]);
        assert_eq!(
            (ds.sets[1].name.as_str(), ds.sets[1].examples()),
            ("valid", 1)
        );
        assert_eq!(ds.sets[0].x.data[0], 40, "data_batch_1 first");
    }
    let (mut ok, mut err) = (0, 0);
    for i in 0..iters() {
        // Half mutate the archive (headers, sizes, padding, data), half
        // one batch's pickle inside a well-formed archive.
        let input = if i % 2 == 0 {
            mutate(&seed, &mut r)
        } else {
            let mut m = members.clone();
            let k = (r() as usize) % m.len();
            m[k].1 = mutate(&m[k].1, &mut r);
            ustar(&m)
        };
        match load::load_bytes(Path::new("fuzz.tar"), &input, &opts()) {
            Ok(ds) => {
                ok += 1;
                if ds.format != Format::Cifar10 {
                    continue; // mutated into another format's magic
                }
                let names: Vec<&str> = ds.sets.iter().map(|s| s.name.as_str()).collect();
                assert_eq!(names, ["train", "valid", "test"]);
                for s in &ds.sets {
                    assert_eq!(&s.x.shape[1..], &[3, 32, 32]);
                    assert_eq!(s.x.shape[0], s.y.shape[0], "set {}", s.name);
                    assert_eq!(s.x.data.len(), s.x.shape[0] * 3072);
                    assert!(s.y.data.chunks(8).all(|c| {
                        let v = i64::from_le_bytes(c.try_into().unwrap());
                        (0..10).contains(&v)
                    }));
                }
            }
            Err(e) => {
                err += 1;
                let msg = e.to_string();
                assert!(msg.starts_with("fuzz.tar: "), "error names the file: {msg}");
                match &e {
                    LoadError::Tar { stream, .. } | LoadError::Member { stream, .. } => {
                        assert_eq!(*stream, Stream::File, "{msg}");
                        assert!(e.offset().unwrap() <= input.len() as u64, "{msg}");
                    }
                    // a mutated magic: no longer a tar, read as a pickle
                    LoadError::Pickle { .. }
                    | LoadError::Layout { .. }
                    | LoadError::WorkBudget { .. }
                    | LoadError::Gzip { .. }
                    | LoadError::Zip { .. }
                    | LoadError::Format { .. }
                    | LoadError::Dataset { .. } => {}
                    other => panic!("unexpected error: {other}"),
                }
                if let LoadError::Member { member, .. } = &e {
                    assert!(member.starts_with("cifar-10-batches-py/"), "{msg}");
                }
            }
        }
    }
    assert!(
        err > ok,
        "most mutations must be caught ({ok} ok, {err} errors)"
    );
}

#[test]
fn mutated_npz_gz_never_panic() {
    let mut r = rng(0x9a2);
    let seed = gzip_stored(&zip(&keras_members(), true));
    let ds = load::load_bytes(Path::new("seed.npz.gz"), &seed, &opts()).unwrap();
    assert_eq!(ds.format, Format::Npz);
    for _ in 0..iters() / 4 {
        let input = mutate(&seed, &mut r);
        if let Err(e) = load::load_bytes(Path::new("fuzz.npz.gz"), &input, &opts()) {
            let msg = e.to_string();
            assert!(
                msg.starts_with("fuzz.npz.gz"),
                "error names the file: {msg}"
            );
        }
    }
}
