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
//! is fair, first come first served) for at most [`Budget::wait`], then its
//! stream ends with RESOURCE_EXHAUSTED, which clients treat as "try again or
//! elsewhere".
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// The shared budget (cheap to clone).
#[derive(Debug, Clone)]
pub struct Budget {
    sem: Arc<Semaphore>,
    bytes: usize,
    wait: Duration,
    /// Bytes leased now (for metrics).
    held: Arc<AtomicU64>,
}

/// Bytes taken from the budget; returned when dropped.
#[derive(Debug)]
pub struct Lease {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    held: Arc<AtomicU64>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
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
    /// A budget of `bytes`; takers wait at most `wait`.
    pub fn new(bytes: usize, wait: Duration) -> Self {
        // A tokio semaphore counts at most usize::MAX >> 3 permits.
        let bytes = bytes.min(Semaphore::MAX_PERMITS);
        Self {
            sem: Arc::new(Semaphore::new(bytes)),
            bytes,
            wait,
            held: Arc::default(),
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

    fn lease(&self, permit: OwnedSemaphorePermit, n: usize) -> Lease {
        self.held.fetch_add(n as u64, Ordering::Relaxed);
        Lease {
            _permit: permit,
            bytes: n as u64,
            held: self.held.clone(),
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

    /// `n` bytes now, if free (no allocation, no waiting: the common case).
    pub fn try_take(&self, n: usize) -> Result<Option<Lease>, BudgetError> {
        let p = self.permits(n)?;
        Ok(self
            .sem
            .clone()
            .try_acquire_many_owned(p)
            .ok()
            .map(|permit| self.lease(permit, n)))
    }

    /// `n` bytes, waiting for them at most [`Budget::wait`].
    pub async fn take(self, n: usize) -> Result<Lease, BudgetError> {
        let p = self.permits(n)?;
        match tokio::time::timeout(self.wait, self.sem.clone().acquire_many_owned(p)).await {
            Ok(Ok(permit)) => Ok(self.lease(permit, n)),
            // The semaphore is never closed; treat it like a timeout anyway.
            Ok(Err(_)) | Err(_) => Err(BudgetError::Exhausted {
                budget: self.bytes,
                waited: self.wait,
            }),
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
        let b = Budget::new(100, Duration::from_millis(10));
        let l = b.try_take(60).unwrap().unwrap();
        assert_eq!(b.held(), 60);
        assert!(b.try_take(50).unwrap().is_none(), "only 40 left");
        let bytes = filled(l, 60, |v| v.resize(60, 7));
        let part = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(b.held(), 60, "a slice still holds the buffer");
        assert_eq!(&part[..], &[7; 10]);
        drop(part);
        assert_eq!(b.held(), 0);
        assert!(b.try_take(100).unwrap().is_some());
    }

    #[tokio::test]
    async fn waits_then_refuses_and_never_grants_more_than_the_budget() {
        let b = Budget::new(100, Duration::from_millis(30));
        assert_eq!(
            b.try_take(101).unwrap_err(),
            BudgetError::TooLarge {
                want: 101,
                budget: 100
            }
        );
        let l = b.clone().take(80).await.unwrap();
        let err = b.clone().take(30).await.unwrap_err();
        assert!(matches!(err, BudgetError::Exhausted { budget: 100, .. }));
        drop(l);
        // A waiter is served as soon as bytes return.
        let b = Budget::new(100, Duration::from_secs(60));
        let l = b.clone().take(80).await.unwrap();
        let waiter = tokio::spawn(b.clone().take(30));
        tokio::task::yield_now().await;
        drop(l);
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(b.held(), 30);
        drop(got);
        assert_eq!(b.held(), 0);
    }
}
