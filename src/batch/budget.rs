//! One memory budget for everything the server builds per request.
//!
//! A contiguous, unconverted minibatch is a slice of the resident dataset
//! and costs nothing. A shuffled, sharded or converted one is gathered into
//! a fresh buffer, one chunk at a time ([`super::stream`]); each such buffer
//! holds a [`Lease`] on this budget from its allocation until the transport
//! drops the last reference to it (after the bytes reached the socket). So
//! the bytes the server holds for requests never exceed the budget, however
//! many streams clients open and however slowly they read.
//!
//! Why a budget and not only per-request limits: an audit held 5.9 GB with
//! 4 connections × 64 streams × one gathered minibatch each, whose readers
//! never read (each limit was respected). With chunks gathered lazily a
//! stream holds one or two chunks, and this budget bounds the sum.
//!
//! A chunk that cannot get budget waits (backpressure; the tokio semaphore
//! is fair, first come first served) for at most the budget's wait, then
//! its stream ends with RESOURCE_EXHAUSTED, which clients treat as "try
//! again or elsewhere".
//!
//! Stalled holders are evicted. A client that opens streams and never reads
//! them would otherwise keep its share of the budget forever and starve
//! everyone else: the bytes sit in HTTP/2 send buffers, where only closing
//! the connection frees them. So each lease records the connection
//! ([`Holder`]) whose stream took it; while someone waits for budget, every
//! connection holding a lease older than the stall time is closed. A
//! reading client's chunks leave in milliseconds and never get that old.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default budget: 128 MiB. It holds 64 streams each with two 1 MiB chunks
/// in flight (the default chunk size), or 40 whole-message 1.6 MB
/// minibatches (the Rust client's GetBatch(500) float32) twice over, and
/// fits beside the full MNIST (about 220 MB resident) in the shipped k8s
/// pod's 512 MiB limit.
pub const DEFAULT_BUDGET_BYTES: usize = 128 << 20;

/// Default longest wait for budget before a stream is refused: long enough
/// to ride out a burst of gathers (each chunk leaves in milliseconds on a
/// live connection), short enough that a client fails over while its peers
/// are still healthy.
pub const DEFAULT_BUDGET_WAIT: Duration = Duration::from_secs(10);

/// Default age at which a lease counts as stalled when others wait: a
/// thousand times what a chunk takes to leave on a live loopback
/// connection, and well inside the default budget wait, so a waiter is
/// served by eviction before it gives up.
pub const DEFAULT_STALL: Duration = Duration::from_secs(2);

/// How often a waiter looks for stalled holders again.
const STALL_CHECK: Duration = Duration::from_millis(250);

/// Request bytes one connection may buffer at once: four requests at the
/// 64 KiB request limit, far above what BatchService requests (under 100
/// bytes each) need even with all 64 streams opening together. An audit
/// held 640 MB with 2 connections × 64 streams × 4 MiB partial requests.
pub const MAX_CONNECTION_REQUEST_BYTES: usize = 256 << 10;

/// A connection as the budget sees it: something it can close. The server
/// makes one per connection and closes the connection when asked (its
/// reads fail, so its streams and their leases drop). It also counts the
/// request bytes the connection's streams are buffering: requests have
/// their own small per-connection allowance instead of the shared budget,
/// so a queue of large gathers never stalls the reading of requests.
#[derive(Debug)]
pub struct Holder {
    closed: AtomicBool,
    waker: AtomicWaker,
    request_bytes: std::sync::atomic::AtomicUsize,
    /// The connection's share of the budget for chunks: a connection's
    /// streams queue here first, so one connection with many streams
    /// waits behind itself instead of filling the budget's queue ahead of
    /// every other client.
    share: Arc<Semaphore>,
}

impl Default for Holder {
    /// A connection without a share limit.
    fn default() -> Self {
        Self::new(Semaphore::MAX_PERMITS)
    }
}

