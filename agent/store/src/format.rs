//! On-disk formats: the superblock (T2) or `store.meta` (T3), the entry, and the checkpoint.
//!
#![doc = include_str!("../FORMAT.md")]

use xxhash_rust::xxh3::xxh3_64;

/// Alignment and padding unit of everything on the device.
pub(crate) const BLOCK: u64 = 4096;
/// Bytes before region 0 (the superblock on T2; kept on T3 so that offsets agree).
pub(crate) const DATA_START: u64 = BLOCK;
/// The on-disk format version this build reads and writes (superblock, checkpoint).
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Superblock magic.
pub(crate) const SUPER_MAGIC: [u8; 8] = *b"NENCSTOR";
/// Superblock kind of a T2 file or block device.
pub(crate) const KIND_FILE: u32 = 1;
/// Superblock kind of a T3 directory.
pub(crate) const KIND_DIR: u32 = 2;
/// Entry magic (`NCE1`).
pub(crate) const ENTRY_MAGIC: u32 = u32::from_le_bytes(*b"NCE1");
/// Entry format version.
pub(crate) const ENTRY_VERSION: u16 = 1;
/// Flag: the entry is a tombstone.
pub(crate) const FLAG_TOMBSTONE: u16 = 1;
/// Every flag this build understands.
pub(crate) const KNOWN_FLAGS: u16 = FLAG_TOMBSTONE;
/// Fixed part of an entry header.
pub(crate) const HEADER_FIXED: usize = 96;
/// Where the header checksum lives in the header.
const HEADER_CHECKSUM_AT: usize = 80;
/// Checkpoint magic.
pub(crate) const CKPT_MAGIC: [u8; 8] = *b"NENCCKPT";
const CKPT_HEADER: usize = 64;
const CKPT_REGION: usize = 32;
const CKPT_ENTRY: usize = 64;

/// Rounds up to a multiple of [`BLOCK`].
pub(crate) const fn round_up(x: u64) -> u64 {
    x.div_ceil(BLOCK) * BLOCK
}

/// Bytes of an entry's header proper (before padding).
pub(crate) const fn header_len(key_len: u64, meta_len: u64) -> u64 {
    HEADER_FIXED as u64 + key_len + meta_len
}

/// Bytes of an entry's header block (header padded to 4096).
pub(crate) const fn header_block(key_len: u64, meta_len: u64) -> u64 {
    round_up(header_len(key_len, meta_len))
}

/// Bytes an entry takes on the device.
pub(crate) const fn entry_size(key_len: u64, meta_len: u64, value_len: u64) -> u64 {
    header_block(key_len, meta_len) + round_up(value_len)
}

/// XXH3-64 of a value.
pub(crate) fn value_checksum(value: &[u8]) -> u64 {
    xxh3_64(value)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    u128::from_le_bytes(a)
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// The fields of an entry header (key and metadata are passed separately).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryHeader {
    /// Flags (bit 0: tombstone).
    pub flags: u16,
    /// Key length.
    pub key_len: u16,
    /// Metadata length.
    pub meta_len: u32,
    /// Value length.
    pub value_len: u64,
    /// Sequence number.
    pub seq: u64,
    /// Expiry, Unix milliseconds.
    pub expires_unix_ms: u64,
    /// The store's id.
    pub store_id: u64,
    /// Key hash.
    pub hash: u128,
    /// XXH3-64 of the value.
    pub value_checksum: u64,
}

/// Why a header was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderError {
    /// No entry here: wrong magic, or an entry of another store (formatted earlier).
    Absent,
    /// An entry format version this build does not read.
    Version(u16),
    /// The header is longer than the bytes given; this many are needed.
    Short(usize),
    /// Inconsistent lengths or a checksum mismatch: torn or corrupt.
    Corrupt,
}

impl EntryHeader {
    /// Bytes of the header proper.
    pub(crate) fn header_len(&self) -> u64 {
        header_len(u64::from(self.key_len), u64::from(self.meta_len))
    }

