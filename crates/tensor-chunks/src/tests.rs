use super::*;
use prost::Message;

const F32: i32 = proto::Dtype::Float32 as i32;
const I64: i32 = proto::Dtype::Int64 as i32;

/// GetBatch(index 4, size 3): x float32 [rows, 4], y int64 [rows].
fn get4() -> Expect {
    Expect::get_batch(
        &proto::GetBatchRequest {
            set: "train".into(),
            index: 4,
            size: 3,
            ..Default::default()
        },
        Known::default(),
    )
}

fn chunk(name: &str, offset: u64, data: &[u8], total: u64, last: bool) -> TensorChunk {
    let (dtype, shape) = match name {
        "x" => (F32, vec![total / 16, 4]),
        _ => (I64, vec![total / 8]),
    };
    TensorChunk {
        index: 4,
        name: name.into(),
        dtype,
        shape,
        offset,
        data: Bytes::copy_from_slice(data),
        crc32c: checksum(data),
        total_bytes: total,
        scale_divisor: 0,
        last,
    }
}

/// x of 2 rows (32 bytes) in two chunks, y of 2 rows (16 bytes) in one.
fn good() -> Vec<TensorChunk> {
    let x: Vec<u8> = (0..32).collect();
    vec![
        chunk("x", 0, &x[..20], 32, false),
        chunk("x", 20, &x[20..], 32, false),
        chunk("y", 0, &[1; 16], 16, true),
    ]
}

/// The first error pushing `chunks` (then finishing) gives.
fn first_error(expect: Expect, chunks: Vec<TensorChunk>) -> ChunkError {
    let mut a = Assembler::new(expect, true);
    for c in chunks {
        if let Err(e) = a.push(c) {
            return e;
        }
    }
    a.finish().expect_err("the stream was accepted")
}

#[test]
fn crc_check_value() {
    assert_eq!(checksum(b"123456789"), 0xE306_9283);
}

#[test]
fn chunks_make_a_batch_and_one_chunk_is_not_copied() {
    let mut a = Assembler::new(get4(), true);
    let mut chunks = good();
    let y = chunks.pop().unwrap();
    let y_ptr = y.data.as_ptr();
    for c in chunks {
        assert_eq!(a.push(c), Ok(None));
    }
    let mut b = a.push(y).unwrap().expect("complete");
    a.finish().unwrap();
    assert_eq!(b.index, 4);
    let bx = b.take("x").unwrap();
    let x: Vec<u8> = (0..32).collect();
    assert_eq!(bx.shape, vec![2, 4]);
    assert_eq!(bx.contiguous(), Bytes::from(x.clone()));
    assert_eq!(bx.to_vec(), x);
    assert_eq!(b.take("y").unwrap().contiguous().as_ptr(), y_ptr);
}

#[test]
fn corrupted_chunks_fail_their_crc() {
    let mut bad = good();
    bad[1].crc32c ^= 1;
    assert!(matches!(
        first_error(get4(), bad.clone()),
        ChunkError::Checksum {
            index: 4,
            offset: 20,
            ..
        }
    ));
    let mut a = Assembler::new(get4(), false);
    let got: Vec<_> = bad.into_iter().map(|c| a.push(c).unwrap()).collect();
    assert!(got[2].is_some(), "unchecked");
}

