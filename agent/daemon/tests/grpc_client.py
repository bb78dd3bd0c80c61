#!/usr/bin/env python3
"""An independent NenCache client, written from docs/api.md and agent.proto alone.

This script is a second implementation of the node-local API, in another language than the
Rust client and without reading any of the agent's or the Rust client's sources: everything
it does comes from `docs/api.md` (the contract) and `proto/nencache/v1/agent.proto`. It
proves that the page is enough to write a client, byte for byte, and runs with the tests
(`agent/daemon/tests/python_client.rs`).

Usage: grpc_client.py <path of the agent's gRPC socket>

It needs Python 3.9+, `grpcio` and `grpcio-tools` (to generate the stubs from the proto at
run time, into a temporary directory) and the standard library only: `socket.recvmsg` for the
descriptors, `mmap` for the regions, `struct` for the frames. It expects an agent with the
documented default limits and no other client busy on it (it checks that no lease is left at
the end). It prints every check it makes; it exits 0 when all pass, and 1 with the first
mismatch otherwise.

What it checks, in order:
  handshake and limits, the health service; attach (hello, reply, two descriptors with
  SCM_RIGHTS); the mappings (arena read-only and sealed, staging read-write); puts over gRPC
  and over fast-path frames; gets over both, reading the values in place in the arena;
  lookup; release over gRPC and piggybacked on a GET; abort, delete, checksum mismatch; the
  documented errors (malformed, oversized and unknown frames, unknown leases and sessions,
  bad versions and tenants, batch and key limits); a session's leases going with its
  connection; the worked exchange of the page's last section, byte for byte; no lease left.

Checksums: XXH3-64 is not in the standard library, so puts commit without one, and the
CHECKSUM_MISMATCH path is checked with a checksum of 0, wrong for any value but with odds
of 2^-64.
"""

import array
import errno
import fcntl
import mmap
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import grpc
except ImportError:
    sys.exit("grpc_client.py needs grpcio and grpcio-tools: python3 -m pip install grpcio "
             "grpcio-tools")

REPO = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO / "proto"
PROTO_FILE = "nencache/v1/agent.proto"

# docs/api.md, "Handshake": the documented default limits.
DEFAULT_LIMITS = {
    "max_key_len": 256,
    "max_value_len": 64 << 20,
    "max_metadata_len": 4096,
    "max_batch": 1024,
    "max_leases_per_session": 16384,
    "reservation_timeout_ms": 30000,
    "max_frame_len": 1 << 20,
    "max_message_len": 4 << 20,
}

# docs/api.md, "Fast-path frames".
OP_LOOKUP, OP_GET, OP_RELEASE, OP_RESERVE, OP_COMMIT, OP_ABORT = 1, 2, 3, 4, 5, 6
# docs/api.md, "Errors": gRPC status code numbers, as the fast path's status byte.
OK, INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED = 0, 3, 5, 12
TIER_HOST = 2

# docs/api.md, "Attach".
HELLO_MAGIC = b"NCATTACH"
REPLY_MAGIC = b"NCATTREP"
REPLY_HEADER = struct.Struct("<8sIQQQH")  # magic, status, session, arena, staging, m
assert REPLY_HEADER.size == 38
ATTACH_OK, ATTACH_BAD_VERSION, ATTACH_UNKNOWN_TENANT, ATTACH_MALFORMED = 0, 1, 2, 4

# linux/fcntl.h: the seals the doc names (F_SEAL_FUTURE_WRITE is not in every Python).
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_FUTURE_WRITE = 0x1, 0x2, 0x4, 0x10


# ---------------------------------------------------------------------------------------------
# Checking and reporting


class Mismatch(Exception):
    """The agent did something other than what docs/api.md says."""


def ok(what):
    print(f"ok   {what}", flush=True)


def check(cond, what, detail=""):
    if not cond:
        raise Mismatch(f"{what}: {detail}" if detail else what)
    ok(what)


def check_eq(actual, expected, what):
    if actual != expected:
        raise Mismatch(f"{what}: expected {expected!r}, got {actual!r}")
    ok(what)


def check_rpc_error(call, code, what):
    """Runs `call`, which must fail with the gRPC status `code`; returns the error."""
    try:
        result = call()
    except grpc.RpcError as e:
        if e.code() != code:
            raise Mismatch(f"{what}: expected {code.name}, got {e.code().name}: {e.details()}")
        ok(f"{what} -> {code.name} ({e.details()})")
        return e
    raise Mismatch(f"{what}: expected {code.name}, the call succeeded: {result}")


def value_bytes(seed, n):
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------------------------------------
# Stubs generated from the proto at run time


def load_stubs(out_dir):
    """Generates agent_pb2 / agent_pb2_grpc from the proto into out_dir and imports them."""
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise Mismatch(f"protoc failed ({' '.join(cmd)}):\n{r.stdout}{r.stderr}")
    sys.path.insert(0, str(out_dir))
    from nencache.v1 import agent_pb2, agent_pb2_grpc

    return agent_pb2, agent_pb2_grpc


# ---------------------------------------------------------------------------------------------
# Fast-path frames (docs/api.md, "Fast-path frames")


def u16(n):
    return struct.pack("<H", n)


def enc_keys(keys):
    return u16(len(keys)) + b"".join(u16(len(k)) + k for k in keys)


def enc_ids(ids):
    return u16(len(ids)) + b"".join(struct.pack("<Q", i) for i in ids)


