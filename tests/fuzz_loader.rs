//! Mutation fuzzing of the pickle, gzip and IDX readers, bounded in time for
//! CI. Every mutated input must end in Ok or a LoadError: never a panic, a
//! hang or an allocation beyond the input's size. `FUZZ_ITERS` raises the
//! count (scripts/fuzz.sh runs a long session).
use std::path::Path;

use minibatchd::load::{self, LoadOptions, PinPolicy};

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

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
        valid_split: 1,
        pin: PinPolicy::Off,
    }
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
        match load::load_bytes(Path::new("fuzz"), &input, &opts()) {
            Ok(_) => ok += 1,
            Err(e) => {
                err += 1;
                let msg = e.to_string();
                assert!(msg.starts_with("fuzz: "), "error names the file: {msg}");
            }
        }
    }
    assert!(
        err > ok,
        "most mutations must be caught ({ok} ok, {err} errors)"
    );
}

#[test]
fn mutated_gzip_never_panics() {
    let mut r = rng(0x9e37);
    let gz = {
        // stored-block gzip of the p5 pickle
        let data = py3_p5_pickle();
        let mut v = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1];
        v.extend((data.len() as u16).to_le_bytes());
        v.extend((!(data.len() as u16)).to_le_bytes());
        v.extend(&data);
        v.extend(minibatchd::load::gzip::crc32(&data).to_le_bytes());
        v.extend((data.len() as u32).to_le_bytes());
        v
    };
    load::load_bytes(Path::new("seed.gz"), &gz, &opts()).unwrap();
    for _ in 0..iters() {
        let input = mutate(&gz, &mut r);
        let _ = load::load_bytes(Path::new("fuzz.gz"), &input, &opts());
    }
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
