//! What a call asked for, as bounds on what may come back.
//!
//! A GetBatch or StreamBatches request says how many examples per minibatch
//! (`size`), which minibatches (`index`, or `start` and `count`), the wire
//! dtypes and whether `indices` come too. With GetInfo's answer the client
//! also knows each example's shape and stored dtype, and the epoch's length.
//! [`Expect`] turns that into the limits the [`crate::Assembler`] holds every
//! chunk to before it keeps any bytes: a server cannot make a client hold
//! more than the request's minibatches of the request's size, whatever its
//! `total_bytes`, shapes or stream length say.
use prost::Message as _;

use crate::proto;

/// Largest example (one row of `x` or `y`) accepted while the dataset's
/// shapes are unknown (no GetInfo answer): 1 MiB. That is 330 times an MNIST
/// image as float32 (3,136 bytes) and above a 224×224×3 float32 image
/// (588 KiB); with the server's largest minibatch of 16,384 examples it
/// bounds a tensor at 16 GiB, with 500 examples at 500 MiB. Datasets with
/// larger examples: raise it in the client's configuration, or let the
/// client learn the exact shapes from GetInfo (then this does not apply).
pub const DEFAULT_MAX_EXAMPLE_BYTES: u64 = 1 << 20;

/// Bytes per element of a proto `Dtype` value; None for unspecified or
/// unknown values.
pub fn dtype_size(dtype: i32) -> Option<u64> {
    use proto::Dtype as D;
    Some(match D::try_from(dtype).ok()? {
        D::Unspecified => return None,
        D::Uint8 | D::Int8 | D::Bool => 1,
        D::Float16 | D::Bfloat16 | D::Int16 | D::Uint16 => 2,
        D::Float32 | D::Int32 | D::Uint32 => 4,
        D::Float64 | D::Int64 | D::Uint64 => 8,
    })
}

/// What one call may return; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    /// Index of the call's first minibatch (GetBatch: `index`;
    /// StreamBatches: `start`); the others follow one by one.
    pub first: u64,
    /// Fewest minibatches before the stream may end (GetBatch: 1).
    pub min_batches: u64,
    /// Most minibatches: GetBatch 1; StreamBatches `count`, capped by what
    /// is left of the epoch when its length is known. None: no bound (a
    /// StreamBatches to the end of an epoch of unknown length; every
    /// minibatch is still bounded, and none is kept by the assembler).
    pub max_batches: Option<u64>,
    /// Examples per minibatch asked for (`size`).
    pub size: u64,
    /// Examples in the epoch (this rank's shard of it), when GetInfo gave
    /// the set's length: minibatch `i` then holds exactly
    /// `min(size, shard_len - i * size)` examples, else at most `size`.
    pub shard_len: Option<u64>,
    pub with_indices: bool,
    pub x: TensorExpect,
    pub y: TensorExpect,
}

/// What one tensor of each minibatch may be.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorExpect {
    /// Wire dtype (proto `Dtype` value) when known: the one asked for, else
    /// the stored one GetInfo reports.
    pub dtype: Option<i32>,
    /// One example's shape, when GetInfo reported it.
    pub example_shape: Option<Vec<u64>>,
    /// Bound on one example's bytes while its shape is unknown.
    pub max_example_bytes: u64,
}

/// The `indices` tensor: one int64 per example.
static INDICES: TensorExpect = TensorExpect {
    dtype: Some(proto::Dtype::Int64 as i32),
    example_shape: Some(Vec::new()),
    max_example_bytes: 8,
};

impl TensorExpect {
    /// The `indices` tensor: one int64 per example.
    pub fn indices() -> Self {
        INDICES.clone()
    }

    fn new(asked: i32, info: Option<&proto::TensorInfo>, max_example_bytes: u64) -> Self {
        let stored = info.map(|t| t.dtype).filter(|&d| d != 0);
        Self {
            dtype: (asked != 0).then_some(asked).or(stored),
            example_shape: info.map(|t| t.shape.clone()),
            max_example_bytes,
        }
    }
}

