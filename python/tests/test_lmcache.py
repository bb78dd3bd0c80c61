"""The agent's LMCache remote protocols (``lm://`` and Redis) driven by LMCache 0.5.6's own
remote connectors, created as LMCache's ``RemoteBackend`` creates them: an engine
configuration, a ``LocalCPUBackend`` that allocates the ``KV_2LTD`` memory objects, an asyncio
loop on a thread, and the connector factory ``CreateConnector``. Every test runs against both
``lm://127.0.0.1:PORT`` and ``redis://127.0.0.1:PORT``. Skipped where LMCache is not installed
(``pip install -r python/tests/lmcache-requirements.txt``)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import threading
import time

import pytest

lmcache = pytest.importorskip(
    "lmcache", reason="LMCache is not installed: pip install -r python/tests/lmcache-requirements.txt"
)
torch = pytest.importorskip(
    "torch", reason="torch is not installed: pip install -r python/tests/lmcache-requirements.txt"
)
pytest.importorskip(
    "redis", reason="redis-py is not installed: pip install -r python/tests/lmcache-requirements.txt"
)

from conftest import Agent  # noqa: E402
from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.connector import CreateConnector  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402

MODEL = "nencache-test/model"
CHUNK = 256
LAYERS, HEADS, HEAD = 4, 2, 128  # a full bf16 chunk is [2, 4, 256, 256]: 1 MiB
PROTOCOLS = ["lm", "redis"]

def metrics(agent: Agent) -> dict[str, float]:
    """The agent's Prometheus metrics (series with their labels -> value)."""
    import urllib.request

    log = re.sub(r"\x1b\[[0-9;]*m", "", agent.log())
    m = re.search(r"admin endpoint listening\W+addr\W+([0-9.]+:\d+)", log)
    assert m, f"no admin address in the agent's log:\n{agent.log()}"
    text = urllib.request.urlopen(f"http://{m[1]}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reconnected(remote: Remote) -> Remote:
    """The redis connector after the agent restarted: redis-py 8's pool does not check an idle
    connection before reuse when RESP3 maintenance notifications are on ("auto", the
    default), so the first call on each stale pooled connection fails with ConnectionError
    and closes it (as against redis-server); LMCache's RemoteBackend takes that call as a
    miss. The calls after it reconnect."""
    import redis

    failures = 0
    while True:
        try:
            assert remote.run(remote.conn.exists(key())) is False
            return remote
        except redis.exceptions.ConnectionError:
            failures += 1
            assert failures <= 3, "the redis connector does not reconnect"


def new_hash() -> int:
    """A chunk hash as LMCache's builtin hash gives them: a signed 64-bit int, negative here
    (the key's text then has a ``-`` before the hex digits)."""
    return -int.from_bytes(os.urandom(7), "big") - 1


def key(h: int | None = None) -> CacheEngineKey:
    return CacheEngineKey(MODEL, 1, 0, new_hash() if h is None else h, torch.bfloat16)


class Remote:
    """One LMCache remote connector, with its engine configuration, metadata, CPU backend
    and event loop, as LMCache's ``RemoteBackend`` sets them up."""

    def __init__(
        self,
        url: str,
        layers: int = LAYERS,
        heads: int = HEADS,
        cpu_gb: float = 0.04,
        config: LMCacheEngineConfig | None = None,
    ) -> None:
        self.url = url
        self.layers, self.hidden = layers, heads * HEAD
        self.config = config or LMCacheEngineConfig.from_defaults(
            chunk_size=CHUNK,
            remote_url=url,
            remote_serde="naive",
            max_local_cpu_size=cpu_gb,
        )
        self.md = LMCacheMetadata(
            model_name=MODEL,
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.bfloat16,
            kv_shape=(layers, 2, CHUNK, heads, HEAD),
        )
        self.backend = LocalCPUBackend(self.config, self.md, dst_device="cpu")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        try:
            self.conn = CreateConnector(url, self.loop, self.backend, self.config, self.md)
        except BaseException:
            self._stop_loop()
            self.backend.close()
            raise

    # -- running the connector's coroutines on its loop

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float = 30):
        return self.submit(coro).result(timeout=timeout)

    # -- memory objects

    def shape(self, tokens: int = CHUNK, layers: int | None = None) -> torch.Size:
        return torch.Size([2, layers or self.layers, tokens, self.hidden])

    def chunk(self, tokens: int = CHUNK, seed: int = 0, layers: int | None = None):
        """A KV_2LTD bf16 memory object of random contents, and a copy of its tensor (the
        connector's wrapper releases the object once it is put)."""
        obj = self.backend.allocate(
            self.shape(tokens, layers), torch.bfloat16, MemoryFormat.KV_2LTD
        )
        assert obj is not None, "LMCache's CPU backend has no room"
        g = torch.Generator().manual_seed(seed)
        obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=g).to(torch.bfloat16))
        return obj, obj.tensor.clone()

    def put(self, k: CacheEngineKey, tokens: int = CHUNK, seed: int = 0, layers: int | None = None):
        obj, want = self.chunk(tokens, seed, layers)
        self.run(self.conn.put(k, obj))
        return want

    def check(self, got, want: torch.Tensor) -> None:
        """``got`` is the chunk ``want``: same shape, dtype, format and bytes."""
        assert got is not None, "a chunk put is not found"
        try:
            assert got.get_shape() == want.shape
            assert got.get_shapes() == [want.shape]
            assert got.get_dtype() == torch.bfloat16
            assert got.get_dtypes() == [torch.bfloat16]
            assert got.get_memory_format() == MemoryFormat.KV_2LTD
            assert got.get_size() == want.numel() * 2
            assert bytes(got.byte_array) == want.view(torch.uint8).numpy().tobytes()
            assert torch.equal(got.tensor, want)
        finally:
            got.ref_count_down()

    def get_check(self, k: CacheEngineKey, want: torch.Tensor) -> None:
        self.check(self.run(self.conn.get(k)), want)

    def close(self) -> None:
        inner = self.conn.getWrappedConnector()
        try:
            if self.url.startswith("redis"):
                # RedisConnector.close() calls its executor's blocking shutdown() from the
                # event loop and so never returns (LMCache 0.5.6): do what it means to do.
                self.run(inner.pq_executor.shutdown_async(wait=True), timeout=10)
                self.run(inner.connection.aclose(), timeout=10)
            else:
                self.run(self.conn.close(), timeout=10)
        except Exception:
            pass  # a connector whose agent is gone may fail to close
        self._stop_loop()
        self.backend.close()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory):
    """One agent serving both protocols, for the tests that do not stop it."""
    a = Agent(
        tmp_path_factory.mktemp("lmcache"),
        "--lm-tcp",
        "127.0.0.1:0",
        "--redis-tcp",
        "127.0.0.1:0",
        "--host-capacity",
        "256MiB",
    ).start()
    yield a
    a.kill()