#[test]
fn chunks_must_tile_each_tensor_in_order() {
    let e = get4;
    let mut c = good();
    c.swap(0, 1);
    let err = first_error(e(), c);
    assert!(matches!(
        err,
        ChunkError::Offset {
            offset: 20,
            expected: 0,
            ..
        }
    ));
    assert!(err.to_string().contains("starts at offset 20"), "{err}");
    let mut c = good();
    c[1].offset = 24;
    assert!(matches!(
        first_error(e(), c),
        ChunkError::Offset {
            offset: 24,
            expected: 20,
            ..
        }
    ));
    let mut c = good();
    c.remove(1);
    assert!(matches!(
        first_error(e(), c),
        ChunkError::TensorShort {
            received: 20,
            total_bytes: 32,
            ..
        }
    ));
    let mut c = good();
    c[1].data = Bytes::from(vec![0; 40]);
    c[1].crc32c = checksum(&c[1].data);
    assert!(matches!(
        first_error(e(), c),
        ChunkError::PastEnd {
            offset: 20,
            len: 40,
            total_bytes: 32,
            ..
        }
    ));
    let mut c = good();
    c[1].total_bytes = 48;
    c[1].shape = vec![3, 4];
    assert!(matches!(
        first_error(e(), c),
        ChunkError::Changed {
            field: "total_bytes",
            ..
        }
    ));
    let mut c = good();
    c[1].shape = vec![1, 8];
    assert!(matches!(
        first_error(e(), c),
        ChunkError::Changed { field: "shape", .. }
    ));
    let mut c = good();
    c.pop();
    assert_eq!(first_error(e(), c), ChunkError::EndedMidBatch { index: 4 });
}

#[test]
fn minibatches_hold_exactly_the_tensors_asked_for() {
    let mut c = good();
    c[2].last = false;
    c.push(chunk("x", 0, &[0; 16], 16, true));
    assert!(matches!(
        first_error(get4(), c),
        ChunkError::UnexpectedTensor { expected, .. } if expected.contains("not marked last")
    ));
    let mut c = good();
    c[1].last = true;
    assert_eq!(
        first_error(get4(), c),
        ChunkError::Missing {
            index: 4,
            tensor: "y"
        }
    );
    let mut c = good();
    c.remove(2);
    c.insert(0, chunk("y", 0, &[1; 16], 16, false));
    let e = first_error(get4(), c);
    assert_eq!(
        e,
        ChunkError::Missing {
            index: 4,
            tensor: "x"
        }
    );
    // The Python client's assembler says the same.
    assert!(e.to_string().contains("lacks x or y"), "{e}");
    let mut c = good();
    c[0].name = "z".into();
    assert!(matches!(
        first_error(get4(), c),
        ChunkError::UnexpectedTensor {
            expected: "\"x\"",
            ..
        }
    ));
    // indices asked for: a minibatch without them is refused, with them
    // accepted (int64, one per row).
    let mut with = get4();
    with.with_indices = true;
    assert_eq!(
        first_error(with.clone(), good()),
        ChunkError::Missing {
            index: 4,
            tensor: "indices"
        }
    );
    let mut c = good();
    c[2].last = false;
    c.push(chunk("indices", 0, &[0; 16], 16, true));
    let mut a = Assembler::new(with, true);
    let done: Vec<_> = c.into_iter().map(|c| a.push(c).unwrap()).collect();
    assert_eq!(done[3].as_ref().unwrap().tensors.len(), 3);
    // A name from the wire is echoed shortened.
    let mut c = good();
    c[0].name = "z".repeat(100_000);
    let e = first_error(get4(), c);
    assert!(e.to_string().len() < 200, "{e}");
}

