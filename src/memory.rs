//! Page-aligned host buffers that the loader fills and the server slices.
//!
//! A [`HostBuffer`] is a shared mapping of a memfd (an anonymous file in
//! RAM): page-aligned (so `mlock` covers exactly it and a later device tier
//! can register it for DMA), and growable with `ftruncate` + `mremap` while
//! the decompressor does not yet know the final size. Once loaded it is
//! [frozen](HostBuffer::freeze): the memfd is sealed (no growing, shrinking
//! or writing by anyone) and the daemon's own mapping turns read-only, and
//! the result, [`Resident`], hands out [`bytes::Bytes`] so every minibatch
//! is a reference-counted slice of the same memory, and its descriptor so
//! same-host clients can map the very same pages ([`crate::attach`]).
//!
//! Why a memfd and not anonymous memory: the pages can then be shared with
//! other processes by descriptor, one copy for N trainers; filling them
//! costs the same (shmem pages are zeroed on first touch like anonymous
//! ones; measured in BENCHMARKS.md "Issue 12"). Where `memfd_create` is
//! refused (a seccomp profile, a kernel before 3.17) the buffer falls back
//! to anonymous memory and the dataset simply cannot be attached.
//!
//! Page faults are a large part of a load: the kernel zeroes every new page,
//! and on this VM fresh memory is slow to get. A [`Prefaulter`] faults the
//! pages in on another core while the decompressor fills them. Transparent
//! huge pages were measured and rejected: warm they halve the fault cost, but
//! a daemon starting after a pause waited 3x longer for them (compaction and
//! host-side backing of 2 MiB pages); see BENCHMARKS.md.
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use bytes::Bytes;

/// Why pinning did or did not take effect, reported once per load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinState {
    /// `mlock` succeeded: the pages cannot be swapped out.
    Pinned,
    /// `mlock` failed (usually RLIMIT_MEMLOCK); the text is the OS error.
    NotPinned(String),
}

/// Where a buffer's pages live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// A memfd of its own: other processes can map it by descriptor
    /// (attach). Falls back to anonymous memory where memfds are refused.
    #[default]
    Shared,
    /// Anonymous memory, the daemon's alone: cheaper to fill (a full-size
    /// MNIST daemon was ready in 112 ms against 140 ms in memfds, same run,
    /// BENCHMARKS.md "Issue 12"), so a daemon nobody can attach to (no
    /// `--uds`) does not pay for sharing.
    Private,
}

/// A page-aligned, optionally locked allocation: a shared mapping of its
/// own memfd, or anonymous memory ([`Backing`]).
pub struct HostBuffer {
    ptr: NonNull<u8>,
    /// Bytes in use (what `as_slice` shows).
    len: usize,
    /// Bytes mapped (a multiple of the page size, at least one page); the
    /// memfd's size.
    cap: usize,
    locked: bool,
    /// The memfd behind the mapping; `None` for anonymous memory.
    fd: Option<OwnedFd>,
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

/// Name of the daemon's memfds (`/proc/PID/maps` shows `/memfd:minibatchd`).
const MEMFD_NAME: &std::ffi::CStr = c"minibatchd";

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A new memfd of `cap` bytes, sealable, closed on exec.
fn memfd(cap: usize) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall with a valid C string.
    let fd = unsafe {
        libc::memfd_create(
            MEMFD_NAME.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    check(fd)?;
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    truncate(&fd, cap)?;
    Ok(fd)
}

fn truncate(fd: &OwnedFd, len: usize) -> std::io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })
}

/// Whether memfds could not be made here, logged once.
static MEMFD_REFUSED: std::sync::Once = std::sync::Once::new();

