//! The client's errors.

use std::path::PathBuf;

use crate::PutOutcome;

/// What went wrong in a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gRPC channel could not be opened.
    #[error("connecting to {socket}: {source}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The agent refused or failed a call.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The attach exchange failed.
    #[error("attaching a session: {0}")]
    Attach(String),
    /// The session's connection ended (the agent stopped or restarted) while the call was
    /// under way. The next call attaches a new session.
    #[error("session lost: {0}")]
    Disconnected(String),
    /// Mapping shared memory or another local operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The caller asked for something the client refuses before sending anything.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The agent answered something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A batch of puts or commits was sent in several requests and one was refused: the
    /// outcome of each item is known, `None` for items that were not stored.
    #[error("{} of {} puts done before: {source}", .outcomes.iter().flatten().count(), .outcomes.len())]
    PartialPut {
        /// Per item: its outcome, or `None` when it was not stored.
        outcomes: Vec<Option<PutOutcome>>,
        /// Why the rest was not stored.
        #[source]
        source: Box<ClientError>,
    },
}

impl ClientError {
    /// The gRPC code, when the agent refused the call.
    #[must_use]
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status(s) => Some(s.code()),
            Self::PartialPut { source, .. } => source.code(),
            _ => None,
        }
    }
}
