//! NenCache's node-local API: the generated gRPC types and service stubs
//! (`proto/nencache/v1/agent.proto`; see that file for the contract of each call), and the
//! attach protocol that hands clients their session and shared-memory descriptors.

pub mod attach;
pub mod frame;

/// Version 1 of the node-local API (generated).
#[allow(missing_docs, clippy::doc_markdown, clippy::default_trait_access)]
pub mod v1 {
    tonic::include_proto!("nencache.v1");
}

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = v1::ProtocolVersion::V1 as u32;
