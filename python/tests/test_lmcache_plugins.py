"""NenCache's LMCache plugins driven by LMCache 0.5.6's own code: the remote connector loaded
through ``remote_storage_plugins`` (created by LMCache's connector factory, with its
``LocalCPUBackend`` allocating the memory objects) and the native client loaded by its
``native_plugin`` L2 adapter. Skipped where LMCache is not installed
(``pip install -r python/tests/lmcache-requirements.txt``)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

lmcache = pytest.importorskip(
    "lmcache", reason="LMCache is not installed: pip install -r python/tests/lmcache-requirements.txt"
)
torch = pytest.importorskip("torch")

from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.connector import CreateConnector  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402

LAYERS, HEADS, HEAD = 4, 2, 64


def engine(socket: str):
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=256,
        remote_url="plugin://nencache",
        remote_serde="naive",
        max_local_cpu_size=0.25,
        remote_storage_plugins=["nencache"],
        extra_config={
            "remote_storage_plugin.nencache.module_path": "nencache.lmcache_remote",
            "remote_storage_plugin.nencache.class_name": "NenCacheConnector",
            "remote_storage_plugin.nencache.socket": socket,
        },
    )
    md = LMCacheMetadata(
        model_name="test-model",
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.bfloat16,
        kv_shape=(LAYERS, 2, 256, HEADS, HEAD),
    )
    backend = LocalCPUBackend(config, md, dst_device="cpu")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    conn = CreateConnector("plugin://nencache", loop, backend, config, md)
    return conn, backend, md, loop


def chunk(backend, md, tokens: int, seed: int):
    obj = backend.allocate(md.get_shapes(tokens), md.get_dtypes(), MemoryFormat.KV_2LTD)
    g = torch.Generator().manual_seed(seed)
    obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=g).to(torch.bfloat16))
    return obj, obj.tensor.clone()


def key(h: int) -> CacheEngineKey:
    return CacheEngineKey("test-model", 1, 0, h, torch.bfloat16)


@pytest.fixture
def remote(agent):
    conn, backend, md, loop = engine(str(agent.socket))
    run = lambda c: asyncio.run_coroutine_threadsafe(c, loop).result(timeout=30)  # noqa: E731
    yield conn, backend, md, run
    run(conn.close())
    loop.call_soon_threadsafe(loop.stop)


def test_remote_plugin_full_and_partial_chunks(remote):
    conn, backend, md, run = remote
    base = time.monotonic_ns()
    for tokens, h in [(256, -(base % 10**12)), (100, base % 10**12 + 1)]:
        k = key(h)
        assert run(conn.exists(k)) is False
        assert run(conn.get(k)) is None
        obj, want = chunk(backend, md, tokens, seed=tokens)
        run(conn.put(k, obj))
        assert run(conn.exists(k)) is True
        got = run(conn.get(k))
        assert got.get_shapes() == md.get_shapes(tokens)
        assert got.get_dtypes() == [torch.bfloat16]
        assert got.get_memory_format() == MemoryFormat.KV_2LTD
        assert torch.equal(got.tensor, want)
        got.ref_count_down()


def test_remote_plugin_batches(remote):
    conn, backend, md, run = remote
    base = time.monotonic_ns() % 10**12
    keys = [key(base + i) for i in range(6)]
    objs, wants = zip(*(chunk(backend, md, 256, seed=i) for i in range(6)))
    run(conn.batched_put(keys[:4], list(objs[:4])))
    assert conn.batched_contains(keys) == 4
    got = run(conn.batched_get(keys))
    assert got[4:] == [None, None]
    for g, w in zip(got[:4], wants[:4]):
        assert torch.equal(g.tensor, w)
        g.ref_count_down()


def test_remote_plugin_with_no_agent(tmp_path):
    # LMCache reports a connector it cannot create; nothing crashes.
    with pytest.raises(Exception):
        conn, *_ = engine(str(tmp_path / "nobody.sock"))
        raise AssertionError(f"created {conn!r} without an agent")


def test_native_plugin_through_lmcaches_l2_adapter(agent):
    from lmcache.v1.distributed.l2_adapters.config import get_l2_adapter_config_class
    from lmcache.v1.distributed.l2_adapters.factory import (
        create_l2_adapter_from_registry,
        ensure_adapter_loaded,
    )

    ensure_adapter_loaded("native_plugin")
    cfg = get_l2_adapter_config_class("native_plugin").from_dict(
        {
            "type": "native_plugin",
            "module_path": "nencache.lmcache",
            "class_name": "NativeClient",
            "adapter_params": {"socket": str(agent.socket)},
        }
    )
    adapter = create_l2_adapter_from_registry(cfg)
    try:
        _, backend, md, _ = engine(str(agent.socket))
        from lmcache.v1.distributed.api import ObjectKey

        keys = [ObjectKey(chunk_hash=bytes([i]) * 16, model_name="test-model", kv_rank=0) for i in range(3)]
        objs, wants = zip(*(chunk(backend, md, 256, seed=10 + i) for i in range(3)))
        import select

        def wait(fd):
            p = select.poll()
            p.register(fd, select.POLLIN)
            assert p.poll(20_000), "no completion"

        t = adapter.submit_store_task(keys[:2], list(objs[:2]))
        wait(adapter.get_store_event_fd())
        stores = adapter.pop_completed_store_tasks()
        assert bool(stores[t])
        t = adapter.submit_lookup_and_lock_task(keys, {})
        wait(adapter.get_lookup_and_lock_event_fd())
        bitmap = adapter.query_lookup_and_lock_result(t)
        assert [bitmap.test(i) for i in range(3)] == [True, True, False]
        adapter.submit_unlock(keys[:2])
        outs, _ = zip(*(chunk(backend, md, 256, seed=99) for _ in range(3)))
        t = adapter.submit_load_task(keys, list(outs))
        wait(adapter.get_load_event_fd())
        loaded = adapter.query_load_result(t)
        assert [loaded.test(i) for i in range(3)] == [True, True, False]
        for o, w in zip(outs[:2], wants[:2]):
            assert torch.equal(o.tensor, w)
    finally:
        adapter.close()
