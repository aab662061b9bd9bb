//! A `TensorChunk` as it goes on the wire: the gRPC length prefix and
//! every field but `data` in one small buffer, then `data` itself, the
//! same `Bytes` the minibatch was sliced or gathered into.
//!
//! Why: tonic's codec encodes every message into one buffer, copying the
//! whole `data` field, and that buffer then grows (a second copy) when the
//! fields after `data` are appended. Profiles of GetBatch(500) showed the two
//! copies as 21 % of the server's CPU samples. As two HTTP/2 body frames,
//! h2 writes the large one with `writev` straight from the dataset's bytes.
//! Field order on the wire differs from prost's (`data`, field 6, comes
//! after fields 7-10); protobuf parsers accept fields in any order.
use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use crate::proto;

use grpc_frames::Prefix;
pub use grpc_frames::PREFIX;

/// Room left in a message for the fields around `data` (name, shape, ...).
pub const MESSAGE_OVERHEAD: usize = 1024;

/// The prefix of an uncompressed message of `len` bytes. The server refuses
/// message limits over u32::MAX at start-up, so every message fits.
fn prefix(len: usize) -> [u8; PREFIX] {
    Prefix::uncompressed(len)
        .expect("messages stay under the validated limit")
        .to_bytes()
}

/// One encoded message: `head` then `data` make the gRPC message.
#[derive(Debug, Clone)]
pub struct Frame {
    pub head: Bytes,
    pub data: Bytes,
}

/// A whole message that has no large field (GetInfo's answer), prefixed.
pub fn message(m: &impl Message) -> Bytes {
    let len = m.encoded_len();
    let mut b = BytesMut::with_capacity(PREFIX + len);
    b.put_slice(&prefix(len));
    m.encode(&mut b)
        .expect("capacity reserved for the encoded length");
    b.freeze()
}

/// Splits `chunk` into the bytes before its `data` (gRPC prefix, the other
/// fields, `data`'s key and length) and `data` itself, untouched.
pub fn encode(mut chunk: proto::TensorChunk) -> Frame {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    use tensor_chunks::DATA_FIELD;
    let data = std::mem::take(&mut chunk.data);
    let data_len = if data.is_empty() {
        0
    } else {
        key_len(DATA_FIELD) + encoded_len_varint(data.len() as u64) + data.len()
    };
    let len = chunk.encoded_len() + data_len;
    let mut head = BytesMut::with_capacity(PREFIX + len - data.len());
    head.put_slice(&prefix(len));
    chunk
        .encode(&mut head)
        .expect("capacity reserved for the encoded length");
    if !data.is_empty() {
        encode_key(DATA_FIELD, WireType::LengthDelimited, &mut head);
        encode_varint(data.len() as u64, &mut head);
    }
    Frame {
        head: head.freeze(),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two parts, joined, are a message prost (any protobuf parser)
    /// decodes to the chunk that went in.
    #[test]
    fn hand_framed_chunks_decode_as_the_original() {
        for data in [
            Bytes::new(),
            Bytes::from_static(b"x"),
            Bytes::from(vec![7u8; 300_000]),
        ] {
            let chunk = proto::TensorChunk {
                index: 3,
                name: "x".into(),
                dtype: proto::Dtype::Float32 as i32,
                shape: vec![2, 784],
                offset: 12,
                data: data.clone(),
                crc32c: 99,
                total_bytes: 1 << 40,
                scale_divisor: 256,
                last: true,
            };
            let Frame { head, data: d } = encode(chunk.clone());
            assert_eq!(d, data);
            assert_eq!(head[0], 0, "uncompressed");
            let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
            let mut msg = head[5..].to_vec();
            msg.extend_from_slice(&d);
            assert_eq!(msg.len(), len, "prefix length covers header and data");
            assert_eq!(proto::TensorChunk::decode(&msg[..]).unwrap(), chunk);
            // ... and so do the clients' (generated in crates/tensor-chunks).
            let mirror = tensor_chunks::TensorChunk::decode(&msg[..]).unwrap();
            assert_eq!(
                (
                    mirror.index,
                    mirror.name.as_str(),
                    mirror.dtype,
                    &mirror.shape[..]
                ),
                (
                    chunk.index,
                    chunk.name.as_str(),
                    chunk.dtype,
                    &chunk.shape[..]
                )
            );
            assert_eq!(
                (
                    mirror.offset,
                    &mirror.data,
                    mirror.crc32c,
                    mirror.total_bytes
                ),
                (chunk.offset, &chunk.data, chunk.crc32c, chunk.total_bytes)
            );
            assert_eq!(
                (mirror.scale_divisor, mirror.last),
                (chunk.scale_divisor, chunk.last)
            );
        }
    }
}
