#!/usr/bin/env bash
# Set up and run the main job: a local 2-instance cluster (ESP data plane) on the embedded
# SmolLM2-135M-Instruct, answering real prompts and printing what each instance did.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
loong generate --instances 2 --decode-masters 2 --chat --max-tokens 64 \
  --prompt "What is the capital of France? Answer in one sentence." \
  --prompt "Give me three tips for reading long documents." \
  --prompt "Write a short poem about the sea." "$@"
