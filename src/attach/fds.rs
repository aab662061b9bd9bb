//! Descriptors over a Unix socket: `sendmsg`/`recvmsg` with SCM_RIGHTS.
//!
//! The descriptors ride on the first byte of the data sent with them; a
//! receiver that reads that byte without room for control data gets none
//! (the kernel closes them), one with too little room gets some and
//! MSG_CTRUNC. Received descriptors are close-on-exec (MSG_CMSG_CLOEXEC).
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Control-message buffer space for `n` descriptors.
fn space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Sends (a prefix of) `data` on socket `sock` with `fds` attached; returns
/// the bytes sent, which may be fewer than `data` on a non-blocking socket
/// (the descriptors went with the first of them). `WouldBlock` means
/// nothing was sent.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // u64 elements keep the buffer aligned for cmsghdr.
    let mut control = vec![0u64; space(fds.len()).div_ceil(8)];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space(fds.len()) as _;
        // SAFETY: the control buffer holds one cmsghdr with room for
        // `fds.len()` descriptors (CMSG_SPACE above), and is aligned.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
            let p = libc::CMSG_DATA(c) as *mut RawFd;
            for (i, fd) in fds.iter().enumerate() {
                p.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// What one `recvmsg` got.
#[derive(Debug)]
pub struct Received {
    pub bytes: usize,
    pub fds: Vec<OwnedFd>,
    /// The sender passed more descriptors than there was room for (those
    /// beyond the room were closed by the kernel).
    pub truncated: bool,
}

/// Receives into `buf` with room for up to `max_fds` descriptors.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8], max_fds: usize) -> std::io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = vec![0u64; space(max_fds.max(1)).div_ceil(8)];
    // SAFETY: as in send_with_fds.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space(max_fds.max(1)) as _;
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg's control buffer; the CMSG_* walk stays
    // within msg_controllen, and every SCM_RIGHTS descriptor is new and
    // ours to own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(Received {
        bytes: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_travel_with_the_bytes_and_extras_are_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let three = [f.as_fd(), f.as_fd(), f.as_fd()];
        let n = send_with_fds(a.as_raw_fd(), b"hello", &three).unwrap();
        assert_eq!(n, 5);
        let mut buf = [0u8; 16];
        let r = recv_with_fds(b.as_raw_fd(), &mut buf, 1).unwrap();
        assert_eq!(&buf[..r.bytes], b"hello");
        // Room for one rounds up to the control buffer's alignment (two
        // descriptors on 64-bit Linux), still short of three.
        assert!((1..3).contains(&r.fds.len()), "{}", r.fds.len());
        assert!(r.truncated);
        // Plain bytes after: no descriptors.
        send_with_fds(a.as_raw_fd(), b"x", &[]).unwrap();
        let mut one = [0u8; 1];
        (&b).read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
    }
}