def url_of(agent: Agent, protocol: str) -> str:
    return f"{protocol}://127.0.0.1:{agent.compat_port(protocol)}"


@pytest.fixture
def remotes():
    """Creates connectors and closes them at teardown."""
    made: list[Remote] = []

    def make(url: str) -> Remote:
        r = Remote(url)
        made.append(r)
        return r

    yield make
    for r in reversed(made):
        r.close()


@pytest.fixture(params=PROTOCOLS)
def remote(request, shared_agent, remotes) -> Remote:
    return remotes(url_of(shared_agent, request.param))


def test_the_connector_factory_gives_lmcaches_connectors(remote):
    inner = type(remote.conn.getWrappedConnector()).__name__
    expected = {"lm": "LMCServerConnector", "redis": "RedisConnector"}
    assert inner == expected[remote.url.split(":")[0]]


def test_full_chunk_put_exists_get(remote):
    k = key()
    assert k.chunk_hash < 0 and "@-" in k.to_string()
    want = remote.put(k, CHUNK, seed=1)
    assert remote.run(remote.conn.exists(k)) is True
    assert remote.conn.exists_sync(k) is True
    remote.get_check(k, want)
    # a second get of the same chunk answers the same bytes
    remote.get_check(k, want)


def test_partial_chunk_put_exists_get(remote):
    for tokens in (1, 100, CHUNK - 1):
        k = key()
        want = remote.put(k, tokens, seed=tokens)
        assert remote.run(remote.conn.exists(k)) is True
        remote.get_check(k, want)


def test_llama_sized_chunk(shared_agent):
    """A full chunk of Llama-3.1-8B (32 layers, 8 KV heads of 128, bf16): 32 MiB, and a
    partial one."""
    for protocol in PROTOCOLS:
        r = Remote(url_of(shared_agent, protocol), layers=32, heads=8, cpu_gb=0.08)
        try:
            k = key()
            want = r.put(k, CHUNK, seed=7)
            assert want.numel() * 2 == 32 << 20
            assert r.run(r.conn.exists(k)) is True
            r.get_check(k, want)
            k = key()
            want = r.put(k, 129, seed=8)
            r.get_check(k, want)
        finally:
            r.close()


