//! The response stream of GetBatch and StreamBatches: minibatches of a
//! [`Plan`], each as chunks of `x`, then `y`, then (when asked) `indices`,
//! each chunk an encoded [`Frame`].
//!
//! Pull-based: the next chunk is sliced or gathered only when the transport
//! takes the previous one, so a stream holds at most the chunk in flight
//! (plus, shuffled, its minibatch's index list), never a minibatch or an
//! epoch, whatever the client's chunk size or reading speed. Gathered bytes
//! are leased from the server's memory [`Budget`](super::budget::Budget); a chunk that cannot get
//! budget waits, then the stream ends with RESOURCE_EXHAUSTED.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio_stream::Stream;

use super::budget::{self, BudgetError, Holder, Lease};
use super::convert::Conversion;
use super::crc::{checksum, RowCrcs};
use super::frame::{self, Frame};
use super::gather::Rows;
use super::prepared::{Prepared, Source};
use crate::error::ServeError;
use crate::order::{Plan, Selection};
use crate::proto;
use crate::store::DType;

/// How a stream's tensors go on the wire, fixed when it opens.
#[derive(Debug, Clone, Copy)]
pub struct Encoding {
    /// x and y as stored or converted.
    pub conv: (Conversion, Conversion),
    pub with_indices: bool,
    /// Largest `data` per message.
    pub chunk_bytes: usize,
}

/// One outgoing tensor of the current minibatch.
struct Part {
    name: &'static str,
    source: Source,
    dtype: DType,
    scale_divisor: u32,
    shape: Vec<u64>,
    total: usize,
    /// Bytes per chunk: whole rows when a row fits (so CRCs fold from row
    /// CRCs), else whole elements.
    step: usize,
}

impl Part {
    fn new(
        name: &'static str,
        source: Source,
        wire: Conversion,
        sel: &Selection,
        chunk: usize,
    ) -> Self {
        let (n, row) = (sel.len(), source.rows.row_bytes());
        let elem = source.rows.elem_bytes();
        let step = if row > 0 && row <= chunk {
            chunk / row * row
        } else {
            (chunk / elem * elem).max(elem)
        };
        let mut shape = vec![n as u64];
        if let Rows::Tensor { tensor, .. } = &source.rows {
            shape.extend(tensor.shape[1..].iter().map(|&d| d as u64));
        }
        Self {
            name,
            dtype: wire.to,
            scale_divisor: if wire.to == DType::U8 {
                wire.scale_divisor
            } else {
                0
            },
            shape,
            total: n * row,
            step,
            source,
        }
    }

    /// The CRC of output bytes `range`, folded from row CRCs when the
    /// range is whole rows of known CRCs.
    fn crc(&self, sel: &Selection, range: std::ops::Range<usize>, data: &[u8]) -> u32 {
        let rows = self.source.rows.row_bytes();
        match &self.source.crcs {
            Some(rc) if rows > 0 && self.step.is_multiple_of(rows) => {
                fold(rc, sel, range.start / rows..range.end / rows)
            }
            _ => checksum(data),
        }
    }
}

fn fold(rc: &RowCrcs, sel: &Selection, ks: std::ops::Range<usize>) -> u32 {
    match sel {
        Selection::Range(a, _) => rc.of_rows(a + ks.start..a + ks.end),
        Selection::Indices(v) => rc.of_rows(v[ks].iter().copied()),
    }
}

/// The minibatch being sent.
struct Current {
    index: u64,
    sel: Selection,
    /// Budget held by a shuffled minibatch's index list.
    _sel_lease: Option<Lease>,
    parts: Vec<Part>,
    part: usize,
    off: usize,
}

/// What the stream needs to go on.
enum Step {
    Frame(Frame),
    /// This many bytes of budget, for a chunk or (not a chunk) a shuffled
    /// minibatch's index list. Only chunk leases mark their connection as
    /// stalled when they age: a chunk waits in the send buffer only while
    /// the client does not read, an index list also while its stream waits
    /// for budget itself.
    Budget {
        bytes: usize,
        chunk: bool,
    },
    End,
}

type Wait = Pin<Box<dyn Future<Output = Result<Lease, BudgetError>> + Send>>;

/// Which minibatches a stream sends: `range` of `plan` over the set
/// numbered `set` in the prepared dataset.
pub struct Span {
    pub set: usize,
    pub plan: Plan,
    pub range: std::ops::Range<u64>,
}

/// See the module docs.
pub struct BatchStream {
    method: &'static str,
    prepared: Arc<Prepared>,
    set: usize,
    plan: Plan,
    enc: Encoding,
    next: u64,
    end: u64,
    cur: Option<Current>,
    /// Budget granted for the step that asked for it.
    lease: Option<Lease>,
    /// The connection the stream serves (leases are taken on its behalf).
    holder: Option<Arc<Holder>>,
    waiting: Option<Wait>,
    started: Instant,
    /// How the stream ended, once it has (for metrics).
    outcome: Option<tonic::Code>,
    /// Its entry on the status page, when listed ([`BatchStream::shown`]).
    shown: Option<crate::status::Shown>,
}

impl BatchStream {
    /// A stream of `span`'s minibatches, for a request of `method` that
    /// arrived at `started` on connection `holder`; the caller validated
    /// all of it.
    pub fn new(
        method: &'static str,
        prepared: Arc<Prepared>,
        span: Span,
        enc: Encoding,
        holder: Option<Arc<Holder>>,
        started: Instant,
    ) -> Self {
        let Span { set, plan, range } = span;
        prepared
            .metrics
            .active_streams
            .fetch_add(1, Ordering::Relaxed);
        Self {
            method,
            prepared,
            set,
            plan,
            enc,
            next: range.start,
            end: range.end,
            cur: None,
            lease: None,
            holder,
            waiting: None,
            started,
            outcome: None,
            shown: None,
        }
    }

