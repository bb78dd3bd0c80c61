"""NenCache: the node-local KV cache for LLM inference, from Python.

A node-local agent serves a shared-memory cache over a Unix socket; :class:`Client`
connects to it, puts values (copied once, straight into shared memory) and gets them back
as zero-copy, read-only views of that memory::

    import nencache, numpy as np

    client = nencache.Client()                       # $NENCACHE_SOCKET or the default socket
    client.put(b"k", np.arange(4, dtype=np.float32))
    with client.get([b"k"]) as (value,):
        print(np.frombuffer(value, dtype=np.float32))

The protocol, the shared-memory mappings and the leases are implemented once, in the Rust
client (``nencache-client``); this package binds it.
"""

from ._errors import (
    ConnectionError,
    Disconnected,
    Error,
    InvalidArgument,
    NoSpace,
    NotFound,
    ResourceExhausted,
    Timeout,
)
from ._native import (
    DEFAULT_CHUNK_SIZE,
    MAX_KEY_LEN,
    Client,
    Value,
    __version__,
    chunk_keys,
    default_socket,
)
from ._values import Values

__all__ = [
    "Client",
    "Value",
    "Values",
    "chunk_keys",
    "default_socket",
    "MAX_KEY_LEN",
    "DEFAULT_CHUNK_SIZE",
    "Error",
    "ConnectionError",
    "Disconnected",
    "Timeout",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "NoSpace",
    "__version__",
]
