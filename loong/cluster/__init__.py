"""The cluster runtime on the manager side and in instance processes: executors (in-process
for a cluster of one, remote for N), the launcher, the instance process, and the control
protocol (messages and their protobuf codec). Below the engine, above the worker."""
