"""Local instances start as `python -m loong.cluster.instance_main` subprocesses.

- A script without a main guard that builds `LLM(path, instances=2)` works run as a file
  and read from standard input, and serves the in-process engine's greedy tokens.
- The instances are direct children of the caller with this checkout first on their
  PYTHONPATH, the cluster key in their environment and not on their command line; once the
  cluster is up neither they nor the caller hold the model handoff (no mapping, no open
  file), and no instance outlives close() or the script.
- The handoff leaves no file in /dev/shm once the cluster is up, whether it is handed over
  as an inherited descriptor (Linux) or by name; a failed startup leaves no file and no
  process behind.
- The handoff round-trips the model config and the weights (aliased tensors included).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from loong import LLM, SamplingParams
from loong.cluster import handoff, launch
from loong.cluster.errors import ClusterError
from tests.dist.conftest import ROOT

PROMPTS = [[10 + i % 200 for i in range(40)], [7, 8, 9]]
OPTS = dict(dtype="float32", device="cpu", kv_capacity_tokens=256)
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

SCRIPT = """\
import json, os, sys
sys.path.insert(0, {root!r})
from loong import LLM, SamplingParams


def holds_handoff(pid):
    with open(f"/proc/{{pid}}/maps") as f:
        held = [f.read()]
    for fd in os.listdir(f"/proc/{{pid}}/fd"):
        try:
            held.append(os.readlink(f"/proc/{{pid}}/fd/{{fd}}"))
        except OSError:
            pass
    return any({prefix!r} in x for x in held)


llm = LLM({path!r}, instances=2, instance_threads=1, **{opts!r})
me_holds = holds_handoff(os.getpid())
procs = [i.process for i in llm.engine.executor.instances]
seen = []
for p in procs:
    with open(f"/proc/{{p.pid}}/cmdline", "rb") as f:
        argv = f.read().decode().split("\\0")
    with open(f"/proc/{{p.pid}}/environ", "rb") as f:
        env = dict(x.split("=", 1) for x in f.read().decode().split("\\0") if "=" in x)
    with open(f"/proc/{{p.pid}}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    seen.append(dict(pid=p.pid, ppid=ppid, argv=argv, env_path=env.get("PYTHONPATH", ""),
                     key=env.get("LOONG_CLUSTER_KEY", ""), holds=holds_handoff(p.pid)))
sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
ids = [o.token_ids for o in llm.generate({prompts!r}, sp)]
llm.close()
print("RESULT " + json.dumps(dict(ids=ids, seen=seen, me=os.getpid(),
                                  me_holds=me_holds,
                                  running=[p.exitcode is None for p in procs])))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_script(path, how: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # only sys.path knows
    env["OMP_NUM_THREADS"] = "1"
    run = dict(cwd=os.path.dirname(path), env=env, timeout=300, capture_output=True, text=True)
    if how == "file":
        res = subprocess.run([sys.executable, str(path)], **run)
    else:
        with open(path) as f:
            res = subprocess.run([sys.executable, "-"], stdin=f, **run)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@linux_only
@pytest.mark.parametrize("how", ["file", "stdin"])
def test_script_without_main_guard(tiny_path, tmp_path, how):
    want = [o.token_ids for o in LLM(tiny_path, **OPTS).generate(
        PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
    script = tmp_path / "no_guard.py"
    script.write_text(SCRIPT.format(root=ROOT, path=tiny_path, opts=OPTS, prompts=PROMPTS,
                                    prefix=handoff.PREFIX))
    got = _run_script(script, how)
    assert got["ids"] == want
    assert got["running"] == [False, False] and not got["me_holds"]
    for inst in got["seen"]:
        argv = inst["argv"]
        assert argv[argv.index("-m") + 1] == "loong.cluster.instance_main"
        assert argv[argv.index("--weights") + 1].startswith("/proc/self/fd/")
        assert inst["ppid"] == got["me"] and not inst["holds"]
        assert inst["env_path"].split(os.pathsep)[0] == ROOT
        assert len(inst["key"]) == 32 and not any(inst["key"] in a for a in argv)
        assert not _alive(inst["pid"])


@pytest.mark.parametrize("by_name", [False, True])
def test_no_handoff_file_is_left_once_up(tiny_loaded, tiny_path, tmp_path, monkeypatch,
                                         by_name):
    monkeypatch.setattr(handoff, "SHM_DIR", str(tmp_path))
    if by_name:                        # as where there is no /proc/self/fd
        monkeypatch.setattr(handoff, "FD_DIR", str(tmp_path / "no-such-dir"))
    with LLM(tiny_path, loaded=tiny_loaded, instances=2, instance_threads=1, **OPTS) as llm:
        assert os.listdir(tmp_path) == []
        assert llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))[0].token_ids


def test_failed_startup_leaves_nothing(tiny_loaded, tiny_path, tmp_path, monkeypatch):
    started = []
    real_argv, real_start = launch.instance_argv, launch.InstanceProcess.start

    def start(*a):
        started.append(real_start(*a))
        return started[-1]

    monkeypatch.setattr(handoff, "SHM_DIR", str(tmp_path))
    monkeypatch.setattr(handoff, "FD_DIR", str(tmp_path / "no-such-dir"))   # a named file
    monkeypatch.setattr(launch, "instance_argv", lambda *a: real_argv(*a) + ["--no-such-flag"])
    monkeypatch.setattr(launch.InstanceProcess, "start", staticmethod(start))
    with pytest.raises(ClusterError, match="exited with code 2"):
        LLM(tiny_path, loaded=tiny_loaded, instances=2, **OPTS)
    assert os.listdir(tmp_path) == []
    assert len(started) == 2 and all(p.exitcode is not None for p in started)


@pytest.mark.parametrize("by_name", [False, True])
def test_handoff_round_trip(tiny_loaded, tmp_path, monkeypatch, by_name):
    monkeypatch.setattr(handoff, "SHM_DIR", str(tmp_path))
    if by_name:
        monkeypatch.setattr(handoff, "FD_DIR", str(tmp_path / "no-such-dir"))
    weights = dict(tiny_loaded.weights)
    weights["alias.of.embedding"] = weights["model.embed_tokens.weight"][:3]   # shared storage
    h = handoff.write(tiny_loaded.config, weights)
    try:
        assert len(os.listdir(tmp_path)) == (1 if by_name else 0)
        if by_name:
            assert os.stat(h.directory).st_mode & 0o777 == 0o700
        path = h.path if by_name else f"{handoff.FD_DIR}/{os.dup(h.fd)}"    # read() closes it
        cfg, got = handoff.read(path)
        assert cfg == tiny_loaded.config
        assert set(got) == set(weights)
        assert all(torch.equal(got[k], v) for k, v in weights.items())
    finally:
        h.release()
    assert os.listdir(tmp_path) == []
