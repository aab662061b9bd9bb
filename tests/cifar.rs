//! CIFAR served end to end: a CIFAR-100 archive (written here, in the
//! originals' cPickle form) loaded by the real loader, served by a real
//! server, read back with the real client: the minibatches are the file's
//! images in CHW order, the coarse sets serve the same images with the
//! coarse labels, and float32 minibatches are byte / 255 exactly.
mod common;

use std::path::Path;

use common::TestServer;
use minibatchd::client::BatchRequest;
use minibatchd::load::{self, LoadOptions, PinPolicy};
use minibatchd::store::{DType, Format};

/// A CIFAR-100 batch dict as Python 2's cPickle wrote it: `data` uint8
/// [n, 3072] through `_reconstruct` (BINSTRING payload), `fine_labels` and
/// `coarse_labels` lists of ints.
fn batch(n: usize, first: u8, fine: &[u8], coarse: &[u8]) -> Vec<u8> {
    let mut p = b"\x80\x02}q\x01(U\x04dataq\x02".to_vec();
    p.extend(b"cnumpy.core.multiarray\n_reconstruct\nq\x03cnumpy\nndarray\nq\x04K\x00\x85U\x01b\x87Rq\x05");
    p.extend(b"(K\x01K");
    p.push(n as u8);
    p.extend(b"M\x00\x0c\x86cnumpy\ndtype\nq\x06U\x02u1K\x00K\x01\x87Rq\x07");
    p.extend(b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T");
    p.extend(((n * 3072) as i32).to_le_bytes());
    p.extend((0..n * 3072).map(|i| first.wrapping_add((i * 7 + i / 3072) as u8)));
    p.extend(b"tb");
    for (key, labels) in [(&b"fine_labels"[..], fine), (b"coarse_labels", coarse)] {
        p.push(b'U');
        p.push(key.len() as u8);
        p.extend(key);
        p.extend(b"](");
        for &l in labels {
            p.extend([b'K', l]);
        }
        p.extend(b"e");
    }
    p.extend(b"u.");
    p
}

/// A ustar (POSIX) archive of `files`.
fn tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut v = Vec::new();
    for (name, data) in files {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[156] = b'0';
        h[257..265].copy_from_slice(b"ustar\x0000");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&c| c as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        v.extend(h);
        v.extend(*data);
        v.resize(v.len().next_multiple_of(512), 0);
    }
    v.extend([0u8; 1024]);
    v
}

#[tokio::test]
async fn cifar100_minibatches_are_the_files_images_with_fine_or_coarse_labels() {
    let fine: Vec<u8> = (0..6).map(|i| i * 16).collect();
    let coarse: Vec<u8> = (0..6).map(|i| i * 3).collect();
    let train = batch(6, 1, &fine, &coarse);
    let test = batch(2, 99, &[98, 99], &[18, 19]);
    let raw = tar(&[
        ("cifar-100-python/train", &train),
        ("cifar-100-python/test", &test),
        ("cifar-100-python/meta", b"not read"),
    ]);
    let opts = LoadOptions {
        pin: PinPolicy::Off,
        ..Default::default()
    };
    let ds = load::load_bytes(Path::new("cifar-100-python.tar"), &raw, &opts).unwrap();
    assert_eq!(ds.format, Format::Cifar100);
    // The images of row r of train, as the file holds them (CHW).
    let row = |r: usize| -> Vec<u8> {
        (r * 3072..(r + 1) * 3072)
            .map(|i| 1u8.wrapping_add((i * 7 + i / 3072) as u8))
            .collect()
    };
    let srv = TestServer::start(ds).await;
    let mut c = srv.client().await;
    for (set, labels) in [("train", &fine), ("train_coarse", &coarse)] {
        let b = c.get_batch(&BatchRequest::new(set, 1, 4)).await.unwrap();
        assert_eq!(
            b.x.shape,
            vec![2, 3, 32, 32],
            "{set}: the last, partial minibatch"
        );
        assert_eq!(b.x.dtype, DType::U8);
        assert_eq!(b.x.scale_divisor, 255);
        assert_eq!(&b.x.data[..], [row(4), row(5)].concat(), "{set}");
        assert_eq!(
            common::int64s(&b.y.data),
            [labels[4] as i64, labels[5] as i64]
        );
    }
    let mut req = BatchRequest::new("train_coarse", 0, 3);
    req.x_dtype = Some(DType::F32);
    let b = c.get_batch(&req).await.unwrap();
    assert_eq!(b.x.dtype, DType::F32);
    let want: Vec<u8> = [row(0), row(1), row(2)]
        .concat()
        .iter()
        .flat_map(|&v| (v as f32 / 255.0).to_le_bytes())
        .collect();
    assert_eq!(&b.x.data[..], &want[..], "float32 is byte / 255 exactly");
    let t = c
        .get_batch(&BatchRequest::new("test_coarse", 0, 2))
        .await
        .unwrap();
    assert_eq!(common::int64s(&t.y.data), [18, 19]);
    assert_eq!(t.x.data[0], 99);
}