/// Request bytes a connection is buffering; returned when dropped.
#[derive(Debug)]
pub struct RequestLease {
    holder: Arc<Holder>,
    bytes: usize,
}

impl Drop for RequestLease {
    fn drop(&mut self) {
        self.holder
            .request_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Holder {
    /// A connection whose chunks may hold at most `share` bytes of budget.
    pub fn new(share: usize) -> Self {
        Self {
            closed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            request_bytes: Default::default(),
            share: Arc::new(Semaphore::new(share.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// `n` request bytes of this connection's allowance, if left.
    pub fn take_request(self: &Arc<Self>, n: usize) -> Option<RequestLease> {
        self.request_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n)
                    .filter(|&t| t <= MAX_CONNECTION_REQUEST_BYTES)
            })
            .ok()?;
        Some(RequestLease {
            holder: self.clone(),
            bytes: n,
        })
    }

    /// Asks the connection to close.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Whether [`Holder::close`] was called; registers `w` to be woken
    /// when it is.
    pub fn closed(&self, w: &Waker) -> bool {
        self.waker.register(w);
        self.closed.load(Ordering::Acquire)
    }
}

/// Leases taken on behalf of a holder: when, and by whom.
type Registry = Mutex<HashMap<u64, (Instant, Weak<Holder>)>>;

/// The shared budget (cheap to clone).
#[derive(Debug, Clone)]
pub struct Budget {
    sem: Arc<Semaphore>,
    bytes: usize,
    wait: Duration,
    stall: Duration,
    /// Bytes leased now (for metrics).
    held: Arc<AtomicU64>,
    /// Connections closed for holding stalled leases (for metrics).
    evictions: Arc<AtomicU64>,
    leases: Arc<Registry>,
    next_id: Arc<AtomicU64>,
}

/// Bytes taken from the budget; returned when dropped.
#[derive(Debug)]
pub struct Lease {
    _permit: OwnedSemaphorePermit,
    /// The same bytes of the holder's share, when a holder took it.
    _share: Option<OwnedSemaphorePermit>,
    bytes: u64,
    held: Arc<AtomicU64>,
    /// This lease's entry in the registry, when a holder took it.
    registered: Option<(u64, Arc<Registry>)>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
        if let Some((id, reg)) = &self.registered {
            reg.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        }
    }
}

/// Why budget was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("{want} bytes exceed the whole memory budget of {budget} bytes")]
    TooLarge { want: usize, budget: usize },
    #[error("the server's memory budget ({budget} bytes) stayed in use for {waited:?}; try again or another replica")]
    Exhausted { budget: usize, waited: Duration },
}

impl Budget {
    /// A budget of `bytes`; takers wait at most `wait`, and leases older
    /// than `stall` get their holders evicted while someone waits.
    pub fn new(bytes: usize, wait: Duration, stall: Duration) -> Self {
        // A tokio semaphore counts at most usize::MAX >> 3 permits.
        let bytes = bytes.min(Semaphore::MAX_PERMITS);
        Self {
            sem: Arc::new(Semaphore::new(bytes)),
            bytes,
            wait,
            stall,
            held: Arc::default(),
            evictions: Arc::default(),
            leases: Arc::default(),
            next_id: Arc::default(),
        }
    }

    /// Connections closed so far for holding stalled leases.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Closes every holder of a lease older than the stall time.
    fn evict_stalled(&self) {
        let now = Instant::now();
        let stalled: Vec<Arc<Holder>> = {
            let reg = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            reg.values()
                .filter(|(since, _)| now.duration_since(*since) >= self.stall)
                .filter_map(|(_, h)| h.upgrade())
                .collect()
        };
        for h in stalled {
            if !h.closed.load(Ordering::Acquire) {
                self.evictions.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    stall_s = self.stall.as_secs_f64(),
                    "closing a connection whose streams hold memory budget unread while others wait"
                );
                h.close();
            }
        }
    }

