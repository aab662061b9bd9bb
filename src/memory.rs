//! Page-aligned host buffers that the loader fills and the server slices.
//!
//! A [`HostBuffer`] is an anonymous `mmap` region: page-aligned (so `mlock`
//! covers exactly it and a later device tier can register it for DMA), asked
//! for transparent huge pages (a 220 MB dataset then faults in ~100 pages, not
//! ~54,000), and growable in place with `mremap` while the decompressor does
//! not yet know the final size. Once loaded it is frozen into [`bytes::Bytes`]
//! so every minibatch is a reference-counted slice of the same memory.
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
        // Best effort: huge pages make the first touch of a large dataset
        // several times cheaper. Failure only costs speed.
        // SAFETY: the range is the mapping just created.
        unsafe { libc::madvise(p, cap, libc::MADV_HUGEPAGE) };
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
