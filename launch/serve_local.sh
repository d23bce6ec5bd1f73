#!/usr/bin/env bash
# The main job: set up, then serve the embedded SmolLM2-135M-Instruct with a local cluster of
# 2 CPU instances over gRPC (127.0.0.1:${LOONG_PORT:-50051}) and the OpenAI-compatible HTTP
# API with its live console (http://127.0.0.1:${LOONG_HTTP_PORT:-8000}/), send it real
# requests (launch/serve_demo.py: streamed chat answers, one HTTP request, and a question
# about a ~3,000-token document that the 2,048 KV tokens per instance cannot hold alone, so
# its prefill runs over both instances), print what each request and instance did, and
# stop the server with SIGTERM (it drains, then exits).
# Extra arguments go to `loong serve` (e.g. --policy static-sp, --instances 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
PORT="${LOONG_PORT:-50051}"
HTTP_PORT="${LOONG_HTTP_PORT:-8000}"
loong serve --instances 2 --port "$PORT" --http-port "$HTTP_PORT" --kv-capacity-tokens 2048 "$@" &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" || true' EXIT
python3 launch/serve_demo.py --address "127.0.0.1:$PORT" --http-url "http://127.0.0.1:$HTTP_PORT"