    /// Bytes of the header block.
    pub(crate) fn header_block(&self) -> u64 {
        round_up(self.header_len())
    }

    /// Bytes the entry takes on the device.
    pub(crate) fn entry_size(&self) -> u64 {
        self.header_block() + round_up(self.value_len)
    }

    /// Whether every flag bit set is one this build understands (an entry that is not
    /// understood is skipped and counted, never served).
    pub(crate) fn understood(&self) -> bool {
        self.flags & !KNOWN_FLAGS == 0
    }

    /// Whether this is a tombstone.
    pub(crate) fn is_tombstone(&self) -> bool {
        self.flags & FLAG_TOMBSTONE != 0
    }

    /// Writes the header with key and metadata into `out` (at least `header_block` bytes,
    /// zeroed beyond the header by the caller or here), computing the header checksum.
    pub(crate) fn encode(&self, key: &[u8], meta: &[u8], out: &mut [u8]) {
        debug_assert_eq!(key.len(), usize::from(self.key_len));
        debug_assert_eq!(meta.len() as u64, u64::from(self.meta_len));
        let hl = HEADER_FIXED + key.len() + meta.len();
        let block = round_up(hl as u64) as usize;
        out[..block].fill(0);
        put(out, 0, &ENTRY_MAGIC.to_le_bytes());
        put(out, 4, &ENTRY_VERSION.to_le_bytes());
        put(out, 6, &self.flags.to_le_bytes());
        put(out, 8, &(hl as u32).to_le_bytes());
        put(out, 12, &self.key_len.to_le_bytes());
        put(out, 16, &self.meta_len.to_le_bytes());
        put(out, 24, &self.value_len.to_le_bytes());
        put(out, 32, &self.seq.to_le_bytes());
        put(out, 40, &self.expires_unix_ms.to_le_bytes());
        put(out, 48, &self.store_id.to_le_bytes());
        put(out, 56, &self.hash.to_le_bytes());
        put(out, 72, &self.value_checksum.to_le_bytes());
        put(out, HEADER_FIXED, key);
        put(out, HEADER_FIXED + key.len(), meta);
        let sum = xxh3_64(&out[..hl]);
        put(out, HEADER_CHECKSUM_AT, &sum.to_le_bytes());
    }

    /// Parses and verifies a header at the start of `buf` (magic, version, lengths, header
    /// checksum, store id); the caller checks [`Self::understood`]. On success, the key is
    /// `buf[96..96 + key_len]` and the metadata follows it.
    pub(crate) fn decode(buf: &[u8], store_id: u64) -> Result<Self, HeaderError> {
        if buf.len() < HEADER_FIXED {
            return Err(HeaderError::Short(HEADER_FIXED));
        }
        if u32_at(buf, 0) != ENTRY_MAGIC {
            return Err(HeaderError::Absent);
        }
        let version = u16_at(buf, 4);
        if version != ENTRY_VERSION {
            return Err(HeaderError::Version(version));
        }
        let flags = u16_at(buf, 6);
        let hl = u32_at(buf, 8) as usize;
        let key_len = u16_at(buf, 12);
        let meta_len = u32_at(buf, 16);
        if hl as u64 != header_len(u64::from(key_len), u64::from(meta_len)) {
            return Err(HeaderError::Corrupt);
        }
        if hl > buf.len() {
            return Err(HeaderError::Short(hl));
        }
        let stored = u64_at(buf, HEADER_CHECKSUM_AT);
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        hasher.update(&buf[..HEADER_CHECKSUM_AT]);
        hasher.update(&[0u8; 8]);
        hasher.update(&buf[HEADER_CHECKSUM_AT + 8..hl]);
        if hasher.digest() != stored {
            return Err(HeaderError::Corrupt);
        }
        let h = Self {
            flags,
            key_len,
            meta_len,
            value_len: u64_at(buf, 24),
            seq: u64_at(buf, 32),
            expires_unix_ms: u64_at(buf, 40),
            store_id: u64_at(buf, 48),
            hash: u128_at(buf, 56),
            value_checksum: u64_at(buf, 72),
        };
        if h.store_id != store_id {
            return Err(HeaderError::Absent);
        }
        // No value this large can be in a region; a header saying so is not ours to trust.
        if h.value_len > 1 << 56 {
            return Err(HeaderError::Corrupt);
        }
        Ok(h)
    }
}

