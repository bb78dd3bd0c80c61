"""LMCache's own remote connectors against the servers they talk to, in the same run:
LMCache's ``lm://`` connector against LMCache's cache server (``python -m lmcache.v1.server
HOST PORT cpu``) and against the NenCache agent's ``lm://`` listener, and LMCache's Redis
connector against ``redis-server`` and against the agent's Redis listener.

Each case puts then gets ``--chunks`` chunks of a Llama-3.1-8B shape (32 layers, 8 KV heads
of 128, 256 tokens, bf16: 32 MiB each; 512 MiB in all by default, more than any last-level
cache) through the connector as LMCache's ``RemoteBackend`` creates it (engine
configuration, ``LocalCPUBackend``, an asyncio loop, ``CreateConnector``). Puts are timed up
to an ``exists`` of the last chunk answered after them; gets copy each chunk into a memory
object of LMCache's CPU backend, as a retrieve does. Servers take turns, ``--rounds`` times;
the best round of each is printed. It measures; it asserts nothing about speed.

    pip install -r python/tests/lmcache-requirements.txt
    cargo build --release -p nencache-agent
    python python/benchmarks/lmcache_remote.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.connector import CreateConnector
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

ROOT = Path(__file__).resolve().parents[2]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LAYERS, HEADS, HEAD, TOKENS = 32, 8, 128, 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"{what} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                sys.exit(f"{what} did not listen on {port} within 60 s")
            time.sleep(0.05)


class Connector:
    """One LMCache remote connector set up as LMCache's RemoteBackend sets it up."""

    def __init__(self, url: str, buffer_gb: float) -> None:
        self.url = url
        self.config = LMCacheEngineConfig.from_defaults(
            chunk_size=TOKENS, remote_url=url, remote_serde="naive", max_local_cpu_size=buffer_gb
        )
        self.md = LMCacheMetadata(
            model_name=MODEL,
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.bfloat16,
            kv_shape=(LAYERS, 2, TOKENS, HEADS, HEAD),
        )
        self.backend = LocalCPUBackend(self.config, self.md, dst_device="cpu")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.conn = CreateConnector(url, self.loop, self.backend, self.config, self.md)

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def chunk(self, seed: int):
        obj = self.backend.allocate(
            torch.Size([2, LAYERS, TOKENS, HEADS * HEAD]), torch.bfloat16, MemoryFormat.KV_2LTD
        )
        assert obj is not None, "LMCache's CPU buffer is full"
        obj.tensor.fill_(seed % 100)
        return obj

    def close(self) -> None:
        inner = self.conn.getWrappedConnector()
        try:
            if self.url.startswith("redis"):
                # RedisConnector.close() blocks its own loop in LMCache 0.5.6.
                self.run(inner.pq_executor.shutdown_async(wait=True), timeout=10)
                self.run(inner.connection.aclose(), timeout=10)
            else:
                self.run(self.conn.close(), timeout=10)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.backend.close()


def one_round(c: Connector, chunks: int, round_no: int) -> tuple[float, float]:
    """GB/s of puts then gets of ``chunks`` chunks."""
    keys = [
        CacheEngineKey(MODEL, 1, 0, (round_no << 20) + i + 1, torch.bfloat16)
        for i in range(chunks)
    ]
    objs = [c.chunk(round_no * chunks + i) for i in range(chunks)]
    size = objs[0].get_size()

    async def put_all():
        for k, o in zip(keys, objs):
            await c.conn.put(k, o)
        # Requests are answered in order: this exists is answered after the puts are read.
        assert await c.conn.exists(keys[-1])

    t = time.perf_counter()
    c.run(put_all())
    put = chunks * size / (time.perf_counter() - t) / 1e9

    async def get_all():
        for k in keys:
            got = await c.conn.get(k)
            assert got is not None and got.get_size() == size, f"{k} not found"
            got.ref_count_down()

    t = time.perf_counter()
    c.run(get_all())
    get = chunks * size / (time.perf_counter() - t) / 1e9
    return put, get


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=16, help="32 MiB chunks per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--agent", default=os.environ.get("NENCACHE_AGENT_BIN"))
    p.add_argument("--no-redis", action="store_true")
    args = p.parse_args()
    agent_bin = Path(args.agent or ROOT / "target" / "release" / "nencache-agent")
    if not agent_bin.exists():
        sys.exit(f"no agent at {agent_bin}: cargo build --release -p nencache-agent")
    chunk_mib = 2 * LAYERS * TOKENS * HEADS * HEAD * 2 >> 20
    buffer_gb = (2 * args.chunks * chunk_mib + 256) / 1024

    procs: list[subprocess.Popen] = []
    tmp = tempfile.mkdtemp(prefix="nencache-lmbench-")
    try:
        lm_port, agent_lm, agent_redis, redis_port = (free_port() for _ in range(4))
        lmserver = subprocess.Popen(
            [sys.executable, "-m", "lmcache.v1.server", "127.0.0.1", str(lm_port), "cpu"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(lmserver)
        agent = subprocess.Popen(
            [str(agent_bin), "serve", "--socket", f"{tmp}/agent.sock", "--admin-addr", "off"]
            + ["--log-level", "warn", "--host-capacity", "3GiB", "--staging-size", "512MiB"]
            + ["--max-value", "64MiB", "--nvme-size", "0"]
            + ["--lm-tcp", f"127.0.0.1:{agent_lm}", "--redis-tcp", f"127.0.0.1:{agent_redis}"]
        )
        procs.append(agent)
        servers = [
            ("LMCache server", f"lm://127.0.0.1:{lm_port}", lmserver, lm_port),
            ("NenCache agent", f"lm://127.0.0.1:{agent_lm}", agent, agent_lm),
        ]
        if not args.no_redis and shutil.which("redis-server"):
            redis = subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"]
                + ["--save", "", "--appendonly", "no", "--maxmemory", "4gb"],
                stdout=subprocess.DEVNULL,
            )
            procs.append(redis)
            servers += [
                ("redis-server", f"redis://127.0.0.1:{redis_port}", redis, redis_port),
                ("NenCache agent", f"redis://127.0.0.1:{agent_redis}", agent, agent_redis),
            ]
        for name, _, proc, port in servers:
            wait_port(port, proc, name)
        conns = [Connector(url, buffer_gb) for _, url, _, _ in servers]
        best = [[0.0, 0.0] for _ in servers]
        for r in range(args.rounds):
            for i, c in enumerate(conns):
                put, get = one_round(c, args.chunks, r * len(conns) + i)
                best[i] = [max(best[i][0], put), max(best[i][1], get)]
        for c in conns:
            c.close()
        print(
            f"# LMCache {LAYERS}-layer bf16 chunks of {chunk_mib} MiB, {args.chunks} per round, "
            f"best of {args.rounds} rounds (GB/s)\n"
        )
        print("| connector | server | PUT GB/s | GET GB/s | PUT vs reference | GET vs reference |")
        print("|---|---|---|---|---|---|")
        for i, (name, url, _, _) in enumerate(servers):
            ref = best[i - 1] if name == "NenCache agent" else best[i]
            print(
                f"| {url.split(':')[0]} | {name} | {best[i][0]:.2f} | {best[i][1]:.2f} "
                f"| {best[i][0] / ref[0]:.2f}x | {best[i][1] / ref[1]:.2f}x |"
            )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
