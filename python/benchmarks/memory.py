"""Node memory with N inference processes sharing one cached prompt prefix.

    python python/benchmarks/memory.py [--prefix 8000] [--processes 1,2,4,8]

The prefix's KV (real text through SmolLM2-135M-Instruct, float32: 8,000 tokens are 31 whole
chunks, 366 MB) is computed once. Then, for each N, N worker processes start, each of them
an inference process that has served a request with that prefix, in one of three setups:

- **nencache**: the KV is in one agent (host tier sized to hold it); each worker restored it
  from the agent's shared memory (``PrefixCache.load``) and keeps no copy of its own.
- **private**: each worker holds its own copy of the chunks in its memory, as an in-process
  cache does (LMCache's local CPU backend, for one), and restored from that.
- **none**: workers that import and set up the same, with no cache at all: what the processes
  cost without a cache, subtracted to give the cache's own share.

Workers import torch, transformers and nencache and build the model on torch's ``meta``
device (its weights, the same in every setup, are left out, so what is measured is the
cache). The restored ``DynamicCache`` (the transient copy a request makes, on a GPU node in
device memory) is dropped before measuring; ``MALLOC_MMAP_THRESHOLD_`` keeps freed tensors
from lingering in glibc's heap. Memory is PSS (proportional set size: a page mapped by k
processes counts 1/k in each) and USS (private pages) from ``/proc/<pid>/smaps_rollup``,
summed over every worker and, for ``nencache``, the agent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import common

CHUNK = 256
# The agent's staging area for puts: room for one chunk (11.8 MB) in flight.
STAGING = "16MiB"
# Freed tensors go back to the kernel at once, in every setup.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}


def smaps(pid: int) -> dict[str, int]:
    """Rss, Pss and USS (Private_Clean + Private_Dirty) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def worker(mode: str, workdir: Path, socket: str, fingerprint: str) -> None:
    """One inference process: sets up, restores the prefix (per mode), says `ready` on
    stdout, and waits for its standard input to close."""
    import numpy
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import nencache
    from nencache.transformers import PrefixCache

    config = LlamaConfig.from_json_file(workdir / "config.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ids = json.loads((workdir / "prompt.json").read_text())
    checksum = None
    private = None
    if mode == "nencache":
        client = nencache.Client(socket)
        pc = PrefixCache(client, model, chunk_size=CHUNK, fingerprint=fingerprint)
        restored = pc.load(ids)
        checksum = float(restored.cache.layers[-1].keys.sum())
        del restored
        client.flush_releases()
    elif mode == "private":
        pc = PrefixCache(None, model, chunk_size=CHUNK, fingerprint=fingerprint)
        # Read into private memory: the process's own copy, as an in-process cache holds it.
        data = torch.from_numpy(numpy.fromfile(workdir / "chunks.bin", dtype=numpy.uint8))
        per = pc.layout.chunk_bytes
        L, H, D = pc.layout.layers, pc.layout.kv_heads, pc.layout.head_dim
        private = [
            data[i * per : (i + 1) * per].view(torch.float32).view(L, 2, H, CHUNK, D)
            for i in range(data.numel() // per)
        ]
        restored = pc.cache_from_chunks(private, len(private) * CHUNK)
        checksum = float(restored.layers[-1].keys.sum())
        del restored
    print(json.dumps({"ready": True, "checksum": checksum}), flush=True)
    sys.stdin.read()
    del private


def measure(mode: str, n: int, workdir: Path, socket: str, fingerprint: str, agent_pid: int | None):
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", mode, str(workdir), socket, fingerprint],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, **WORKER_ENV),
            text=True,
        )
        for _ in range(n)
    ]
    try:
        checksums = [json.loads(p.stdout.readline())["checksum"] for p in procs]
        per = [smaps(p.pid) for p in procs]
        agent = smaps(agent_pid) if agent_pid else None
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(timeout=60)
    total = {k: sum(m[k] for m in per) + (agent[k] if agent else 0) for k in ("pss", "uss", "rss")}
    return {
        "mode": mode,
        "processes": n,
        "total_pss": total["pss"],
        "total_uss": total["uss"],
        "workers_pss": sum(m["pss"] for m in per),
        "agent_pss": agent["pss"] if agent else 0,
        "checksums": checksums,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefix", type=int, default=8000)
    ap.add_argument("--processes", default="1,2,4,8")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    counts = [int(n) for n in args.processes.split(",")]

    import torch

    import nencache
    from nencache.transformers import PrefixCache

    tokenizer, model = common.load_model()
    ids = common.text_tokens(tokenizer, args.prefix)
    fingerprint = f"bench-memory-{uuid.uuid4()}"
    chunks = args.prefix // CHUNK
    kv_bytes = chunks * 30 * 2 * 3 * CHUNK * 64 * 4
    # The host tier holds the prefix and 1 MiB to spare; staging needs room for one chunk.
    capacity = f"{(kv_bytes >> 20) + 2}MiB"
    rows = []
    with tempfile.TemporaryDirectory(prefix="nencache-memory-") as d, common.agent(
        capacity, "--staging-size", STAGING
    ) as (socket, agent_proc):
        workdir = Path(d)
        model.config.to_json_file(workdir / "config.json")
        (workdir / "prompt.json").write_text(json.dumps(ids))
        client = nencache.Client(socket)
        pc = PrefixCache(client, model, chunk_size=CHUNK, fingerprint=fingerprint)
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        assert pc.store(ids, cache) == chunks
        with client.get(pc.keys(ids)) as values, open(workdir / "chunks.bin", "wb") as f:
            for v in values:
                f.write(memoryview(v))
        client.close()
        del model, cache, out
        for n in counts:
            for mode in ("none", "private", "nencache"):
                row = measure(
                    mode, n, workdir, str(socket), fingerprint,
                    agent_proc.pid if mode == "nencache" else None,
                )
                sums = {c for c in row.pop("checksums") if c is not None}
                assert len(sums) <= 1, f"workers restored different bytes: {sums}"
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    print(f"prefix {args.prefix} tokens: {chunks} chunks, {kv_bytes / 1e6:.0f} MB of KV; "
          f"agent host tier {capacity}, staging {STAGING}\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"prefix": args.prefix, "kv_bytes": kv_bytes, "rows": rows}, f, indent=1)


def table(rows: list[dict]) -> str:
    by = {(r["mode"], r["processes"]): r for r in rows}
    mb = 1e6
    lines = [
        "| processes | no cache (PSS) | private copies (PSS) | NenCache (PSS, agent incl.) | "
        "NenCache / private | cache share: private | cache share: NenCache | "
        "cache share ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted({r["processes"] for r in rows}):
        none, priv, ours = by[("none", n)], by[("private", n)], by[("nencache", n)]
        share_p = priv["total_pss"] - none["total_pss"]
        share_o = ours["total_pss"] - none["total_pss"]
        lines.append(
            f"| {n} | {none['total_pss'] / mb:,.0f} MB | {priv['total_pss'] / mb:,.0f} MB | "
            f"{ours['total_pss'] / mb:,.0f} MB | {ours['total_pss'] / priv['total_pss']:.2f} | "
            f"{share_p / mb:,.0f} MB | {share_o / mb:,.0f} MB | {share_o / share_p:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
