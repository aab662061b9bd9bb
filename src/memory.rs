//! Page-aligned host buffers that the loader fills and the server slices.
//!
//! A [`HostBuffer`] is an anonymous `mmap` region: page-aligned (so `mlock`
//! covers exactly it and a later device tier can register it for DMA), and
//! growable in place with `mremap` while the decompressor does not yet know
//! the final size. Once loaded it is frozen into [`bytes::Bytes`] so every
//! minibatch is a reference-counted slice of the same memory.
//!
//! Page faults are a large part of a load: the kernel zeroes every new page,
//! and on this VM fresh memory is slow to get. A [`Prefaulter`] faults the
//! pages in on another core while the decompressor fills them. Transparent
//! huge pages were measured and rejected: warm they halve the fault cost, but
//! a daemon starting after a pause waited 3x longer for them (compaction and
//! host-side backing of 2 MiB pages); see BENCHMARKS.md.
use std::ptr::NonNull;

/// Why pinning did or did not take effect, reported once per load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinState {
    /// `mlock` succeeded: the pages cannot be swapped out.
    Pinned,
    /// `mlock` failed (usually RLIMIT_MEMLOCK); the text is the OS error.
    NotPinned(String),
}

/// An anonymous, page-aligned, optionally locked allocation.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    /// Bytes in use (what `as_slice` shows).
    len: usize,
    /// Bytes mapped (a multiple of the page size, at least one page).
    cap: usize,
    locked: bool,
}

// SAFETY: the buffer is plain memory owned by this value; no interior
// aliasing exists outside the borrow rules of `as_slice`/`as_mut_slice`.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to).max(1) * to
}

impl HostBuffer {
    /// Maps `len` zeroed bytes. Pages are only touched (and counted in RSS)
    /// when written.
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        let cap = round_up(len, page_size());
        // SAFETY: anonymous private mapping with no address hint.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(p as *mut u8).expect("mmap returned null"),
            len,
            cap,
            locked: false,
        })
    }

    /// Copies `data` into a new buffer.
    pub fn from_slice(data: &[u8]) -> std::io::Result<Self> {
        let mut b = Self::zeroed(data.len())?;
        b.as_mut_slice().copy_from_slice(data);
        Ok(b)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Mapped bytes, including the tail of the last page.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Resizes to `len` bytes, moving the mapping if it must grow (the
    /// kernel remaps pages; nothing is copied). New bytes are zero.
    pub fn resize(&mut self, len: usize) -> std::io::Result<()> {
        let cap = round_up(len, page_size());
        if cap != self.cap {
            // SAFETY: remapping our own mapping; MAYMOVE lets the kernel
            // relocate it, after which only the new pointer is used.
            let p = unsafe {
                libc::mremap(
                    self.ptr.as_ptr() as *mut libc::c_void,
                    self.cap,
                    cap,
                    libc::MREMAP_MAYMOVE,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            self.ptr = NonNull::new(p as *mut u8).expect("mremap returned null");
            self.cap = cap;
        }
        if len > self.len && cap == self.cap {
            // Bytes past the old length inside the same pages may hold data
            // from before a shrink: keep the "new bytes are zero" promise.
            let old = self.len;
            self.len = len;
            self.as_mut_slice()[old..].fill(0);
        }
        self.len = len;
        Ok(())
    }

    /// Locks the pages in RAM. Idempotent.
    pub fn lock(&mut self) -> PinState {
        if self.locked {
            return PinState::Pinned;
        }
        // SAFETY: locking our own mapping.
        let r = unsafe { libc::mlock(self.ptr.as_ptr() as *const libc::c_void, self.cap) };
        if r == 0 {
            self.locked = true;
            PinState::Pinned
        } else {
            PinState::NotPinned(std::io::Error::last_os_error().to_string())
        }
    }

    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

/// Faults a buffer's pages in on a background thread, front to back, so the
/// thread that fills the buffer finds them present.
///
/// It only asks the kernel to populate the pages (`MADV_POPULATE_WRITE`,
/// Linux 5.14+; on older kernels it does nothing): it never reads or writes
/// the memory, so it cannot race with the filler. It must be stopped (or
/// dropped) before the buffer is resized or unmapped.
pub struct Prefaulter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// Pages populated per system call: small enough to stop promptly and to
/// stay just ahead of the decompressor, large enough to cost few calls.
const PREFAULT_STEP: usize = 4 << 20;

/// Linux's MADV_POPULATE_WRITE (not in every libc crate version).
const MADV_POPULATE_WRITE: libc::c_int = 23;

impl Prefaulter {
    /// Starts populating `buf`'s mapping.
    pub fn start(buf: &HostBuffer) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (addr, cap) = (buf.ptr.as_ptr() as usize, buf.cap);
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || {
                let mut off = 0;
                while off < cap && !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = PREFAULT_STEP.min(cap - off);
                    // SAFETY: the range lies in a mapping that outlives this
                    // thread (the owner stops us before unmapping or moving
                    // it); populating does not touch its contents.
                    let r = unsafe {
                        libc::madvise((addr + off) as *mut libc::c_void, n, MADV_POPULATE_WRITE)
                    };
                    if r != 0 {
                        break; // old kernel, or memory pressure: faults happen on demand
                    }
                    off += n;
                }
            })
            .ok();
        Self { stop, handle }
    }

    /// Stops and waits for the thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Prefaulter {
    fn drop(&mut self) {
        self.halt();
    }
}

impl AsRef<[u8]> for HostBuffer {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping exactly once (munmap also
        // releases any lock).
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.cap) };
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("locked", &self.locked)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_shrinks_keeping_contents() {
        let mut b = HostBuffer::zeroed(10).unwrap();
        b.as_mut_slice().copy_from_slice(b"0123456789");
        b.resize(3 * 4096 + 5).unwrap();
        assert_eq!(&b.as_slice()[..10], b"0123456789");
        assert!(b.as_slice()[10..].iter().all(|&x| x == 0));
        b.resize(4).unwrap();
        assert_eq!(b.as_slice(), b"0123");
        b.resize(8).unwrap();
        assert_eq!(b.as_slice(), b"0123\0\0\0\0");
        assert_eq!(b.capacity() % page_size(), 0);
    }

    #[test]
    fn empty_buffer_is_valid() {
        let b = HostBuffer::zeroed(0).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.as_slice(), b"");
    }
}
