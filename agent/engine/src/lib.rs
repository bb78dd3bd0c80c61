//! The NenCache storage engine.
//!
//! This crate is the bottom of the dependency graph: it knows nothing of gRPC, Kubernetes or
//! the command line. It holds the host-memory tier (T1) of the KV cache:
//!
//! - [`shm`]: sealed memfd regions, the arena (committed values, mapped read-only by
//!   clients) and the staging area (puts in flight, mapped read-write by clients);
//! - [`alloc`]: the extent allocator that places values contiguously in those regions;
//! - [`index`]: the Robin Hood hash index keyed by a 128-bit hash of each key;
//! - `policy`: S3-FIFO and LRU eviction;
//! - [`engine`]: the tier itself, with reservations (two-phase put), leases (zero-copy get),
//!   sessions, TTL and statistics;
//! - [`key`]: key validation and content-defined chunk keys;
//! - [`traces`]: the synthetic workloads shared by benchmarks and the demo.
//!
//! The unsafe operations on raw shared memory are defined in [`shm`]; the engine calls them
//! on extents it owns, each call with a `SAFETY:` comment.

pub mod alloc;
pub mod config;
pub mod engine;
pub mod error;
pub mod index;
pub mod key;
mod policy;
pub mod shm;
mod slab;
pub mod traces;

pub use engine::{
    Admission, Committed, DemotionConfig, Engine, EngineConfig, EvictionPolicy, Get, HostConfig,
    Lease, Limits, Lookup, LowerTier, MAX_METADATA_LEN, PendingGet, PutItem, Reserved, SessionId,
    Stats, Tier, TierConfig, TierStats,
};
pub use error::{EngineError, Result};
pub use key::{ChunkKeys, DEFAULT_CHUNK_SIZE, MAX_KEY_LEN, checksum, hex, key_hash, validate_key};
pub use nencache_store::{IoEngineKind, StoreConfig};
