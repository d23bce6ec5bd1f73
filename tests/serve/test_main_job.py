"""The README's main job as launch/serve_local.sh runs it (its server options, then
launch/serve_demo.py), on a machine without ../shared: the long document (Loong's own
design notes) is prefilled over both instances, and the HTTP API answers too."""
import subprocess
import sys

from tests.serve.conftest import ROOT, ServerProcess


def test_demo_spreads_the_long_document_over_both_instances():
    srv = ServerProcess("--instances", "2", "--kv-capacity-tokens", "2048",
                        "--http-port", str(ServerProcess.free_port()))
    try:
        out = subprocess.run([sys.executable, "launch/serve_demo.py", "--address", srv.address,
                              "--http-url", srv.http_url, "--no-leval", "--max-tokens", "12"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        srv.kill()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "of Loong's design notes" in out.stdout
    assert "prefilled with ring attention over 2 instance(s)" in out.stdout, out.stdout
    assert "--- [HTTP] POST" in out.stdout and "live console: http://" in out.stdout