/// What a client knows besides the request itself.
#[derive(Debug, Clone, Copy)]
pub struct Known<'a> {
    /// The server's GetInfo answer, when the client has it.
    pub info: Option<&'a proto::DatasetInfo>,
    /// Bound on one example's bytes for tensors whose shape is unknown
    /// ([`DEFAULT_MAX_EXAMPLE_BYTES`] unless configured).
    pub max_example_bytes: u64,
}

impl Default for Known<'_> {
    fn default() -> Self {
        Self {
            info: None,
            max_example_bytes: DEFAULT_MAX_EXAMPLE_BYTES,
        }
    }
}

/// The fields GetBatch and StreamBatches requests share.
struct Asked<'a> {
    dataset: &'a str,
    set: &'a str,
    size: u32,
    order: Option<&'a proto::Order>,
    x_dtype: i32,
    y_dtype: i32,
    with_indices: bool,
}

/// The [`Asked`] fields of a GetBatch or StreamBatches request.
macro_rules! asked {
    ($r:expr) => {
        Asked {
            dataset: &$r.dataset,
            set: &$r.set,
            size: $r.size,
            order: $r.order.as_ref(),
            x_dtype: $r.x_dtype,
            y_dtype: $r.y_dtype,
            with_indices: $r.with_indices,
        }
    };
}

/// Set `set` of dataset `dataset` as `info` (a GetInfo answer) describes
/// it. An empty `dataset` is the one GetInfo described (a daemon's only
/// one: with several the server refuses such requests); a named one is
/// looked up in the answer's list (servers before named datasets send no
/// list and no name: nothing is known of it then).
pub fn set_info<'a>(
    info: &'a proto::DatasetInfo,
    dataset: &str,
    set: &str,
) -> Option<&'a proto::SetInfo> {
    let ds = if dataset.is_empty() || info.name == dataset {
        info
    } else {
        info.datasets.iter().find(|d| d.name == dataset)?
    };
    ds.sets.iter().find(|s| s.name == set)
}

impl Expect {
    /// Exactly minibatch `r.index`, once.
    pub fn get_batch(r: &proto::GetBatchRequest, known: Known<'_>) -> Self {
        let mut e = Self::new(asked!(r), known);
        e.first = r.index;
        e.min_batches = 1;
        e.max_batches = Some(1);
        e
    }

    /// Minibatches `r.start ..`, `r.count` of them (0: to the end of the
    /// epoch), fewer when the epoch ends first.
    pub fn stream_batches(r: &proto::StreamBatchesRequest, known: Known<'_>) -> Self {
        let mut e = Self::new(asked!(r), known);
        e.first = r.start;
        let left = e.epoch_batches().map(|n| n.saturating_sub(r.start));
        e.max_batches = match (r.count, left) {
            (0, left) => left,
            (count, Some(left)) => Some(count.min(left)),
            (count, None) => Some(count),
        };
        e
    }

    /// The bounds of a call given as its method path and encoded request
    /// (what the Python client's native transport receives): `Ok(None)` for
    /// a method that does not return minibatches.
    pub fn for_call(
        path: &str,
        request: &[u8],
        known: Known<'_>,
    ) -> Result<Option<Self>, prost::DecodeError> {
        Ok(match path {
            crate::GET_BATCH => Some(Self::get_batch(
                &proto::GetBatchRequest::decode(request)?,
                known,
            )),
            crate::STREAM_BATCHES => Some(Self::stream_batches(
                &proto::StreamBatchesRequest::decode(request)?,
                known,
            )),
            _ => None,
        })
    }

