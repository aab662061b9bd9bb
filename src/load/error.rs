//! The loader's one error type. Every variant names the file, and every
//! decoding error the byte offset it applies to and what was expected there,
//! so a broken or hostile file can be diagnosed from the message alone.
use std::path::PathBuf;

/// A decoding error inside one byte stream, before the file name is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    pub offset: u64,
    pub what: String,
}

impl At {
    pub fn new(offset: impl TryInto<u64>, what: impl Into<String>) -> Self {
        Self {
            offset: offset.try_into().unwrap_or(u64::MAX),
            what: what.into(),
        }
    }
}

/// Which byte stream an offset counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Offsets count bytes of the file itself.
    File,
    /// Offsets count bytes of the gzip member's decompressed data.
    Decompressed,
}

impl std::fmt::Display for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stream::File => "byte",
            Stream::Decompressed => "decompressed byte",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a dataset this loader knows: {what}")]
    Format { path: PathBuf, what: String },
    #[error("{path}: gzip: byte {}: {}", at.offset, at.what)]
    Gzip { path: PathBuf, at: At },
    #[error("{path}: pickle: {stream} {}: {}", at.offset, at.what)]
    Pickle {
        path: PathBuf,
        stream: Stream,
        at: At,
    },
    #[error("{path}: layout: {stream} {}: {}", at.offset, at.what)]
    Layout {
        path: PathBuf,
        stream: Stream,
        at: At,
    },
    #[error("{path}: idx: {stream} {}: {}", at.offset, at.what)]
    Idx {
        path: PathBuf,
        stream: Stream,
        at: At,
    },
    /// The zip structure of an `.npz` (offsets count bytes of the file, or
    /// of its inflated stream for a gzip'd `.npz`).
    #[error("{path}: zip{}: {stream} {}: {}", member.as_deref().map(|m| format!(" member {m}")).unwrap_or_default(), at.offset, at.what)]
    Zip {
        path: PathBuf,
        member: Option<String>,
        stream: Stream,
        at: At,
    },
    /// A `.npy` array: an `.npz` member or a file of its own (offsets count
    /// bytes of the member, inflated).
    #[error("{path}: npy{}: {} {}: {}", member.as_deref().map(|m| format!(" member {m}")).unwrap_or_default(), if member.is_some() { "member byte" } else { "byte" }, at.offset, at.what)]
    Npy {
        path: PathBuf,
        member: Option<String>,
        at: At,
    },
    /// The structure of a tar archive (offsets count bytes of the archive:
    /// of the file, or of its inflated stream when it was gzip'd).
    #[error("{path}: tar: {stream} {}: {}", at.offset, at.what)]
    Tar {
        path: PathBuf,
        stream: Stream,
        at: At,
    },
    /// The content of one archive member (a CIFAR batch in a tar): the
    /// offset is given in the archive's stream and in the member.
    #[error("{path}: member {member}: {stage}: {stream} {} (member byte {}): {}", base.saturating_add(at.offset), at.offset, at.what)]
    Member {
        path: PathBuf,
        member: String,
        /// "pickle" or "layout": the pass that failed.
        stage: &'static str,
        stream: Stream,
        /// Where the member's bytes start in the archive's stream.
        base: u64,
        at: At,
    },
    /// Reading the file took more steps than its size allows
    /// ([`crate::load::work`]): a file built to burn CPU.
    #[error("{path}: {stage}: {stream} {}: {}", at.offset, at.what)]
    WorkBudget {
        path: PathBuf,
        /// "pickle" or "layout": the pass that ran out.
        stage: &'static str,
        stream: Stream,
        at: At,
    },
    #[error("{path}: {what}")]
    Dataset { path: PathBuf, what: String },
    #[error("cannot allocate {bytes} bytes of host memory: {source}")]
    Memory {
        bytes: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("memory could not be pinned ({reason}) and --require-pinned is set; raise the memlock limit (ulimit -l, or docker --ulimit memlock=-1) or grant CAP_IPC_LOCK")]
    NotPinned { reason: String },
}

impl LoadError {
    /// Byte offset the error applies to, where there is one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            LoadError::Gzip { at, .. }
            | LoadError::Pickle { at, .. }
            | LoadError::Layout { at, .. }
            | LoadError::WorkBudget { at, .. }
            | LoadError::Idx { at, .. }
            | LoadError::Zip { at, .. }
            | LoadError::Npy { at, .. }
            | LoadError::Tar { at, .. } => Some(at.offset),
            LoadError::Member { base, at, .. } => Some(base.saturating_add(at.offset)),
            _ => None,
        }
    }
}
