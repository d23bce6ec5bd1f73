#!/usr/bin/env bash
# The main job: set up, then serve the embedded SmolLM2-135M-Instruct with a local cluster of
# 2 CPU instances over gRPC (127.0.0.1:${LOONG_PORT:-50051}), send it real requests
# (launch/serve_demo.py: streamed chat answers and a long L-Eval document), print what each
# request and instance did, and stop the server with SIGTERM (it drains, then exits).
# Extra arguments go to `loong serve` (e.g. --policy static-sp, --instances 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
PORT="${LOONG_PORT:-50051}"
loong serve --instances 2 --port "$PORT" "$@" &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" || true' EXIT
python3 launch/serve_demo.py --address "127.0.0.1:$PORT"
