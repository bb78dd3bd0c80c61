"""NenCache as LMCache's storage, over the node's shared memory instead of TCP.

LMCache 0.5 loads third-party backends by module path and class name. Two are here:

- :class:`NativeClient`, for the ``native_plugin`` L2 adapter of LMCache's multiprocess mode::

      --l2-adapter '{"type": "native_plugin", "module_path": "nencache.lmcache",
                     "class_name": "NativeClient", "adapter_params": {"socket": "/run/nencache/agent.sock"}}'

- ``nencache.lmcache_remote.NenCacheConnector``, a remote connector for
  ``remote_storage_plugins`` (the single-process mode); see that module.

Both go through :class:`nencache.Client`: a get copies each value once, from the agent's
arena straight into LMCache's buffer (:meth:`nencache.Value.copy_into`), and a set copies
LMCache's buffer once into the agent's staging area, both with the GIL released. Neither
module imports LMCache's code on the data path; this one imports nothing of LMCache at all.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ._native import Client

__all__ = ["NativeClient"]

#: One completion: ``(future_id, ok, error, result_bools)``.
Completion = tuple[int, bool, "str | None", "list[bool] | None"]


def _key(k: str | bytes) -> bytes:
    return k.encode() if isinstance(k, str) else bytes(k)


class NativeClient:
    """The native client LMCache's ``native_plugin`` L2 adapter drives: each
    ``submit_batch_*`` call returns a future id at once and runs on a small thread pool;
    completions are announced on :meth:`event_fd` (an eventfd) and collected with
    :meth:`drain_completions` as ``(future_id, ok, error, result_bools)``.

    ``socket``, ``timeout`` (seconds) and ``name`` are those of :class:`nencache.Client`;
    ``workers`` is the number of operations in flight at once. A get of a key that is
    missing, or whose value does not have the buffer's exact size, reports ``False`` for it
    (a miss, never a partial copy); a set reports the batch's success.
    """

    def __init__(
        self,
        socket: str | None = None,
        timeout: float | None = None,
        workers: int = 2,
        name: str = "lmcache",
    ) -> None:
        self._client = Client(socket, timeout=timeout, name=name)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pool = ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix="nencache-lmcache")
        self._lock = threading.Lock()
        self._done: list[Completion] = []
        self._next = 0
        self._closed = False

    def event_fd(self) -> int:
        """The eventfd that becomes readable when completions wait."""
        return self._efd

    def _submit(self, fn: Callable[..., Any], *args: Any) -> int:
        with self._lock:
            if self._closed:
                raise RuntimeError("the nencache native client is closed")
            self._next += 1
            fid = self._next

        def run() -> None:
            try:
                item: Completion = (fid, True, None, fn(*args))
            except Exception as e:  # noqa: BLE001 - reported through the completion
                item = (fid, False, f"{type(e).__name__}: {e}", None)
            with self._lock:
                self._done.append(item)
                if self._closed:
                    return
                os.eventfd_write(self._efd, 1)

        self._pool.submit(run)
        return fid

    def submit_batch_get(self, keys: Sequence[str], bufs: Sequence[Any]) -> int:
        """Copies the value of each key into its buffer (writable, of the value's exact size)."""
        if len(keys) != len(bufs):
            raise ValueError("keys and bufs length mismatch")
        return self._submit(self._get, list(keys), list(bufs))

    def submit_batch_set(self, keys: Sequence[str], bufs: Sequence[Any]) -> int:
        """Stores each buffer under its key (an existing key keeps its value)."""
        if len(keys) != len(bufs):
            raise ValueError("keys and bufs length mismatch")
        return self._submit(self._set, list(keys), list(bufs))

    def submit_batch_exists(self, keys: Sequence[str]) -> int:
        """Whether each key is cached (in any tier)."""
        return self._submit(self._exists, list(keys))

    def submit_batch_delete(self, keys: Sequence[str]) -> int:
        """Deletes each key; per key, whether it existed."""
        return self._submit(self._delete, list(keys))

    def drain_completions(self) -> list[Completion]:
        """The completions since the last call (and resets the eventfd)."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Waits for the operations in flight, then disconnects. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        self._client.close()
        os.close(self._efd)

    # The operations, on the pool's threads.

    def _get(self, keys: list[str], bufs: list[Any]) -> list[bool]:
        out = []
        with self._client.get([_key(k) for k in keys]) as values:
            for v, buf in zip(values, bufs, strict=True):
                view = memoryview(buf)
                if v is None or len(v) != view.nbytes:
                    out.append(False)
                    continue
                v.copy_into(view)
                out.append(True)
        return out

    def _set(self, keys: list[str], bufs: list[Any]) -> None:
        self._client.put_many([(_key(k), memoryview(b)) for k, b in zip(keys, bufs, strict=True)])

    def _exists(self, keys: list[str]) -> list[bool]:
        # `lookup` answers the cached prefix; the keys after a miss are looked up again.
        ks = [_key(k) for k in keys]
        out: list[bool] = []
        while len(out) < len(ks):
            n, _ = self._client.lookup(ks[len(out) :])
            out.extend([True] * n)
            if len(out) < len(ks):
                out.append(False)
        return out

    def _delete(self, keys: list[str]) -> list[bool]:
        return [self._client.delete([_key(k)]) > 0 for k in keys]