def test_keys_with_tags_and_of_the_longest_length(remote):
    """Keys as LMCache writes them with request tags (``@tag%value``), and one of 150 bytes,
    the longest the lm connector sends."""
    tagged = CacheEngineKey(
        MODEL, 1, 0, new_hash(), torch.bfloat16,
        request_configs={"lmcache.tag.tenant": "team-a", "lmcache.tag.lora": "x1"},
    )
    assert tagged.to_string().endswith("@tenant%team-a@lora%x1")
    h = new_hash()
    stub = CacheEngineKey("", 1, 0, h, torch.bfloat16).to_string()
    longest = CacheEngineKey("m/" + "x" * (148 - len(stub)), 1, 0, h, torch.bfloat16)
    assert len(longest.to_string()) == 150
    for k, tokens in [(tagged, CHUNK), (longest, 3)]:
        want = remote.put(k, tokens, seed=tokens)
        assert remote.run(remote.conn.exists(k)) is True
        remote.get_check(k, want)
        other = CacheEngineKey(k.model_name, 1, 1, k.chunk_hash, torch.bfloat16, k.request_configs)
        assert remote.run(remote.conn.exists(other)) is False


def test_missing_key(remote):
    k = key()
    assert remote.run(remote.conn.exists(k)) is False
    assert remote.conn.exists_sync(k) is False
    assert remote.run(remote.conn.get(k)) is None
    # the connection is still usable after a miss
    want = remote.put(k, CHUNK, seed=2)
    remote.get_check(k, want)
    other = key()
    assert remote.run(remote.conn.get(other)) is None
    assert remote.run(remote.conn.exists(other)) is False


def test_put_replaces_a_chunk(remote):
    k = key()
    remote.put(k, CHUNK, seed=3)
    want = remote.put(k, 10, seed=4)
    remote.get_check(k, want)


def test_batched_operations(remote):
    """What LMCache 0.5.6 offers of batches: the redis connector has batched puts, the lm
    connector none (RemoteBackend then puts one by one); both have batched_async_contains
    and batched_get_non_blocking (prefix semantics); neither has batched_contains or
    batched_get."""
    conn = remote.conn
    is_redis = remote.url.startswith("redis")
    assert conn.support_batched_put() is is_redis
    assert conn.support_batched_get() is False
    assert conn.support_batched_contains() is False
    assert conn.support_batched_async_contains() is True
    assert conn.support_batched_get_non_blocking() is True

    keys = [key() for _ in range(6)]
    sizes = [CHUNK if i % 2 == 0 else 50 + i for i in range(6)]
    objs, wants = zip(*(remote.chunk(n, seed=20 + i) for i, n in enumerate(sizes)))
    if is_redis:
        remote.run(conn.batched_put(keys[:4], list(objs[:4])))
    else:
        for k, o in zip(keys[:4], objs[:4]):
            remote.run(conn.put(k, o))
    for o in objs[4:]:
        o.ref_count_down()

    assert remote.run(conn.batched_async_contains("lookup-1", keys)) == 4
    assert remote.run(conn.batched_async_contains("lookup-2", keys[:3])) == 3
    assert remote.run(conn.batched_async_contains("lookup-3", keys[4:] + keys[:4])) == 0
    assert remote.run(conn.batched_async_contains("lookup-4", keys[:2] + keys[5:] + keys[2:4])) == 2

    got = remote.run(conn.batched_get_non_blocking("lookup-5", keys))
    assert len(got) == 4
    for g, w in zip(got, wants[:4]):
        remote.check(g, w)
    # lm (the base class): the prefix found, up to the first miss; redis: every chunk found
    got = remote.run(conn.batched_get_non_blocking("lookup-6", keys[4:] + keys[:1]))
    if is_redis:
        assert len(got) == 1
        remote.check(got[0], wants[0])
    else:
        assert got == []


