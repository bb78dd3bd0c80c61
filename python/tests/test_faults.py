"""Bad input and faults: each is refused with a clear exception, never a crash."""

from __future__ import annotations

import socket as sock
import threading
import time

import numpy as np
import pytest

import nencache


def test_values_without_the_buffer_protocol_are_refused(client, unique):
    for bad in ["text", 42, 1.5, [1, 2, 3], {"a": 1}, None, object()]:
        with pytest.raises(TypeError, match="buffer protocol"):
            client.put(unique("k"), bad)
    with pytest.raises(TypeError, match="buffer protocol"):
        client.put_many([(unique("k"), "text")])
    assert client.get([unique("k")]) == [None]


def test_non_contiguous_arrays_are_refused(client, unique):
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    for bad in [a[:, ::2], a.T, a[::2]]:
        with pytest.raises(BufferError, match="not C-contiguous"):
            client.put(unique("k"), bad)
    with pytest.raises(BufferError, match="ascontiguousarray"):
        client.put_many({unique("k"): a.T})
    assert client.get([unique("k")]) == [None]
    # A contiguous copy is fine.
    assert client.put(unique("k"), np.ascontiguousarray(a.T)) == "stored"


def test_zero_dimensional_arrays_are_refused_clearly(client, unique):
    with pytest.raises(BufferError, match=r"zero-dimensional.*reshape\(1\)"):
        client.put(unique("k"), np.array(5.0, dtype=np.float32))
    assert client.get([unique("k")]) == [None]
    assert client.put(unique("k"), np.array(5.0, dtype=np.float32).reshape(1)) == "stored"


def test_bad_keys_are_refused(client):
    with pytest.raises(nencache.InvalidArgument) as e:
        client.put(b"k" * 257, b"v")
    assert e.value.code == "INVALID_ARGUMENT"
    assert "257" in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, nencache.Error)
    with pytest.raises(nencache.InvalidArgument):
        client.get([b"k" * 257])
    with pytest.raises(nencache.InvalidArgument):
        client.lookup([b""])
    with pytest.raises(nencache.InvalidArgument):
        client.delete([b"x" * 300])
    # 256 bytes is the limit, inclusive.
    assert client.put(b"\xff" * 256, b"v") in ("stored", "exists")
    for bad in [42, None, 1.0]:
        with pytest.raises(TypeError, match="key"):
            client.put(bad, b"v")
    # A single key where a batch is expected would be iterated byte by byte: refused.
    with pytest.raises(TypeError, match=r"\[key\]"):
        client.get(b"key")
    with pytest.raises(TypeError, match=r"\[key\]"):
        client.lookup("key")
    with pytest.raises(TypeError, match=r"\[key\]"):
        client.delete(bytearray(b"key"))
    with pytest.raises(TypeError, match=r"\[key\]"):
        client.get(memoryview(b"key"))
    with pytest.raises(TypeError):
        client.get(42)


def test_a_value_over_the_agents_maximum_is_refused(client, unique):
    limit = client.info["limits"]["max_value_len"]
    with pytest.raises(nencache.InvalidArgument, match=str(limit)) as e:
        client.put(unique("big"), np.zeros(limit + 1, np.uint8))
    assert e.value.code == "INVALID_ARGUMENT"
    assert client.get([unique("big")]) == [None]


def test_metadata_and_ttl_are_checked(client, unique):
    with pytest.raises(nencache.InvalidArgument):
        client.put(unique("m"), b"v", metadata=b"m" * 5000)
    with pytest.raises(TypeError, match="metadata"):
        client.put(unique("m"), b"v", metadata="text")
    for bad in [0, -1, float("nan"), float("inf")]:
        with pytest.raises(nencache.InvalidArgument, match="ttl"):
            client.put(unique("m"), b"v", ttl=bad)
    with pytest.raises(TypeError, match="ttl"):
        client.put(unique("m"), b"v", ttl="10s")


