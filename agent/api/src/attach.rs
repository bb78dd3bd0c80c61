//! The attach protocol: how a client obtains a session and the descriptors of the shared
//! memory regions. gRPC cannot carry file descriptors, so the agent listens on a second Unix
//! socket (named in the handshake) for this exchange:
//!
//! ```text
//! client -> agent   Hello  = "NCATTACH" | version u32 | tenant_len u16 | tenant bytes
//! agent  -> client  Reply  = "NCATTREP" | status u32 | session u64 | arena_len u64
//!                            | staging_len u64 | message_len u16 | message bytes
//!                   with SCM_RIGHTS [arena (read-only), staging (read-write)] when status = 0
//! ```
//!
//! Integers are little-endian. `version` is the one the gRPC handshake answered (any version
//! in `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION`; see [`crate::negotiate`]). The client keeps
//! the connection open for the session's life and sends fast-path frames on it
//! ([`crate::frame`]); when it closes (the client exited or crashed) the agent releases the
//! session's leases and aborts its reservations. `docs/api.md` specifies the exchange byte
//! for byte.

use std::{
    io::{IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{BorrowedFd, OwnedFd},
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Magic of a hello.
pub const HELLO_MAGIC: &[u8; 8] = b"NCATTACH";
/// Magic of a reply.
pub const REPLY_MAGIC: &[u8; 8] = b"NCATTREP";
/// Longest tenant name.
pub const MAX_TENANT_LEN: usize = 64;
/// Length of a hello's fixed part.
pub const HELLO_HEADER_LEN: usize = 14;
const REPLY_HEADER_LEN: usize = 38;
/// Longest reply (header plus the longest message).
pub const MAX_REPLY_LEN: usize = REPLY_HEADER_LEN + u16::MAX as usize;

/// Status of an attach reply.
pub mod status {
    /// Session opened; descriptors attached.
    pub const OK: u32 = 0;
    /// The client speaks an unsupported protocol version.
    pub const BAD_VERSION: u32 = 1;
    /// No such tenant.
    pub const UNKNOWN_TENANT: u32 = 2;
    /// The session table is full.
    pub const EXHAUSTED: u32 = 3;
    /// The hello was malformed.
    pub const MALFORMED: u32 = 4;
    /// The agent failed.
    pub const INTERNAL: u32 = 5;
}

/// An attach-protocol error.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// A fast-path frame names an operation this side does not know.
    #[error("unknown fast-path operation")]
    UnknownOperation,
    /// The socket failed.
    #[error("attach socket: {0}")]
    Io(#[from] std::io::Error),
}

/// A client's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version spoken.
    pub version: u32,
    /// Tenant name (empty: default).
    pub tenant: String,
}

impl Hello {
    /// Wire form.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let t = self.tenant.as_bytes();
        let mut b = Vec::with_capacity(HELLO_HEADER_LEN + t.len());
        b.extend_from_slice(HELLO_MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(t.len() as u16).to_le_bytes());
        b.extend_from_slice(t);
        b
    }

    /// Parses the fixed header: the protocol version and how many tenant bytes follow.
    ///
    /// # Errors
    /// A wrong magic or an over-long tenant.
    pub fn decode_header(h: &[u8; HELLO_HEADER_LEN]) -> Result<(u32, usize), AttachError> {
        if &h[..8] != HELLO_MAGIC {
            return Err(AttachError::Malformed("bad hello magic"));
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let tenant_len = usize::from(u16::from_le_bytes([h[12], h[13]]));
        if tenant_len > MAX_TENANT_LEN {
            return Err(AttachError::Malformed("tenant name too long"));
        }
        Ok((version, tenant_len))
    }
}

/// The agent's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// One of [`status`].
    pub status: u32,
    /// Session id, when `status` is OK.
    pub session: u64,
    /// Arena length in bytes.
    pub arena_len: u64,
    /// Staging length in bytes.
    pub staging_len: u64,
    /// Human-readable reason when `status` is not OK.
    pub message: String,
}

impl Reply {
    /// Wire form.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let m = &self.message.as_bytes()[..self.message.len().min(u16::MAX as usize)];
        let mut b = Vec::with_capacity(REPLY_HEADER_LEN + m.len());
        b.extend_from_slice(REPLY_MAGIC);
        b.extend_from_slice(&self.status.to_le_bytes());
        b.extend_from_slice(&self.session.to_le_bytes());
        b.extend_from_slice(&self.arena_len.to_le_bytes());
        b.extend_from_slice(&self.staging_len.to_le_bytes());
        b.extend_from_slice(&(m.len() as u16).to_le_bytes());
        b.extend_from_slice(m);
        b
    }

    /// Parses a reply.
    ///
    /// # Errors
    /// Bytes that are not a complete reply.
    pub fn decode(b: &[u8]) -> Result<Self, AttachError> {
        if b.len() < REPLY_HEADER_LEN || &b[..8] != REPLY_MAGIC {
            return Err(AttachError::Malformed("bad reply header"));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let mlen = usize::from(u16::from_le_bytes([b[36], b[37]]));
        let msg = b
            .get(REPLY_HEADER_LEN..REPLY_HEADER_LEN + mlen)
            .ok_or(AttachError::Malformed("truncated reply message"))?;
        Ok(Self {
            status: u32_at(8),
            session: u64_at(12),
            arena_len: u64_at(20),
            staging_len: u64_at(28),
            message: String::from_utf8_lossy(msg).into_owned(),
        })
    }
}

/// Sends `data` with `fds` attached (SCM_RIGHTS) on a connected Unix socket. Returns the
/// bytes sent; the caller writes any remainder without descriptors.
///
/// # Errors
/// The socket's error, `WouldBlock` included for non-blocking sockets.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !anc.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other(
            "too many descriptors for one message",
        ));
    }
    Ok(rustix::net::sendmsg(
        sock,
        &[IoSlice::new(data)],
        &mut anc,
        SendFlags::NOSIGNAL,
    )?)
}

/// Receives into `buf` and collects any descriptors that arrive with it (close-on-exec).
/// Returns the byte count (0 at end of stream).
///
/// # Errors
/// The socket's error.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let r = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut anc,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for msg in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    Ok(r.bytes)
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsFd, unix::net::UnixStream};

    use super::*;

    #[test]
    fn messages_roundtrip() {
        let h = Hello {
            version: 1,
            tenant: "default".into(),
        };
        let b = h.encode();
        let (v, n) = Hello::decode_header(b[..HELLO_HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!((v, n), (1, 7));
        let r = Reply {
            status: 2,
            session: 7,
            arena_len: 9,
            staging_len: 3,
            message: "no".into(),
        };
        assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
        assert!(Reply::decode(&r.encode()[..20]).is_err());
        assert!(Hello::decode_header(b"NCATTACHxxxx\xff\xff").is_err());
    }

    #[test]
    fn descriptors_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        assert_eq!(
            send_with_fds(a.as_fd(), b"hi", &[f.as_fd(), f.as_fd()]).unwrap(),
            2
        );
        let mut buf = [0; 8];
        let mut fds = Vec::new();
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap(), 2);
        assert_eq!(fds.len(), 2);
    }
}
