//! The session fast path: after the attach exchange, the attach connection carries small
//! binary request/response frames for lookup, get, release, reserve, commit and abort, one
//! round trip each with no HTTP/2 or protobuf in the way. Requests on this path act for the
//! connection's own session, so they cannot name another session. gRPC offers the same
//! calls; both paths share the engine. `docs/api.md` specifies every frame byte for byte.
//!
//! ```text
//! request   len u32 | op u8 | body              (len counts op and body)
//!   LOOKUP  1     n u16 | n × (key_len u16 | key)
//!   GET     2     n u16 | n × (key_len u16 | key) | m u16 | m × lease u64
//!                 (the m leases are released first: a reader returns the previous batch's
//!                 leases in the same round trip that fetches the next)
//!   RELEASE 3     n u16 | n × lease u64
//!   RESERVE 4     n u16 | n × (key_len u16 | key | value_len u64 | meta_len u16 | meta
//!                              | ttl_ms u64 | overwrite u8)
//!   COMMIT  5     n u16 | n × (reservation u64 | has_checksum u8 | checksum u64)
//!   ABORT   6     n u16 | n × reservation u64
//! response  len u32 | status u8 | body          (status 0 = OK, else a gRPC code number)
//!   LOOKUP        prefix u32 | prefix × tier u8
//!   GET           n u16 | n × (found u8 | lease u64 | offset u64 | len u64 | tier u8
//!                              | meta_len u16 | meta)     (fields after `found` only if 1)
//!   RELEASE       (empty)
//!   RESERVE       n u16 | n × (reserved u8 | reservation u64 | staging_offset u64)
//!                 (reserved 0: the key exists, and the two numbers are 0)
//!   COMMIT        n u16 | n × committed u8    (0: the checksum did not match)
//!   ABORT         (empty)
//!   error         msg_len u16 | msg
//! ```
//!
//! Integers are little-endian. Every request gets exactly one response, in request order, so
//! a client may send several requests (a put's commits, say) before reading their responses.
//! A refused request leaves the session as it was (and changes nothing, but that a valid GET
//! applies the releases it carries): a frame longer than the
//! agent's limit (announced in the handshake as `max_frame_len`, [`MAX_FRAME`] by default) is
//! read, discarded and answered with `INVALID_ARGUMENT`; so is a frame that does not parse,
//! and an unknown operation is answered with `UNIMPLEMENTED`. The agent never ends a session
//! because of a request: only the client closing the connection (or the agent stopping) does.

use crate::attach::AttachError;

/// Longest frame body accepted, in bytes.
pub const MAX_FRAME: usize = 1 << 20;
/// Operation codes.
pub mod op {
    /// How many leading keys are cached.
    pub const LOOKUP: u8 = 1;
    /// Lease the values of keys.
    pub const GET: u8 = 2;
    /// Release leases.
    pub const RELEASE: u8 = 3;
    /// Reserve space for puts.
    pub const RESERVE: u8 = 4;
    /// Publish reserved puts.
    pub const COMMIT: u8 = 5;
    /// Abandon reservations.
    pub const ABORT: u8 = 6;
}

/// Bytes of a request frame before its items: length (4), op (1) and item count (2).
pub const REQUEST_HEADER_LEN: usize = 7;
/// Bytes of a key on the wire.
#[must_use]
pub fn key_wire_len(key: &[u8]) -> usize {
    2 + key.len()
}
/// Bytes of a lease or reservation id on the wire.
pub const ID_WIRE_LEN: usize = 8;
/// Bytes of a commit item on the wire.
pub const COMMIT_ITEM_WIRE_LEN: usize = 17;
/// Bytes of a GET response's found item before its metadata (flag, lease, offset, length,
/// tier, metadata length).
pub const FOUND_WIRE_LEN: usize = 1 + 8 + 8 + 8 + 1 + 2;

impl ReserveItem<'_> {
    /// Bytes of this item on the wire.
    #[must_use]
    pub fn wire_len(&self) -> usize {
        2 + self.key.len() + 8 + 2 + self.metadata.len() + 8 + 1
    }
}

