"""Content-defined chunk keys: the documented test vector, and their properties."""

from __future__ import annotations

import array

import numpy as np
import pytest

import nencache

FINGERPRINT = "meta-llama/Llama-3.1-8B-Instruct@bf16@tp1"
# docs/ARCHITECTURE.md, "Chunk keys".
TEST_VECTOR = [
    "7bf48e955563851ff62448eb75c5bb39",
    "ff275e300355d8308a0dbd3159f2edd6",
]


def test_the_published_test_vector():
    keys = nencache.chunk_keys(FINGERPRINT, list(range(600)), 256)
    assert [k.hex() for k in keys] == TEST_VECTOR
    assert nencache.DEFAULT_CHUNK_SIZE == 256
    assert nencache.chunk_keys(FINGERPRINT, range(600)) == keys


def test_token_arrays_give_the_same_keys():
    want = nencache.chunk_keys(FINGERPRINT, list(range(600)))
    for dtype in [np.int32, np.int64, np.uint32, np.uint64, np.uint16]:
        assert nencache.chunk_keys(FINGERPRINT, np.arange(600, dtype=dtype)) == want, dtype
    assert nencache.chunk_keys(FINGERPRINT, array.array("I", range(600))) == want
    assert nencache.chunk_keys(FINGERPRINT, tuple(range(600))) == want
    # A non-contiguous array goes through the sequence path.
    assert nencache.chunk_keys(FINGERPRINT, np.arange(1200, dtype=np.int64)[::2] // 2) == want


def test_partial_chunks_and_prefix_sharing():
    a = list(range(700))
    b = a[:512] + [9] * 188
    ka, kb = nencache.chunk_keys("m", a, 256), nencache.chunk_keys("m", b, 256)
    assert len(ka) == 2 and ka == kb
    pa = nencache.chunk_keys("m", a, 256, partial=True)
    assert len(pa) == 3 and pa[:2] == ka
    assert nencache.chunk_keys("m", b, 256, partial=True)[2] != pa[2]
    assert nencache.chunk_keys("other", a, 256) != ka
    assert all(isinstance(k, bytes) and len(k) == 16 for k in pa)
    assert nencache.chunk_keys("m", [], 256) == []


def test_bad_tokens_and_chunk_sizes_are_refused():
    for size in (0, -1, -(1 << 70)):
        with pytest.raises(nencache.InvalidArgument, match="chunk_size") as e:
            nencache.chunk_keys("m", [1, 2], size)
        assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(nencache.InvalidArgument, match="token"):
        nencache.chunk_keys("m", [-1], 1)
    with pytest.raises(nencache.InvalidArgument, match="token"):
        nencache.chunk_keys("m", np.array([1 << 33], np.int64), 1)
    with pytest.raises(nencache.InvalidArgument, match="token"):
        nencache.chunk_keys("m", np.array([-5], np.int32), 1)
    with pytest.raises(TypeError):
        nencache.chunk_keys("m", "abc", 1)
    with pytest.raises(TypeError):
        nencache.chunk_keys("m", [1.5], 1)
    with pytest.raises(TypeError):
        nencache.chunk_keys("m", 5, 1)
    with pytest.raises(TypeError):
        nencache.chunk_keys("m", np.array(5), 1)
    with pytest.raises(TypeError, match="chunk_size"):
        nencache.chunk_keys("m", [1], 2.0)