    fn new(r: Asked<'_>, known: Known<'_>) -> Self {
        let set = known.info.and_then(|i| set_info(i, r.dataset, r.set));
        let max = known.max_example_bytes;
        let shard_len = set.map(|s| {
            let world = r.order.map_or(1, |o| o.world_size.max(1)) as u64;
            // The order left after `offset` consumed positions (an offset
            // past the end is refused by the server: nothing to expect).
            let rest = s.examples.saturating_sub(r.order.map_or(0, |o| o.offset));
            if world > 1 {
                rest / world
            } else {
                rest
            }
        });
        Self {
            first: 0,
            min_batches: 0,
            max_batches: None,
            size: r.size as u64,
            shard_len,
            with_indices: r.with_indices,
            x: TensorExpect::new(r.x_dtype, set.and_then(|s| s.x.as_ref()), max),
            y: TensorExpect::new(r.y_dtype, set.and_then(|s| s.y.as_ref()), max),
        }
        .with_drop_last(r.order.is_some_and(|o| o.drop_last))
    }

    /// Records `drop_last` by cutting the shard to whole minibatches, which
    /// is what the epoch then holds.
    fn with_drop_last(mut self, drop_last: bool) -> Self {
        if drop_last && self.size > 0 {
            self.shard_len = self.shard_len.map(|n| n / self.size * self.size);
        }
        self
    }

    /// Minibatches in the epoch, when its length is known.
    pub fn epoch_batches(&self) -> Option<u64> {
        let n = self.shard_len?;
        Some(if self.size == 0 {
            0
        } else {
            n.div_ceil(self.size)
        })
    }

    /// Examples minibatch `index` holds: `(n, true)` exactly n when the
    /// epoch's length is known, else `(size, false)`, at most size.
    pub fn rows(&self, index: u64) -> (u64, bool) {
        match self.shard_len {
            Some(n) => (
                n.saturating_sub(index.saturating_mul(self.size))
                    .min(self.size),
                true,
            ),
            None => (self.size, false),
        }
    }

    /// The tensors of every minibatch, in the order they come.
    pub(crate) fn tensor(&self, slot: usize) -> Option<(&'static str, &TensorExpect)> {
        match slot {
            0 => Some(("x", &self.x)),
            1 => Some(("y", &self.y)),
            2 if self.with_indices => Some(("indices", &INDICES)),
            _ => None,
        }
    }

