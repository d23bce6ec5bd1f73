"""ServerProcess: `loong serve --port 0 ...` started as a child process (for benchmarks,
tests and scripts), with its address once it printed its ready line.

Owns: starting the server in its own session (so a kill takes its instances with it),
collecting its output on a thread, finding its child processes, and stopping it (SIGTERM,
which drains, or SIGKILL to the whole group).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading

READY = re.compile(r"serving on (\S+:\d+)")
HTTP = re.compile(r"OpenAI API and console on (https?://\S+:\d+)")


class ServerProcess:
    def __init__(self, args: list[str], env: dict | None = None, timeout_s: float = 300.0,
                 cwd: str | None = None) -> None:
        """`args` without --http-port: the HTTP API is off (`http_url` None); with it, the
        URL it serves on (pick a free port with `free_port()`)."""
        if "--http-port" not in args:
            args = ["--http-port", "0", *args]
        cmd = [sys.executable, "-m", "loong.cli", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=cwd, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        self.lines: list[str] = []
        self.address: str | None = None
        self.http_url: str | None = None
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                m = READY.search(line)
                h = HTTP.search(line)
                if m and h and self.address is None:
                    self.http_url = h.group(1)
                if m and self.address is None:
                    self.address = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout_s) or self.address is None:
            self.kill()
            raise RuntimeError("loong serve did not become ready:\n" + "".join(self.lines[-40:]))

    @staticmethod
    def free_port() -> int:
        """A TCP port free on loopback now (for --http-port)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def output(self) -> str:
        return "".join(self.lines)

    def children(self) -> list[int]:
        """Pids of the server's child processes (its instances), from /proc."""
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
        """SIGTERM (the server drains, then exits); returns its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM, then SIGKILL to the group if it does not exit in time."""
        if self.proc.poll() is None:
            try:
                self.terminate(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