/// A minibatch's index, count and row count are what the request asked for.
#[test]
fn minibatches_come_as_asked_and_no_more() {
    // GetBatch: a second minibatch is refused at its first chunk.
    let mut c = good();
    for mut k in good() {
        k.index = 5;
        c.push(k);
    }
    assert_eq!(
        first_error(get4(), c),
        ChunkError::TooManyBatches { index: 5, max: 1 }
    );
    let mut c = good();
    for k in &mut c {
        k.index = 3;
    }
    assert_eq!(
        first_error(get4(), c),
        ChunkError::BatchIndex {
            index: 3,
            expected: 4
        }
    );
    assert_eq!(
        first_error(get4(), vec![]),
        ChunkError::TooFewBatches { got: 0, min: 1 }
    );
    let mut c = good();
    c[2].index = 5;
    assert_eq!(
        first_error(get4(), c),
        ChunkError::Interleaved {
            index: 5,
            unfinished: 4
        }
    );
    // StreamBatches(start 4, count 3): an endless stream is cut after 3.
    let stream = Expect::stream_batches(
        &proto::StreamBatchesRequest {
            size: 3,
            start: 4,
            count: 3,
            ..Default::default()
        },
        Known::default(),
    );
    let mut a = Assembler::new(stream, true);
    let mut got = 0;
    let e = (4..)
        .flat_map(|i| {
            good().into_iter().map(move |mut k| {
                k.index = i;
                k
            })
        })
        .find_map(|k| match a.push(k) {
            Ok(b) => {
                got += b.is_some() as u64;
                None
            }
            Err(e) => Some(e),
        })
        .unwrap();
    assert_eq!(got, 3);
    assert_eq!(e, ChunkError::TooManyBatches { index: 7, max: 3 });
    // Rows: at most `size`, and the same in every tensor.
    let mut c = good();
    c[0] = chunk("x", 0, &[0; 64], 64, false);
    assert!(matches!(
        first_error(get4(), c),
        ChunkError::Rows {
            rows: 4,
            expected: 3,
            exact: false,
            ..
        }
    ));
    let mut c = good();
    c[2] = chunk("y", 0, &[1; 24], 24, true);
    assert!(matches!(
        first_error(get4(), c),
        ChunkError::RowsDiffer {
            rows: 3,
            first: 2,
            ..
        }
    ));
}

/// Sizes are refused before anything is kept: what `total_bytes`, shape and
/// dtype claim must fit the request.
#[test]
fn sizes_beyond_the_request_are_refused_up_front() {
    // total_bytes = 2^40 with a plausible shape: beyond 3 rows of at most
    // DEFAULT_MAX_EXAMPLE_BYTES.
    let mut x = chunk("x", 0, &[0; 16], 16, false);
    x.total_bytes = 1 << 40;
    assert_eq!(
        first_error(get4(), vec![x.clone()]),
        ChunkError::TooLarge {
            index: 4,
            tensor: "x".into(),
            total_bytes: 1 << 40,
            rows: 3,
            row_bytes: DEFAULT_MAX_EXAMPLE_BYTES,
        }
    );
    // ... and with a shape that agrees with it.
    x.shape = vec![1, 1 << 38];
    assert!(matches!(
        first_error(get4(), vec![x.clone()]),
        ChunkError::TooLarge { .. }
    ));
    // One row of 2 MiB: fits 3 rows of 1 MiB, not one.
    x.shape = vec![1, 1 << 19];
    x.total_bytes = 2 << 20;
    assert!(matches!(
        first_error(get4(), vec![x]),
        ChunkError::TooLarge { rows: 1, .. }
    ));
    // Shape and total_bytes must agree; a shape must have rows.
    let mut c = good();
    c[0].shape = vec![2, 3];
    c[1].shape = vec![2, 3];
    assert!(matches!(
        first_error(get4(), c),
        ChunkError::ShapeBytes {
            total_bytes: 32,
            ..
        }
    ));
    let mut c = good();
    c[0].shape = vec![u64::MAX, u64::MAX];
    assert!(matches!(first_error(get4(), c), ChunkError::Rows { .. }));
    let mut c = good();
    c[0].shape = vec![];
    assert!(matches!(first_error(get4(), c), ChunkError::Shape { .. }));
    // Dtypes: a known one, and the one asked for.
    let mut c = good();
    c[0].dtype = 0;
    assert!(matches!(
        first_error(get4(), c),
        ChunkError::Dtype {
            got: 0,
            expected: None,
            ..
        }
    ));
    let mut u8_asked = get4();
    u8_asked.x.dtype = Some(proto::Dtype::Uint8 as i32);
    assert!(matches!(
        first_error(u8_asked, good()),
        ChunkError::Dtype { got: F32, .. }
    ));
    // Empty chunks: only a 0-byte tensor's one chunk.
    let mut c = good();
    c.insert(1, chunk("x", 20, &[], 32, false));
    assert!(matches!(
        first_error(get4(), c),
        ChunkError::EmptyChunk { offset: 20, .. }
    ));
    let empty = |last| {
        let mut k = chunk("x", 0, &[], 0, last);
        k.shape = vec![0, 4];
        k
    };
    assert!(matches!(
        first_error(get4(), vec![empty(false), empty(false)]),
        ChunkError::EmptyChunk { offset: 0, .. }
    ));
}