def enc_reserve(items):
    """items: (key, value_len, meta, ttl_ms, overwrite); each 21 + key_len + meta_len bytes."""
    out = [u16(len(items))]
    for key, value_len, meta, ttl_ms, overwrite in items:
        out.append(u16(len(key)) + key + struct.pack("<QH", value_len, len(meta)) + meta)
        out.append(struct.pack("<QB", ttl_ms, overwrite))
    return b"".join(out)


def enc_commit(items):
    """items: (reservation, checksum or None); each 17 bytes."""
    out = [u16(len(items))]
    for reservation, checksum in items:
        has = 0 if checksum is None else 1
        out.append(struct.pack("<QBQ", reservation, has, checksum or 0))
    return b"".join(out)


def frame(op, body):
    return struct.pack("<IB", 1 + len(body), op) + body


class Reader:
    """Reads little-endian fields off a response body and insists it is used up."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise Mismatch(f"response body too short: {self.data.hex(' ')}")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt):
        s = struct.Struct("<" + fmt)
        v = s.unpack(self.take(s.size))
        return v[0] if len(v) == 1 else v

    def end(self):
        if self.pos != len(self.data):
            raise Mismatch(f"trailing bytes in response body: {self.data.hex(' ')}")


class FastPathError(Exception):
    def __init__(self, status, message):
        super().__init__(f"status {status}: {message}")
        self.status, self.message = status, message


class FastPath:
    """The attach connection after a status-0 reply: request and response frames."""

    def __init__(self, sock):
        self.sock = sock

    def recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise Mismatch(f"attach connection closed by the agent ({len(buf)}/{n} bytes)")
            buf += chunk
        return buf

    def recv_raw(self):
        """One response frame, whole: the length field included."""
        head = self.recv_exact(4)
        (n,) = struct.unpack("<I", head)
        if n < 1:
            raise Mismatch(f"response frame with len 0: {head.hex(' ')}")
        return head + self.recv_exact(n)

    def recv(self):
        """One response: (status, body); a non-zero status's body is checked and decoded."""
        raw = self.recv_raw()
        status, body = raw[4], raw[5:]
        if status != OK:
            r = Reader(body)
            msg_len = r.unpack("H")
            msg = r.take(msg_len)
            r.end()
            if msg_len > 4096:
                raise Mismatch(f"error message of {msg_len} bytes (at most 4096)")
            return status, msg.decode("utf-8")
        return status, body

    def call(self, op, body):
        self.sock.sendall(frame(op, body))
        return self.recv()

    def call_ok(self, op, body):
        status, body = self.call(op, body)
        if status != OK:
            raise FastPathError(status, body)
        return Reader(body)

    def expect_error(self, op_or_raw, body, status, what):
        """Sends a request (op and body, or raw bytes when body is None) expecting `status`."""
        if body is None:
            self.sock.sendall(op_or_raw)
            got, msg = self.recv()
        else:
            got, msg = self.call(op_or_raw, body)
        if got != status:
            raise Mismatch(f"{what}: expected status {status}, got {got}: {msg!r}")
        ok(f"{what} -> status {status} ({msg})")
        return msg

    # The operations, decoded.

    def lookup(self, keys):
        r = self.call_ok(OP_LOOKUP, enc_keys(keys))
        prefix = r.unpack("I")
        tiers = list(r.take(prefix))
        r.end()
        return prefix, tiers

    def get(self, keys, release=()):
        r = self.call_ok(OP_GET, enc_keys(keys) + enc_ids(list(release)))
        items = []
        for _ in range(r.unpack("H")):
            if r.unpack("B") == 1:
                lease, offset, length, tier, meta_len = r.unpack("QQQBH")
                items.append(dict(lease=lease, offset=offset, len=length, tier=tier,
                                  meta=r.take(meta_len)))
            else:
                items.append(None)
        r.end()
        return items

    def release(self, leases):
        self.call_ok(OP_RELEASE, enc_ids(leases)).end()

    def reserve(self, items):
        r = self.call_ok(OP_RESERVE, enc_reserve(items))
        out = [r.unpack("BQQ") for _ in range(r.unpack("H"))]
        r.end()
        return out

    def commit(self, items):
        r = self.call_ok(OP_COMMIT, enc_commit(items))
        out = [r.unpack("B") for _ in range(r.unpack("H"))]
        r.end()
        return out

    def abort(self, ids):
        self.call_ok(OP_ABORT, enc_ids(ids)).end()


# ---------------------------------------------------------------------------------------------
# Attach (docs/api.md, "Attach")


def hello(version, tenant=b"", magic=HELLO_MAGIC):
    return magic + struct.pack("<IH", version, len(tenant)) + tenant


def recv_reply(sock):
    """Reads a whole reply; returns (status, session, arena_len, staging_len, message, fds)."""
    fd_size = array.array("i").itemsize
    buf, fds = b"", []
    need = REPLY_HEADER.size
    while len(buf) < need:
        data, ancdata, flags, _ = sock.recvmsg(4096, socket.CMSG_SPACE(2 * fd_size))
        if flags & socket.MSG_CTRUNC:
            raise Mismatch("attach reply: control message truncated")
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[: len(cdata) - len(cdata) % fd_size])
                fds.extend(a)
                if buf:
                    raise Mismatch("attach reply: descriptors after the reply's first bytes")
        if not data:
            raise Mismatch(f"attach connection closed after {len(buf)} reply bytes")
        buf += data
        if len(buf) >= len(REPLY_MAGIC) and not buf.startswith(REPLY_MAGIC):
            raise Mismatch(f"not an attach reply: {buf[:16].hex(' ')}")
        if len(buf) >= REPLY_HEADER.size:
            need = REPLY_HEADER.size + REPLY_HEADER.unpack_from(buf)[5]
    if len(buf) != need:
        raise Mismatch(f"attach reply: {len(buf) - need} bytes past its announced length")
    magic, status, session, arena_len, staging_len, m = REPLY_HEADER.unpack_from(buf)
    if magic != REPLY_MAGIC:
        raise Mismatch(f"attach reply magic {magic!r}")
    message = buf[REPLY_HEADER.size :].decode("utf-8")
    return status, session, arena_len, staging_len, message, fds


