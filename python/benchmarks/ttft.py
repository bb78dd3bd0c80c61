"""Time to first token with a cached prompt prefix: a real model on the CPU, through the agent.

    python python/benchmarks/ttft.py [--prefixes 1000,2000,4000,8000] [--runs 3] [--plot FILE]

For each prefix length P (tokens of real text) followed by a short question (the suffix):

- **full prefill**: the model runs over prefix and suffix; the time until the first token's
  logits (and its argmax).
- **NenCache**: the prefix's KV is loaded from the agent (lookup, get, one copy from its shared
  memory into a ``DynamicCache``) and only the rest (the suffix and the prefix's last partial
  chunk) is prefilled.
- **bound**: the same, but the prefix's KV is copied from the process's own memory (the
  chunks as private tensors, already in RAM): the physical bound of loading it, plus the
  same prefill of the rest.
- **store**: putting the prefix's chunks into the agent (one copy out of the cache's tensors
  into chunk order, one into the agent's staging area), against the prefill it saves.

Each case runs ``--runs`` times after a warm-up; medians are reported. The agent is a
release build of this workspace, started on a temporary socket. Results are printed as a
Markdown table and written as JSON (``--json``) and a PNG plot (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid

import common


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefixes", default="1000,2000,4000,8000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a PNG plot here")
    args = ap.parse_args()
    prefixes = [int(p) for p in args.prefixes.split(",")]

    import torch

    import nencache
    from nencache.transformers import PrefixCache, cache_argument

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, model = common.load_model()
    suffix = tokenizer("\n\nQuestion: what does the agent do when a client crashes?\nAnswer:")
    suffix = suffix.input_ids
    text = common.text_tokens(tokenizer, max(prefixes))
    limit = model.config.max_position_embeddings
    if max(prefixes) + len(suffix) > limit:
        sys.exit(f"prefix and suffix exceed the model's {limit} positions")
    arg = cache_argument(model)

    def forward(ids, cache=None):
        kwargs = {"use_cache": True, "logits_to_keep": 1}
        if cache is not None:
            kwargs[arg] = cache
        with torch.no_grad():
            return model(torch.tensor([ids]), **kwargs)

    # Every prefix's KV at once, with the chunks of the largest: 8,000 tokens of float32 KV
    # of this model are 369 MB.
    bytes_per_token = 30 * 2 * 3 * 64 * 4
    capacity = (max(prefixes) + 2 * args.chunk_size) * bytes_per_token * 2
    rows = []
    with common.agent(f"{capacity >> 20}MiB") as (socket, _):
        client = nencache.Client(socket)
        pc = PrefixCache(
            client, model, chunk_size=args.chunk_size, fingerprint=f"bench-{uuid.uuid4()}"
        )
        # Warm-up: the first forward passes of a process are slower.
        warm = text[:300] + suffix
        forward(warm)
        pc.prefill(warm)
        pc.prefill(warm, store=False)

        for p in prefixes:
            prefix, prompt = text[:p], text[:p] + suffix
            print(f"prefix {p} tokens (+{len(suffix)} suffix)", file=sys.stderr, flush=True)

            full, full_out = [], None
            for _ in range(args.runs):
                t, full_out = common.timed(lambda: forward(prompt))
                full.append(t)
            first_full = int(full_out.logits[0, -1].argmax())

            # The prefix's own prefill: the work a stored prefix saves.
            prefill_prefix, out = common.timed(lambda: forward(prefix))
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            store = []
            keys = pc.keys(prefix)
            for _ in range(args.runs):
                client.delete(keys)
                client.flush_releases()
                t, stored = common.timed(lambda: pc.store(prefix, cache))
                assert stored == len(keys), (stored, len(keys))
                store.append(t)
            cached = len(keys) * args.chunk_size

            # The chunks as private tensors, as an in-process cache would hold them.
            with client.get(keys) as values:
                private = [
                    torch.frombuffer(bytearray(v), dtype=torch.float32).view(
                        30, 2, 3, args.chunk_size, 64
                    )
                    for v in values
                ]

            ours, ours_load, bound, bound_copy, first_ours, diff = [], [], [], [], None, 0.0
            for _ in range(args.runs):
                tl, restored = common.timed(lambda: pc.load(prompt))
                assert restored.tokens == cached, (restored.tokens, cached)
                tf, out = common.timed(lambda: forward(prompt[cached:], restored.cache))
                ours.append(tl + tf)
                ours_load.append(tl)
                first_ours = int(out.logits[0, -1].argmax())
                diff = max(diff, float((out.logits[0, -1] - full_out.logits[0, -1]).abs().max()))
                del restored, out

                tc, c = common.timed(lambda: pc.cache_from_chunks(private, cached))
                tf, out = common.timed(lambda: forward(prompt[cached:], c))
                bound.append(tc + tf)
                bound_copy.append(tc)
                del c, out

            row = {
                "prefix": p,
                "suffix": len(suffix),
                "cached": cached,
                "kv_bytes": cached * bytes_per_token,
                "full_s": common.median(full),
                "nencache_s": common.median(ours),
                "nencache_load_s": common.median(ours_load),
                "bound_s": common.median(bound),
                "bound_copy_s": common.median(bound_copy),
                "store_s": common.median(store),
                "prefix_prefill_s": prefill_prefix,
                "first_token_equal": first_ours == first_full,
                "max_logit_diff": diff,
                "runs": args.runs,
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del private, cache
        client.close()

    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


def table(rows: list[dict]) -> str:
    lines = [
        "| prefix tokens | from NenCache | full prefill | NenCache (load) | bound (copy) | "
        "full / NenCache | NenCache / bound | store | store / prefix prefill | "
        "same first token |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prefix']:,} | {r['cached']:,} | {r['full_s']:.3f} s | "
            f"{r['nencache_s']:.3f} s ({r['nencache_load_s']:.3f}) | "
            f"{r['bound_s']:.3f} s ({r['bound_copy_s']:.3f}) | "
            f"{r['full_s'] / r['nencache_s']:.1f}x | {r['nencache_s'] / r['bound_s']:.2f}x | "
            f"{r['store_s']:.3f} s | {r['store_s'] / r['prefix_prefill_s']:.3f} | "
            f"{'yes' if r['first_token_equal'] else 'NO'} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["prefix"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(x, [r["full_s"] for r in rows], "o-", label="full prefill")
    ax.plot(x, [r["nencache_s"] for r in rows], "s-", label="NenCache (prefix loaded)")
    ax.plot(x, [r["bound_s"] for r in rows], "^--", label="bound (prefix copied from RAM)")
    ax.set_xlabel("shared prefix (tokens) + short question")
    ax.set_ylabel("time to first token (s)")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v:,}" for v in x])
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("SmolLM2-135M on CPU (transformers, float32): median TTFT")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
