"""Generated protobuf code for the internal control protocol in
proto/loong/control/v1/control.proto (do not edit the *_pb2* files; regenerate with
`python proto/generate.py`). `loong/cluster/control_codec.py` converts to and from the
dataclasses in `loong/cluster/messages.py` and `loong/worker/step_io.py`."""
