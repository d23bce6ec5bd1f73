"""launch/serve_multinode.sh as users run it, on one CPU machine: the manager role starts
`loong serve --cluster-address`, the instances role starts torchrun, the instances join,
greedy answers equal the offline engine's, and SIGTERM to the manager ends every process."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from loong.client import LoongClient
from loong.engine.llm import LLM
from loong.sampling_params import SamplingParams
from tests.serve.conftest import ROOT

SCRIPT = os.path.join(ROOT, "launch", "serve_multinode.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(role: str, env: dict, *args: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(["bash", SCRIPT, *args], env={**env, "ROLE": role}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


@pytest.mark.skipif(sys.platform != "linux", reason="the launch script assumes Linux")
def test_multinode_script_on_one_cpu_machine(tiny_path):
    bindir = os.path.dirname(sys.executable)      # where pip put `loong` and `torchrun`
    port = _free_port()
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
               MANAGER_ADDR="127.0.0.1", MANAGER_BIND="127.0.0.1", MANAGER_PORT=str(_free_port()),
               MASTER_PORT=str(_free_port()), NNODES="1", NODE_RANK="0", GPUS_PER_NODE="2",
               LOONG_DEVICE="cpu", LOONG_PORT=str(port), LOONG_CLUSTER_KEY=os.urandom(16).hex(),
               OMP_NUM_THREADS="1")
    manager, mlines = _start("manager", env, "--model", tiny_path, "--dtype", "float32",
                             "--kv-capacity-tokens", "256", "--block-size", "4",
                             "--http-port", "0")
    instances, ilines = _start("instances", env)
    try:
        c = LoongClient(f"127.0.0.1:{port}")
        c.wait_ready(180)
        assert any(re.search(r"serving on 127\.0\.0\.1:\d+ \(2 instance", x) for x in mlines), \
            "".join(mlines[-20:])
        prompts = [[5, 6, 7, 8, 9], list(range(20, 60))]
        sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        want = [o.token_ids for o in LLM(tiny_path, dtype="float32", device="cpu")
                .generate(prompts, sp)]
        got = [c.generate(prompt_token_ids=p, max_tokens=8, temperature=0.0, ignore_eos=True)
               .token_ids for p in prompts]
        assert got == want
        stats = c.stats()
        assert [i["alive"] for i in stats["instances"]] == [True, True]
        c.close()
        manager.send_signal(signal.SIGTERM)
        assert manager.wait(60) == 0, "".join(mlines[-30:])
        # The instances see the manager's connection close and exit; so does torchrun.
        assert instances.wait(60) == 0, "".join(ilines[-30:])
    finally:
        for p in (manager, instances):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

