"""A real agent for the tests: the workspace's debug build of ``nencache-agent`` (or the
binary named by ``NENCACHE_AGENT_BIN``), started on a temporary socket with a 64 MiB host tier
and no lower tier (unless the test configures its own), and killed at teardown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import nencache

ROOT = Path(__file__).resolve().parents[2]


def agent_binary() -> Path:
    env = os.environ.get("NENCACHE_AGENT_BIN")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not target.is_absolute():
        target = ROOT / target
    return target / "debug" / "nencache-agent"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LISTENER = re.compile(r"protocol\W+(lm|redis)\W+addr\W+([0-9.]+):(\d+)")


class Agent:
    """One ``nencache-agent serve`` process on ``<dir>/agent.sock``; its log (standard
    error) goes to ``<dir>/agent.log``."""

    READY = "nencache agent serving"

    def __init__(self, directory: Path, *extra: str) -> None:
        self.dir = directory
        self.socket = directory / "agent.sock"
        self.log_path = directory / "agent.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        binary = agent_binary()
        if not binary.exists():
            pytest.fail(
                f"no agent binary at {binary}: build it with "
                "`cargo build -p nencache-agent --bin nencache-agent` or set NENCACHE_AGENT_BIN"
            )
        self.binary = binary

    def start(self) -> Agent:
        """Starts the agent and waits until it serves. The test's own ``--config``, tier or
        host-capacity arguments replace the defaults (no lower tier, 64 MiB)."""
        args = [str(self.binary), "serve", "--socket", str(self.socket)]
        args += ["--admin-addr", "127.0.0.1:0", *self.extra]
        own = set(self.extra)
        if not own & {"--config", "--nvme-size", "--nvme-path", "--disk-size", "--disk-path"}:
            args += ["--nvme-size", "0"]
        if not own & {"--config", "--host-capacity"}:
            args += ["--host-capacity", "64MiB"]
        env = dict(os.environ, XDG_DATA_HOME=str(self.dir / "data"))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
            )
        deadline = time.monotonic() + 30
        while self.READY not in self.log():
            if self.proc.poll() is not None:
                pytest.fail(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"agent not ready after 30 s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self, timeout: float = 20) -> float:
        """SIGTERM, a graceful stop; returns how long the agent took to exit."""
        assert self.proc is not None
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"agent still running {timeout} s after SIGTERM:\n{self.log()}")
        took = time.monotonic() - began
        assert code == 0, f"agent exited with {code} after SIGTERM:\n{self.log()}"
        self.proc = None
        return took

    def compat_port(self, protocol: str) -> int:
        """The port of the agent's ``protocol`` (``lm``, ``redis``) listener, from its log
        (text or JSON, with or without colours)."""
        text = _ANSI.sub("", self.log())
        found = [int(m[3]) for m in _LISTENER.finditer(text) if m[1] == protocol]
        assert found, f"no {protocol} listener in the agent's log:\n{self.log()}"
        return found[-1]

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory):
    """One agent shared by the tests that do not stop it."""
    a = Agent(tmp_path_factory.mktemp("agent")).start()
    yield a
    a.kill()


@pytest.fixture
def own_agent(tmp_path: Path):
    """An agent of the test's own, which it may kill and restart."""
    a = Agent(tmp_path).start()
    yield a
    a.kill()


@pytest.fixture
def client(agent: Agent):
    with nencache.Client(agent.socket) as c:
        yield c


@pytest.fixture
def unique(request: pytest.FixtureRequest):
    """Keys unique to the test, so tests sharing the agent do not see each other's values."""
    prefix = request.node.nodeid.encode()[-180:]

    def make(name: str | bytes) -> bytes:
        if isinstance(name, str):
            name = name.encode()
        return prefix + b"/" + name

    return make