/// One item of a RESERVE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReserveItem<'a> {
    /// Key.
    pub key: &'a [u8],
    /// Value length.
    pub value_len: u64,
    /// Metadata.
    pub metadata: &'a [u8],
    /// TTL in milliseconds (0: the agent's default).
    pub ttl_ms: u64,
    /// Replace an existing entry.
    pub overwrite: bool,
}
/// Status of a successful response.
pub const OK: u8 = 0;
/// Status of a malformed request (gRPC `INVALID_ARGUMENT`).
pub const INVALID_ARGUMENT: u8 = 3;
/// Status of an unknown operation (gRPC `UNIMPLEMENTED`).
pub const UNIMPLEMENTED: u8 = 12;

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// Keys of a prompt, in order.
    Lookup(Vec<&'a [u8]>),
    /// Keys to lease, and leases to release first.
    Get(Vec<&'a [u8]>, Vec<u64>),
    /// Leases to release.
    Release(Vec<u64>),
    /// Puts to reserve.
    Reserve(Vec<ReserveItem<'a>>),
    /// Reservations to commit, each with an optional XXH3-64 checksum.
    Commit(Vec<(u64, Option<u64>)>),
    /// Reservations to abandon.
    Abort(Vec<u64>),
}

/// One found value of a GET response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Lease id.
    pub lease: u64,
    /// Arena offset.
    pub offset: u64,
    /// Value length.
    pub len: u64,
    /// Tier (the proto `Tier` number).
    pub tier: u8,
    /// Stored metadata.
    pub metadata: Vec<u8>,
}

/// A decoded response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Cached prefix length and the tier of each of those keys.
    Lookup(Vec<u8>),
    /// One entry per requested key.
    Get(Vec<Option<Found>>),
    /// Leases released.
    Release,
    /// Per item: `Some((reservation, staging offset))`, or `None` when the key exists.
    Reserve(Vec<Option<(u64, u64)>>),
    /// Per item: whether it was committed (false: checksum mismatch).
    Commit(Vec<bool>),
    /// Reservations abandoned.
    Abort,
    /// The call was refused.
    Error {
        /// gRPC code number.
        code: u8,
        /// Reason.
        message: String,
    },
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AttachError> {
        if self.0.len() < n {
            return Err(AttachError::Malformed("truncated frame"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, AttachError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, AttachError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, AttachError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, AttachError> {
        let mut x = [0; 8];
        x.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(x))
    }

    fn flag(&mut self) -> Result<bool, AttachError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(AttachError::Malformed("flag is neither 0 nor 1")),
        }
    }

    fn end(&self) -> Result<(), AttachError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(AttachError::Malformed("trailing bytes in frame"))
        }
    }

    fn ids(&mut self) -> Result<Vec<u64>, AttachError> {
        let n = usize::from(self.u16()?);
        (0..n).map(|_| self.u64()).collect()
    }

    fn keys(&mut self) -> Result<Vec<&'a [u8]>, AttachError> {
        let n = usize::from(self.u16()?);
        let mut keys = Vec::with_capacity(n);
        for _ in 0..n {
            let len = usize::from(self.u16()?);
            keys.push(self.take(len)?);
        }
        Ok(keys)
    }
}

fn begin(out: &mut Vec<u8>, first: u8) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(first);
    at
}

fn finish(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_ids(out: &mut Vec<u8>, ids: &[u64]) {
    out.extend_from_slice(&(ids.len() as u16).to_le_bytes());
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

fn put_keys(out: &mut Vec<u8>, keys: &[&[u8]]) {
    out.extend_from_slice(&(keys.len() as u16).to_le_bytes());
    for k in keys {
        out.extend_from_slice(&(k.len() as u16).to_le_bytes());
        out.extend_from_slice(k);
    }
}

impl Request<'_> {
    /// The operation code.
    #[must_use]
    pub fn op(&self) -> u8 {
        match self {
            Self::Lookup(_) => op::LOOKUP,
            Self::Get(..) => op::GET,
            Self::Release(_) => op::RELEASE,
            Self::Reserve(_) => op::RESERVE,
            Self::Commit(_) => op::COMMIT,
            Self::Abort(_) => op::ABORT,
        }
    }

    /// Appends the framed request to `out`. Callers keep batches within the agent's
    /// `max_batch` and keys within 256 bytes, so counts and lengths fit their fields.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let at = begin(out, self.op());
        match self {
            Self::Lookup(keys) => put_keys(out, keys),
            Self::Get(keys, ids) => {
                put_keys(out, keys);
                put_ids(out, ids);
            }
            Self::Release(ids) | Self::Abort(ids) => put_ids(out, ids),
            Self::Reserve(items) => {
                out.extend_from_slice(&(items.len() as u16).to_le_bytes());
                for it in items {
                    out.extend_from_slice(&(it.key.len() as u16).to_le_bytes());
                    out.extend_from_slice(it.key);
                    out.extend_from_slice(&it.value_len.to_le_bytes());
                    out.extend_from_slice(&(it.metadata.len() as u16).to_le_bytes());
                    out.extend_from_slice(it.metadata);
                    out.extend_from_slice(&it.ttl_ms.to_le_bytes());
                    out.push(u8::from(it.overwrite));
                }
            }
            Self::Commit(items) => {
                out.extend_from_slice(&(items.len() as u16).to_le_bytes());
                for (id, sum) in items {
                    out.extend_from_slice(&id.to_le_bytes());
                    out.push(u8::from(sum.is_some()));
                    out.extend_from_slice(&sum.unwrap_or(0).to_le_bytes());
                }
            }
        }
        finish(out, at);
    }
}