def test_several_puts_then_gets_in_one_go(remote):
    """Puts submitted at once as RemoteBackend submits them (one future per chunk, not
    waited for), then gets submitted at once as its batched_get_blocking does."""
    conn = remote.conn
    keys = [key() for _ in range(8)]
    objs, wants = zip(*(remote.chunk(CHUNK - 7 * i, seed=40 + i) for i in range(8)))
    puts = [remote.submit(conn.put(k, o)) for k, o in zip(keys, objs)]
    for f in puts:
        assert f.result(timeout=30) is None
    gets = [remote.submit(conn.get(k)) for k in keys]
    for f, w in zip(gets, wants):
        remote.check(f.result(timeout=30), w)
    exists = [remote.submit(conn.exists(k)) for k in keys + [key()]]
    assert [f.result(timeout=30) for f in exists] == [True] * 8 + [False]


def test_lm_requests_behind_puts_see_them(shared_agent, remotes):
    """lm:// answers in order on one connection: exists and a get queued behind puts (which
    the agent does not answer) see the chunks those puts stored, the last put of a key wins."""
    remote = remotes(url_of(shared_agent, "lm"))
    conn = remote.conn
    keys = [key() for _ in range(5)]
    objs, wants = zip(*(remote.chunk(CHUNK, seed=60 + i) for i in range(5)))
    last, last_want = remote.chunk(33, seed=70)  # replaces keys[0]
    futures = [remote.submit(conn.put(k, o)) for k, o in zip(keys, objs)]
    futures.append(remote.submit(conn.put(keys[0], last)))
    exists = [remote.submit(conn.exists(k)) for k in keys]
    # one get only: LMCache's lm connector takes its lock twice per get, so several gets
    # queued behind a put could interleave on the socket (a fault of the client, not ours)
    get = remote.submit(conn.get(keys[0]))
    for f in futures:
        assert f.result(timeout=30) is None
    assert [f.result(timeout=30) for f in exists] == [True] * 5
    remote.check(get.result(timeout=30), last_want)
    for k, w in zip(keys[1:], wants[1:]):
        remote.get_check(k, w)


def test_a_chunk_put_through_one_protocol_is_found_through_the_other(shared_agent, remotes):
    lm = remotes(url_of(shared_agent, "lm"))
    rd = remotes(url_of(shared_agent, "redis"))
    k1, k2 = key(), key()
    w1 = lm.put(k1, CHUNK, seed=80)
    w2 = rd.put(k2, 77, seed=81)
    assert rd.run(rd.conn.exists(k1)) is True
    assert lm.run(lm.conn.exists(k2)) is True
    rd.get_check(k1, w1)
    lm.get_check(k2, w2)