/// The superblock's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Superblock {
    /// [`KIND_FILE`] or [`KIND_DIR`].
    pub kind: u32,
    /// Region size.
    pub region_size: u64,
    /// Capacity in bytes (whole regions).
    pub capacity: u64,
    /// Store id.
    pub store_id: u64,
    /// Creation time.
    pub created_unix_ms: u64,
}

/// Why a superblock was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SuperError {
    /// No magic: not a store of ours.
    Foreign,
    /// Our magic with another format version.
    Version(u32),
    /// Our magic and version, but a checksum mismatch.
    Corrupt,
}

/// Bytes of a superblock.
pub(crate) const SUPERBLOCK_LEN: usize = BLOCK as usize;
const SUPER_SUM_AT: usize = 48;

impl Superblock {
    /// Encodes into 4096 bytes.
    pub(crate) fn encode(&self) -> [u8; SUPERBLOCK_LEN] {
        let mut b = [0u8; SUPERBLOCK_LEN];
        put(&mut b, 0, &SUPER_MAGIC);
        put(&mut b, 8, &FORMAT_VERSION.to_le_bytes());
        put(&mut b, 12, &self.kind.to_le_bytes());
        put(&mut b, 16, &self.region_size.to_le_bytes());
        put(&mut b, 24, &self.capacity.to_le_bytes());
        put(&mut b, 32, &self.store_id.to_le_bytes());
        put(&mut b, 40, &self.created_unix_ms.to_le_bytes());
        let sum = xxh3_64(&b[..SUPER_SUM_AT]);
        put(&mut b, SUPER_SUM_AT, &sum.to_le_bytes());
        b
    }

    /// Decodes the first bytes of a file (at least 56 bytes for a valid one).
    pub(crate) fn decode(b: &[u8]) -> Result<Self, SuperError> {
        if b.len() < 8 || b[..8] != SUPER_MAGIC {
            return Err(SuperError::Foreign);
        }
        if b.len() < SUPER_SUM_AT + 8 {
            return Err(SuperError::Corrupt);
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(SuperError::Version(version));
        }
        if xxh3_64(&b[..SUPER_SUM_AT]) != u64_at(b, SUPER_SUM_AT) {
            return Err(SuperError::Corrupt);
        }
        Ok(Self {
            kind: u32_at(b, 12),
            region_size: u64_at(b, 16),
            capacity: u64_at(b, 24),
            store_id: u64_at(b, 32),
            created_unix_ms: u64_at(b, 40),
        })
    }
}

/// One entry as listed in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CkptEntry {
    /// Key hash.
    pub hash: u128,
    /// Device offset of the header.
    pub offset: u64,
    /// Sequence number.
    pub seq: u64,
    /// Value length.
    pub value_len: u64,
    /// Expiry.
    pub expires_unix_ms: u64,
    /// Key length.
    pub key_len: u32,
    /// Metadata length.
    pub meta_len: u32,
}

/// One region as recorded in a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CkptRegion {
    /// Whether the region holds entries.
    pub used: bool,
    /// Seq of its first entry.
    pub first_seq: u64,
    /// Bytes from the region start that the checkpoint accounts for.
    pub end: u64,
    /// Its live entries.
    pub entries: Vec<CkptEntry>,
}

/// A checkpoint: the index and region table at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// Store id.
    pub store_id: u64,
    /// Region size.
    pub region_size: u64,
    /// Every entry written before has a smaller seq.
    pub next_seq: u64,
    /// One per region.
    pub regions: Vec<CkptRegion>,
}