    /// Total bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Bytes leased now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    fn lease(
        &self,
        permit: OwnedSemaphorePermit,
        share: Option<OwnedSemaphorePermit>,
        n: usize,
        holder: Option<&Arc<Holder>>,
    ) -> Lease {
        self.held.fetch_add(n as u64, Ordering::Relaxed);
        let registered = holder.map(|h| {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            self.leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, (Instant::now(), Arc::downgrade(h)));
            (id, self.leases.clone())
        });
        Lease {
            _permit: permit,
            _share: share,
            bytes: n as u64,
            held: self.held.clone(),
            registered,
        }
    }

    fn permits(&self, n: usize) -> Result<u32, BudgetError> {
        match u32::try_from(n) {
            Ok(p) if n <= self.bytes => Ok(p),
            _ => Err(BudgetError::TooLarge {
                want: n,
                budget: self.bytes,
            }),
        }
    }

    /// `n` bytes now, if free (no waiting: the common case), for `holder`.
    pub fn try_take(
        &self,
        n: usize,
        holder: Option<&Arc<Holder>>,
    ) -> Result<Option<Lease>, BudgetError> {
        let p = self.permits(n)?;
        let share = match holder {
            Some(h) => match h.share.clone().try_acquire_many_owned(p) {
                Ok(s) => Some(s),
                Err(_) => return Ok(None),
            },
            None => None,
        };
        Ok(self
            .sem
            .clone()
            .try_acquire_many_owned(p)
            .ok()
            .map(|permit| self.lease(permit, share, n, holder)))
    }

    /// `n` bytes for `holder`, waiting for them at most the budget's wait
    /// and evicting stalled holders meanwhile.
    pub async fn take(self, n: usize, holder: Option<Arc<Holder>>) -> Result<Lease, BudgetError> {
        let p = self.permits(n)?;
        let deadline = tokio::time::Instant::now() + self.wait;
        let exhausted = BudgetError::Exhausted {
            budget: self.bytes,
            waited: self.wait,
        };
        // The connection's own share first: while its other streams hold
        // it, evicting anyone else would not help.
        let share = match &holder {
            Some(h) => {
                match tokio::time::timeout_at(deadline, h.share.clone().acquire_many_owned(p)).await
                {
                    Ok(Ok(s)) => Some(s),
                    Ok(Err(_)) | Err(_) => return Err(exhausted),
                }
            }
            None => None,
        };
        let acquire = self.sem.clone().acquire_many_owned(p);
        tokio::pin!(acquire);
        loop {
            self.evict_stalled();
            let slice = (tokio::time::Instant::now() + STALL_CHECK).min(deadline);
            match tokio::time::timeout_at(slice, &mut acquire).await {
                Ok(Ok(permit)) => return Ok(self.lease(permit, share, n, holder.as_ref())),
                Err(_) if slice < deadline => continue,
                // Out of time (the semaphore is never closed).
                Ok(Err(_)) | Err(_) => return Err(exhausted),
            }
        }
    }
}

