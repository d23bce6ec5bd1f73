"""Fixtures of the serving tier: a tiny in-process engine for EngineLoop tests, and real
`loong serve` processes on loopback for the end-to-end tests."""
import os
import sys
import time
from contextlib import contextmanager


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from loong.tools.server_process import ServerProcess as _ServerProcess  # noqa: E402


def make_engine(path, **kw):
    from loong.config import EngineConfig
    from loong.engine.llm_engine import LLMEngine
    args = dict(model=path, dtype="float32", device="cpu", kv_capacity_tokens=4096)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


class ServerProcess(_ServerProcess):
    """`loong serve` on loopback for tests: fp32 unless told otherwise, run from the repo."""

    def __init__(self, *args: str, env: dict | None = None, timeout_s: float = 240.0) -> None:
        super().__init__(["--dtype", "float32", *args], env=env, timeout_s=timeout_s, cwd=ROOT)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def wait_until(cond, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def ready_client(server: ServerProcess):
    """A LoongClient on the server, once its health check passes."""
    from loong.client import LoongClient
    with LoongClient(server.address, timeout=120) as c:
        c.wait_ready(60)
        yield c


def idle_and_empty(client) -> bool:
    """Every call received has ended, nothing runs or waits, no KV block is in use."""
    st = client.stats()
    return (st["running"] == 0 and st["waiting"] == 0
            and st["received"] == st["finished"] + sum(st["rejections"].values())
            and all(g["blocks_used"] == 0 for g in st["instances"]))


def request_kv(engine) -> dict:
    """KV held by requests on the in-process instance (request -> tokens); {} when every
    block is free or cached (prefix caching keeps finished requests' full blocks)."""
    assert engine.executor.inspect(0, "integrity") is None
    return engine.executor.inspect(0, "shards")[0]
