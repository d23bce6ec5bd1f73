"""Generated protobuf code for the internal control protocol in
proto/loong/control/v1/control.proto (do not edit the *_pb2* files; regenerate with
`python proto/generate.py`). `loong/worker/control_codec.py` converts to and from the
dataclasses in `loong/worker/messages.py`."""
