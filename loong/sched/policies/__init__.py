"""Cluster policies: plans for a cluster of instances from requests and results.

Build one by name with `registry.build_policy(PolicySpec(...), cost_model)`; what a driver
may call on it is `protocol.ClusterPolicy`. Never imports torch; this package file imports
nothing, so importing one policy module does not load the others.
"""
