//! The same-host tier: clients on the daemon's host map the resident
//! dataset itself, one copy in RAM for any number of trainer processes.
//!
//! The dataset lives in sealed memfds ([`crate::memory::Resident`]); a
//! client on the Unix socket (`--uds`) sends an attach request and receives
//! their descriptors (SCM_RIGHTS) with a description of every tensor: which
//! file, byte range, dtype, shape and sha256. It then maps the files
//! read-only, and a minibatch is a slice of the mapping, as in the tutorial
//! this project comes from. The exchange is not gRPC (descriptors cannot
//! travel in HTTP/2): the socket tells it apart by its first 8 bytes,
//! [`MAGIC`] instead of the HTTP/2 preface. The messages are protobuf
//! (`AttachRequest`, `AttachResponse` in the .proto, which documents the
//! framing); README "Attach" is the protocol for third parties.
//!
//! - [`fds`]: `sendmsg`/`recvmsg` with descriptors.
//! - [`serve`]: the daemon's side: checks, limits, the description.
//! - [`client`]: the Rust client's side: maps and checks what it got.
//!
//! One home for the framing: the header below is written and read by both
//! sides here; the Python client (`minibatch_client/attach.py`) is its only
//! other implementation.
pub mod client;
pub mod fds;
pub mod serve;

/// First bytes of an attach request and of its reply.
pub const MAGIC: &[u8; 8] = b"MBATTACH";
/// Protocol version this build speaks.
pub const VERSION: u32 = 1;
/// Header: magic, version, message length (little-endian u32s).
pub const HEADER_BYTES: usize = 16;
/// Largest request: a token (bearer tokens are at most a few hundred
/// bytes), a handful of dtypes and a client name of at most
/// [`MAX_CLIENT_NAME`] bytes fit many times over.
pub const MAX_REQUEST_BYTES: u32 = 4096;
/// Largest reply a client accepts: a region is under 200 bytes, so this
/// holds thousands of tensors; MNIST's is under 2 KiB.
pub const MAX_REPLY_BYTES: u32 = 1 << 20;
/// Most descriptors one reply may pass (the kernel's SCM_MAX_FD is 253; a
/// dataset has one file per loaded buffer plus one per mirror).
pub const MAX_FILES: usize = 64;
/// Longest client name the daemon logs.
pub const MAX_CLIENT_NAME: usize = 128;

/// A message's header.
pub fn header(len: usize) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// Why a header cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bytes 0..8 are not the attach magic \"MBATTACH\"")]
    Magic,
    #[error("attach protocol version {0} (bytes 8..12); this build speaks version {VERSION}")]
    Version(u32),
    #[error("message length {len} (bytes 12..16) exceeds the limit of {max} bytes")]
    TooLong { len: u32, max: u32 },
}

/// The message length a header announces, checked against `max`.
pub fn parse_header(h: &[u8; HEADER_BYTES], max: u32) -> Result<usize, HeaderError> {
    if &h[..8] != MAGIC {
        return Err(HeaderError::Magic);
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(HeaderError::Version(version));
    }
    let len = u32::from_le_bytes(h[12..].try_into().expect("4 bytes"));
    if len > max {
        return Err(HeaderError::TooLong { len, max });
    }
    Ok(len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_name_what_is_wrong() {
        let h = header(300);
        assert_eq!(parse_header(&h, MAX_REQUEST_BYTES), Ok(300));
        assert_eq!(
            parse_header(&h, 299),
            Err(HeaderError::TooLong { len: 300, max: 299 })
        );
        let mut v = h;
        v[8] = 2;
        assert_eq!(parse_header(&v, 4096), Err(HeaderError::Version(2)));
        let mut m = h;
        m[0] = b'P';
        assert_eq!(parse_header(&m, 4096), Err(HeaderError::Magic));
    }
}
