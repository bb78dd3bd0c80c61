"""Puts, gets, lookups, deletes and stats against a real agent."""

from __future__ import annotations

import array
import datetime
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

import nencache


def test_put_then_get_round_trips_bytes(client, unique):
    k = unique("k")
    assert client.put(k, b"hello", metadata=b"meta") == "stored"
    with client.get([k]) as values:
        (v,) = values
        assert isinstance(v, nencache.Value)
        assert bytes(v) == b"hello"
        assert v.tobytes() == b"hello"
        assert len(v) == 5
        assert v.key == k
        assert v.metadata == b"meta"


def test_a_second_put_of_a_key_answers_exists_and_keeps_the_first_value(client, unique):
    k = unique("k")
    assert client.put(k, b"first") == "stored"
    assert client.put(k, b"second") == "exists"
    with client.get([k]) as (v,):
        assert bytes(v) == b"first"


def test_every_buffer_type_is_accepted(client, unique):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    cases = {
        "bytes": b"abc",
        "bytearray": bytearray(b"defg"),
        "memoryview": memoryview(b"0123456789")[2:6],
        "numpy": arr,
        "array": array.array("i", [1, 2, 3]),
        "empty": b"",
    }
    for name, value in cases.items():
        assert client.put(unique(name), value) == "stored", name
    with client.get([unique(n) for n in cases]) as values:
        got = {n: v.tobytes() for n, v in zip(cases, values)}
    assert got["bytes"] == b"abc"
    assert got["bytearray"] == b"defg"
    assert got["memoryview"] == b"2345"
    assert got["numpy"] == arr.tobytes()
    assert got["array"] == array.array("i", [1, 2, 3]).tobytes()
    assert got["empty"] == b""
    with client.get([unique("empty"), unique("missing")]) as values:
        assert [bool(v) for v in values] == [True, False]
        assert len(values[0]) == 0


class LooksLikeATensor:
    """An object with every attribute of a CPU torch tensor, pointing at memory that is not
    its own: the client must not read an address it is handed by anything but torch."""

    device = types.SimpleNamespace(type="cpu")
    nbytes = 4096

    def data_ptr(self) -> int:
        return 8

    def is_contiguous(self) -> bool:
        return True


def test_an_object_that_only_looks_like_a_tensor_is_refused(client, unique):
    with pytest.raises(TypeError, match="buffer protocol"):
        client.put(unique("fake"), LooksLikeATensor())


def test_cpu_tensors_are_put_from_their_memory(client, unique):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    t = torch.arange(1000, dtype=torch.float32)
    assert client.put(unique("t"), t) == "stored"
    assert client.put(unique("e"), t[:0]) == "stored"
    with client.get([unique("t"), unique("e")]) as (v, e):
        assert bytes(v) == t.numpy().tobytes() and bytes(e) == b""
    with pytest.raises(BufferError, match="contiguous"):
        client.put(unique("nc"), t.reshape(10, 100).T)


def test_str_keys_are_their_utf8_bytes(client, unique):
    k = unique("clé").decode()
    client.put(k, b"x")
    with client.get([k.encode()]) as (v,):
        assert bytes(v) == b"x"


def test_get_answers_none_for_missing_keys_in_order(client, unique):
    client.put(unique("a"), b"A")
    client.put(unique("c"), b"C")
    with client.get([unique("a"), unique("b"), unique("c")]) as values:
        assert isinstance(values, nencache.Values)
        assert [None if v is None else bytes(v) for v in values] == [b"A", None, b"C"]


def test_values_are_zero_copy_views_of_shared_memory(client, unique):
    k = unique("k")
    src = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32)
    client.put(k, src)
    with client.get([k]) as (v,):
        a = np.frombuffer(v, dtype=np.float32).reshape(64, 128)
        b = np.frombuffer(v, dtype=np.float32)
        assert np.array_equal(a, src)
        # Two views of one value share one address: nothing was copied.
        assert a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        assert not a.flags.writeable
        m = memoryview(v)
        assert m.readonly and m.format == "B" and m.nbytes == src.nbytes
        # The arena is page-aligned: values start on a page boundary.
        assert a.__array_interface__["data"][0] % client.info["page_size"] == 0
        del a, b
        m.release()


def test_put_many_takes_a_mapping_or_tuples(client, unique):
    out = client.put_many({unique("m1"): b"1", unique("m2"): np.zeros(3, np.uint8)})
    assert out == ["stored", "stored"]
    out = client.put_many(
        [(unique("t1"), b"one"), (unique("t2"), b"two", b"own"), (unique("m1"), b"x")],
        metadata=b"default",
    )
    assert out == ["stored", "stored", "exists"]
    with client.get([unique("t1"), unique("t2"), unique("m2")]) as (t1, t2, m2):
        assert (bytes(t1), t1.metadata) == (b"one", b"default")
        assert (bytes(t2), t2.metadata) == (b"two", b"own")
        assert bytes(m2) == b"\0\0\0"


def test_a_large_batch_is_split_to_the_agents_limits(client, unique):
    n = client.info["limits"]["max_batch"] + 300
    keys = [unique(f"b{i}") for i in range(n)]
    assert client.put_many([(k, i.to_bytes(4, "little")) for i, k in enumerate(keys)]) == [
        "stored"
    ] * n
    with client.get(keys) as values:
        assert [int.from_bytes(bytes(v), "little") for v in values] == list(range(n))
    assert client.lookup(keys) == (n, ["host"] * n)


