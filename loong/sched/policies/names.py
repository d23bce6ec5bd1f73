"""The names of the cluster policies, for option checks that must stay light.

Owns `POLICY_NAMES` (every name `registry.build_policy` accepts), `ESP_POLICY_NAMES` and
`REPLICA_POLICY_NAMES` (its two families). `registry.py` maps each name to a policy;
`loong.config` checks `EngineConfig.policy` against these without importing the policies.
Imports nothing (no loong, no numpy, no torch).
"""
from __future__ import annotations

# ESP policies: a request's KV may span instances (the elastic policy and its ablations).
ESP_POLICY_NAMES: tuple[str, ...] = ("elastic", "static-sp", "simple")
# Replica baselines: each request served whole by one replica of fixed instances.
REPLICA_POLICY_NAMES: tuple[str, ...] = ("chunked-prefill", "sarathi", "vllm", "pd-disagg")
POLICY_NAMES: tuple[str, ...] = ESP_POLICY_NAMES + REPLICA_POLICY_NAMES