    /// Names of the tensors every minibatch has.
    pub(crate) fn names(&self) -> &'static [&'static str] {
        if self.with_indices {
            &["x", "y", "indices"]
        } else {
            &["x", "y"]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> proto::DatasetInfo {
        let t = |dtype: proto::Dtype, shape: Vec<u64>| proto::TensorInfo {
            dtype: dtype as i32,
            shape,
            ..Default::default()
        };
        proto::DatasetInfo {
            sets: vec![proto::SetInfo {
                name: "train".into(),
                examples: 1003,
                x: Some(t(proto::Dtype::Float32, vec![784])),
                y: Some(t(proto::Dtype::Int64, vec![])),
                classes: vec![],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn requests_without_info_bound_rows_and_bytes_per_example() {
        let r = proto::StreamBatchesRequest {
            set: "train".into(),
            size: 100,
            start: 3,
            count: 4,
            x_dtype: proto::Dtype::Uint8 as i32,
            ..Default::default()
        };
        let e = Expect::stream_batches(&r, Known::default());
        assert_eq!((e.first, e.min_batches, e.max_batches), (3, 0, Some(4)));
        assert_eq!(e.rows(5), (100, false));
        assert_eq!(e.x.dtype, Some(proto::Dtype::Uint8 as i32));
        assert_eq!(e.y.dtype, None);
        assert_eq!(e.x.example_shape, None);
        assert_eq!(e.x.max_example_bytes, DEFAULT_MAX_EXAMPLE_BYTES);
        let to_end = proto::StreamBatchesRequest { count: 0, ..r };
        assert_eq!(
            Expect::stream_batches(&to_end, Known::default()).max_batches,
            None
        );
    }

    #[test]
    fn info_gives_exact_shapes_rows_and_epoch_length() {
        let info = info();
        let known = Known {
            info: Some(&info),
            ..Known::default()
        };
        let g = proto::GetBatchRequest {
            set: "train".into(),
            index: 10,
            size: 100,
            ..Default::default()
        };
        let e = Expect::get_batch(&g, known);
        assert_eq!((e.first, e.min_batches, e.max_batches), (10, 1, Some(1)));
        assert_eq!(e.rows(10), (3, true), "the last, partial minibatch");
        assert_eq!(e.rows(0), (100, true));
        assert_eq!(e.x.example_shape, Some(vec![784]));
        assert_eq!(e.x.dtype, Some(proto::Dtype::Float32 as i32));
        let order = proto::Order {
            world_size: 2,
            drop_last: true,
            ..Default::default()
        };
        let s = proto::StreamBatchesRequest {
            set: "train".into(),
            size: 100,
            start: 2,
            count: 0,
            order: Some(order),
            ..Default::default()
        };
        // 1003 / 2 = 501 examples per rank, 5 whole minibatches.
        let e = Expect::stream_batches(&s, known);
        assert_eq!(e.epoch_batches(), Some(5));
        assert_eq!(e.max_batches, Some(3));
        assert_eq!(e.rows(4), (100, true));
        let s = proto::StreamBatchesRequest { count: 10, ..s };
        assert_eq!(Expect::stream_batches(&s, known).max_batches, Some(3));
        // An offset cuts the order before sharding: (1003 - 4) / 2 = 499
        // examples per rank, 4 whole minibatches; at or past the end, none.
        let at = |offset| proto::StreamBatchesRequest {
            start: 0,
            count: 0,
            order: Some(proto::Order { offset, ..order }),
            ..s.clone()
        };
        let e = Expect::stream_batches(&at(4), known);
        assert_eq!((e.epoch_batches(), e.max_batches), (Some(4), Some(4)));
        assert_eq!(e.rows(3), (100, true));
        for offset in [1003, 1004, u64::MAX] {
            let e = Expect::stream_batches(&at(offset), known);
            assert_eq!((e.epoch_batches(), e.max_batches), (Some(0), Some(0)));
        }
        let unsharded = proto::StreamBatchesRequest {
            order: Some(proto::Order {
                offset: 3,
                ..Default::default()
            }),
            ..at(0)
        };
        let e = Expect::stream_batches(&unsharded, known);
        assert_eq!(e.epoch_batches(), Some(10));
        let other = proto::GetBatchRequest {
            set: "nope".into(),
            ..g
        };
        assert_eq!(Expect::get_batch(&other, known).x.example_shape, None);
    }

    #[test]
    fn calls_are_recognised_by_their_path() {
        let g = proto::GetBatchRequest {
            set: "train".into(),
            index: 7,
            size: 5,
            with_indices: true,
            ..Default::default()
        };
        let e = Expect::for_call(crate::GET_BATCH, &g.encode_to_vec(), Known::default())
            .unwrap()
            .unwrap();
        assert_eq!(e, Expect::get_batch(&g, Known::default()));
        assert!(e.with_indices);
        assert_eq!(
            Expect::for_call(crate::GET_INFO, &[], Known::default()).unwrap(),
            None
        );
        assert!(Expect::for_call(crate::STREAM_BATCHES, &[0xff], Known::default()).is_err());
    }

    #[test]
    fn dtype_sizes() {
        assert_eq!(dtype_size(proto::Dtype::Float32 as i32), Some(4));
        assert_eq!(dtype_size(proto::Dtype::Bfloat16 as i32), Some(2));
        assert_eq!(dtype_size(proto::Dtype::Bool as i32), Some(1));
        assert_eq!(dtype_size(proto::Dtype::Uint64 as i32), Some(8));
        assert_eq!(dtype_size(0), None);
        assert_eq!(dtype_size(99), None);
    }
}