def test_lookup_counts_the_cached_prefix_with_tiers(client, unique):
    keys = nencache.chunk_keys(unique("model").decode(), list(range(1024)), 256)
    assert len(keys) == 4
    assert client.lookup(keys) == (0, [])
    client.put_many([(k, b"kv") for k in keys[:2]] + [(keys[3], b"kv")])
    # Stops at the first miss: the fourth key is cached but not part of the prefix.
    assert client.lookup(keys) == (2, ["host", "host"])


def test_delete_answers_how_many_existed(client, unique):
    client.put(unique("d1"), b"1")
    client.put(unique("d2"), b"2")
    assert client.delete([unique("d1"), unique("d2"), unique("nope")]) == 2
    assert client.get([unique("d1")]) == [None]
    assert client.delete([unique("d1")]) == 0


def test_a_value_got_before_a_delete_stays_readable(client, unique):
    k = unique("k")
    client.put(k, b"still here")
    with client.get([k]) as (v,):
        assert client.delete([k]) == 1
        assert bytes(v) == b"still here"


def test_ttl_in_seconds_or_timedelta_expires_the_value(client, unique):
    client.put(unique("short"), b"x", ttl=0.2)
    client.put_many([(unique("td"), b"y")], ttl=datetime.timedelta(milliseconds=200))
    client.put(unique("long"), b"z", ttl=3600)
    time.sleep(0.6)
    with client.get([unique("short"), unique("td"), unique("long")]) as values:
        assert values[0] is None and values[1] is None
        assert bytes(values[2]) == b"z"


def test_stats_is_a_dict_of_the_agents_counters(client, unique):
    before = client.stats()
    client.put(unique("s"), b"s")
    client.get([unique("s"), unique("missing")]).release()
    after = client.stats()
    assert after["commits"] == before["commits"] + 1
    assert after["hits"] >= before["hits"] + 1
    assert after["misses"] >= before["misses"] + 1
    assert after["sessions"] >= 1
    (host,) = after["tiers"]
    assert host["tier"] == "host"
    assert host["capacity_bytes"] == 64 << 20
    assert host["entries"] >= 1


def test_info_and_session(client):
    info = client.info
    assert info["protocol_version"] >= 1
    assert info["limits"]["max_key_len"] == nencache.MAX_KEY_LEN == 256
    assert info["arena_size"] == 64 << 20
    assert client.session != 0
    assert "session=" in repr(client)


def test_verify_puts_and_the_grpc_transport_work_too(agent, unique):
    with nencache.Client(agent.socket, verify_puts=True, fast_path=False, name="t") as c:
        assert c.put(unique("v"), b"checked") == "stored"
        with c.get([unique("v")]) as (v,):
            assert bytes(v) == b"checked"
        assert c.lookup([unique("v")]) == (1, ["host"])


def test_the_default_socket_follows_the_environment(agent, tmp_path):
    code = (
        "import nencache, sys\n"
        "print(nencache.default_socket())\n"
        "with nencache.Client() as c:\n"
        "    print(c.socket)\n"
    )

    def run(env):
        base = {k: v for k, v in os.environ.items()
                if k not in ("NENCACHE_SOCKET", "XDG_RUNTIME_DIR")}
        out = subprocess.run(
            [sys.executable, "-c", code], env=dict(base, **env),
            capture_output=True, text=True, timeout=60,
        )
        return out

    r = run({"NENCACHE_SOCKET": str(agent.socket)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(agent.socket)] * 2

    r = run({"XDG_RUNTIME_DIR": str(tmp_path)})
    assert r.stdout.split()[0] == f"{tmp_path}/nencache/agent.sock"
    assert "ConnectionError" in r.stderr and f"{tmp_path}/nencache/agent.sock" in r.stderr

    r = run({"XDG_RUNTIME_DIR": "relative"})
    assert r.stdout.split()[0] == f"/tmp/nencache-{os.getuid()}/agent.sock"


def test_a_closed_client_refuses_calls(agent):
    c = nencache.Client(agent.socket)
    c.close()
    c.close()
    with pytest.raises(ValueError, match="closed"):
        c.lookup([b"k"])
    assert "closed" in repr(c)


def test_values_outlive_their_client(agent, unique):
    with nencache.Client(agent.socket) as c:
        c.put(unique("k"), b"kept")
        values = c.get([unique("k")])
    with values:
        assert bytes(values[0]) == b"kept"


def test_a_key_twice_in_one_put_many_is_put_once(client, unique):
    k = unique("twice")
    assert client.put_many([(k, b"first"), (k, b"second")]) == ["stored", "exists"]
    with client.get([k]) as (v,):
        assert bytes(v) == b"first"


def test_a_relative_socket_path_is_made_absolute(agent, monkeypatch):
    monkeypatch.chdir(agent.dir)
    with nencache.Client("agent.sock") as c:
        assert os.path.isabs(c.socket)
        assert c.socket == str(agent.socket)
        monkeypatch.chdir("/")
        c.put(b"relative-socket", b"x")
