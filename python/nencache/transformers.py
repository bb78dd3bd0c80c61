"""Prompt-prefix KV caching for Hugging Face transformers models.

A decoder's KV for a prompt is stored in the node's NenCache agent chunk by chunk, under the
content-defined keys of :func:`nencache.chunk_keys`; a later prompt that starts with the same
tokens loads the longest cached prefix back into a cache object the model accepts, and only
the rest of the prompt is prefilled::

    import nencache
    from nencache.transformers import PrefixCache

    prefix_cache = PrefixCache(nencache.Client(), model)
    result = prefix_cache.prefill(input_ids)        # loads, prefills the rest, stores
    next_token = result.logits[0, -1].argmax()
    # result.cache holds the whole prompt: decode on from result.logits, feeding one token
    # at a time with cache=result.cache (not model.generate(prompt, ...), which would
    # prefill the prompt's last token again)

**Chunk format.** One value per chunk of ``chunk_size`` tokens holds the keys and values of
every layer, in the model's dtype, laid out ``[layer][k, v][kv_head][token][head_dim]``
(C order, native byte order), so ``layers * 2 * kv_heads * chunk_size * head_dim *
itemsize`` bytes. Its metadata is a JSON object describing that layout (see :class:`KVLayout`);
a chunk whose metadata or size does not match the model's is refused with
:class:`MetadataMismatch`, never loaded.

This module imports neither torch nor transformers until it is used, so ``import
nencache.transformers`` works where they are not installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import warnings
from typing import Any

from . import _native
from ._errors import Error, ResourceExhausted

__all__ = [
    "KVLayout",
    "MetadataMismatch",
    "Prefill",
    "Prefix",
    "PrefixCache",
    "cache_argument",
    "model_fingerprint",
]

#: The value of the ``format`` field of a chunk's metadata.
FORMAT = "nencache.transformers.kv/1"
#: The order of a chunk's dimensions.
LAYOUT = "layer,kv,head,token,dim"
# Chunks copied into one staging tensor per `put_many` when storing.
_STORE_GROUP = 8


class MetadataMismatch(Error, ValueError):
    """A cached chunk (or a cache given to store) does not match the model's KV layout."""


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised where torch is absent
        raise ImportError(
            "nencache.transformers needs torch and transformers: pip install torch transformers"
        ) from e
    return torch


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """What a chunk's bytes mean: stored as the chunk's metadata and checked on load.

    ``fingerprint`` names the model (weights included) and goes into the chunk keys;
    ``layers``, ``kv_heads``, ``head_dim``, ``dtype`` (a torch dtype's name, e.g.
    ``"float32"``) and ``chunk_size`` fix the size and meaning of every byte.
    """

    fingerprint: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    chunk_size: int

    @property
    def chunk_bytes(self) -> int:
        """The size of one chunk's value."""
        itemsize = _torch().empty((), dtype=getattr(_torch(), self.dtype)).element_size()
        return self.layers * 2 * self.kv_heads * self.chunk_size * self.head_dim * itemsize

    def metadata(self) -> bytes:
        """The metadata stored with every chunk: compact JSON, keys sorted."""
        fields = {"format": FORMAT, "layout": LAYOUT, **dataclasses.asdict(self)}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def check(self, metadata: bytes, size: int, what: str) -> None:
        """Raises :class:`MetadataMismatch` unless a chunk with this ``metadata`` and ``size``
        is one of this layout's."""
        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [k for k, _ in pairs]
            if len(set(keys)) != len(keys):
                raise ValueError("a field is given twice")
            return dict(pairs)

        try:
            got = json.loads(metadata, object_pairs_hook=no_duplicates)
        except (ValueError, UnicodeDecodeError):
            raise MetadataMismatch(
                f"{what}: its metadata is not a {FORMAT} description ({metadata[:64]!r})"
            ) from None
        if not isinstance(got, dict):
            raise MetadataMismatch(f"{what}: its metadata is not a JSON object")
        want = json.loads(self.metadata())
        for field, value in want.items():
            have = got.get(field)
            # Types too: 3.0 is not the layer count 3.
            if have != value or type(have) is not type(value):
                raise MetadataMismatch(
                    f"{what}: it was stored with {field}={have!r}, "
                    f"the model needs {field}={value!r}"
                )
        extra = sorted(set(got) - set(want))
        if extra:
            raise MetadataMismatch(f"{what}: its metadata has fields this layout does not: {extra}")
        if size != self.chunk_bytes:
            raise MetadataMismatch(
                f"{what}: it holds {size} bytes, a chunk of this layout {self.chunk_bytes}"
            )

    @classmethod
    def of(
        cls, model: Any, *, chunk_size: int = _native.DEFAULT_CHUNK_SIZE, fingerprint: str | None = None
    ) -> KVLayout:
        """The layout of ``model``'s KV (a transformers causal LM): layers, KV heads and head
        size from its config, dtype from its parameters. Models with sliding-window or other
        non-full attention layers are refused (``NotImplementedError``)."""
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, not {chunk_size!r}")
        config = model.config
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layer_types = getattr(text, "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(
                f"{type(model).__name__} has layers of types {sorted(set(layer_types))}: "
                "only models whose every layer is full attention are supported"
            )
        window = getattr(text, "sliding_window", None)
        if not layer_types and window is not None and getattr(text, "use_sliding_window", True):
            # Mistral-style: one window for every layer, its cache keeps the last tokens only.
            raise NotImplementedError(
                f"{type(model).__name__} uses sliding-window attention ({window} tokens): only "
                "models whose every layer is full attention are supported"
            )
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return cls(
            fingerprint=fingerprint if fingerprint is not None else model_fingerprint(model),
            layers=text.num_hidden_layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=dtype,
            chunk_size=chunk_size,
        )