def test_redis_two_instances_store_one_chunk_at_once(shared_agent, remotes):
    """Two LMCache instances (two connectors) storing the same chunk at the same time, as two
    inference pods of a node do for a shared prefix. Each put is LMCache's two SETs; here
    instance B's whole put falls between instance A's SET <key>kv_bytes and its SET
    <key>metadata. The agent must keep one entry, found and lost as a whole."""
    import redis

    url = url_of(shared_agent, "redis")
    a, b = remotes(url), remotes(url)
    raw = redis.Redis(port=shared_agent.compat_port("redis"))
    k = key()
    obj_a, want = a.chunk(CHUNK, seed=140)
    obj_b, _ = b.chunk(CHUNK, seed=140)  # the same chunk: same key, same bytes

    inner = a.conn.getWrappedConnector()
    real_set = inner.connection.set
    interleaved = []

    async def set_then_instance_b(name, value, *args, **kwargs):
        reply = await real_set(name, value, *args, **kwargs)
        if name.endswith("kv_bytes") and not interleaved:
            interleaved.append(name)
            await asyncio.wrap_future(b.submit(b.conn.put(k, obj_b)))
        return reply

    inner.connection.set = set_then_instance_b
    try:
        a.run(a.conn.put(k, obj_a))
    finally:
        inner.connection.set = real_set
    assert interleaved == [k.to_string() + "kv_bytes"]

    try:
        assert a.run(a.conn.exists(k)) is True
        b.get_check(k, want)
        a.get_check(k, want)
        listed = sorted(raw.keys(k.to_string() + "*"))
        # The entry removed (as eviction would): neither name may be found any more, or
        # LMCache counts a hit it cannot load.
        assert raw.delete(k.to_string() + "kv_bytes") == 1
        assert raw.exists(k.to_string() + "metadata") == 0
        assert a.run(a.conn.exists(k)) is False
        assert a.run(a.conn.get(k)) is None
        # one entry, listed once as <key>
        assert listed == [k.to_string().encode()]
    finally:
        raw.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_restart_with_a_lower_tier(protocol, tmp_path, remotes):
    """A graceful stop (SIGTERM) and a restart on the same port, with an NVMe tier: the
    chunks put before are found after it. LMCache's redis connector reconnects by itself;
    its lm connector never does, so a new one is made (as a restarted LMCache would)."""
    lm_port, redis_port = free_port(), free_port()
    agent = Agent(
        tmp_path,
        "--lm-tcp",
        f"127.0.0.1:{lm_port}",
        "--redis-tcp",
        f"127.0.0.1:{redis_port}",
        "--host-capacity",
        "64MiB",
        "--nvme-path",
        str(tmp_path / "t2"),
        "--nvme-size",
        "64MiB",
    ).start()
    try:
        url = f"{protocol}://127.0.0.1:{lm_port if protocol == 'lm' else redis_port}"
        assert agent.compat_port(protocol) == int(url.rsplit(":", 1)[1])
        first = remotes(url)
        before = [key() for _ in range(3)]
        wants = [first.put(k, CHUNK if i else 90, seed=100 + i) for i, k in enumerate(before)]
        for k, w in zip(before, wants):
            first.get_check(k, w)

        # The connector's connection is open and idle while the agent stops.
        took = agent.stop()
        assert took < 5, f"the agent took {took:.1f} s to stop with an idle connection open"
        agent.start()
        assert agent.compat_port(protocol) == int(url.rsplit(":", 1)[1])

        # redis-py reconnects by itself; the lm connection is gone for good
        after = reconnected(first) if protocol == "redis" else remotes(url)

        for k, w in zip(before, wants):
            assert after.run(after.conn.exists(k)) is True, "a chunk put before the restart is lost"
            after.get_check(k, w)
        k = key()
        w = after.put(k, 200, seed=110)
        assert after.run(after.conn.exists(k)) is True
        after.get_check(k, w)
        assert after.run(after.conn.get(key())) is None
    finally:
        agent.kill()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_chunks_evicted_to_the_lower_tier(protocol, tmp_path, remotes):
    """More chunks than host memory holds (8 MiB, 1 MiB chunks), with an NVMe tier: exists and
    get agree on every chunk, every chunk found is whole (read up from the tier or not), and
    every chunk missing is counted as an eviction no tier had saved (demotion runs ahead of
    eviction but does not stall puts that outrun it)."""
    agent = Agent(
        tmp_path,
        f"--{protocol}-tcp",
        "127.0.0.1:0",
        "--host-capacity",
        "8MiB",
        "--nvme-path",
        str(tmp_path / "t2"),
        "--nvme-size",
        "64MiB",
    ).start()
    try:
        remote = remotes(url_of(agent, protocol))
        keys = [key() for _ in range(24)]
        wants = []
        for i, k in enumerate(keys):
            wants.append(remote.put(k, CHUNK if i % 3 else 64, seed=150 + i))
            time.sleep(0.01)
        time.sleep(0.2)
        missing = 0
        for k, w in zip(keys, wants):
            found = remote.run(remote.conn.exists(k))
            got = remote.run(remote.conn.get(k))
            assert found is (got is not None), "exists and get disagree"
            if got is None:
                missing += 1
            else:
                remote.check(got, w)
        m = metrics(agent)
        assert m.get('nencache_agent_demotions_total{tier="nvme"}', 0) > 0
        assert m.get('nencache_agent_tier_read_bytes_total{tier="nvme"}', 0) > 0
        assert missing <= m.get("nencache_agent_evictions_unsaved_total", 0)
        assert remote.run(remote.conn.exists(key())) is False
    finally:
        agent.kill()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_connectors_after_a_kill(protocol, own_agent_with_compat, remotes):
    """SIGKILL and a restart on the same port, no lower tier: what was put is gone (a miss,
    not an error) and the connector (lm: a new one) works again."""
    agent, ports = own_agent_with_compat
    url = f"{protocol}://127.0.0.1:{ports[protocol]}"
    first = remotes(url)
    k = key()
    first.put(k, CHUNK, seed=120)
    agent.restart()
    after = reconnected(first) if protocol == "redis" else remotes(url)
    assert after.run(after.conn.exists(k)) is False
    assert after.run(after.conn.get(k)) is None
    k2 = key()
    w = after.put(k2, CHUNK, seed=121)
    after.get_check(k2, w)


