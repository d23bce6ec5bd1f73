"""Session fixtures shared by every test tier: the default model loaded once, the
transformers reference model on the same GGUF file, and long real text."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SHARED_LEVAL = os.path.join(ROOT, "..", "shared", "data", "leval")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A tiny random Llama (GQA 4/2 heads, head dim 16, 2 layers, byte tokenizer)."""
    from tests.helpers_models import write_tiny_hf_checkpoint
    return str(write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer="bytes",
                                        max_position_embeddings=4096, seed=3))


@pytest.fixture(scope="session")
def loaded_default():
    """`LoadedModel` of the embedded SmolLM2 GGUF (fp32 weights, dequantized once)."""
    from loong.model.loader import load_model_files

    return load_model_files(None)


@pytest.fixture(scope="session")
def hf_default():
    """transformers' LlamaForCausalLM on the same GGUF file, fp32, eval mode."""
    transformers = pytest.importorskip("transformers")
    from loong.model.default_model import default_model_path

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype="float32")
    return model.eval()


@pytest.fixture(scope="session")
def long_text():
    """About 40K characters of real prose: L-Eval documents when ../shared/data is present,
    else a deterministic pseudo-English text."""
    parts = []
    if os.path.isdir(SHARED_LEVAL):
        for name in ("coursera.jsonl", "tpo.jsonl", "gov_report_summ.jsonl"):
            path = os.path.join(SHARED_LEVAL, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    parts.append(json.loads(f.readline())["input"])
    text = "\n\n".join(parts)
    if len(text) < 40000:
        import random
        rng = random.Random(0)
        words = ("the river runs past old stone towns where people trade grain salt and stories "
                 "about weather ships kings numbers and the long history of the coast").split()
        text += " ".join(rng.choice(words) for _ in range(12000))
    return text
