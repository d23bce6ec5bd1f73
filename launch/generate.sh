#!/usr/bin/env bash
# Set up and run the main job: generation on the embedded SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
loong generate --chat --max-tokens 64 \
  --prompt "What is the capital of France? Answer in one sentence." \
  --prompt "Give me three tips for reading long documents." \
  --prompt "Write a short poem about the sea." "$@"