@pytest.fixture
def own_agent_with_compat(tmp_path):
    ports = {"lm": free_port(), "redis": free_port()}
    a = Agent(
        tmp_path,
        "--lm-tcp",
        f"127.0.0.1:{ports['lm']}",
        "--redis-tcp",
        f"127.0.0.1:{ports['redis']}",
    ).start()
    yield a, ports
    a.kill()


@pytest.fixture(scope="module")
def small_agent(tmp_path_factory):
    """An agent whose largest value is 1 MiB: a full chunk here is exactly that."""
    a = Agent(
        tmp_path_factory.mktemp("small"),
        "--lm-tcp",
        "127.0.0.1:0",
        "--redis-tcp",
        "127.0.0.1:0",
        "--max-value",
        "1MiB",
    ).start()
    yield a
    a.kill()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_value_over_the_agents_maximum(protocol, small_agent, remotes):
    """A 2 MiB chunk to an agent whose largest value is 1 MiB: refused (lm: read and dropped,
    no reply; redis: an error reply the connector raises), not found, and the connection
    still serves later puts and gets, a chunk of exactly 1 MiB included."""
    remote = remotes(url_of(small_agent, protocol))
    conn = remote.conn
    big = key()
    obj, _ = remote.chunk(CHUNK, seed=130, layers=2 * LAYERS)  # 2 MiB
    assert obj.get_size() == 2 << 20
    try:
        remote.run(conn.put(big, obj))
    except Exception as e:  # the redis connector reports the agent's refusal
        assert protocol == "redis", f"lm put raised {e!r}"
        assert "max" in str(e).lower() or "too" in str(e).lower() or "large" in str(e).lower(), e
    assert remote.run(conn.exists(big)) is False
    assert remote.run(conn.get(big)) is None

    # the connection is still usable: a small chunk, and one of exactly the maximum
    small = key()
    w_small = remote.put(small, 16, seed=131)
    remote.get_check(small, w_small)
    edge = key()
    w_edge = remote.put(edge, CHUNK, seed=132)
    assert remote.run(conn.exists(edge)) is True
    remote.get_check(edge, w_edge)

    # a too-large put replacing a stored chunk is refused: the chunk stored stays
    obj, _ = remote.chunk(CHUNK, seed=133, layers=2 * LAYERS)
    try:
        remote.run(conn.put(small, obj))
    except Exception:
        assert protocol == "redis"
    remote.get_check(small, w_small)
    assert remote.run(conn.get(big)) is None


def test_a_converted_configuration_end_to_end(tmp_path):
    """The migration path of docs/migrating-from-lmcache.md: an LMCache configuration with a
    CPU cache and a local disk, converted by ``nencache lmcache convert``; an agent started
    from the agent.yaml it wrote; LMCache's configuration loaded by LMCache from the
    lmcache.yaml it wrote, and LMCache's own connector (from that configuration's
    remote_url) storing and loading chunks there, which land in the converted disk tier."""
    cli = Agent(tmp_path).binary.with_name("nencache")
    assert cli.exists(), f"no {cli}: cargo build -p nencache-agent --bin nencache"
    source = tmp_path / "lmcache-old.yaml"
    source.write_text(
        "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 0.125\n"
        f"local_disk: file://{tmp_path}/lmc/\nmax_local_disk_size: 0.5\n"
        "remote_serde: naive\nsave_unfull_chunk: true\n"
    )
    (tmp_path / "lmc").mkdir()
    port = free_port()
    out = tmp_path / "converted"
    done = subprocess.run(
        [str(cli), "lmcache", "convert", str(source), "--strict", "--out-dir", str(out)]
        + ["--lm-listen", f"127.0.0.1:{port}", "--lm-addr", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    agent = Agent(tmp_path / "agent", "--config", str(out / "agent.yaml"))
    agent.dir.mkdir()
    agent.start()
    try:
        config = LMCacheEngineConfig.from_file(str(out / "lmcache.yaml"))
        assert config.remote_url == f"lm://127.0.0.1:{port}"
        assert config.local_cpu is False and config.save_unfull_chunk is True
        remote = Remote(config.remote_url, config=config)
        try:
            keys = [key() for _ in range(4)]
            wants = [remote.put(k, CHUNK if i else 100, seed=300 + i) for i, k in enumerate(keys)]
            for k, w in zip(keys, wants):
                assert remote.run(remote.conn.exists(k)) is True
                remote.get_check(k, w)
        finally:
            remote.close()
        assert (tmp_path / "lmc" / "cache.t2").stat().st_size >= 512 << 20
    finally:
        agent.kill()