impl<'a> Request<'a> {
    /// Parses a frame body (the bytes after the length).
    ///
    /// # Errors
    /// An unknown operation or bytes that do not match it.
    pub fn decode(body: &'a [u8]) -> Result<Self, AttachError> {
        let mut r = Reader(body);
        let req = match r.u8()? {
            op::LOOKUP => Self::Lookup(r.keys()?),
            op::GET => Self::Get(r.keys()?, r.ids()?),
            op::RELEASE => Self::Release(r.ids()?),
            op::RESERVE => {
                let n = usize::from(r.u16()?);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let klen = usize::from(r.u16()?);
                    let key = r.take(klen)?;
                    let value_len = r.u64()?;
                    let mlen = usize::from(r.u16()?);
                    let metadata = r.take(mlen)?;
                    let ttl_ms = r.u64()?;
                    let overwrite = r.flag()?;
                    items.push(ReserveItem {
                        key,
                        value_len,
                        metadata,
                        ttl_ms,
                        overwrite,
                    });
                }
                Self::Reserve(items)
            }
            op::COMMIT => {
                let n = usize::from(r.u16()?);
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = r.u64()?;
                    let has = r.flag()?;
                    let sum = r.u64()?;
                    items.push((id, has.then_some(sum)));
                }
                Self::Commit(items)
            }
            op::ABORT => Self::Abort(r.ids()?),
            _ => return Err(AttachError::UnknownOperation),
        };
        r.end()?;
        Ok(req)
    }
}

