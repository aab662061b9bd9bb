//! Everything that can go wrong serving a request, and the one table that
//! turns it into a gRPC status code.
use std::time::Duration;

use tonic::Status;

use crate::batch::budget::BudgetError;
use crate::order::OrderError;
use crate::store::DType;

/// Longest part of a client-supplied name repeated in an error message:
/// error text travels in a header, and a huge hostile name must not make
/// the status undeliverable.
pub const MAX_ECHOED_NAME: usize = 64;

/// Everything that can go wrong serving a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    #[error("unknown set {name:?}; this dataset has {available}")]
    UnknownSet { name: String, available: String },
    #[error("unknown dataset {name:?}; this daemon serves {available}")]
    UnknownDataset { name: String, available: String },
    #[error("this daemon serves several datasets ({available}): name one in the request's dataset field")]
    DatasetNeeded { available: String },
    #[error("{0}")]
    Order(#[from] OrderError),
    #[error("start {start} is past the end: this order has {batches} minibatches")]
    StartPastEnd { start: u64, batches: u64 },
    #[error("{tensor} is {from}; cannot send it as {to}: {why}")]
    Conversion {
        tensor: String,
        from: DType,
        to: DType,
        why: String,
    },
    #[error("unknown dtype value {0} in request")]
    BadDType(i32),
    #[error("dataset statistics are unavailable: {0}")]
    Stats(String),
    #[error("{0}")]
    Budget(#[from] BudgetError),
    #[error("request message of {len} bytes exceeds the limit of {limit} bytes")]
    RequestTooLarge { len: usize, limit: usize },
    #[error("this connection is already reading {limit} bytes of requests; wait for them or use another connection")]
    ConnectionRequests { limit: usize },
    #[error("compressed request messages are not supported: send them uncompressed")]
    Compressed,
    #[error("{0}")]
    BadRequest(String),
    #[error("the request message did not arrive within {0:?}")]
    RequestTimeout(Duration),
    #[error("reading the request failed: {0}")]
    Transport(String),
    #[error("attach passes the dataset's memory as file descriptors, which travel only over a Unix socket on the daemon's host: connect to the daemon's --uds socket (this connection is TCP)")]
    AttachNeedsUnixSocket,
    #[error("{attached} processes are attached, the most this daemon allows (--max-attached {max}); close an attachment or raise the limit")]
    AttachLimit { attached: usize, max: usize },
    #[error("the dataset's memory cannot be shared: {0}")]
    NotShareable(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("attach protocol version {0}; this daemon speaks version {v}", v = crate::attach::VERSION)]
    AttachVersion(u32),
}

impl ServeError {
    /// An unknown set, echoing at most [`MAX_ECHOED_NAME`] characters of it.
    pub fn unknown_set<'a>(name: &str, available: impl Iterator<Item = &'a str>) -> Self {
        ServeError::UnknownSet {
            name: echoed(name),
            available: quoted(available),
        }
    }

    /// An unknown dataset, echoing at most [`MAX_ECHOED_NAME`] characters of it.
    pub fn unknown_dataset<'a>(name: &str, available: impl Iterator<Item = &'a str>) -> Self {
        ServeError::UnknownDataset {
            name: echoed(name),
            available: quoted(available),
        }
    }

    /// A request that named no dataset of a daemon with several.
    pub fn dataset_needed<'a>(available: impl Iterator<Item = &'a str>) -> Self {
        ServeError::DatasetNeeded {
            available: quoted(available),
        }
    }
}

/// At most [`MAX_ECHOED_NAME`] characters of a client-supplied name.
fn echoed(name: &str) -> String {
    name.chars().take(MAX_ECHOED_NAME).collect()
}

