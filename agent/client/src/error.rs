//! The client's errors.

use std::path::PathBuf;

use crate::PutOutcome;

/// What went wrong in a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent answered on the socket (none runs, it is starting or restarting, or this
    /// process may not connect): the gRPC channel could not be opened or the handshake did
    /// not get through.
    #[error("connecting to {}: {reason}", .socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why, with every cause ("transport error: Permission denied").
        reason: String,
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

/// An error and its causes, joined: a transport error's own text says little ("transport
/// error"); the cause ("Permission denied") is what the reader needs.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        cause = c.source();
    }
    out
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