def test_put_many_items_must_be_pairs_or_triples(client, unique):
    with pytest.raises(TypeError, match="tuple"):
        client.put_many([unique("k")])
    with pytest.raises(TypeError, match="tuple"):
        client.put_many([(unique("k"), b"v", b"m", b"extra")])
    with pytest.raises(TypeError, match="put_many"):
        client.put_many(42)


def test_a_full_arena_is_resource_exhausted(own_agent):
    with nencache.Client(own_agent.socket) as c:
        size = c.info["limits"]["max_value_len"]
        held = []
        n = 0
        with pytest.raises(nencache.ResourceExhausted) as e:
            while n < 64:
                k = f"big{n}".encode()
                c.put(k, np.full(size, n, np.uint8))
                held.append(c.get([k]))  # leased: cannot be evicted
                n += 1
        assert e.value.code == "RESOURCE_EXHAUSTED"
        assert nencache.NoSpace is nencache.ResourceExhausted
        assert n >= 2
        for values in held:
            values.release()
        c.flush_releases()
        # With the leases returned, eviction makes room again.
        assert c.put(b"after", np.zeros(size, np.uint8)) == "stored"


def test_a_get_over_the_sessions_lease_quota_takes_none(tmp_path):
    from conftest import Agent

    config = tmp_path / "agent.yaml"
    config.write_text("limits:\n  max_leases_per_session: 4\n")
    agent = Agent(tmp_path, "--config", str(config)).start()
    try:
        with nencache.Client(agent.socket) as c:
            assert c.info["limits"]["max_leases_per_session"] == 4
            keys = [f"q{i}".encode() for i in range(5)]
            c.put_many({k: k for k in keys})
            with pytest.raises(nencache.ResourceExhausted) as e:
                c.get(keys)
            assert e.value.code == "RESOURCE_EXHAUSTED"
            # Nothing was taken: the quota is whole for a get in parts.
            with c.get(keys[:4]) as values:
                assert [bytes(v) for v in values] == keys[:4]
                with pytest.raises(nencache.ResourceExhausted):
                    c.get(keys[4:])
            c.flush_releases()
            with c.get(keys[4:]) as (v,):
                assert bytes(v) == keys[4]
    finally:
        agent.kill()


def test_no_agent_is_a_connection_error_naming_the_socket(tmp_path):
    path = tmp_path / "nobody.sock"
    with pytest.raises(nencache.ConnectionError) as e:
        nencache.Client(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, ConnectionError)  # the builtin, too
    # A socket file with nothing listening behind it (an agent that died).
    stale = tmp_path / "stale.sock"
    s = sock.socket(sock.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(nencache.ConnectionError, match="stale.sock"):
        nencache.Client(stale)


def test_an_agent_killed_and_restarted_mid_session(own_agent):
    with nencache.Client(own_agent.socket) as c:
        c.put(b"before", b"old session")
        old_session = c.session
        kept = c.get([b"before"])
        own_agent.kill()
        # While no agent runs: a clear error naming the socket, every time.
        for _ in range(2):
            with pytest.raises(nencache.ConnectionError) as e:
                c.lookup([b"before"])
        assert str(own_agent.socket) in str(e.value) or isinstance(e.value, nencache.Disconnected)
        own_agent.start()
        # The next call reconnects (the host tier did not survive: the value is gone).
        assert c.lookup([b"before"]) == (0, [])
        assert c.session != old_session
        assert c.put(b"after", b"new session") == "stored"
        with c.get([b"after"]) as (v,):
            assert bytes(v) == b"new session"
        # A value of the old session stays readable: it maps the old region.
        with kept:
            assert bytes(kept[0]) == b"old session"


def test_an_agent_restarted_between_calls_is_reconnected_transparently(own_agent):
    with nencache.Client(own_agent.socket) as c:
        c.put(b"k", b"v")
        own_agent.restart()
        # The dead session is noticed; a lookup or put retries on a new session or fails
        # once with Disconnected, then works.
        for attempt in range(2):
            try:
                assert c.put(b"k2", b"v2") == "stored"
                break
            except nencache.Disconnected:
                assert attempt == 0
        with c.get([b"k2"]) as (v,):
            assert bytes(v) == b"v2"


def test_threads_calling_while_the_agent_is_killed_and_restarted(own_agent):
    """Calls in flight when the agent dies fail with a ConnectionError (never anything else,
    never a crash), and every thread goes on once the agent is back."""
    errors: list[BaseException] = []
    ok_after = [0] * 4
    phase = {"restarted": False}
    stop = threading.Event()

    with nencache.Client(own_agent.socket) as c:

        def work(t: int) -> None:
            data = np.full(1 << 20, t, np.uint8)
            i = 0
            while not stop.is_set():
                i += 1
                k = f"{t}/{i}".encode()
                try:
                    c.put(k, data)
                    with c.get([k]) as (v,):
                        assert v is None or np.array_equal(np.frombuffer(v, np.uint8), data)
                    if phase["restarted"]:
                        ok_after[t] += 1
                except nencache.ConnectionError:
                    time.sleep(0.005)
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    return

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        own_agent.kill()
        time.sleep(0.2)
        own_agent.start()
        phase["restarted"] = True
        deadline = time.monotonic() + 30
        while min(ok_after) < 5 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:3]
    assert min(ok_after) >= 5, ok_after


