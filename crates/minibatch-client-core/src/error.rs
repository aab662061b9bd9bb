use tensor_chunks::ChunkError;

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("invalid address {address:?}: {why}")]
    Address { address: String, why: String },
    /// Settings that cannot work (an unreadable certificate, a token that
    /// is not header text, half a client identity, ...).
    #[error("client settings: {0}")]
    Config(String),
    /// The call's gRPC status: the server's, or the transport's
    /// (UNAVAILABLE without a response, RESOURCE_EXHAUSTED for a message
    /// over the client's limit, ...).
    #[error("server answered {code:?}: {message}", code = .0.code(), message = .0.message())]
    Status(#[from] tonic::Status),
    /// The response stream broke the protocol or the request's bounds, or
    /// failed a CRC check: what and where.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}