    /// Lists this stream on the status page (`crate::status`) as `req`'s
    /// until it ends.
    pub fn shown(mut self, req: crate::status::StreamRequest) -> Self {
        let board = &self.prepared.metrics.status;
        self.shown = Some(board.open(req, &self.prepared.name, self.next..self.end));
        self
    }

    /// Starts minibatch `index`: its selection and its parts.
    fn start(&mut self, index: u64, sel_lease: Option<Lease>) -> Current {
        let sel = self
            .plan
            .batch(index)
            .expect("index validated against the plan");
        let p = &self.prepared;
        let [x, y] = p.sets[self.set].sources(self.enc.conv, p);
        let chunk = self.enc.chunk_bytes;
        let mut parts = vec![
            Part::new("x", x, self.enc.conv.0, &sel, chunk),
            Part::new("y", y, self.enc.conv.1, &sel, chunk),
        ];
        if self.enc.with_indices {
            let indices = Source {
                rows: Rows::Indices,
                crcs: None,
            };
            let wire = Conversion {
                from: DType::I64,
                to: DType::I64,
                scale_divisor: 0,
            };
            parts.push(Part::new("indices", indices, wire, &sel, chunk));
        }
        Current {
            index,
            sel,
            _sel_lease: sel_lease,
            parts,
            part: 0,
            off: 0,
        }
    }

    fn step(&mut self) -> Step {
        if self.cur.is_none() {
            if self.next >= self.end {
                return Step::End;
            }
            let index = self.next;
            let sel_lease = if self.plan.gathers() {
                let need = self.plan.batch_len(index) * std::mem::size_of::<usize>();
                match self.lease.take() {
                    Some(l) => Some(l),
                    None => {
                        return Step::Budget {
                            bytes: need,
                            chunk: false,
                        }
                    }
                }
            } else {
                None
            };
            self.cur = Some(self.start(index, sel_lease));
            self.next += 1;
        }
        let cur = self.cur.as_mut().expect("started above");
        let last_part = cur.parts.len() - 1;
        let p = &cur.parts[cur.part];
        let (off, end) = (cur.off, (cur.off + p.step).min(p.total));
        let data = match p.source.rows.slice(&cur.sel, off..end) {
            Some(d) => d,
            None => match self.lease.take() {
                Some(l) => budget::filled(l, end - off, |out| {
                    p.source.rows.fill(&cur.sel, off..end, out)
                }),
                None => {
                    return Step::Budget {
                        bytes: end - off,
                        chunk: true,
                    }
                }
            },
        };
        let chunk = proto::TensorChunk {
            index: cur.index,
            name: p.name.to_string(),
            dtype: p.dtype.to_proto() as i32,
            shape: p.shape.clone(),
            offset: off as u64,
            crc32c: p.crc(&cur.sel, off..end, &data),
            data,
            total_bytes: p.total as u64,
            scale_divisor: p.scale_divisor,
            last: cur.part == last_part && end == p.total,
        };
        if end < p.total {
            cur.off = end;
        } else if cur.part < last_part {
            cur.part += 1;
            cur.off = 0;
        } else {
            let bytes = cur.parts[..2].iter().map(|p| p.total as u64).sum();
            self.prepared
                .metrics
                .minibatch(self.method, &self.prepared.name, bytes);
            if let Some(s) = &self.shown {
                s.sent(bytes);
            }
            self.cur = None;
        }
        Step::Frame(frame::encode(chunk))
    }

    fn fail(&mut self, e: BudgetError) -> ServeError {
        let e = ServeError::from(e);
        self.outcome = Some(tonic::Status::from(e.clone()).code());
        tracing::debug!(method = self.method, error = %e, "stream refused budget");
        e
    }
}

impl Stream for BatchStream {
    type Item = Result<Frame, ServeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.outcome.is_some() {
            return Poll::Ready(None);
        }
        loop {
            if let Some(w) = this.waiting.as_mut() {
                let granted = std::task::ready!(w.as_mut().poll(cx));
                this.waiting = None;
                match granted {
                    Ok(l) => this.lease = Some(l),
                    Err(e) => {
                        this.prepared
                            .metrics
                            .budget_refusals
                            .fetch_add(1, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(this.fail(e))));
                    }
                }
            }
            match this.step() {
                Step::Frame(f) => return Poll::Ready(Some(Ok(f))),
                Step::End => {
                    this.outcome = Some(tonic::Code::Ok);
                    return Poll::Ready(None);
                }
                Step::Budget { bytes, chunk } => {
                    let holder = this.holder.clone().filter(|_| chunk);
                    match this.prepared.budget.try_take(bytes, holder.as_ref()) {
                        Ok(Some(l)) => this.lease = Some(l),
                        Ok(None) => {
                            this.prepared
                                .metrics
                                .budget_waits
                                .fetch_add(1, Ordering::Relaxed);
                            let take = this.prepared.budget.clone().take(bytes, holder);
                            this.waiting = Some(Box::pin(take));
                        }
                        Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
                    }
                }
            }
        }
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        let m = &self.prepared.metrics;
        m.active_streams.fetch_sub(1, Ordering::Relaxed);
        // A stream dropped before its end means the client left (or the
        // server shut down past its grace period).
        let code = self.outcome.unwrap_or(tonic::Code::Cancelled);
        m.request(self.method, code, self.started.elapsed());
        if let Some(s) = &mut self.shown {
            s.finish(&format!("{code:?}"));
        }
    }
}