def test_many_threads_share_one_client(client, unique):
    errors = []
    n_threads, n_ops = 8, 150

    def work(t: int) -> None:
        try:
            rng = np.random.default_rng(t)
            for i in range(n_ops):
                k = unique(f"t{t}/{i}")
                data = rng.integers(0, 255, size=int(rng.integers(1, 20000)), dtype=np.uint8)
                assert client.put(k, data) == "stored"
                with client.get([k]) as (v,):
                    assert np.array_equal(np.frombuffer(v, np.uint8), data)
                assert client.lookup([k])[0] == 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads)
    assert time.monotonic() - start < 120


def test_a_client_cannot_be_used_after_fork(client):
    import os

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            client.lookup([b"k"])
        except nencache.Error as e:
            code = 0 if "fork" in str(e) else 2
        except BaseException:
            code = 3
        try:
            # A new client in the child works.
            with nencache.Client(client.socket) as c:
                if c.lookup([b"k"])[0] not in (0, 1):
                    code = 4
        except BaseException:
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def silent_socket(tmp_path):
    """A socket that accepts connections and never answers: a hung agent."""
    path = tmp_path / "hung.sock"
    s = sock.socket(sock.AF_UNIX)
    s.bind(str(path))
    s.listen(16)
    yield path
    s.close()


def test_a_hung_agent_times_out_with_a_timeout(silent_socket):
    start = time.monotonic()
    with pytest.raises(nencache.Timeout, match="hung.sock") as e:
        nencache.Client(silent_socket, timeout=0.3)
    assert isinstance(e.value, TimeoutError)
    assert 0.25 < time.monotonic() - start < 10
    with pytest.raises(nencache.InvalidArgument, match="timeout"):
        nencache.Client(silent_socket, timeout=0)


def test_a_client_with_a_timeout_works_as_usual(unique, agent):
    with nencache.Client(agent.socket, timeout=30) as c:
        assert c.timeout == 30
        assert c.put(unique("k"), b"v") == "stored"
        with c.get([unique("k")]) as (v,):
            assert bytes(v) == b"v"


def test_calls_release_the_gil_while_they_wait(silent_socket):
    """Four threads wait on a hung agent at once: with the GIL released they overlap (about
    one timeout in all), where holding it would serialise them (four timeouts)."""
    timeout = 0.5
    outcomes: list[str] = []

    def call() -> None:
        try:
            nencache.Client(silent_socket, timeout=timeout)
            outcomes.append("connected")
        except nencache.Timeout:
            outcomes.append("timeout")

    threads = [threading.Thread(target=call) for _ in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    elapsed = time.monotonic() - start
    assert outcomes == ["timeout"] * 4
    assert elapsed < 2.5 * timeout, elapsed


def test_ctrl_c_interrupts_a_waiting_call(silent_socket):
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            nencache.Client(silent_socket)
        assert time.monotonic() - start < 10
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
