"""Type hints of the compiled module (``nencache._native``); see the docstrings at run time."""

import os
from collections.abc import Iterable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal, SupportsIndex, TypeAlias, final

from typing_extensions import Buffer

from ._values import Values

__version__: str
MAX_KEY_LEN: int
DEFAULT_CHUNK_SIZE: int

Key: TypeAlias = bytes | bytearray | memoryview | str
"""A key: 1 to 256 bytes (a ``str`` is taken as its UTF-8 bytes)."""

Ttl: TypeAlias = float | int | timedelta | None
"""A time to live: seconds or a ``timedelta``; ``None`` takes the agent's default."""

PutOutcome: TypeAlias = Literal["stored", "exists", "checksum_mismatch"]
Tier: TypeAlias = Literal["host", "nvme", "disk", "gpu", "unspecified"]

PutItem: TypeAlias = tuple[Key, Buffer | Any] | tuple[Key, Buffer | Any, bytes | None]
"""A ``put_many`` item: ``(key, value)`` or ``(key, value, metadata)``; a value is any
C-contiguous buffer (bytes, bytearray, memoryview, numpy array) or a contiguous CPU torch
tensor."""

def default_socket() -> str:
    """The socket ``Client()`` connects to: ``$NENCACHE_SOCKET``, else
    ``$XDG_RUNTIME_DIR/nencache/agent.sock``, else ``/tmp/nencache-$UID/agent.sock``."""

def chunk_keys(
    fingerprint: str,
    tokens: Iterable[SupportsIndex] | Buffer,
    chunk_size: int = 256,
    *,
    partial: bool = False,
) -> list[bytes]:
    """Content-defined 16-byte keys, one per full chunk of ``chunk_size`` tokens (and one for
    a trailing partial chunk when ``partial``), chained so that prompts sharing their first n
    chunks share their first n keys. The same keys as every other NenCache client."""

@final
class Value:
    """A value found by :meth:`Client.get`: a read-only, zero-copy view of the cache's shared
    memory holding a lease. Read it through the buffer protocol (``memoryview(v)``,
    ``numpy.frombuffer(v, dtype)``, ``torch.frombuffer(v, dtype=...)``) inside ``with v:``
    (or ``with client.get(keys) as values:``), or until :meth:`release`. Afterwards every
    use raises ``ValueError``; views taken before stay valid, and the lease is returned when
    the last of them is released."""

    @property
    def key(self) -> bytes:
        """The key the value was found under."""
    @property
    def metadata(self) -> bytes:
        """The metadata stored with the value (a copy; readable after release too)."""
    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called (or the ``with`` block ended)."""
    @property
    def held(self) -> bool:
        """Whether the lease is still held (until release, and after it while views live)."""
    def release(self) -> None:
        """Ends the value for Python; the lease goes back now, or when the last view exported
        before is released. Idempotent."""
    def tobytes(self) -> bytes:
        """A copy of the bytes."""
    def copy_into(self, buffer: Buffer) -> int:
        """Copies the value into a writable, C-contiguous buffer at least as long as it (from
        the shared memory straight into it, the GIL released); answers the bytes copied."""
    def __len__(self) -> int: ...
    def __bool__(self) -> Literal[True]:
        """Always true (an empty or released value too): ``if v:`` tells it from ``None``."""
    def __enter__(self) -> Value: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...

@final
class Client:
    """A connection to the node's NenCache agent, shareable by any number of threads."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        timeout: float | timedelta | None = None,
        verify_puts: bool = False,
        fast_path: bool = True,
        name: str | None = None,
    ) -> None:
        """Connects to ``socket``, else ``$NENCACHE_SOCKET``, else the agent's default path;
        raises :class:`nencache.ConnectionError` naming the path when no agent answers.
        ``timeout`` bounds every call, connecting included (:class:`nencache.Timeout`)."""
    @property
    def socket(self) -> str:
        """The agent's socket path."""
    @property
    def timeout(self) -> float | None:
        """The longest any call may wait, in seconds (``None``: no limit)."""
    @property
    def session(self) -> int:
        """The current session's id (it changes when the client reconnects)."""
    @property
    def info(self) -> dict[str, Any]:
        """What the agent announced: versions, region sizes, ``page_size``, ``limits``."""
    def put(
        self,
        key: Key,
        value: Buffer | Any,
        *,
        metadata: bytes | None = None,
        ttl: Ttl = None,
    ) -> PutOutcome:
        """Puts one value (copied once, into the agent's shared staging area)."""
    def put_many(
        self,
        items: Mapping[Key, Buffer | Any] | Iterable[PutItem],
        *,
        metadata: bytes | None = None,
        ttl: Ttl = None,
    ) -> list[PutOutcome]:
        """Puts a batch; one outcome per item, in order."""
    def get(self, keys: Iterable[Key]) -> Values:
        """Per key, a :class:`Value` (zero-copy, leased) or ``None`` when not cached."""
    def lookup(self, keys: Iterable[Key]) -> tuple[int, list[Tier]]:
        """How many leading keys are cached, and the tier of each of those."""
    def delete(self, keys: Iterable[Key]) -> int:
        """Deletes keys from every tier; answers how many existed."""
    def stats(self) -> dict[str, Any]:
        """The agent's counters and gauges; ``tiers`` lists one dict per tier."""
    def flush_releases(self) -> None:
        """Returns the leases of released values now and waits until the agent applied them."""
    def close(self) -> None:
        """Closes the client; later calls raise ``ValueError``."""
    def __enter__(self) -> Client: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool: ...