impl HostBuffer {
    /// Maps `len` zeroed bytes. Pages are only touched (and counted in RSS)
    /// when written.
    pub fn zeroed(len: usize, backing: Backing) -> std::io::Result<Self> {
        let cap = round_up(len, page_size());
        let fd = match backing {
            Backing::Private => None,
            Backing::Shared => match memfd(cap) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    MEMFD_REFUSED.call_once(|| {
                        tracing::warn!(error = %e, "memfd_create failed: dataset memory is anonymous, and same-host clients cannot attach to it");
                    });
                    None
                }
            },
        };
        let (flags, raw) = match &fd {
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a new mapping with no address hint, of our memfd (sized
        // `cap` above) or anonymous.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
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
            fd,
        })
    }

    /// Copies `data` into a new buffer.
    pub fn from_slice(data: &[u8], backing: Backing) -> std::io::Result<Self> {
        let mut b = Self::zeroed(data.len(), backing)?;
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
        // SAFETY: as above, and &mut self guarantees exclusivity; the
        // mapping is writable until `freeze` consumes self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Resizes to `len` bytes, moving the mapping if it must grow (the
    /// kernel remaps pages; nothing is copied). New bytes are zero.
    pub fn resize(&mut self, len: usize) -> std::io::Result<()> {
        let cap = round_up(len, page_size());
        if cap != self.cap {
            // A file mapping may only cover the file: grow the memfd first,
            // shrink it after.
            if let (Some(fd), true) = (&self.fd, cap > self.cap) {
                truncate(fd, cap)?;
            }
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
            if let (Some(fd), true) = (&self.fd, cap < self.cap) {
                truncate(fd, cap)?;
            }
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

    /// Ends the writing: seals the memfd against growing, shrinking and
    /// writes by anyone (the descriptor can then be handed to other
    /// processes, which can only map it read-only) and makes the daemon's
    /// own mapping read-only.
    pub fn freeze(self) -> std::io::Result<Resident> {
        self.freeze_with(true)
    }

    /// [`freeze`](Self::freeze), with F_SEAL_FUTURE_WRITE tried first or
    /// not (the older kernels' way, tested on this one).
    fn freeze_with(mut self, future_write: bool) -> std::io::Result<Resident> {
        let addr = self.ptr.as_ptr() as *mut libc::c_void;
        if let Some(fd) = self.fd.as_ref().map(|f| f.as_raw_fd()) {
            // F_SEAL_FUTURE_WRITE (Linux 5.1+): no new writable mappings
            // or writes, while the mapping that exists (ours) stays valid.
            let fixed = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
            // SAFETY: fcntl on a descriptor we own.
            let sealed = future_write
                && unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, fixed | libc::F_SEAL_FUTURE_WRITE) }
                    == 0;
            if sealed {
                // SAFETY: our own mapping; nothing writes it after the load.
                check(unsafe { libc::mprotect(addr, self.cap, libc::PROT_READ) })?;
            } else {
                // Before Linux 5.1: F_SEAL_WRITE needs every mapping that
                // may write gone, and a shared mapping of a descriptor
                // opened read-write may (mprotect could make it writable),
                // even when read-only. So a read-only mapping through a
                // read-only descriptor of the same file replaces ours at
                // the same address (pointers into it stay valid).
                let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))
                    .expect("no NUL in a path of digits");
                // SAFETY: open with a valid C string.
                let ro = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                check(ro)?;
                // SAFETY: `ro` is new and ours.
                let ro = unsafe { OwnedFd::from_raw_fd(ro) };
                // SAFETY: MAP_FIXED over exactly our own mapping.
                let p = unsafe {
                    libc::mmap(
                        addr,
                        self.cap,
                        libc::PROT_READ,
                        libc::MAP_SHARED | libc::MAP_FIXED,
                        ro.as_raw_fd(),
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error());
                }
                if self.locked {
                    self.locked = false;
                    self.lock();
                }
                // SAFETY: fcntl on a descriptor we own.
                check(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, fixed | libc::F_SEAL_WRITE) })?;
            }
        } else {
            // SAFETY: our own mapping; nothing writes it after the load.
            check(unsafe { libc::mprotect(addr, self.cap, libc::PROT_READ) })?;
        }
        let fd = self.fd.take().map(Arc::new);
        let len = self.len;
        Ok(Resident {
            bytes: Bytes::from_owner(self),
            len,
            fd,
        })
    }
}

/// A frozen [`HostBuffer`]: read-only bytes for slicing, and the sealed
/// memfd behind them for sharing (cheap to clone).
#[derive(Clone)]
pub struct Resident {
    bytes: Bytes,
    len: usize,
    fd: Option<Arc<OwnedFd>>,
}

