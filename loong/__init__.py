"""Loong: long-context LLM serving with elastic sequence parallelism.

`import loong` stays light (no torch) so the policy layer (`loong.sched`) can be imported
without torch; `LLM` and `SamplingParams` load on first use.
"""
from __future__ import annotations

from loong.version import __version__
__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from loong.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from loong.sampling_params import SamplingParams
        return SamplingParams
    if name == "RequestOutput":
        from loong.engine.outputs import RequestOutput
        return RequestOutput
    raise AttributeError(f"module 'loong' has no attribute {name!r}")