/// The server's own names, quoted, for a message.
fn quoted<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Status {
        let msg = e.to_string();
        match e {
            ServeError::UnknownSet { .. } | ServeError::UnknownDataset { .. } => {
                Status::not_found(msg)
            }
            ServeError::Order(OrderError::PastEnd { .. })
            | ServeError::StartPastEnd { .. }
            | ServeError::RequestTooLarge { .. } => Status::out_of_range(msg),
            ServeError::Order(_)
            | ServeError::BadDType(_)
            | ServeError::BadRequest(_)
            | ServeError::DatasetNeeded { .. } => Status::invalid_argument(msg),
            ServeError::Conversion { .. }
            | ServeError::AttachNeedsUnixSocket
            | ServeError::NotShareable(_) => Status::failed_precondition(msg),
            ServeError::Unauthenticated(_) => Status::unauthenticated(msg),
            ServeError::AttachLimit { .. } => Status::resource_exhausted(msg),
            ServeError::AttachVersion(_) => Status::unimplemented(msg),
            ServeError::Stats(_) => Status::internal(msg),
            ServeError::Budget(_) | ServeError::ConnectionRequests { .. } => {
                Status::resource_exhausted(msg)
            }
            ServeError::Compressed => Status::unimplemented(msg),
            ServeError::RequestTimeout(_) => Status::deadline_exceeded(msg),
            ServeError::Transport(_) => Status::cancelled(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// Every variant's code, as README "Status codes" documents them.
    #[test]
    fn each_error_has_its_documented_code() {
        let cases: Vec<(ServeError, Code)> = vec![
            (
                ServeError::unknown_set("nope", ["train", "valid"].into_iter()),
                Code::NotFound,
            ),
            (
                ServeError::unknown_dataset("nope", ["mnist", "cifar"].into_iter()),
                Code::NotFound,
            ),
            (
                ServeError::dataset_needed(["mnist", "cifar"].into_iter()),
                Code::InvalidArgument,
            ),
            (
                OrderError::PastEnd {
                    index: 9,
                    batches: 3,
                    size: 2,
                }
                .into(),
                Code::OutOfRange,
            ),
            (
                ServeError::StartPastEnd {
                    start: 4,
                    batches: 3,
                },
                Code::OutOfRange,
            ),
            (OrderError::ZeroSize.into(), Code::InvalidArgument),
            (
                OrderError::BadRank { rank: 2, world: 2 }.into(),
                Code::InvalidArgument,
            ),
            (ServeError::BadDType(99), Code::InvalidArgument),
            (
                ServeError::BadRequest("not protobuf".into()),
                Code::InvalidArgument,
            ),
            (
                ServeError::Conversion {
                    tensor: "train.y".into(),
                    from: DType::I64,
                    to: DType::U8,
                    why: "no".into(),
                },
                Code::FailedPrecondition,
            ),
            (ServeError::Stats("gone".into()), Code::Internal),
            (
                BudgetError::Exhausted {
                    budget: 1,
                    waited: Duration::from_secs(1),
                }
                .into(),
                Code::ResourceExhausted,
            ),
            (
                ServeError::RequestTooLarge { len: 9, limit: 8 },
                Code::OutOfRange,
            ),
            (
                ServeError::ConnectionRequests { limit: 9 },
                Code::ResourceExhausted,
            ),
            (ServeError::Compressed, Code::Unimplemented),
            (
                ServeError::RequestTimeout(Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
            (ServeError::Transport("reset".into()), Code::Cancelled),
            (ServeError::AttachNeedsUnixSocket, Code::FailedPrecondition),
            (
                ServeError::AttachLimit {
                    attached: 3,
                    max: 3,
                },
                Code::ResourceExhausted,
            ),
            (
                ServeError::NotShareable("anonymous memory".into()),
                Code::FailedPrecondition,
            ),
            (
                ServeError::Unauthenticated("invalid bearer token"),
                Code::Unauthenticated,
            ),
            (ServeError::AttachVersion(2), Code::Unimplemented),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let st = Status::from(e);
            assert_eq!(st.code(), code, "{text}");
            assert_eq!(st.message(), text);
        }
    }

    #[test]
    fn echoed_names_are_capped() {
        let e = ServeError::unknown_set(&"n".repeat(10_000), ["train"].into_iter());
        let ServeError::UnknownSet { name, available } = &e else {
            unreachable!()
        };
        assert_eq!(name.len(), MAX_ECHOED_NAME);
        assert_eq!(available, "\"train\"");
    }
}