impl Resident {
    /// All its bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The sealed memfd, if the memory is one.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// The memfd's size (whole pages; the bytes end at `bytes().len()`).
    pub fn file_len(&self) -> usize {
        round_up(self.len, page_size())
    }

    /// Where `part` starts in these bytes, if it lies within them.
    pub fn offset_of(&self, part: &[u8]) -> Option<usize> {
        let base = self.bytes.as_ptr() as usize;
        let p = part.as_ptr() as usize;
        (p >= base && p + part.len() <= base + self.bytes.len()).then(|| p - base)
    }
}

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resident")
            .field("len", &self.len)
            .field("memfd", &self.fd.as_ref().map(|f| f.as_raw_fd()))
            .finish()
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
        let fd = buf.fd.as_ref().map(|f| f.as_raw_fd());
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || {
                let mut off = 0;
                while off < cap && !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = PREFAULT_STEP.min(cap - off);
                    if let Some(fd) = fd {
                        // A memfd's pages are allocated (zeroed) in one call
                        // per step before they are mapped: filling 200 MB
                        // this way took 114 ms against 121 ms by faults
                        // alone, near anonymous memory's 97 ms (measured
                        // here, BENCHMARKS.md "Issue 12"). Failure (no
                        // memory) leaves it to the faults, as before.
                        // SAFETY: plain syscall on the buffer's memfd, which
                        // outlives this thread like the mapping.
                        unsafe { libc::fallocate(fd, 0, off as libc::off_t, n as libc::off_t) };
                    }
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
        // releases any lock). The memfd closes after it; pages that other
        // processes mapped stay theirs.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.cap) };
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("locked", &self.locked)
            .field("memfd", &self.fd.as_ref().map(|f| f.as_raw_fd()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_shrinks_keeping_contents() {
        for backing in [Backing::Shared, Backing::Private] {
            grows_and_shrinks(backing);
        }
    }

    fn grows_and_shrinks(backing: Backing) {
        let mut b = HostBuffer::zeroed(10, backing).unwrap();
        assert_eq!(b.fd.is_some(), backing == Backing::Shared);
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

    /// Seals of a resident's memfd, and whether a new writable mapping of
    /// it and a resize are refused.
    fn sealed(r: &Resident) -> (libc::c_int, bool, bool) {
        let fd = r.fd().expect("a memfd").as_raw_fd();
        // SAFETY: syscalls on a live descriptor; a mapping that succeeds
        // (it must not) is unmapped at once.
        unsafe {
            let seals = libc::fcntl(fd, libc::F_GET_SEALS);
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            let map_refused = p == libc::MAP_FAILED;
            if !map_refused {
                libc::munmap(p, 4096);
            }
            let truncate_refused = libc::ftruncate(fd, 0) != 0;
            (seals, map_refused, truncate_refused)
        }
    }

    #[test]
    fn frozen_memory_is_sealed_read_only_and_keeps_its_bytes() {
        for future_write in [true, false] {
            let mut b = HostBuffer::zeroed(10, Backing::Shared).unwrap();
            b.resize(3 * 4096 + 5).unwrap();
            b.as_mut_slice()[..10].copy_from_slice(b"0123456789");
            let r = b.freeze_with(future_write).unwrap();
            assert_eq!(&r.bytes()[..10], b"0123456789");
            assert_eq!(r.bytes().len(), 3 * 4096 + 5);
            assert_eq!(r.file_len(), 4 * 4096);
            let (seals, map_refused, truncate_refused) = sealed(&r);
            let write = if future_write {
                libc::F_SEAL_FUTURE_WRITE
            } else {
                libc::F_SEAL_WRITE
            };
            let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL | write;
            assert_eq!(seals & want, want, "seals {seals:#x}");
            assert!(map_refused && truncate_refused);
            let part = r.bytes().slice(4..8);
            assert_eq!(r.offset_of(&part), Some(4));
            assert_eq!(r.offset_of(b"elsewhere"), None);
        }
    }

    #[test]
    fn empty_buffer_is_valid() {
        let b = HostBuffer::zeroed(0, Backing::Shared).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.as_slice(), b"");
    }
}
