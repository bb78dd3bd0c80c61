"""nencache.lmcache.NativeClient, the object LMCache's ``native_plugin`` L2 adapter drives, used
the way that adapter uses it (submit, wait on the eventfd, drain); needs no LMCache. The
same client driven by LMCache's own adapter code is in test_lmcache_plugins.py."""

from __future__ import annotations

import os
import select

import numpy as np
import pytest

import nencache
from nencache.lmcache import NativeClient


def wait(client: NativeClient, fids: set[int], timeout: float = 20) -> dict[int, tuple]:
    """Polls the eventfd and drains until every future in `fids` completed."""
    poller = select.poll()
    poller.register(client.event_fd(), select.POLLIN)
    done: dict[int, tuple] = {}
    while not fids <= done.keys():
        assert poller.poll(int(timeout * 1000)), f"no completion within {timeout} s"
        for fid, ok, error, result in client.drain_completions():
            done[fid] = (ok, error, result)
    return done


@pytest.fixture
def native(agent):
    c = NativeClient(socket=str(agent.socket))
    yield c
    c.close()


def test_set_exists_get_delete(native, unique):
    keys = [unique(f"chunk{i}").decode() for i in range(5)]
    data = [np.random.default_rng(i).integers(0, 255, 100_000 + i, dtype=np.uint8) for i in range(5)]
    fid = native.submit_batch_set(keys, [memoryview(d) for d in data])
    assert wait(native, {fid})[fid][:2] == (True, None)
    fid = native.submit_batch_exists(keys[:2] + ["missing-" + keys[0]] + keys[2:])
    assert wait(native, {fid})[fid][2] == [True, True, False, True, True, True]
    bufs = [bytearray(len(d)) for d in data]
    fid = native.submit_batch_get(keys, [memoryview(b) for b in bufs])
    ok, err, loaded = wait(native, {fid})[fid]
    assert (ok, err, loaded) == (True, None, [True] * 5)
    for b, d in zip(bufs, data):
        assert bytes(b) == d.tobytes()
    fid = native.submit_batch_delete([keys[0], keys[0], "missing"])
    assert wait(native, {fid})[fid][2] == [True, False, False]


def test_wrong_buffer_sizes_and_missing_keys_are_misses(native, unique):
    k = unique("sized").decode()
    fid = native.submit_batch_set([k], [memoryview(b"x" * 4096)])
    wait(native, {fid})
    small, big, right = bytearray(4095), bytearray(4097), bytearray(4096)
    fid = native.submit_batch_get([k, k, k, unique("none").decode()], [small, big, right, bytearray(8)])
    ok, _, loaded = wait(native, {fid})[fid]
    assert ok and loaded == [False, False, True, False]
    assert small == bytearray(4095) and big == bytearray(4097)  # untouched
    assert right == b"x" * 4096
    # A read-only buffer cannot receive a value: the batch fails, clearly.
    fid = native.submit_batch_get([k], [memoryview(b"y" * 4096)])
    ok, err, _ = wait(native, {fid})[fid]
    assert not ok and "writable" in err
    with pytest.raises(ValueError, match="mismatch"):
        native.submit_batch_get([k], [])


def test_many_operations_in_flight(native, unique):
    fids = set()
    for i in range(50):
        fids.add(native.submit_batch_set([unique(f"m{i}").decode()], [memoryview(os.urandom(5000))]))
    done = wait(native, fids)
    assert all(done[f][0] for f in fids)
    fid = native.submit_batch_exists([unique(f"m{i}").decode() for i in range(50)])
    assert wait(native, {fid})[fid][2] == [True] * 50


def test_a_missing_agent_and_a_closed_client(tmp_path, agent):
    with pytest.raises(nencache.ConnectionError, match="nobody.sock"):
        NativeClient(socket=str(tmp_path / "nobody.sock"))
    c = NativeClient(socket=str(agent.socket))
    c.close()
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.submit_batch_exists(["k"])


def test_an_agent_restart_fails_the_calls_then_recovers(own_agent, unique):
    c = NativeClient(socket=str(own_agent.socket))
    try:
        k = unique("r").decode()
        fid = c.submit_batch_set([k], [memoryview(b"1" * 1000)])
        assert wait(c, {fid})[fid][0]
        own_agent.kill()
        fid = c.submit_batch_exists([k])
        ok, err, _ = wait(c, {fid})[fid]
        assert not ok and "Error" in err
        own_agent.start()
        fid = c.submit_batch_set([k], [memoryview(b"2" * 1000)])
        assert wait(c, {fid})[fid][0], "the client reconnects by itself"
        buf = bytearray(1000)
        fid = c.submit_batch_get([k], [buf])
        assert wait(c, {fid})[fid][2] == [True] and buf == b"2" * 1000
    finally:
        c.close()