def attach_raw(path, hello_bytes):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)  # no step waits this long: a silent agent is a failure, not a hang
    sock.connect(path)
    sock.sendall(hello_bytes)
    return sock, recv_reply(sock)


# ---------------------------------------------------------------------------------------------
# The steps


class Ctx:
    """What the steps share: stubs, the handshake, the session and the mappings."""

    pb = stub = channel = hs = limits = None
    socket_path = attach_path = None
    sock = fast = session = None
    arena_fd = staging_fd = arena = staging = None
    page = 0
    prefix = ""

    def key(self, name):
        return f"{self.prefix}{name}".encode()


def step_handshake(c):
    print("-- handshake", flush=True)
    pb = c.pb
    hs = c.stub.Handshake(pb.HandshakeRequest(protocol_version=1, client_name="grpc_client.py"))
    c.hs = hs
    check_eq(hs.protocol_version, 1, "handshake protocol_version")
    check(hs.agent_version != "", f"handshake agent_version {hs.agent_version!r}")
    check_eq(hs.tenant, "default", "handshake tenant")
    check_eq((hs.arena.writable, hs.staging.writable), (False, True), "arena/staging writable")
    check(hs.page_size >= 4096 and hs.page_size & (hs.page_size - 1) == 0,
          f"page_size {hs.page_size} a power of two >= 4096")
    for name, region in (("arena", hs.arena), ("staging", hs.staging)):
        check(region.size > 0 and region.size % hs.page_size == 0,
              f"{name}.size {region.size} a positive multiple of page_size")
    check(hs.attach_socket != "" and "/" not in hs.attach_socket,
          f"attach_socket {hs.attach_socket!r} is a file name")
    c.page = hs.page_size
    c.attach_path = os.path.join(os.path.dirname(c.socket_path), hs.attach_socket)

    # docs/api.md, "Permissions": both sockets 0660, the lock file 0600.
    for path, mode in ((c.socket_path, 0o660), (c.attach_path, 0o660),
                       (c.socket_path + ".lock", 0o600)):
        name = os.path.basename(path)
        check_eq(oct(os.stat(path).st_mode & 0o777), oct(mode), f"mode of {name} is {mode:o}")

    # A field an older agent does not send reads as 0: take the default.
    lim = {f: getattr(hs.limits, f) or d for f, d in DEFAULT_LIMITS.items()}
    for f in ("max_reservations_per_session", "max_staging_per_session"):
        lim[f] = getattr(hs.limits, f)  # 0: no limit of its own
    c.limits = lim
    for f, d in DEFAULT_LIMITS.items():
        if f == "max_value_len":
            continue
        check_eq(lim[f], d, f"limits.{f} (documented default)")
    # The value limit is the documented 64 MiB unless a region is smaller (configuration.md:
    # max_value <= staging, <= capacity).
    check_eq(lim["max_value_len"], min(64 << 20, hs.staging.size, hs.arena.size),
             "limits.max_value_len (64 MiB, at most the staging and arena sizes)")
    print(f"     limits: {lim}", flush=True)

    # Version 0 is never valid; the tenant is empty or "default", anything else NOT_FOUND.
    check_rpc_error(lambda: c.stub.Handshake(pb.HandshakeRequest(protocol_version=0)),
                    grpc.StatusCode.FAILED_PRECONDITION, "handshake protocol_version 0")
    hs2 = c.stub.Handshake(pb.HandshakeRequest(protocol_version=7, tenant="default"))
    check_eq(hs2.protocol_version, 1, "handshake protocol_version 7 answers the lower, 1")
    check_rpc_error(lambda: c.stub.Handshake(pb.HandshakeRequest(protocol_version=1,
                                                                 tenant="no-such-tenant")),
                    grpc.StatusCode.NOT_FOUND, "handshake with an unknown tenant")


def step_health(c):
    """grpc.health.v1.Health/Check, encoded by hand (no grpcio-health-checking needed)."""
    print("-- health", flush=True)
    check_health = c.channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    # HealthCheckRequest{service: ""} is empty; HealthCheckResponse{status: SERVING(1)}.
    check_eq(check_health(b""), b"\x08\x01", "grpc.health.v1.Health/Check -> SERVING")


def step_attach(c):
    print("-- attach", flush=True)
    sock, (status, session, arena_len, staging_len, message, fds) = attach_raw(
        c.attach_path, hello(c.hs.protocol_version))
    check_eq(status, ATTACH_OK, f"attach status (message {message!r})")
    check(session != 0, f"attach session id {session:#x} is not 0")
    check_eq((arena_len, staging_len), (c.hs.arena.size, c.hs.staging.size),
             "attach reply region lengths repeat the handshake's")
    check_eq(len(fds), 2, "attach reply carries two descriptors (SCM_RIGHTS)")
    c.sock, c.fast, c.session = sock, FastPath(sock), session
    c.arena_fd, c.staging_fd = fds
    acc = lambda fd: fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    check_eq(acc(c.arena_fd), os.O_RDONLY, "arena descriptor is read-only")
    check_eq(acc(c.staging_fd), os.O_RDWR, "staging descriptor is read-write")


