//! Splitting batches to fit the agent's limits: at most `max_batch` items per request, and
//! requests within the frame (fast path) or message (gRPC) size the handshake announced.
//! Each call splits its items here, so no request the client sends is refused for its size.

use std::ops::Range;

use nencache_api::{
    frame::{self, ReserveItem},
    v1,
};

/// Request-size rules of one transport.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizer {
    /// Fast-path frames (else gRPC messages).
    pub(crate) fast: bool,
    /// Bytes available for a request's items.
    pub(crate) budget: usize,
    /// Most items per request.
    pub(crate) max_batch: usize,
}

/// The gRPC form of a reserve item.
pub(crate) fn put_item(i: &ReserveItem<'_>) -> v1::PutItem {
    v1::PutItem {
        key: i.key.to_vec(),
        value_len: i.value_len,
        metadata: i.metadata.to_vec(),
        ttl_ms: i.ttl_ms,
        overwrite: i.overwrite,
    }
}

/// Bytes of [`put_item`]'s encoding, computed without building it (proto3 leaves out fields
/// at their defaults: empty bytes, 0, false).
fn put_item_len(i: &ReserveItem<'_>) -> usize {
    let bytes = |n: usize| if n == 0 { 0 } else { proto_field(n) };
    let varint = |v: u64| {
        if v == 0 {
            0
        } else {
            1 + prost::encoding::encoded_len_varint(v)
        }
    };
    bytes(i.key.len())
        + varint(i.value_len)
        + bytes(i.metadata.len())
        + varint(i.ttl_ms)
        + 2 * usize::from(i.overwrite)
}

/// Bytes a protobuf length-delimited field of `len` bytes takes with its tag.
fn proto_field(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

impl Sizer {
    /// The rules for `limits`: frames of at most `max_frame_len` (fast path) or messages of at
    /// most `max_message_len` (gRPC); zero (an agent that does not say) takes the defaults.
    pub(crate) fn new(fast: bool, limits: &v1::Limits) -> Self {
        let max_batch = (limits.max_batch as usize).clamp(1, usize::from(u16::MAX));
        let budget = if fast {
            let max = match limits.max_frame_len {
                0 => frame::MAX_FRAME,
                n => n as usize,
            };
            // The op byte and two item counts (a GET carries keys and lease ids).
            max.saturating_sub(1 + 2 + 2)
        } else {
            let max = match limits.max_message_len {
                0 => 4 << 20,
                n => n as usize,
            };
            // The session field (tag and a 10-byte varint) and slack for the outer framing.
            max.saturating_sub(32)
        };
        Self {
            fast,
            budget,
            max_batch,
        }
    }

    pub(crate) fn key(&self, key: &[u8]) -> usize {
        if self.fast {
            frame::key_wire_len(key)
        } else {
            proto_field(key.len())
        }
    }

    pub(crate) fn reserve(&self, item: &ReserveItem<'_>) -> usize {
        if self.fast {
            item.wire_len()
        } else {
            proto_field(put_item_len(item))
        }
    }

    pub(crate) fn commit(&self) -> usize {
        if self.fast {
            frame::COMMIT_ITEM_WIRE_LEN
        } else {
            // reservation id (tag + varint) and checksum (tag + fixed or varint), framed.
            proto_field(1 + 10 + 1 + 10)
        }
    }

    pub(crate) fn id(&self) -> usize {
        if self.fast { frame::ID_WIRE_LEN } else { 10 }
    }

    /// Consecutive ranges of `sizes` with at most `max_batch` items and at most `budget`
    /// bytes each (an item larger than the budget alone gets a range of its own, which the
    /// agent then refuses with a message naming the limit).
    pub(crate) fn split(&self, sizes: impl IntoIterator<Item = usize>) -> Vec<Range<usize>> {
        split(sizes, self.max_batch, self.budget)
    }
}

/// Consecutive ranges of at most `max_items` items whose sizes add up to at most
/// `max_bytes`.
pub(crate) fn split(
    sizes: impl IntoIterator<Item = usize>,
    max_items: usize,
    max_bytes: usize,
) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes, mut i) = (0, 0, 0);
    for size in sizes {
        if i > start && (i - start == max_items || bytes + size > max_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
        i += 1;
    }
    if i > start {
        out.push(start..i);
    }
    out
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn put_item_lengths_match_the_encoding() {
        for (key, value_len, metadata, ttl_ms, overwrite) in [
            (&b"k"[..], 0, &b""[..], 0, false),
            (&[7u8; 256][..], u64::MAX, &[1u8; 4096][..], 1, true),
            (&b"key"[..], 300, &b"m"[..], u64::MAX, false),
        ] {
            let item = ReserveItem {
                key,
                value_len,
                metadata,
                ttl_ms,
                overwrite,
            };
            assert_eq!(put_item_len(&item), put_item(&item).encoded_len());
        }
    }

    #[test]
    fn ranges_respect_both_bounds_and_cover_everything() {
        assert_eq!(split([], 3, 10), Vec::<Range<usize>>::new());
        assert_eq!(split([4, 4, 4, 4], 3, 10), vec![0..2, 2..4]);
        assert_eq!(split([1; 7], 3, 100), vec![0..3, 3..6, 6..7]);
        // An oversized item stands alone.
        assert_eq!(split([2, 50, 2], 3, 10), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn a_full_fast_path_request_fits_the_frame() {
        let limits = v1::Limits {
            max_batch: 1024,
            max_frame_len: 1 << 20,
            ..Default::default()
        };
        let s = Sizer::new(true, &limits);
        let meta = vec![0u8; 4096];
        let key = [1u8; 256];
        let items: Vec<ReserveItem<'_>> = (0..1000)
            .map(|_| ReserveItem {
                key: &key,
                value_len: 1,
                metadata: &meta,
                ttl_ms: 0,
                overwrite: false,
            })
            .collect();
        for r in s.split(items.iter().map(|i| s.reserve(i))) {
            let mut out = Vec::new();
            frame::Request::Reserve(items[r].to_vec()).encode(&mut out);
            assert!(out.len() - 4 <= 1 << 20, "frame body of {}", out.len() - 4);
        }
    }

    #[test]
    fn a_full_grpc_request_fits_the_message() {
        let limits = v1::Limits {
            max_batch: 4096,
            max_message_len: 4 << 20,
            ..Default::default()
        };
        let s = Sizer::new(false, &limits);
        let meta = vec![0u8; 4096];
        let key = [1u8; 256];
        let items: Vec<ReserveItem<'_>> = (0..4000)
            .map(|_| ReserveItem {
                key: &key,
                value_len: u64::MAX,
                metadata: &meta,
                ttl_ms: u64::MAX,
                overwrite: true,
            })
            .collect();
        let ranges = s.split(items.iter().map(|i| s.reserve(i)));
        assert!(ranges.len() > 1);
        for r in ranges {
            let req = v1::ReserveRequest {
                session: u64::MAX,
                items: items[r].iter().map(put_item).collect(),
            };
            assert!(req.encoded_len() <= 4 << 20, "{}", req.encoded_len());
        }
    }
}
