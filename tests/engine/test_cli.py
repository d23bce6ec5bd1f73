"""`loong generate`: runs on the default model, prints text; bad input exits 2 naming the field."""
import json
import subprocess
import sys

from loong.cli import main


def test_generate_json(capsys):
    rc = main(["generate", "--prompt", "The capital of France is", "--prompt", "2 + 2 =",
               "--max-tokens", "5", "--ignore-eos", "--json", "--dtype", "float32"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["prompt"] for x in lines] == ["The capital of France is", "2 + 2 ="]
    assert all(len(x["token_ids"]) == 5 and x["finish_reason"] == "length" for x in lines)
    assert "Paris" in lines[0]["text"]


def test_bad_input_exits_2(capsys):
    assert main(["generate"]) == 2
    assert "prompt" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "loong.cli", "generate", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--max-tokens" in out and "--prompt" in out