/// A buffer of `len` bytes (at most the lease's), appended by `fill`, as
/// `Bytes` that hold the lease until the last reference drops.
pub fn filled(lease: Lease, len: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    struct Held {
        buf: Vec<u8>,
        _lease: Lease,
    }
    impl AsRef<[u8]> for Held {
        fn as_ref(&self) -> &[u8] {
            &self.buf
        }
    }
    debug_assert!(len as u64 <= lease.bytes);
    let mut buf = Vec::with_capacity(len);
    fill(&mut buf);
    assert!(buf.len() <= len, "filled past the leased length");
    Bytes::from_owner(Held { buf, _lease: lease })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leases_return_when_the_last_bytes_drop() {
        let b = Budget::new(100, Duration::from_millis(10), DEFAULT_STALL);
        let l = b.try_take(60, None).unwrap().unwrap();
        assert_eq!(b.held(), 60);
        assert!(b.try_take(50, None).unwrap().is_none(), "only 40 left");
        let bytes = filled(l, 60, |v| v.resize(60, 7));
        let part = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(b.held(), 60, "a slice still holds the buffer");
        assert_eq!(&part[..], &[7; 10]);
        drop(part);
        assert_eq!(b.held(), 0);
        assert!(b.try_take(100, None).unwrap().is_some());
    }

    #[tokio::test]
    async fn waits_then_refuses_and_never_grants_more_than_the_budget() {
        let b = Budget::new(100, Duration::from_millis(30), DEFAULT_STALL);
        assert_eq!(
            b.try_take(101, None).unwrap_err(),
            BudgetError::TooLarge {
                want: 101,
                budget: 100
            }
        );
        let l = b.clone().take(80, None).await.unwrap();
        let err = b.clone().take(30, None).await.unwrap_err();
        assert!(matches!(err, BudgetError::Exhausted { budget: 100, .. }));
        drop(l);
        // A waiter is served as soon as bytes return.
        let b = Budget::new(100, Duration::from_secs(60), DEFAULT_STALL);
        let l = b.clone().take(80, None).await.unwrap();
        let waiter = tokio::spawn(b.clone().take(30, None));
        tokio::task::yield_now().await;
        drop(l);
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(b.held(), 30);
        drop(got);
        assert_eq!(b.held(), 0);
    }

    /// A holder whose lease outlives the stall time while someone waits is
    /// closed; one whose lease is young, or that nobody waits behind, is not.
    #[tokio::test(start_paused = true)]
    async fn waiting_evicts_holders_of_stalled_leases() {
        let stall = Duration::from_secs(2);
        let b = Budget::new(100, Duration::from_secs(10), stall);
        let (old, young) = (Arc::new(Holder::default()), Arc::new(Holder::default()));
        let waker = futures_waker();
        let old_lease = b.try_take(60, Some(&old)).unwrap().unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!old.closed(&waker), "nobody waits: no eviction");
        let young_lease = b.try_take(40, Some(&young)).unwrap().unwrap();
        // A waiter: the old holder is closed at once, the young one is not.
        let waiter = tokio::spawn(b.clone().take(50, None));
        tokio::task::yield_now().await;
        assert!(old.closed(&waker));
        assert!(!young.closed(&waker));
        assert_eq!(b.evictions(), 1);
        // The server drops the closed connection's streams: the waiter is served.
        drop(old_lease);
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(b.held(), 90);
        drop((got, young_lease));
        assert!(b.leases.lock().unwrap().is_empty(), "leases unregister");
    }

    #[test]
    fn a_connection_buffers_requests_up_to_its_allowance() {
        let h = Arc::new(Holder::default());
        let a = h.take_request(MAX_CONNECTION_REQUEST_BYTES - 10).unwrap();
        assert!(h.take_request(11).is_none());
        let b = h.take_request(10).unwrap();
        drop(a);
        assert!(h.take_request(1000).is_some());
        drop(b);
    }

    /// One connection's chunks hold at most its share; another
    /// connection's are not queued behind them.
    #[tokio::test]
    async fn a_connection_holds_at_most_its_share() {
        let b = Budget::new(100, Duration::from_millis(50), DEFAULT_STALL);
        let (greedy, other) = (Arc::new(Holder::new(50)), Arc::new(Holder::new(50)));
        let a = b.try_take(30, Some(&greedy)).unwrap().unwrap();
        assert!(
            b.try_take(30, Some(&greedy)).unwrap().is_none(),
            "over its share"
        );
        let e = b.clone().take(30, Some(greedy.clone())).await.unwrap_err();
        assert!(matches!(e, BudgetError::Exhausted { .. }));
        let c = b.try_take(50, Some(&other)).unwrap().unwrap();
        assert_eq!(b.held(), 80);
        drop(a);
        assert!(b.try_take(30, Some(&greedy)).unwrap().is_some());
        drop(c);
    }

    fn futures_waker() -> Waker {
        std::task::Waker::noop().clone()
    }
}
