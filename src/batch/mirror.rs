//! Narrow copies ("mirrors") of x tensors in a lossless wire dtype, built on
//! first demand.
//!
//! Why: serving MNIST's float32 pixels as uint8 converts 1.57 MB of floats
//! per 500-image minibatch. Reading those floats from memory was 38 % of the
//! server's time and capped uint8 GetBatch near float32's rate, wasting the
//! 4× smaller wire. A uint8 mirror of the set (a quarter of its x bytes:
//! 39 MB for MNIST's train set) turns every later request into the float32
//! path's zero-copy slice or row gather, with CRCs folded from per-row CRCs.
//!
//! The first uint8 request for a set starts the build on its own thread and
//! is served by converting, as are requests until the mirror is ready; the
//! bytes are the same either way (one conversion function makes both). The
//! mirror is pinned when the dataset is.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::convert::{self, Conversion};
use super::crc::RowCrcs;
use crate::memory::{Backing, HostBuffer, Resident};
use crate::metrics::Metrics;
use crate::store::{DType, Tensor};

/// One set's x in the wire dtype `conv.to`, with its per-row CRCs.
pub struct Mirror {
    pub conv: Conversion,
    pub tensor: Tensor,
    pub crcs: Arc<RowCrcs>,
    /// The sealed memory `tensor` is, for same-host clients to attach.
    pub memory: Resident,
    /// sha256 (hex) of `tensor`'s bytes, which attached clients verify.
    pub sha256: String,
}

impl Mirror {
    /// Converts all of `t` (blocking: seconds of CPU for large sets).
    pub fn build(
        t: &Tensor,
        conv: Conversion,
        pin: bool,
        backing: Backing,
    ) -> std::io::Result<Self> {
        let len = t.examples() * t.row_elems() * conv.to.size();
        let mut buf = HostBuffer::zeroed(len, backing)?;
        convert::convert_into(&t.data, &conv, buf.as_mut_slice());
        if pin {
            buf.lock();
        }
        let memory = buf.freeze()?;
        let mut tensor = Tensor::new(conv.to, t.shape.clone(), memory.bytes().clone())
            .map_err(std::io::Error::other)?;
        tensor.scale_divisor = (conv.scale_divisor != 0).then_some(conv.scale_divisor);
        let crcs = Arc::new(RowCrcs::new(&tensor));
        let sha256 = crate::analyze::sha256_hex(&tensor.data);
        Ok(Self {
            conv,
            tensor,
            crcs,
            memory,
            sha256,
        })
    }
}

enum Slot {
    Building,
    Ready(Arc<Mirror>),
    /// Building failed (out of memory): requests keep converting.
    Failed,
}

/// The mirrors of one tensor, keyed by wire dtype.
#[derive(Default)]
pub struct Mirrors {
    slots: Arc<Mutex<HashMap<DType, Slot>>>,
}

impl Mirrors {
    /// Whether `conv` of an x tensor is worth a mirror: narrowing to uint8
    /// (4× fewer bytes than float32, exact for MNIST's pixels).
    pub fn wanted(conv: &Conversion) -> bool {
        conv.to == DType::U8 && conv.from != DType::U8
    }

    /// The mirror of `x` as `conv`, if built; otherwise starts its build
    /// (once) and returns None, so the caller converts meanwhile. `label`
    /// names the tensor in logs (`train.x`); it is called only when a build
    /// starts.
    pub fn get_or_start(
        &self,
        label: impl FnOnce() -> String,
        x: &Tensor,
        conv: Conversion,
        pin: bool,
        backing: Backing,
        metrics: &Arc<Metrics>,
    ) -> Option<Arc<Mirror>> {
        let key = conv.to;
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.get(&key) {
            Some(Slot::Ready(m)) if m.conv == conv => return Some(m.clone()),
            Some(_) => return None,
            None => {}
        }
        slots.insert(key, Slot::Building);
        let (x, shared, metrics) = (x.clone(), self.slots.clone(), metrics.clone());
        let label = label();
        let spawned = std::thread::Builder::new()
            .name("mirror".into())
            .spawn(move || {
                let t0 = Instant::now();
                let slot = match Mirror::build(&x, conv, pin, backing) {
                    Ok(m) => {
                        let bytes = m.tensor.data.len() as u64;
                        metrics
                            .mirror_bytes
                            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(
                            tensor = %label,
                            dtype = %conv.to,
                            bytes,
                            ms = t0.elapsed().as_millis() as u64,
                            "x mirror ready: this set's minibatches in this dtype are now served without converting"
                        );
                        Slot::Ready(Arc::new(m))
                    }
                    Err(e) => {
                        tracing::warn!(tensor = %label, dtype = %conv.to, error = %e, "cannot build the x mirror; converting per request");
                        Slot::Failed
                    }
                };
                shared.lock().unwrap_or_else(|e| e.into_inner()).insert(key, slot);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the mirror thread; converting per request");
            slots.insert(key, Slot::Failed);
        }
        None
    }

    /// The mirror of `x` as `conv`, building it first if it is not yet
    /// (blocking this task until it is, polling): for clients that map the
    /// mirror itself rather than have minibatches converted.
    pub async fn ready(
        &self,
        label: impl Fn() -> String,
        x: &Tensor,
        conv: Conversion,
        pin: bool,
        backing: Backing,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<Mirror>, String> {
        loop {
            if let Some(m) = self.get_or_start(&label, x, conv, pin, backing, metrics) {
                return Ok(m);
            }
            let failed = matches!(
                self.slots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&conv.to),
                Some(Slot::Failed)
            );
            if failed {
                return Err(format!(
                    "the {} mirror of {} could not be built (see the daemon's log)",
                    conv.to,
                    label()
                ));
            }
            tokio::time::sleep(MIRROR_POLL).await;
        }
    }
}

/// How often [`Mirrors::ready`] looks whether a build has finished (a
/// build takes ~100 ms for MNIST's train set).
const MIRROR_POLL: std::time::Duration = std::time::Duration::from_millis(10);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::gather::tests::gather_all;
    use crate::order::Selection;
    use bytes::Bytes;

    /// A mirror holds exactly what per-request conversion sends, and its
    /// folded CRCs are those of the bytes.
    #[test]
    fn mirror_equals_per_request_conversion() {
        let vals: Vec<u8> = (0..40u32 * 784)
            .flat_map(|i| ((i * 37 % 256) as f32 / 256.0).to_le_bytes())
            .collect();
        let t = Tensor::new(DType::F32, vec![40, 784], Bytes::from(vals)).unwrap();
        let conv = Conversion {
            from: DType::F32,
            to: DType::U8,
            scale_divisor: 256,
        };
        let m = Mirror::build(&t, conv, false, Backing::Private).unwrap();
        assert_eq!(m.tensor.scale_divisor, Some(256));
        let sel = Selection::Indices(vec![39, 0, 7, 7, 12]);
        let direct = gather_all(&t, &sel, &conv);
        let mirrored = gather_all(&m.tensor, &sel, &Conversion::identity(&m.tensor));
        assert_eq!(direct, mirrored);
        assert_eq!(m.crcs.of_rows([39, 0, 7, 7, 12]), crc32c::crc32c(&direct));
        let all = gather_all(&t, &Selection::Range(0, 40), &conv);
        assert_eq!(&all[..], &m.tensor.data[..]);
    }
}
