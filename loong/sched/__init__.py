"""Scheduling policy layer: pure Python (+numpy), never imports torch.

Policies read request and cluster state and return plans (`plan.py`); executors run them.
"""