impl Checkpoint {
    /// Encodes the checkpoint file's content.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let entries: usize = self.regions.iter().map(|r| r.entries.len()).sum();
        let len = CKPT_HEADER + self.regions.len() * CKPT_REGION + entries * CKPT_ENTRY;
        let mut b = vec![0u8; len];
        put(&mut b, 0, &CKPT_MAGIC);
        put(&mut b, 8, &FORMAT_VERSION.to_le_bytes());
        put(&mut b, 16, &self.store_id.to_le_bytes());
        put(&mut b, 24, &self.region_size.to_le_bytes());
        put(&mut b, 32, &(self.regions.len() as u32).to_le_bytes());
        put(&mut b, 40, &self.next_seq.to_le_bytes());
        put(&mut b, 48, &(entries as u64).to_le_bytes());
        let mut at = CKPT_HEADER;
        for r in &self.regions {
            put(&mut b, at, &u32::from(r.used).to_le_bytes());
            put(&mut b, at + 8, &r.first_seq.to_le_bytes());
            put(&mut b, at + 16, &r.end.to_le_bytes());
            put(&mut b, at + 24, &(r.entries.len() as u64).to_le_bytes());
            at += CKPT_REGION;
        }
        for r in &self.regions {
            for e in &r.entries {
                put(&mut b, at, &e.hash.to_le_bytes());
                put(&mut b, at + 16, &e.offset.to_le_bytes());
                put(&mut b, at + 24, &e.seq.to_le_bytes());
                put(&mut b, at + 32, &e.value_len.to_le_bytes());
                put(&mut b, at + 40, &e.expires_unix_ms.to_le_bytes());
                put(&mut b, at + 48, &e.key_len.to_le_bytes());
                put(&mut b, at + 52, &e.meta_len.to_le_bytes());
                at += CKPT_ENTRY;
            }
        }
        let sum = xxh3_64(&b);
        put(&mut b, 56, &sum.to_le_bytes());
        b
    }

    /// Decodes and verifies a checkpoint file's content.
    pub(crate) fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < CKPT_HEADER || b[..8] != CKPT_MAGIC {
            return Err("no checkpoint magic".into());
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "checkpoint version {version}, this build reads {FORMAT_VERSION}"
            ));
        }
        let nregions = u32_at(b, 32) as usize;
        let nentries = u64_at(b, 48);
        let want = (CKPT_HEADER as u64)
            .checked_add((nregions as u64).saturating_mul(CKPT_REGION as u64))
            .and_then(|x| x.checked_add(nentries.checked_mul(CKPT_ENTRY as u64)?));
        if want != Some(b.len() as u64) {
            return Err("checkpoint length does not match its counts".into());
        }
        let stored = u64_at(b, 56);
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        hasher.update(&b[..56]);
        hasher.update(&[0u8; 8]);
        hasher.update(&b[64..]);
        if hasher.digest() != stored {
            return Err("checkpoint checksum mismatch".into());
        }
        let mut regions = Vec::with_capacity(nregions);
        let mut at = CKPT_HEADER;
        let mut listed = 0u64;
        for _ in 0..nregions {
            let n = u64_at(b, at + 24);
            listed = listed.saturating_add(n);
            regions.push((
                CkptRegion {
                    used: u32_at(b, at) == 1,
                    first_seq: u64_at(b, at + 8),
                    end: u64_at(b, at + 16),
                    entries: Vec::new(),
                },
                n,
            ));
            at += CKPT_REGION;
        }
        if listed != nentries {
            return Err("checkpoint region counts do not add up".into());
        }
        let mut out = Vec::with_capacity(nregions);
        for (mut r, n) in regions {
            r.entries.reserve(n as usize);
            for _ in 0..n {
                r.entries.push(CkptEntry {
                    hash: u128_at(b, at),
                    offset: u64_at(b, at + 16),
                    seq: u64_at(b, at + 24),
                    value_len: u64_at(b, at + 32),
                    expires_unix_ms: u64_at(b, at + 40),
                    key_len: u32_at(b, at + 48),
                    meta_len: u32_at(b, at + 52),
                });
                at += CKPT_ENTRY;
            }
            out.push(r);
        }
        Ok(Self {
            store_id: u64_at(b, 16),
            region_size: u64_at(b, 24),
            next_seq: u64_at(b, 40),
            regions: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> EntryHeader {
        EntryHeader {
            flags: 0,
            key_len: 5,
            meta_len: 3,
            value_len: 10_000,
            seq: 42,
            expires_unix_ms: u64::MAX,
            store_id: 7,
            hash: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            value_checksum: 99,
        }
    }

    #[test]
    fn entry_header_round_trips_and_sizes() {
        let h = header();
        let mut buf = vec![0xffu8; 4096];
        h.encode(b"hello", b"abc", &mut buf);
        assert_eq!(&buf[0..4], b"NCE1");
        assert_eq!(&buf[96..101], b"hello");
        assert_eq!(&buf[101..104], b"abc");
        assert!(buf[104..].iter().all(|&b| b == 0));
        assert_eq!(EntryHeader::decode(&buf, 7), Ok(h));
        assert_eq!(h.header_len(), 104);
        assert_eq!(h.entry_size(), 4096 + 12288);
        assert_eq!(EntryHeader::decode(&buf, 8), Err(HeaderError::Absent));
        assert_eq!(
            EntryHeader::decode(&buf[..100], 7),
            Err(HeaderError::Short(104))
        );
    }

    #[test]
    fn every_header_byte_is_covered() {
        let h = header();
        let mut buf = vec![0u8; 4096];
        h.encode(b"hello", b"abc", &mut buf);
        for i in 0..104 {
            let mut b = buf.clone();
            b[i] ^= 0x10;
            assert!(
                EntryHeader::decode(&b, 7).is_err(),
                "byte {i} flipped was accepted"
            );
        }
    }

    #[test]
    fn unknown_flags_and_versions_are_reported() {
        let mut h = header();
        h.flags = 0b100;
        let mut buf = vec![0u8; 4096];
        h.encode(b"hello", b"abc", &mut buf);
        let d = EntryHeader::decode(&buf, 7).unwrap();
        assert!(!d.understood());
        buf[4] = 2;
        assert_eq!(EntryHeader::decode(&buf, 7), Err(HeaderError::Version(2)));
    }

    #[test]
    fn superblock_round_trips() {
        let s = Superblock {
            kind: KIND_FILE,
            region_size: 1 << 20,
            capacity: 4 << 20,
            store_id: 3,
            created_unix_ms: 5,
        };
        let b = s.encode();
        assert_eq!(Superblock::decode(&b), Ok(s));
        let mut v = b;
        v[8] = 9;
        assert_eq!(Superblock::decode(&v), Err(SuperError::Version(9)));
        let mut c = b;
        c[20] ^= 1;
        assert_eq!(Superblock::decode(&c), Err(SuperError::Corrupt));
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(SuperError::Foreign));
    }

    #[test]
    fn checkpoint_round_trips_and_rejects_damage() {
        let e = CkptEntry {
            hash: 1,
            offset: 4096,
            seq: 2,
            value_len: 3,
            expires_unix_ms: 4,
            key_len: 5,
            meta_len: 6,
        };
        let c = Checkpoint {
            store_id: 9,
            region_size: 1 << 20,
            next_seq: 77,
            regions: vec![
                CkptRegion {
                    used: true,
                    first_seq: 2,
                    end: 8192,
                    entries: vec![e, e],
                },
                CkptRegion::default(),
            ],
        };
        let b = c.encode();
        assert_eq!(Checkpoint::decode(&b), Ok(c));
        for i in [0, 9, 20, 40, 70, 100, b.len() - 1] {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(Checkpoint::decode(&d).is_err(), "byte {i}");
        }
        assert!(Checkpoint::decode(&b[..b.len() - 1]).is_err());
    }
}
