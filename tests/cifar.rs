//! CIFAR served end to end: a CIFAR-100 archive (written here, in the
//! originals' cPickle form) loaded by the real loader, served by a real
//! server, read back with the real client: the minibatches are the file's
//! images in CHW order, the coarse sets serve the same images with the
//! coarse labels, and float32 minibatches are byte / 255 exactly.
mod common;

use std::path::Path;

use common::{py2_cifar_batch, ustar, TestServer};
use minibatchd::client::BatchRequest;
use minibatchd::load::{self, LoadOptions, PinPolicy};
use minibatchd::store::{DType, Format};

/// A CIFAR-100 batch: `n` images whose bytes start at `first`, fine and
/// coarse labels.
fn batch(n: usize, first: u8, fine: &[u8], coarse: &[u8]) -> Vec<u8> {
    let pixel = |i: usize| first.wrapping_add((i * 7 + i / 3072) as u8);
    py2_cifar_batch(
        n,
        pixel,
        &[("fine_labels", fine), ("coarse_labels", coarse)],
    )
}

#[tokio::test]
async fn cifar100_minibatches_are_the_files_images_with_fine_or_coarse_labels() {
    let fine: Vec<u8> = (0..6).map(|i| i * 16).collect();
    let coarse: Vec<u8> = (0..6).map(|i| i * 3).collect();
    let train = batch(6, 1, &fine, &coarse);
    let test = batch(2, 99, &[98, 99], &[18, 19]);
    let raw = ustar(&[
        ("cifar-100-python/train", &train[..]),
        ("cifar-100-python/test", &test[..]),
        ("cifar-100-python/meta", &b"not read"[..]),
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
