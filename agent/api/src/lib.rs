//! NenCache's node-local API: the generated gRPC types and service stubs
//! (`proto/nencache/v1/agent.proto`), the attach protocol that hands clients their session
//! and shared-memory descriptors, the session fast path's frame codec, and version
//! negotiation. `docs/api.md` is the contract, byte for byte.

pub mod attach;
pub mod frame;

/// Version 1 of the node-local API (generated).
#[allow(missing_docs, clippy::doc_markdown, clippy::default_trait_access)]
pub mod v1 {
    tonic::include_proto!("nencache.v1");
}

/// The highest protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = v1::ProtocolVersion::V1 as u32;
/// The lowest protocol version this crate speaks.
pub const MIN_PROTOCOL_VERSION: u32 = v1::ProtocolVersion::V1 as u32;

/// The version both sides speak when a peer announces `offered` as the highest it speaks:
/// the lower of `offered` and [`PROTOCOL_VERSION`], or `None` when that is below
/// [`MIN_PROTOCOL_VERSION`]. The handshake answers this version, and an attach hello must
/// carry a version in `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION` (the one the handshake
/// answered), so both checks agree.
#[must_use]
pub fn negotiate(offered: u32) -> Option<u32> {
    let v = offered.min(PROTOCOL_VERSION);
    (v >= MIN_PROTOCOL_VERSION).then_some(v)
}

/// The canonical name of a gRPC status code, as in the API's error table (and as a bounded
/// metric label value).
#[must_use]
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_negotiate_to_the_lower_supported_one() {
        assert_eq!(super::negotiate(0), None);
        assert_eq!(super::negotiate(1), Some(1));
        assert_eq!(super::negotiate(7), Some(super::PROTOCOL_VERSION));
    }
}
