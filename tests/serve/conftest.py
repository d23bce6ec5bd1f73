"""Fixtures of the serving tier: a tiny in-process engine for EngineLoop tests, and real
`loong serve` processes on loopback for the end-to-end tests."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.helpers_models import write_tiny_hf_checkpoint  # noqa: E402

READY = re.compile(r"serving on (\S+:\d+)")


@pytest.fixture(scope="session")
def tiny_serve_path(tmp_path_factory):
    return str(write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_serve"), tokenizer="bytes",
                                        max_position_embeddings=4096, seed=5))


def make_engine(path, **kw):
    from loong.config import EngineConfig
    from loong.engine.llm_engine import LLMEngine
    args = dict(model=path, dtype="float32", device="cpu", kv_capacity_tokens=4096)
    args.update(kw)
    return LLMEngine(EngineConfig(**args))


class ServerProcess:
    """`loong serve` in a child process; `.address` once it printed its ready line."""

    def __init__(self, *args: str, env: dict | None = None, timeout_s: float = 240.0) -> None:
        cmd = [sys.executable, "-m", "loong.cli", "serve", "--port", "0", "--dtype", "float32",
               *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        self.lines: list[str] = []
        self.address: str | None = None
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                m = READY.search(line)
                if m and self.address is None:
                    self.address = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout_s) or self.address is None:
            self.kill()
            raise RuntimeError("loong serve did not become ready:\n" + "".join(self.lines))

    def output(self) -> str:
        return "".join(self.lines)

    def children(self) -> list[int]:
        """Pids of the server's child processes (its instances)."""
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid:      # the parent pid
                    out.append(int(name))
        return out

    def terminate(self, timeout_s: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


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