def model_fingerprint(model: Any) -> str:
    """A name for ``model``'s weights: its type, its config's model type, the last part of
    its name or path, its dtype and a hash of its configuration (all of it but its name,
    version and attention implementation) and of every parameter's name and shape and a
    sample of its bytes (the first and last 4 KiB, on any device). Two processes that load the same weights get
    the same fingerprint; a fine-tune gets another. Pass ``fingerprint=`` to name the model
    yourself (a hub id and revision, say)."""
    torch = _torch()
    h = hashlib.blake2b(digest_size=12)
    # The configuration too: the same weights with another RoPE setting give other keys.
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in ("_name_or_path", "transformers_version", "_commit_hash")
        and not k.startswith("_attn_implementation")
    }
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        flat = p.detach().reshape(-1)
        # The first and last 4 KiB of its bytes, the same on every device.
        n = -(-4096 // max(flat.element_size(), 1))
        head = flat[:n].cpu().contiguous().view(torch.uint8)[:4096]
        tail = flat[-n:].cpu().contiguous().view(torch.uint8)[-4096:]
        h.update(head.numpy().tobytes())
        h.update(tail.numpy().tobytes())
    name = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/").rsplit("/", 1)[-1]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return f"{type(model).__name__}:{model.config.model_type}:{name}:{dtype}:{h.hexdigest()}"


@dataclasses.dataclass
class Prefix:
    """What :meth:`PrefixCache.load` found: ``tokens`` leading tokens restored into
    ``cache`` (``None`` when nothing was cached)."""

    tokens: int
    cache: Any | None


@dataclasses.dataclass
class Prefill:
    """What :meth:`PrefixCache.prefill` did: the ``logits`` of the prefilled tokens (of the
    last one only, by default), the ``cache`` of the whole prompt, how many leading tokens
    came from NenCache (``cached_tokens``) and how many chunks it stored (``stored_chunks``)."""

    logits: Any
    cache: Any
    cached_tokens: int
    stored_chunks: int


def _token_list(tokens: Any) -> list[int]:
    """Token ids as a list: from a sequence, a 1-D tensor or array, or a batch of one."""
    shape = getattr(tokens, "shape", None)
    dtype = getattr(tokens, "dtype", None)
    if dtype is not None:
        kind = getattr(dtype, "kind", None)  # numpy
        if kind is not None and kind not in "iu":
            raise TypeError(f"token ids must be integers, not {dtype}")
        if kind is None and (getattr(dtype, "is_floating_point", False) or str(dtype) in (
            "torch.bool",
            "torch.complex64",
            "torch.complex128",
        )):
            raise TypeError(f"token ids must be integers, not {dtype}")
    if shape is not None:
        if len(shape) == 2:
            if shape[0] != 1:
                raise ValueError(f"one prompt at a time: a batch of {shape[0]} was given")
            tokens = tokens[0]
        elif len(shape) != 1:
            raise ValueError(f"token ids must be 1-D or of shape (1, n), not {tuple(shape)}")
        return [int(t) for t in tokens.tolist()]
    if isinstance(tokens, (str, bytes)):
        raise TypeError("tokens must be token ids, not text: tokenize the prompt first")
    out = []
    for t in tokens:
        if isinstance(t, (bool, float)) or not hasattr(t, "__index__"):
            raise TypeError(f"token ids must be integers, not {type(t).__name__}")
        out.append(int(t))
    return out


def _layer_tensors(cache: Any) -> list[tuple[Any, Any]]:
    """The (keys, values) tensors of each layer of a transformers cache, of any version: a
    ``Cache`` with ``layers`` (4.56 on), one with ``key_cache``/``value_cache``, or the legacy
    tuple of tuples."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(kv[0], kv[1]) for kv in cache]


class PrefixCache:
    """Stores and restores a model's prompt KV through a NenCache :class:`~nencache.Client`.

    ``model`` is a transformers causal LM whose layers are all full attention (Llama, Qwen,
    Mistral without sliding windows, ...); one prompt at a time (batch size 1). Only whole
    chunks of ``chunk_size`` tokens are stored and loaded: a prompt's trailing partial chunk is
    always prefilled. ``fingerprint`` defaults to :func:`model_fingerprint`; ``ttl`` (seconds)
    is the stored chunks' time to live (the agent's default when ``None``).
    """

    def __init__(
        self,
        client: _native.Client,
        model: Any,
        *,
        chunk_size: int = _native.DEFAULT_CHUNK_SIZE,
        fingerprint: str | None = None,
        ttl: float | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.layout = KVLayout.of(model, chunk_size=chunk_size, fingerprint=fingerprint)
        if ttl is not None:
            seconds = ttl.total_seconds() if hasattr(ttl, "total_seconds") else ttl
            if not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
                raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        self.ttl = ttl
        limit = client.info["limits"]["max_value_len"] if client is not None else None
        if limit is not None and self.layout.chunk_bytes > limit:
            per_token = self.layout.chunk_bytes // self.layout.chunk_size
            raise ValueError(
                f"a chunk of {self.layout.chunk_size} tokens is {self.layout.chunk_bytes} bytes, "
                f"over the agent's largest value ({limit} bytes): use chunk_size <= "
                f"{limit // per_token}, or raise the agent's max_value"
            )
        self._metadata = self.layout.metadata()
        self._cache_arg = cache_argument(model)
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def keys(self, tokens: Any) -> list[bytes]:
        """The chunk keys of a prompt's whole chunks."""
        layout = self.layout
        return _native.chunk_keys(layout.fingerprint, _token_list(tokens), layout.chunk_size)

    def lookup(self, tokens: Any) -> int:
        """How many leading tokens of the prompt are cached (whole chunks); takes no lease."""
        keys = self.keys(tokens)
        n, _ = self.client.lookup(keys) if keys else (0, [])
        return n * self.layout.chunk_size

    def load(self, tokens: Any, *, max_tokens: int | None = None) -> Prefix:
        """Restores the longest cached prefix of the prompt, of at most ``max_tokens`` tokens
        (by default all but the last token, which must be prefilled to give logits; the last
        chunk loaded is cut short to that), into a new ``DynamicCache`` on the CPU. The
        chunks' bytes are copied once, from the agent's shared memory into the cache's
        tensors. Raises :class:`MetadataMismatch` if a chunk
        was stored for another layout (nothing is loaded then)."""
        torch = _torch()
        ids = _token_list(tokens)
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise TypeError(f"max_tokens must be an integer, not {type(max_tokens).__name__}")
        limit = len(ids) - 1 if max_tokens is None else min(max_tokens, len(ids))
        layout = self.layout
        if limit <= 0:
            return Prefix(0, None)
        # The chunks covering the first `limit` tokens: the last one may be cut short below.
        keys = _native.chunk_keys(layout.fingerprint, ids, layout.chunk_size)
        keys = keys[: -(-limit // layout.chunk_size)]
        if not keys:
            return Prefix(0, None)
        n, _ = self.client.lookup(keys)
        if n == 0:
            return Prefix(0, None)
        dtype = getattr(torch, layout.dtype)
        L, H, C, D = layout.layers, layout.kv_heads, layout.chunk_size, layout.head_dim
        with self.client.get(keys[:n]) as values:
            # A chunk evicted since the lookup ends the prefix there.
            present = next((i for i, v in enumerate(values) if v is None), len(values))
            if present == 0:
                return Prefix(0, None)
            for i, v in enumerate(values[:present]):
                layout.check(v.metadata, len(v), f"cached chunk {i} ({v.key.hex()})")
            with warnings.catch_warnings():
                # The views are read-only (the agent's memory): torch warns, nothing writes.
                warnings.simplefilter("ignore", UserWarning)
                chunks = [
                    torch.frombuffer(v, dtype=dtype).view(L, 2, H, C, D)
                    for v in values[:present]
                ]
            restored = min(present * C, limit)
            cache = self.cache_from_chunks(chunks, restored)
            del chunks
        return Prefix(restored, cache)

    def cache_from_chunks(self, chunks: list[Any], tokens: int) -> Any:
        """A ``DynamicCache`` of the first ``tokens`` tokens of these chunks (tensors of shape
        ``(layers, 2, kv_heads, chunk_size, head_dim)``): each layer's keys and values are
        copied once, from the chunks into one tensor, which the cache keeps as it is."""
        torch = _torch()
        layout = self.layout
        H, C, D = layout.kv_heads, layout.chunk_size, layout.head_dim
        dtype = getattr(torch, layout.dtype)
        shape = (layout.layers, 2, H, C, D)
        for i, c in enumerate(chunks):
            if tuple(c.shape) != shape or c.dtype != dtype:
                raise MetadataMismatch(
                    f"chunk {i} is {tuple(c.shape)} {c.dtype}, this layout's are {shape} {dtype}"
                )
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 < tokens <= len(chunks) * C:
            raise ValueError(f"tokens must be from 1 to {len(chunks) * C}, not {tokens!r}")
        layers = []
        for layer in range(layout.layers):
            kv = []
            for which in (0, 1):
                out = torch.empty((1, H, len(chunks) * C, D), dtype=dtype)
                torch.cat([c[layer, which] for c in chunks], dim=1, out=out[0])
                kv.append(out if tokens == len(chunks) * C else out[:, :, :tokens])
            layers.append(kv)
        return self._new_cache(layers)

    def _new_cache(self, layers: list[list[Any]]) -> Any:
        """A ``DynamicCache`` holding these (keys, values) tensors, without copying them."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers before 4.56
            cache = DynamicCache()
        slots = getattr(cache, "layers", None)
        for i, (k, v) in enumerate(layers):
            layer = slots[i] if slots is not None and i < len(slots) else None
            if layer is not None and hasattr(layer, "lazy_initialization"):
                # A plain DynamicLayer keeps `keys`/`values` and grows them by concatenation:
                # hand it the restored tensors as they are (`update` would copy them again).
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            else:
                cache.update(k, v, i)
        return cache

    def store(self, tokens: Any, cache: Any) -> int:
        """Stores the whole chunks of the prompt's KV in ``cache`` (holding at least those
        tokens, in order, as a forward pass over them leaves it) that the agent does not hold
        yet; answers how many chunks were stored. Raises :class:`MetadataMismatch` if the
        cache's shapes or dtype are not the model's."""
        torch = _torch()
        ids = _token_list(tokens)
        layout = self.layout
        L, H, C, D = layout.layers, layout.kv_heads, layout.chunk_size, layout.head_dim
        tensors = _layer_tensors(cache)
        if len(tensors) != L:
            raise MetadataMismatch(f"the cache has {len(tensors)} layers, the model {L}")
        k0 = tensors[0][0]
        if k0 is None:
            raise MetadataMismatch("the cache holds no tokens")
        seq = k0.shape[-2]
        keys = _native.chunk_keys(layout.fingerprint, ids[: min(len(ids), seq)], C)
        if not keys:
            return 0
        dtype = getattr(torch, layout.dtype)
        for i, (k, v) in enumerate(tensors):
            for t in (k, v):
                if tuple(t.shape[:2]) != (1, H) or t.shape[-1] != D or t.shape[-2] < len(keys) * C:
                    raise MetadataMismatch(
                        f"layer {i} of the cache has shape {tuple(t.shape)}, the model's is "
                        f"(1, {H}, >= {len(keys) * C}, {D})"
                    )
                if t.dtype != dtype:
                    raise MetadataMismatch(f"layer {i} of the cache is {t.dtype}, the model {dtype}")
        first, _ = self.client.lookup(keys)
        stored = 0
        for start in range(first, len(keys), _STORE_GROUP):
            group = keys[start : start + _STORE_GROUP]
            g = len(group)
            stage = torch.empty((g, L, 2, H, C, D), dtype=dtype)
            lo, hi = start * C, (start + g) * C
            for layer, (k, v) in enumerate(tensors):
                for which, t in enumerate((k, v)):
                    src = t[0, :, lo:hi].to("cpu").reshape(H, g, C, D).transpose(0, 1)
                    stage[:, layer, which].copy_(src)
            outcomes = self.client.put_many(
                [(key, stage[j]) for j, key in enumerate(group)],
                metadata=self._metadata,
                ttl=self.ttl,
            )
            stored += sum(o == "stored" for o in outcomes)
        return stored

    def prefill(
        self, input_ids: Any, *, store: bool = True, logits_to_keep: int = 1
    ) -> Prefill:
        """Prefills a prompt the fast way: restores its longest cached prefix
        (:meth:`load`), runs the model over the rest only, and (``store=True``) stores the
        prompt's whole chunks that were not cached. ``input_ids`` is a tensor of shape
        ``(1, n)`` or ``(n,)``; the logits are those of the last ``logits_to_keep`` tokens
        (0: all prefilled tokens)."""
        torch = _torch()
        ids = _token_list(input_ids)
        if not ids:
            raise ValueError("an empty prompt has nothing to prefill")
        prefix = self.load(ids)
        device = self.model.device
        if prefix.cache is not None and getattr(device, "type", "cpu") != "cpu":
            for layer in getattr(prefix.cache, "layers", []):
                layer.keys = layer.keys.to(device, non_blocking=True)
                layer.values = layer.values.to(device, non_blocking=True)
                layer.device = device
        rest = torch.tensor([ids[prefix.tokens :]], dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {"use_cache": True}
        if prefix.cache is not None:
            kwargs[self._cache_arg] = prefix.cache
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        with torch.no_grad():
            out = self.model(rest, **kwargs)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        logits = out.logits
        if not self._has_logits_to_keep and logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        stored = 0
        if store:
            try:
                stored = self.store(ids, cache)
            except ResourceExhausted as e:
                # The agent is full of leased or reserved values right now: the prefill
                # stands, its chunks are not cached this time.
                warnings.warn(f"nencache: prompt chunks not stored: {e}", RuntimeWarning, stacklevel=2)
        return Prefill(logits, cache, prefix.tokens, stored)


def cache_argument(model: Any) -> str:
    """The name of the forward argument that takes a cache: ``"cache"`` (transformers 5) or
    ``"past_key_values"`` (before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