impl Response {
    /// Appends the framed response to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let status = match self {
            Self::Error { code, .. } => *code,
            _ => OK,
        };
        let at = begin(out, status);
        match self {
            Self::Lookup(tiers) => {
                out.extend_from_slice(&(tiers.len() as u32).to_le_bytes());
                out.extend_from_slice(tiers);
            }
            Self::Get(items) => {
                out.extend_from_slice(&(items.len() as u16).to_le_bytes());
                for it in items {
                    match it {
                        None => out.push(0),
                        Some(f) => {
                            out.push(1);
                            for x in [f.lease, f.offset, f.len] {
                                out.extend_from_slice(&x.to_le_bytes());
                            }
                            out.push(f.tier);
                            out.extend_from_slice(&(f.metadata.len() as u16).to_le_bytes());
                            out.extend_from_slice(&f.metadata);
                        }
                    }
                }
            }
            Self::Release | Self::Abort => {}
            Self::Reserve(items) => {
                out.extend_from_slice(&(items.len() as u16).to_le_bytes());
                for it in items {
                    let (id, off) = it.unwrap_or((0, 0));
                    out.push(u8::from(it.is_some()));
                    out.extend_from_slice(&id.to_le_bytes());
                    out.extend_from_slice(&off.to_le_bytes());
                }
            }
            Self::Commit(items) => {
                out.extend_from_slice(&(items.len() as u16).to_le_bytes());
                out.extend(items.iter().map(|&c| u8::from(c)));
            }
            Self::Error { message, .. } => {
                let m = &message.as_bytes()[..message.len().min(4096)];
                out.extend_from_slice(&(m.len() as u16).to_le_bytes());
                out.extend_from_slice(m);
            }
        }
        finish(out, at);
    }

    /// Parses the body of the response to a request of operation `op`.
    ///
    /// # Errors
    /// Bytes that do not form such a response.
    pub fn decode(op: u8, body: &[u8]) -> Result<Self, AttachError> {
        let mut r = Reader(body);
        let status = r.u8()?;
        let resp = if status != OK {
            let n = usize::from(r.u16()?);
            let message = String::from_utf8_lossy(r.take(n)?).into_owned();
            Self::Error {
                code: status,
                message,
            }
        } else {
            match op {
                op::LOOKUP => {
                    let n = r.u32()? as usize;
                    Self::Lookup(r.take(n)?.to_vec())
                }
                op::GET => {
                    let n = usize::from(r.u16()?);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(match r.u8()? {
                            0 => None,
                            1 => {
                                let (lease, offset, len) = (r.u64()?, r.u64()?, r.u64()?);
                                let tier = r.u8()?;
                                let m = usize::from(r.u16()?);
                                let metadata = r.take(m)?.to_vec();
                                Some(Found {
                                    lease,
                                    offset,
                                    len,
                                    tier,
                                    metadata,
                                })
                            }
                            _ => return Err(AttachError::Malformed("bad found flag")),
                        });
                    }
                    Self::Get(items)
                }
                op::RELEASE => Self::Release,
                op::ABORT => Self::Abort,
                op::RESERVE => {
                    let n = usize::from(r.u16()?);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        let reserved = r.flag()?;
                        let (id, off) = (r.u64()?, r.u64()?);
                        items.push(reserved.then_some((id, off)));
                    }
                    Self::Reserve(items)
                }
                op::COMMIT => {
                    let n = usize::from(r.u16()?);
                    Self::Commit((0..n).map(|_| r.flag()).collect::<Result<_, _>>()?)
                }
                _ => return Err(AttachError::Malformed("unknown operation")),
            }
        };
        r.end()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(framed: &[u8]) -> &[u8] {
        let len = u32::from_le_bytes(framed[..4].try_into().unwrap()) as usize;
        assert_eq!(framed.len(), len + 4);
        &framed[4..]
    }

    #[test]
    fn requests_roundtrip() {
        for req in [
            Request::Lookup(vec![b"a", b"bcd"]),
            Request::Get(vec![], vec![]),
            Request::Get(vec![b"k"], vec![3, 4]),
            Request::Release(vec![1, u64::MAX]),
            Request::Reserve(vec![ReserveItem {
                key: b"k",
                value_len: 1 << 20,
                metadata: b"meta",
                ttl_ms: 5,
                overwrite: true,
            }]),
            Request::Commit(vec![(7, None), (8, Some(99))]),
            Request::Abort(vec![5]),
        ] {
            let mut out = Vec::new();
            req.encode(&mut out);
            assert_eq!(Request::decode(body(&out)).unwrap(), req);
        }
    }

    #[test]
    fn responses_roundtrip() {
        let found = Found {
            lease: 9,
            offset: 4096,
            len: 10,
            tier: 2,
            metadata: b"m".to_vec(),
        };
        for (op, resp) in [
            (op::LOOKUP, Response::Lookup(vec![2, 2])),
            (op::GET, Response::Get(vec![None, Some(found)])),
            (op::RELEASE, Response::Release),
            (op::RESERVE, Response::Reserve(vec![Some((3, 8192)), None])),
            (op::COMMIT, Response::Commit(vec![true, false])),
            (op::ABORT, Response::Abort),
            (
                op::GET,
                Response::Error {
                    code: 5,
                    message: "not found".into(),
                },
            ),
        ] {
            let mut out = Vec::new();
            resp.encode(&mut out);
            assert_eq!(Response::decode(op, body(&out)).unwrap(), resp);
        }
    }

    proptest::proptest! {
        /// Whatever bytes arrive, decoding returns a value or an error and never panics.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Request::decode(&bytes);
            for op in [op::LOOKUP, op::GET, op::RELEASE, op::RESERVE, op::COMMIT, op::ABORT, 0, 200] {
                let _ = Response::decode(op, &bytes);
            }
        }
    }

    #[test]
    fn wire_lengths_match_the_encoding() {
        let items = [
            ReserveItem {
                key: b"key",
                value_len: 9,
                metadata: b"metadata",
                ttl_ms: 0,
                overwrite: false,
            },
            ReserveItem {
                key: &[7; 256],
                value_len: 1,
                metadata: &[1; 4096],
                ttl_ms: 3,
                overwrite: true,
            },
        ];
        let mut out = Vec::new();
        Request::Reserve(items.to_vec()).encode(&mut out);
        let want: usize = items.iter().map(ReserveItem::wire_len).sum();
        assert_eq!(out.len(), REQUEST_HEADER_LEN + want);
        out.clear();
        Request::Commit(vec![(1, None), (2, Some(3))]).encode(&mut out);
        assert_eq!(out.len(), REQUEST_HEADER_LEN + 2 * COMMIT_ITEM_WIRE_LEN);
        out.clear();
        Request::Get(vec![b"ab", b"c"], vec![1, 2, 3]).encode(&mut out);
        assert_eq!(
            out.len(),
            REQUEST_HEADER_LEN + key_wire_len(b"ab") + key_wire_len(b"c") + 2 + 3 * ID_WIRE_LEN
        );
    }

    #[test]
    fn unknown_operations_are_told_apart_from_malformed_frames() {
        assert!(matches!(
            Request::decode(&[99]),
            Err(AttachError::UnknownOperation)
        ));
        assert!(matches!(
            Request::decode(&[op::ABORT, 1]),
            Err(AttachError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_frames_are_rejected() {
        assert!(Request::decode(&[]).is_err());
        assert!(Request::decode(&[9]).is_err());
        assert!(
            Request::decode(&[op::GET, 2, 0, 1, 0]).is_err(),
            "truncated key"
        );
        assert!(
            Request::decode(&[op::RELEASE, 0, 0, 7]).is_err(),
            "trailing byte"
        );
        assert!(
            Response::decode(op::GET, &[0, 1, 0, 7]).is_err(),
            "bad found flag"
        );
    }
}
