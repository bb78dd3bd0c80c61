"""NenCache as a remote connector of LMCache 0.5 (single-process mode), over shared memory.

In LMCache's configuration (leave ``remote_url`` unset: with it, LMCache 0.5.6 creates a
second remote backend beside the plugin's)::

    remote_storage_plugins: ["nencache"]
    extra_config:
      remote_storage_plugin.nencache.module_path: nencache.lmcache_remote
      remote_storage_plugin.nencache.class_name: NenCacheConnector
      remote_storage_plugin.nencache.socket: /run/nencache/agent.sock   # optional

The socket defaults to ``$NENCACHE_SOCKET``, else the agent's default path. Each chunk is
stored with LMCache's own description of it (its ``RemoteMetadata``: length, format, dtype,
shape) as the value's metadata, the record LMCache's Redis connector and the agent's
``lm://`` listener use, so a chunk stored one way is found the others. A get allocates the
memory object LMCache's ``LocalCPUBackend`` gives for that description and copies the value
into it once, from the agent's shared memory; a put copies the object once into the agent's
staging area; both with the GIL released, off the event loop.

This module imports LMCache (it subclasses its ``RemoteConnector``): import it only where
LMCache is installed.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from lmcache.v1.protocol import RemoteMetadata
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from ._native import Client

__all__ = ["NenCacheConnector"]


def _socket_from(config: Any) -> str | None:
    extra = getattr(config, "extra_config", None) or {}
    for k, v in extra.items():
        if k.startswith("remote_storage_plugin.") and k.endswith(".socket") and v:
            return str(v)
    return os.environ.get("NENCACHE_SOCKET") or None


class NenCacheConnector(RemoteConnector):
    """LMCache's ``RemoteConnector`` over the node's NenCache agent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, local_cpu_backend: Any, config: Any) -> None:
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.client = Client(_socket_from(config), name="lmcache")

    # Existence.

    def exists_sync(self, key: Any) -> bool:
        n, _ = self.client.lookup([key.to_string().encode()])
        return n == 1

    async def exists(self, key: Any) -> bool:
        return await asyncio.to_thread(self.exists_sync, key)

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[Any]) -> int:
        """How many leading keys are cached (LMCache's prefix semantics)."""
        if not keys:
            return 0
        n, _ = self.client.lookup([k.to_string().encode() for k in keys])
        return n

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: list[Any], pin: bool = False) -> int:
        return await asyncio.to_thread(self.batched_contains, keys)

    # Reads.

    def _read(self, value: Any) -> Any:
        """A memory object holding `value`, or None when it is not an LMCache chunk or no
        memory is free."""
        meta = value.metadata
        if len(meta) != self.remote_metadata_bytes:
            return None
        desc = RemoteMetadata.deserialize(meta)
        if desc.length != len(value):
            return None
        obj = self.local_cpu_backend.allocate(desc.shapes, desc.dtypes, desc.fmt)
        if obj is None:
            return None
        view = memoryview(obj.byte_array)
        if view.nbytes < desc.length:
            obj.ref_count_down()
            return None
        value.copy_into(view)
        return obj

    def _get_many(self, keys: list[Any]) -> list[Any]:
        with self.client.get([k.to_string().encode() for k in keys]) as values:
            return [None if v is None else self._read(v) for v in values]

    async def get(self, key: Any) -> Any:
        return (await asyncio.to_thread(self._get_many, [key]))[0]

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[Any]) -> list[Any]:
        return await asyncio.to_thread(self._get_many, list(keys))

    # Writes.

    def _put_many(self, keys: list[Any], objs: list[Any]) -> None:
        items = []
        for key, obj in zip(keys, objs, strict=True):
            data = memoryview(obj.byte_array)
            desc = RemoteMetadata(
                data.nbytes, obj.get_shapes(), obj.get_dtypes(), obj.get_memory_format()
            ).serialize()
            items.append((key.to_string().encode(), data, desc))
        self.client.put_many(items)

    async def put(self, key: Any, memory_obj: Any) -> None:
        await asyncio.to_thread(self._put_many, [key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[Any], memory_objs: list[Any]) -> None:
        await asyncio.to_thread(self._put_many, list(keys), list(memory_objs))

    # The rest.

    def remove_sync(self, key: Any) -> bool:
        return self.client.delete([key.to_string().encode()]) > 0

    async def list(self) -> list[str]:
        """Not offered: the agent's keyspace is walked by its Redis listener's SCAN."""
        return []

    async def close(self) -> None:
        self.client.close()
