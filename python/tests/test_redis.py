"""The agent's Redis listener through redis-py, the client LMCache's Redis connector uses, in
RESP2 and RESP3 (redis-py 8 sends ``HELLO 3`` on every new connection when asked for RESP3)."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from conftest import Agent

redis = pytest.importorskip("redis", reason="redis-py is not installed: pip install redis")


@pytest.fixture(scope="module")
def redis_agent(tmp_path_factory):
    a = Agent(
        tmp_path_factory.mktemp("redis"),
        "--redis-tcp",
        "127.0.0.1:0",
        "--redis-password",
        "pw",
        "--log-format",
        "json",
    ).start()
    yield a
    a.kill()


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def r(request, redis_agent):
    c = redis.Redis(port=redis_agent.compat_port("redis"), password="pw", protocol=request.param)
    yield c
    c.close()


def test_strings_and_expiry(r, unique):
    k = unique("k")
    assert r.ping() is True
    assert r.get(k) is None
    assert r.set(k, b"v1") is True
    assert r.get(k) == b"v1"
    assert r.set(k, b"v2", nx=True) is None
    assert r.set(k, b"v3", xx=True) is True
    assert r.get(k) == b"v3"
    assert r.ttl(k) == -1
    assert r.expire(k, 100) is True
    assert 99 <= r.ttl(k) <= 100
    assert 0 < r.pttl(k) <= 100_000
    assert r.set(k, b"v4", ex=50) is True
    assert 49 <= r.ttl(k) <= 50
    assert r.exists(k, unique("missing")) == 1
    assert r.delete(k) == 1
    assert r.ttl(k) == -2


def test_batches_and_the_keyspace(r):
    # No glob characters in these keys (a test id has brackets).
    base = uuid.uuid4().hex.encode()
    keys = [base + f"/m{i}".encode() for i in range(20)]
    assert r.mset({k: k * 2 for k in keys}) is True
    assert r.mget(keys + [base + b"/none"]) == [k * 2 for k in keys] + [None]
    found = set(r.scan_iter(match=base + b"/m*", count=5))
    assert found == set(keys)
    assert set(r.keys(base + b"/m1*")) == {k for k in keys if k.startswith(base + b"/m1")}
    assert r.dbsize() >= 20
    info = r.info()
    assert info["redis_version"] and "db0" in info
    assert r.unlink(*keys) == 20


def test_large_values_and_pipelines(r, unique):
    big = os.urandom(3 << 20)
    k = unique("big")
    assert r.set(k, big) is True
    assert r.get(k) == big
    p = r.pipeline(transaction=False)
    for i in range(200):
        p.set(unique(f"p{i}"), str(i).encode())
        p.get(unique(f"p{i}"))
    out = p.execute()
    assert out[0::2] == [True] * 200
    assert out[1::2] == [str(i).encode() for i in range(200)]


def test_errors_are_redis_errors(r, unique):
    with pytest.raises(redis.ResponseError, match="unknown command"):
        r.execute_command("NOSUCHCOMMAND", "x")
    with pytest.raises(redis.ResponseError, match="syntax"):
        r.execute_command("SET", unique("k"), "v", "BOGUS")
    assert r.get(unique("k")) is None
    with pytest.raises(redis.ResponseError, match="disabled"):
        r.flushdb()
    # The connection is still usable.
    assert r.ping() is True


def test_a_wrong_password_is_refused(redis_agent):
    c = redis.Redis(port=redis_agent.compat_port("redis"), password="nope", protocol=3)
    with pytest.raises(redis.AuthenticationError):
        c.ping()
    c = redis.Redis(port=redis_agent.compat_port("redis"), protocol=2)
    with pytest.raises(redis.AuthenticationError):
        c.get("k")


def test_many_threads_share_a_pool(r, unique):
    errors = []

    def work(t):
        try:
            for i in range(50):
                k = unique(f"t{t}-{i}")
                v = os.urandom(1000 + i)
                r.set(k, v)
                assert r.get(k) == v
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_the_client_reconnects_after_an_agent_restart(tmp_path):
    a = Agent(tmp_path / "r", "--redis-tcp", "127.0.0.1:0", "--log-format", "json")
    (tmp_path / "r").mkdir()
    a.start()
    try:
        port = a.compat_port("redis")
        c = redis.Redis(port=port, protocol=3, retry_on_error=[redis.ConnectionError])
        assert c.set("k", b"v") is True
        a.kill()
        with pytest.raises(redis.ConnectionError):
            c.get("k")
        # The same port again (a DaemonSet's agent comes back on its configured port).
        a.extra = ("--redis-tcp", f"127.0.0.1:{port}", "--log-format", "json")
        a.start()
        assert c.get("k") is None  # host memory only: the value did not survive
        assert c.set("k", b"again") is True
        assert c.get("k") == b"again"
    finally:
        a.kill()
