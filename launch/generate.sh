#!/usr/bin/env bash
# Set up and run the main job: generation on the embedded SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
loong generate --chat --max-tokens 64 \
  --prompt "What is the capital of France?" \
  --prompt "Write a haiku about long documents." \
  --prompt "Explain sequence parallelism in one sentence." "$@"
