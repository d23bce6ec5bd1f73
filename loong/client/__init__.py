"""Python clients of Loong's gRPC API (`LoongClient`, `AsyncLoongClient`) and the
`loong client` command (`loong.client.cli`)."""
from loong.client.grpc_client import (AsyncLoongClient, AsyncResponseStream, GenerateResult,
                                      LoongClient, LoongClientError, ResponseStream,
                                      build_request, collect)

__all__ = ["AsyncLoongClient", "AsyncResponseStream", "GenerateResult", "LoongClient",
           "LoongClientError", "ResponseStream", "build_request", "collect"]
