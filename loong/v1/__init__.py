"""Generated gRPC code for the public API in proto/loong/v1/loong.proto (do not edit the
*_pb2* files; regenerate with `python proto/generate.py`)."""