def step_map(c):
    print("-- mapping the regions", flush=True)
    c.arena = mmap.mmap(c.arena_fd, c.hs.arena.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    ok(f"arena mapped PROT_READ, MAP_SHARED, {c.hs.arena.size} bytes")
    c.staging = mmap.mmap(c.staging_fd, c.hs.staging.size, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
    ok(f"staging mapped PROT_READ|PROT_WRITE, MAP_SHARED, {c.hs.staging.size} bytes")

    # F_SEAL_FUTURE_WRITE exists since Linux 5.1; no agent can set it on an older kernel.
    future_write = kernel_at_least(5, 1)
    seals = fcntl.fcntl(c.arena_fd, F_GET_SEALS)
    want = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL | (F_SEAL_FUTURE_WRITE if future_write else 0)
    check(seals & want == want, f"arena sealed {want:#x} (SHRINK|GROW|SEAL"
          f"{'|FUTURE_WRITE' if future_write else ', kernel before 5.1'})", f"seals {seals:#x}")

    def must_fail(what, fn):
        try:
            fn()
        except OSError as e:
            ok(f"{what} fails ({errno.errorcode.get(e.errno, e.errno)})")
            return
        raise Mismatch(f"{what} succeeded")

    rw = mmap.PROT_READ | mmap.PROT_WRITE
    must_fail("mapping the arena writable",
              lambda: mmap.mmap(c.arena_fd, c.hs.arena.size, flags=mmap.MAP_SHARED, prot=rw))
    must_fail("write() to the arena descriptor", lambda: os.pwrite(c.arena_fd, b"x", 0))
    must_fail("ftruncate() of the arena descriptor", lambda: os.ftruncate(c.arena_fd, 0))
    # Through a re-opened descriptor too (the open itself may be refused: fine as well).
    if not future_write:
        print("     skipped: writes through a re-opened arena descriptor (kernel before 5.1)")
        return
    try:
        reopened = os.open(f"/proc/self/fd/{c.arena_fd}", os.O_RDWR)
    except OSError as e:
        ok(f"re-opening the arena read-write is refused ({errno.errorcode.get(e.errno)})")
    else:
        try:
            must_fail("mapping a re-opened arena descriptor writable",
                      lambda: mmap.mmap(reopened, c.hs.arena.size, flags=mmap.MAP_SHARED,
                                        prot=rw))
            must_fail("write() to a re-opened arena descriptor",
                      lambda: os.pwrite(reopened, b"x", 0))
        finally:
            os.close(reopened)


def kernel_at_least(major, minor):
    release = os.uname().release.split("-")[0].split(".")
    try:
        return (int(release[0]), int(release[1])) >= (major, minor)
    except (IndexError, ValueError):
        return True


def write_staging(c, offset, value):
    check(offset % c.page == 0 and offset + len(value) <= len(c.staging),
          f"staging_offset {offset} a multiple of page_size, value inside staging")
    c.staging[offset : offset + len(value)] = value


def read_arena(c, offset, length):
    if offset % c.page != 0 or offset + length > len(c.arena):
        raise Mismatch(f"arena extent {offset}+{length}: not page-aligned or outside the arena")
    return c.arena[offset : offset + length]


def step_put_grpc(c, key, value, meta):
    pb = c.pb
    print(f"-- put over gRPC ({key.decode()}, {len(value)} bytes)", flush=True)
    rsp = c.stub.Reserve(pb.ReserveRequest(session=c.session, items=[
        pb.PutItem(key=key, value_len=len(value), metadata=meta)]))
    check_eq(len(rsp.reservations), 1, "Reserve: one reservation per item")
    r = rsp.reservations[0]
    check_eq(r.status, pb.RESERVE_STATUS_RESERVED, "Reserve status RESERVED")
    write_staging(c, r.staging_offset, value)
    rsp = c.stub.Commit(pb.CommitRequest(session=c.session, items=[
        pb.CommitItem(reservation_id=r.reservation_id)]))
    check_eq(list(rsp.statuses), [pb.COMMIT_STATUS_COMMITTED], "Commit status COMMITTED")

    rsp = c.stub.Reserve(pb.ReserveRequest(session=c.session, items=[
        pb.PutItem(key=key, value_len=len(value))]))
    r = rsp.reservations[0]
    check_eq((r.status, r.reservation_id, r.staging_offset), (pb.RESERVE_STATUS_EXISTS, 0, 0),
             "Reserve of a cached key: EXISTS")


def step_put_fast(c, key, value, meta, overwrite=0):
    print(f"-- put over fast-path frames ({key.decode()}, {len(value)} bytes)", flush=True)
    [(reserved, reservation, offset)] = c.fast.reserve([(key, len(value), meta, 0, overwrite)])
    check_eq(reserved, 1, "RESERVE reserved = 1")
    write_staging(c, offset, value)
    check_eq(c.fast.commit([(reservation, None)]), [1], "COMMIT committed = 1")
    if not overwrite:
        check_eq(c.fast.reserve([(key, len(value), b"", 0, 0)]), [(0, 0, 0)],
                 "RESERVE of a cached key: reserved = 0, both numbers 0")


def step_get_grpc(c, key, value, meta):
    pb = c.pb
    print(f"-- get over gRPC ({key.decode()})", flush=True)
    rsp = c.stub.Get(pb.GetRequest(session=c.session, keys=[key, c.key("missing")]))
    check_eq(len(rsp.items), 2, "Get: one item per key")
    it, missing = rsp.items
    check(it.found and not missing.found, "Get: found, and the missing key not found")
    check_eq(it.len, len(value), "Get len")
    check_eq(read_arena(c, it.offset, it.len), value, "value bytes at arena[offset..offset+len]")
    check_eq(it.metadata, meta, "Get metadata")
    check_eq(it.tier, pb.TIER_HOST, "Get tier HOST")
    return it.lease_id


def step_get_fast(c, key, value, meta):
    print(f"-- get over a fast-path GET frame ({key.decode()})", flush=True)
    it, missing = c.fast.get([key, c.key("missing")])
    check(it is not None and missing is None, "GET: found = 1, and found = 0 for the missing key")
    check_eq(it["len"], len(value), "GET len")
    check_eq(read_arena(c, it["offset"], it["len"]), value,
             "value bytes at arena[offset..offset+len]")
    check_eq(it["meta"], meta, "GET meta")
    check_eq(it["tier"], TIER_HOST, "GET tier 2 (host)")
    return it["lease"]


def step_lookup(c, k1, k2):
    print("-- lookup", flush=True)
    keys = [k1, k2, c.key("missing"), k1]
    check_eq(c.fast.lookup(keys), (2, [TIER_HOST, TIER_HOST]),
             "LOOKUP [hit, hit, miss, hit]: prefix 2, tiers [2, 2]")
    rsp = c.stub.Lookup(c.pb.LookupRequest(keys=keys))
    check_eq((rsp.prefix_hits, list(rsp.tiers)), (2, [c.pb.TIER_HOST] * 2),
             "Lookup [hit, hit, miss, hit]: prefix_hits 2, tiers [HOST, HOST]")
    check_eq(c.fast.lookup([c.key("missing"), k1]), (0, []), "LOOKUP [miss, hit]: prefix 0")


def leases_held(c):
    return c.stub.Stats(c.pb.StatsRequest()).leases


def step_release(c, grpc_lease, fast_lease, key, value):
    pb = c.pb
    print("-- release", flush=True)
    check_eq(leases_held(c), 2, "Stats: 2 leases held")
    c.stub.Release(pb.ReleaseRequest(session=c.session, lease_ids=[grpc_lease]))
    ok("Release of the gRPC get's lease")
    check_rpc_error(lambda: c.stub.Release(pb.ReleaseRequest(session=c.session,
                                                             lease_ids=[grpc_lease])),
                    grpc.StatusCode.NOT_FOUND, "Release of the same lease again")
    check_eq(leases_held(c), 1, "Stats: 1 lease held")
    check_rpc_error(lambda: c.stub.Release(pb.ReleaseRequest(session=c.session,
                                                             lease_ids=[0x7777_0000_0001])),
                    grpc.StatusCode.NOT_FOUND, "Release of an unknown lease")
    step_get_piggyback(c, fast_lease, key, value)
    check_eq(leases_held(c), 0, "Stats: 0 leases held")


def step_get_piggyback(c, held, key, value):
    """A GET's m leases are released before its keys are looked up, each on its own."""
    print("-- releases piggybacked on GET", flush=True)

    def get_again(release, what):
        [it] = c.fast.get([key], release=release)
        check(it is not None and read_arena(c, it["offset"], it["len"]) == value, what)
        return it["lease"]

    a = get_again([held], "GET piggybacking the held lease: value read again")
    check_eq(leases_held(c), 1, "Stats: still 1 lease (the old released, a new one taken)")
    c.fast.expect_error(OP_RELEASE, enc_ids([held]), NOT_FOUND,
                        "RELEASE of the piggybacked (already released) lease")

    # An unknown or repeated id is skipped; the others are released, the keys leased.
    b = get_again([held, 0x7777_0000_0002], "GET piggybacking only unknown ids succeeds")
    check_eq(leases_held(c), 2, "Stats: 2 leases (nothing released, one taken)")
    d = get_again([a, a], "GET piggybacking one held lease twice succeeds")
    check_eq(leases_held(c), 2, "Stats: 2 leases (one released once, one taken)")
    c.fast.expect_error(OP_RELEASE, enc_ids([a]), NOT_FOUND, "RELEASE of that lease")

    # A GET refused as invalid (a bad key) does nothing, its releases included.
    c.fast.expect_error(OP_GET, enc_keys([b""]) + enc_ids([b]), INVALID_ARGUMENT,
                        "GET of an empty key, piggybacking a held lease")
    check_eq(leases_held(c), 2, "Stats: the invalid GET released nothing")
    c.fast.release([b])
    ok("RELEASE frame of that lease, still held")
    check_eq(leases_held(c), 1, "Stats: 1 lease")

    # More than max_batch ids refuses the whole GET, releasing nothing.
    ids = [d] + [0x7777_0001_0000 + i for i in range(c.limits["max_batch"])]
    c.fast.expect_error(OP_GET, enc_keys([key]) + enc_ids(ids), INVALID_ARGUMENT,
                        "GET piggybacking max_batch + 1 ids")
    check_eq(leases_held(c), 1, "Stats: that GET released nothing")
    c.fast.release([d])
    ok("RELEASE frame of the last lease")


def step_abort_and_checksum(c):
    pb = c.pb
    print("-- abort, commit twice, checksum mismatch", flush=True)
    v = value_bytes(5, 3000)
    rsp = c.stub.Reserve(pb.ReserveRequest(session=c.session, items=[
        pb.PutItem(key=c.key("aborted-grpc"), value_len=len(v))]))
    rid = rsp.reservations[0].reservation_id
    c.stub.Abort(pb.AbortRequest(session=c.session, reservation_ids=[rid]))
    ok("Abort of a reservation")
    check_rpc_error(lambda: c.stub.Commit(pb.CommitRequest(session=c.session, items=[
        pb.CommitItem(reservation_id=rid)])), grpc.StatusCode.NOT_FOUND,
        "Commit of an aborted reservation")

    [(_, rid, _)] = c.fast.reserve([(c.key("aborted-fast"), len(v), b"", 0, 0)])
    c.fast.abort([rid])
    ok("ABORT frame")
    c.fast.expect_error(OP_COMMIT, enc_commit([(rid, None)]), NOT_FOUND,
                        "COMMIT of an aborted reservation")
    check_eq(c.fast.lookup([c.key("aborted-grpc")]), (0, []), "aborted puts are not stored")

    [(_, rid, off)] = c.fast.reserve([(c.key("twice"), len(v), b"", 0, 0)])
    write_staging(c, off, v)
    check_eq(c.fast.commit([(rid, None)]), [1], "COMMIT")
    c.fast.expect_error(OP_COMMIT, enc_commit([(rid, None)]), NOT_FOUND,
                        "COMMIT of an already committed reservation")

    # No xxhash here: a checksum of 0 is (with odds of 2^-64) wrong for any value.
    failures = c.stub.Stats(pb.StatsRequest()).checksum_failures
    rsp = c.stub.Reserve(pb.ReserveRequest(session=c.session, items=[
        pb.PutItem(key=c.key("bad-sum-grpc"), value_len=len(v))]))
    r = rsp.reservations[0]
    write_staging(c, r.staging_offset, v)
    rsp = c.stub.Commit(pb.CommitRequest(session=c.session, items=[
        pb.CommitItem(reservation_id=r.reservation_id, checksum=0)]))
    check_eq(list(rsp.statuses), [pb.COMMIT_STATUS_CHECKSUM_MISMATCH],
             "Commit with a wrong checksum: CHECKSUM_MISMATCH")
    [(_, rid, off)] = c.fast.reserve([(c.key("bad-sum-fast"), len(v), b"", 0, 0)])
    write_staging(c, off, v)
    check_eq(c.fast.commit([(rid, 0)]), [0], "COMMIT with a wrong checksum: committed = 0")
    check_eq(c.fast.lookup([c.key("bad-sum-grpc")]) + c.fast.lookup([c.key("bad-sum-fast")]),
             (0, [], 0, []), "nothing stored on a checksum mismatch")
    check_eq(c.stub.Stats(pb.StatsRequest()).checksum_failures, failures + 2,
             "Stats checksum_failures counts both")


def step_delete(c):
    pb = c.pb
    print("-- delete under a lease", flush=True)
    key, v = c.key("deleted"), value_bytes(6, 5000)
    step_put_fast(c, key, v, b"d")
    [it] = c.fast.get([key])
    check_eq(c.stub.Delete(pb.DeleteRequest(keys=[key, c.key("missing")])).deleted, 1,
             "Delete [cached, missing]: deleted 1")
    check_eq(c.fast.lookup([key]), (0, []), "a deleted key is not found")
    check_eq(read_arena(c, it["offset"], it["len"]), v, "the leased value stays readable")
    c.fast.release([it["lease"]])
    ok("RELEASE of the deleted value's lease")


def step_fast_errors(c, known):
    print("-- fast-path errors: the session goes on after each", flush=True)
    lim = c.limits

    def still_in_step():
        check_eq(c.fast.lookup([known]), (1, [TIER_HOST]), "   ...and the next LOOKUP works")

    c.fast.expect_error(struct.pack("<I", 0), None, INVALID_ARGUMENT, "frame with len 0")
    still_in_step()
    c.fast.expect_error(OP_LOOKUP, u16(2) + u16(1) + b"k", INVALID_ARGUMENT,
                        "LOOKUP whose count does not match its bytes")
    still_in_step()
    c.fast.expect_error(OP_LOOKUP, enc_keys([b"k"]) + b"\x00", INVALID_ARGUMENT,
                        "LOOKUP with a trailing byte")
    still_in_step()
    c.fast.expect_error(OP_RESERVE, enc_reserve([(c.key("flag"), 10, b"", 0, 2)]),
                        INVALID_ARGUMENT, "RESERVE with overwrite = 2")
    still_in_step()
    c.fast.expect_error(OP_COMMIT, u16(1) + struct.pack("<QBQ", 1, 2, 0), INVALID_ARGUMENT,
                        "COMMIT with has_checksum = 2")
    still_in_step()
    big = lim["max_frame_len"]  # len = op byte + body
    c.fast.expect_error(frame(OP_LOOKUP, b"\x00" * big), None, INVALID_ARGUMENT,
                        f"frame with len {big + 1} (max_frame_len + 1)")
    still_in_step()
    step_frame_of_max_len(c)
    c.fast.expect_error(99, b"anything", UNIMPLEMENTED, "unknown op 99")
    still_in_step()
    c.fast.expect_error(OP_LOOKUP, enc_keys([b"x"] * (lim["max_batch"] + 1)), INVALID_ARGUMENT,
                        "LOOKUP of max_batch + 1 keys")
    c.fast.expect_error(OP_LOOKUP, enc_keys([b""]), INVALID_ARGUMENT, "LOOKUP of an empty key")
    c.fast.expect_error(OP_LOOKUP, enc_keys([b"x" * (lim["max_key_len"] + 1)]),
                        INVALID_ARGUMENT, "LOOKUP of a key of max_key_len + 1 bytes")
    c.fast.expect_error(OP_RELEASE, enc_ids([0x55, 0x55]), INVALID_ARGUMENT,
                        "RELEASE naming an id twice")
    c.fast.expect_error(OP_RESERVE, enc_reserve([(c.key("m"), 10, b"m" * 4097, 0, 0)]),
                        INVALID_ARGUMENT, "RESERVE with 4097 bytes of metadata")
    c.fast.expect_error(OP_RESERVE, enc_reserve([(c.key("v"), lim["max_value_len"] + 1, b"",
                                                  0, 0)]),
                        INVALID_ARGUMENT, "RESERVE of max_value_len + 1 bytes")
    still_in_step()

    # Pipelining: several requests sent before any response is read; answered in order.
    c.sock.sendall(frame(OP_LOOKUP, enc_keys([known])) + frame(99, b"")
                   + frame(OP_LOOKUP, enc_keys([c.key("missing")])))
    got = [c.fast.recv_raw() for _ in range(3)]
    check_eq([g[4] for g in got], [OK, UNIMPLEMENTED, OK], "3 pipelined requests, in order")
    check_eq((got[0][5:], got[2][5:]), (struct.pack("<IB", 1, TIER_HOST), struct.pack("<I", 0)),
             "pipelined LOOKUP bodies")


def step_frame_of_max_len(c):
    """A RESERVE frame of exactly max_frame_len bytes, sized with the documented formula
    (1 + 2 + sum of 21 + key_len + meta_len), is accepted; its reservations are aborted."""
    total = c.limits["max_frame_len"] - 3  # the items' bytes
    key_len = len(c.key("max-frame-00000"))
    per_item = 21 + key_len + c.limits["max_metadata_len"]
    n = -(-total // per_item)
    meta_total = total - n * (21 + key_len)
    items = [(c.key(f"max-frame-{i:05}"), 1,
              b"m" * (meta_total // n + (1 if i < meta_total % n else 0)), 0, 0)
             for i in range(n)]
    body = enc_reserve(items)
    check_eq(1 + len(body), c.limits["max_frame_len"], "RESERVE frame length from the formula")
    got = c.fast.reserve(items)
    check(len(got) == n and all(r == 1 for r, _, _ in got),
          f"RESERVE frame of exactly max_frame_len ({n} items) accepted")
    c.stub.Abort(c.pb.AbortRequest(session=c.session, reservation_ids=[i for _, i, _ in got]))
    ok(f"Abort of its {n} reservations over gRPC")


def step_grpc_errors(c):
    pb = c.pb
    print("-- gRPC errors", flush=True)
    bogus = c.session ^ 0x5A5A_0000_0000
    check_rpc_error(lambda: c.stub.Get(pb.GetRequest(session=bogus, keys=[b"x"])),
                    grpc.StatusCode.FAILED_PRECONDITION, "Get with an unknown session")
    check_rpc_error(lambda: c.stub.Lookup(pb.LookupRequest(keys=[b""])),
                    grpc.StatusCode.INVALID_ARGUMENT, "Lookup of an empty key")
    check_rpc_error(lambda: c.stub.Lookup(pb.LookupRequest(
        keys=[b"x"] * (c.limits["max_batch"] + 1))),
        grpc.StatusCode.INVALID_ARGUMENT, "Lookup of max_batch + 1 keys")
    check_rpc_error(lambda: c.stub.Reserve(pb.ReserveRequest(session=c.session, items=[
        pb.PutItem(key=b"k" * (c.limits["max_key_len"] + 1), value_len=1)])),
        grpc.StatusCode.INVALID_ARGUMENT, "Reserve of a key of max_key_len + 1 bytes")
    # The gRPC layer's own answer to a message over max_message_len.
    over = c.limits["max_message_len"] // 200 + 1
    check_rpc_error(lambda: c.stub.Lookup(pb.LookupRequest(keys=[b"x" * 200] * over)),
                    grpc.StatusCode.OUT_OF_RANGE, "Lookup message over max_message_len")


def check_closed(sock):
    """The agent closed the connection: end of file, or a reset when it left bytes unread."""
    sock.settimeout(5)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        data = b""
    check_eq(data, b"", "   ...and the agent closes the connection")


def step_attach_errors(c):
    print("-- attach errors", flush=True)
    cases = [
        (hello(99), ATTACH_BAD_VERSION, "hello with version 99 (unsupported)"),
        (hello(0), ATTACH_BAD_VERSION, "hello with version 0"),
        (hello(1, b"no-such-tenant"), ATTACH_UNKNOWN_TENANT, "hello with an unknown tenant"),
        (hello(1, magic=b"NCATTACX"), ATTACH_MALFORMED, "hello with a wrong magic"),
        (hello(1, b"t" * 65), ATTACH_MALFORMED, "hello with a 65-byte tenant"),
    ]
    for data, want, what in cases:
        sock, (status, session, _, _, message, fds) = attach_raw(c.attach_path, data)
        try:
            for fd in fds:
                os.close(fd)
            check(status == want and session == 0 and not fds and message,
                  f"{what} -> status {want}, session 0, no descriptors, reason {message!r}",
                  f"status {status}, session {session}, {len(fds)} fds")
            check_closed(sock)
        finally:
            sock.close()
    # The default tenant by name is fine.
    sock, (status, _, _, _, message, fds) = attach_raw(c.attach_path, hello(1, b"default"))
    for fd in fds:
        os.close(fd)
    sock.close()
    check_eq(status, ATTACH_OK, "hello naming tenant 'default'")


def step_session_end(c, key):
    print("-- a session's leases end with its connection", flush=True)
    before = leases_held(c)
    sock, (status, session, _, _, _, fds) = attach_raw(c.attach_path, hello(1))
    for fd in fds:
        os.close(fd)
    check_eq(status, ATTACH_OK, "second session attached")
    fast = FastPath(sock)
    [it] = fast.get([key])
    check(it is not None, "second session holds a lease")
    check_eq(leases_held(c), before + 1, "Stats: one more lease")
    sock.close()
    deadline = time.monotonic() + 10
    while leases_held(c) != before:
        if time.monotonic() > deadline:
            raise Mismatch("the closed session's lease was not released within 10 s")
        time.sleep(0.02)
    ok("closing the connection released the session's lease")
    check_rpc_error(lambda: c.stub.Get(c.pb.GetRequest(session=session, keys=[key])),
                    grpc.StatusCode.FAILED_PRECONDITION, "Get naming the closed session")


def step_worked_exchange(c):
    print("-- the worked exchange (docs/api.md, last section), byte for byte", flush=True)
    # Put "k" in host memory first (overwrite: the key may be there from an earlier run).
    [(_, rid, off)] = c.fast.reserve([(b"k", 3, b"", 0, 1)])
    write_staging(c, off, b"val")
    check_eq(c.fast.commit([(rid, None)]), [1], "put of key 'k'")

    request = bytes.fromhex("06 00 00 00 01 01 00 01 00 6b")
    c.sock.sendall(request)
    check_eq(c.fast.recv_raw().hex(" "), "06 00 00 00 00 01 00 00 00 02",
             "LOOKUP 'k' response bytes")

    request = bytes.fromhex("0b 00 00 00 03 01 00 07 00 00 00 01 00 00 00")
    c.sock.sendall(request)
    raw = c.fast.recv_raw()
    (n,) = struct.unpack_from("<I", raw)
    (msg_len,) = struct.unpack_from("<H", raw, 5)
    msg = raw[7:].decode("utf-8")
    check(raw[4] == NOT_FOUND and n == 1 + 2 + msg_len and len(msg) == msg_len
          and msg.startswith("unknown lease 0x100000007 (never granted"),
          f"RELEASE 0x0000000100000007 -> len | 05 | msg_len | {msg!r}", raw.hex(" "))


def step_final_stats(c):
    print("-- final stats", flush=True)
    s = c.stub.Stats(c.pb.StatsRequest())
    check_eq(s.leases, 0, "Stats: 0 leases")
    check_eq(s.reservations, 0, "Stats: 0 reservations")
    check(s.sessions >= 1, f"Stats: {s.sessions} session(s)")
    host = [t for t in s.tiers if t.tier == c.pb.TIER_HOST]
    check(len(host) == 1 and host[0].capacity_bytes == c.hs.arena.size,
          "Stats: a HOST tier with the arena's capacity")


def run(c):
    with tempfile.TemporaryDirectory(prefix="nencache-stubs-") as tmp:
        c.pb, pb_grpc = load_stubs(tmp)
        ok(f"stubs generated from {PROTO_ROOT / PROTO_FILE}")
    # docs/api.md, "gRPC over a Unix socket": a valid :authority, no receive limit.
    c.channel = grpc.insecure_channel(
        f"unix:{c.socket_path}",
        options=[("grpc.default_authority", "localhost"),
                 ("grpc.max_receive_message_length", -1)],
    )
    c.stub = pb_grpc.NodeCacheStub(c.channel)

    step_handshake(c)
    step_health(c)
    step_attach(c)
    step_map(c)

    k1, v1, m1 = c.key("grpc-put"), value_bytes(1, 10_000), b'{"dtype":"f16"}'
    k2, v2, m2 = c.key("fast-put"), value_bytes(2, 1), b"\x00meta\xff"
    step_put_grpc(c, k1, v1, m1)
    step_put_fast(c, k2, v2, m2)
    grpc_lease = step_get_grpc(c, k1, v1, m1)
    fast_lease = step_get_fast(c, k2, v2, m2)
    step_lookup(c, k1, k2)
    step_release(c, grpc_lease, fast_lease, k2, v2)
    step_abort_and_checksum(c)
    step_delete(c)
    step_fast_errors(c, k1)
    step_grpc_errors(c)
    step_attach_errors(c)
    step_session_end(c, k1)
    step_worked_exchange(c)
    step_final_stats(c)


def main():
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} <agent gRPC socket>", file=sys.stderr)
        return 2
    c = Ctx()
    c.socket_path = sys.argv[1]
    c.prefix = f"pyc-{os.getpid()}-{time.time_ns()}-"
    try:
        run(c)
    except Mismatch as e:
        failure = str(e)
    except FastPathError as e:
        failure = f"unexpected fast-path error {e}"
    except grpc.RpcError as e:
        failure = f"unexpected gRPC error {e.code().name}: {e.details()}"
    except OSError as e:
        failure = f"socket error {e!r}"
    else:
        failure = None
    finally:
        if c.channel is not None:
            c.channel.close()
        if c.sock is not None:
            c.sock.close()
    if failure is not None:
        print(f"MISMATCH: {failure}", file=sys.stderr, flush=True)
        return 1
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