/// With GetInfo's shapes the bounds are exact.
#[test]
fn known_shapes_are_exact() {
    let info = proto::DatasetInfo {
        sets: vec![proto::SetInfo {
            name: "train".into(),
            examples: 14,
            x: Some(proto::TensorInfo {
                dtype: F32,
                shape: vec![4],
                ..Default::default()
            }),
            y: Some(proto::TensorInfo {
                dtype: I64,
                ..Default::default()
            }),
            classes: vec![],
        }],
        ..Default::default()
    };
    // 14 examples in minibatches of 3: minibatch 4 is the last, 2 rows.
    let e = Expect::get_batch(
        &proto::GetBatchRequest {
            set: "train".into(),
            index: 4,
            size: 3,
            ..Default::default()
        },
        Known {
            info: Some(&info),
            ..Known::default()
        },
    );
    let mut a = Assembler::new(e.clone(), true);
    let done: Vec<_> = good().into_iter().map(|c| a.push(c).unwrap()).collect();
    assert!(done[2].is_some());
    let mut x = chunk("x", 0, &[0; 16], 16, false);
    x.shape = vec![1, 4];
    assert!(matches!(
        first_error(e.clone(), vec![x]),
        ChunkError::Rows {
            rows: 1,
            expected: 2,
            exact: true,
            ..
        }
    ));
    let mut c = good();
    c[0].shape = vec![2, 2, 2];
    c[1].shape = vec![2, 2, 2];
    assert_eq!(
        first_error(e.clone(), c),
        ChunkError::Shape {
            index: 4,
            tensor: "x".into(),
            shape: "[2, 2, 2]".into(),
            expected: "[2, 4]".into()
        }
    );
    // The exact size bounds total_bytes before the shape is looked at.
    let mut x = chunk("x", 0, &[0; 16], 16, false);
    x.total_bytes = 33;
    assert!(matches!(
        first_error(e, vec![x]),
        ChunkError::TooLarge {
            rows: 2,
            row_bytes: 16,
            ..
        }
    ));
}

/// The generated contract: method paths and `data`'s field number are the
/// .proto's, and prost writes `data` under DATA_FIELD.
#[test]
fn contract_from_the_proto() {
    assert_eq!(BATCH_SERVICE, "minibatch.v1.BatchService");
    assert_eq!(GET_INFO, "/minibatch.v1.BatchService/GetInfo");
    assert_eq!(GET_BATCH, "/minibatch.v1.BatchService/GetBatch");
    assert_eq!(STREAM_BATCHES, "/minibatch.v1.BatchService/StreamBatches");
    assert_eq!(DATA_FIELD, 6);
    let c = TensorChunk {
        data: Bytes::from_static(b"abc"),
        ..Default::default()
    };
    assert_eq!(
        c.encode_to_vec(),
        vec![((DATA_FIELD as u8) << 3) | 2, 3, b'a', b'b', b'c']
    );
    let c = chunk("indices", 0, &[9; 16], 16, true);
    let buf = Bytes::from(c.encode_to_vec());
    let got = TensorChunk::decode(buf.clone()).unwrap();
    assert_eq!(got, c);
    // Decoded from a Bytes buffer, `data` is a slice of it.
    let start = buf.as_ptr() as usize;
    let at = got.data.as_ptr() as usize;
    assert!(at >= start && at < start + buf.len(), "not copied");
}
