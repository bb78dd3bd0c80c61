"""The life of a value: views valid inside its with block, an error (never a crash, never
reused memory) after it, and its lease returned when the last view goes."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import nencache


@pytest.fixture
def put_one(client, unique):
    def put(value: bytes = b"0123456789abcdef", name: str = "k") -> bytes:
        k = unique(name)
        client.put(k, value)
        return k

    return put


def leases(client) -> int:
    client.flush_releases()
    return client.stats()["leases"]


def test_a_view_used_after_its_with_block_raises(client, put_one):
    k = put_one()
    with client.get([k]) as values:
        v = values[0]
        assert bytes(v) == b"0123456789abcdef"
    assert v.released
    with pytest.raises(ValueError, match="released"):
        memoryview(v)
    with pytest.raises(ValueError, match="released"):
        np.frombuffer(v, dtype=np.uint8)
    with pytest.raises(ValueError, match="released"):
        bytes(v)
    with pytest.raises(ValueError, match="released"):
        len(v)
    with pytest.raises(ValueError, match="released"):
        v.tobytes()
    # Still truthy, as any value (an empty one too): `if v:` tells values from misses.
    assert v
    # Key and metadata are copies: still readable.
    assert v.key == k and v.metadata == b""
    assert "released" in repr(v)


def test_a_value_is_its_own_context_manager_and_release_is_idempotent(client, put_one):
    k = put_one()
    (v,) = client.get([k])
    with v as same:
        assert same is v
        assert bytes(v)[:4] == b"0123"
    assert not v.held
    v.release()
    v.release()
    with pytest.raises(ValueError):
        memoryview(v)


def test_release_returns_the_lease(client, put_one):
    k = put_one()
    base = leases(client)
    values = client.get([k, k, k])
    assert leases(client) == base + 3
    values.release()
    assert leases(client) == base


def test_a_garbage_collected_value_returns_its_lease(client, put_one):
    k = put_one()
    base = leases(client)
    values = client.get([k])
    assert leases(client) == base + 1
    del values
    gc.collect()
    assert leases(client) == base


def test_release_is_deferred_while_views_live(client, put_one):
    k = put_one(bytes(range(256)) * 64)
    base = leases(client)
    with client.get([k]) as (v,):
        arr = np.frombuffer(v, dtype=np.uint16)
        m = memoryview(v)[10:20]
    # The block ended: the value refuses new uses ...
    assert v.released and v.held
    with pytest.raises(ValueError):
        memoryview(v)
    # ... but views taken inside stay valid, and keep the lease.
    assert leases(client) == base + 1
    assert arr[1] == 0x0302 and bytes(m) == bytes(range(10, 20))
    del arr
    assert v.held
    m.release()
    assert not v.held
    assert leases(client) == base


def test_views_are_read_only(client, put_one):
    k = put_one()
    with client.get([k]) as (v,):
        m = memoryview(v)
        with pytest.raises(TypeError):
            m[0] = 1
        a = np.frombuffer(v, dtype=np.uint8)
        with pytest.raises(ValueError):
            a[0] = 1
        with pytest.raises(ValueError):
            a.setflags(write=True)
        del a
        m.release()


def test_a_value_read_after_the_key_is_replaced_keeps_its_bytes(client, unique):
    k = unique("k")
    client.put(k, b"A" * 8192)
    with client.get([k]) as (old,):
        view = np.frombuffer(old, dtype=np.uint8)
        client.delete([k])
        client.put(k, b"B" * 8192)
        # Fill the arena with other puts: the leased extent is never reused.
        for i in range(40):
            client.put(unique(f"fill{i}"), bytes([i]) * (1 << 20))
        assert bytes(view) == b"A" * 8192
        with client.get([k]) as (new,):
            assert bytes(new) == b"B" * 8192
        del view


def test_many_values_in_one_with_block(client, unique):
    keys = [unique(f"v{i}") for i in range(50)]
    client.put_many([(k, np.full(1000, i, np.int32)) for i, k in enumerate(keys)])
    with client.get(keys) as values:
        total = sum(int(np.frombuffer(v, np.int32).sum()) for v in values)
    assert total == sum(i * 1000 for i in range(50))
    assert all(v.released for v in values)
