//! Keys: validation, the 128-bit index hash (seeded per engine), and content-defined chunk
//! keys for prompts (unseeded: every client must derive the same ones).
//!
//! A prompt's tokens are cut into chunks of `chunk_size` tokens and each chunk gets a key
//! chained over everything before it:
//!
//! ```text
//! fp   = XXH3-128(fingerprint string, UTF-8)
//! h_0  = 16 zero bytes
//! h_i  = XXH3-128( h_{i-1} || fp || tokens_i as little-endian u32 )
//! key_i = h_i as 16 little-endian bytes
//! ```
//!
//! Two prompts that share their first `n` chunks share their first `n` keys, whichever client
//! computed them. The test vector in `docs/ARCHITECTURE.md` is checked by this module's tests.

use xxhash_rust::xxh3::{Xxh3, xxh3_64, xxh3_128, xxh3_128_with_seed};

use crate::error::{EngineError, Result};

/// Longest key the engine accepts, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// Default number of tokens per chunk (LMCache's default too).
pub const DEFAULT_CHUNK_SIZE: usize = 256;

/// The 128-bit hash that indexes a key in an engine: XXH3-128 seeded with `seed`, which each
/// engine draws at random when it starts, so that keys chosen to collide (and lengthen
/// probes) in one index do not collide in another. The full key is still compared on lookup.
/// Chunk keys ([`ChunkKeys`]) are unseeded and do not depend on it.
#[must_use]
pub fn key_hash(key: &[u8], seed: u64) -> u128 {
    xxh3_128_with_seed(key, seed)
}

/// The checksum a client may send with a commit: XXH3-64 of the value bytes.
#[must_use]
pub fn checksum(value: &[u8]) -> u64 {
    xxh3_64(value)
}

/// Checks a key's length.
///
/// # Errors
/// [`EngineError::InvalidKey`] when the key is empty or longer than [`MAX_KEY_LEN`].
pub fn validate_key(key: &[u8]) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(EngineError::InvalidKey {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(())
}

/// Derives content-defined chunk keys from a model fingerprint and a token sequence.
#[derive(Debug, Clone)]
pub struct ChunkKeys {
    fingerprint: [u8; 16],
    chunk_size: usize,
}

impl ChunkKeys {
    /// A deriver for `fingerprint` (model, dtype, layout, parallelism: anything that changes the
    /// bytes of a KV chunk) with `chunk_size` tokens per chunk.
    ///
    /// # Panics
    /// When `chunk_size` is zero.
    #[must_use]
    pub fn new(fingerprint: &str, chunk_size: usize) -> Self {
        assert!(chunk_size > 0, "chunk size must be positive");
        Self {
            fingerprint: xxh3_128(fingerprint.as_bytes()).to_le_bytes(),
            chunk_size,
        }
    }

    /// Tokens per chunk.
    #[must_use]
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Keys of the full chunks of `tokens`; a trailing partial chunk gets no key.
    #[must_use]
    pub fn keys(&self, tokens: &[u32]) -> Vec<[u8; 16]> {
        self.keys_inner(tokens, false)
    }

    /// Keys of every chunk of `tokens`, the trailing partial chunk included.
    #[must_use]
    pub fn keys_with_partial(&self, tokens: &[u32]) -> Vec<[u8; 16]> {
        self.keys_inner(tokens, true)
    }

    fn keys_inner(&self, tokens: &[u32], partial: bool) -> Vec<[u8; 16]> {
        let mut out = Vec::with_capacity(tokens.len().div_ceil(self.chunk_size));
        let mut prev = [0u8; 16];
        for chunk in tokens.chunks(self.chunk_size) {
            if chunk.len() < self.chunk_size && !partial {
                break;
            }
            let mut h = Xxh3::new();
            h.update(&prev);
            h.update(&self.fingerprint);
            for t in chunk {
                h.update(&t.to_le_bytes());
            }
            prev = h.digest128().to_le_bytes();
            out.push(prev);
        }
        out
    }
}

/// Lower-case hex of a byte string (for logs, the CLI and test vectors).
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_hash_depends_on_the_seed_only() {
        assert_eq!(key_hash(b"k", 1), key_hash(b"k", 1));
        assert_ne!(key_hash(b"k", 1), key_hash(b"k", 2));
        assert_ne!(key_hash(b"k", 1), key_hash(b"l", 1));
    }

    #[test]
    fn key_limits() {
        assert!(validate_key(b"").is_err());
        assert!(validate_key(&[7; MAX_KEY_LEN]).is_ok());
        assert!(matches!(
            validate_key(&[7; MAX_KEY_LEN + 1]),
            Err(EngineError::InvalidKey { len: 257, max: 256 })
        ));
    }

    #[test]
    fn prefix_sharing_prompts_share_leading_keys() {
        let ck = ChunkKeys::new("m", 4);
        let a: Vec<u32> = (0..12).collect();
        let mut b = a.clone();
        b[9] = 999;
        let (ka, kb) = (ck.keys(&a), ck.keys(&b));
        assert_eq!(ka.len(), 3);
        assert_eq!(ka[..2], kb[..2]);
        assert_ne!(ka[2], kb[2]);
        assert_ne!(ChunkKeys::new("other", 4).keys(&a)[0], ka[0]);
        assert_eq!(ck.keys(&a[..11]).len(), 2);
        assert_eq!(ck.keys_with_partial(&a[..11]).len(), 3);
    }

    /// The published test vector (docs/ARCHITECTURE.md, "Chunk keys"): every client must
    /// reproduce these keys exactly.
    #[test]
    fn published_test_vector() {
        let ck = ChunkKeys::new("meta-llama/Llama-3.1-8B-Instruct@bf16@tp1", 256);
        let tokens: Vec<u32> = (0..600).collect();
        let keys: Vec<String> = ck.keys(&tokens).iter().map(|k| hex(k)).collect();
        assert_eq!(keys, TEST_VECTOR);
    }

    const TEST_VECTOR: [&str; 2] = [
        "7bf48e955563851ff62448eb75c5bb39",
        "ff275e300355d8308a0dbd3159f2edd6",
    ];
}
