//! Errors returned by the engine. Expected outcomes (a miss, a key that already exists) are
//! part of the result types, not errors.

use std::io;

/// Everything that can go wrong in an engine call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The key is empty or longer than [`crate::MAX_KEY_LEN`].
    #[error("key of {len} bytes is invalid: keys are 1 to {max} bytes")]
    InvalidKey {
        /// Length of the offending key.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value is larger than the configured maximum.
    #[error("value of {len} bytes exceeds the maximum of {max} bytes")]
    ValueTooLarge {
        /// Requested value length.
        len: u64,
        /// The configured limit.
        max: u64,
    },
    /// Metadata larger than [`crate::MAX_METADATA_LEN`].
    #[error("metadata of {len} bytes exceeds the maximum of {max} bytes")]
    MetadataTooLarge {
        /// Requested metadata length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A batch holds more items than the configured maximum.
    #[error("batch of {len} items exceeds the maximum of {max}")]
    BatchTooLarge {
        /// Items in the batch.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// No space could be made: everything evictable was evicted and the rest is leased or
    /// reserved, or a bounded table (leases, reservations, sessions) is full.
    #[error("no space: {what}")]
    NoSpace {
        /// What ran out.
        what: &'static str,
    },
    /// The reservation does not exist (never made, already committed or aborted, expired),
    /// or belongs to another session.
    #[error(
        "unknown reservation {0:#x} (never reserved, already committed or aborted, or expired)"
    )]
    UnknownReservation(u64),
    /// The lease does not exist or belongs to another session.
    #[error("unknown lease {0:#x} (never granted, already released, or held by another session)")]
    UnknownLease(u64),
    /// The session handle does not name an open session.
    #[error("unknown or closed session {0:#x}")]
    UnknownSession(u64),
    /// The reservation is already being committed by a concurrent call.
    #[error("reservation {0:#x} is already being committed")]
    CommitInProgress(u64),
    /// The same reservation or lease appears twice in one batch.
    #[error("id {0:#x} appears more than once in the batch")]
    DuplicateId(u64),
    /// Invalid engine configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A lower tier could not be opened (its path, and why).
    #[error("{tier} tier: {reason}")]
    TierOpen {
        /// The tier's name.
        tier: &'static str,
        /// Why.
        reason: String,
    },
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl EngineError {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { what, source }
    }
}

/// Engine result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
