"""Serving processes: instance entry point, cluster executor (and later the gRPC server)."""
