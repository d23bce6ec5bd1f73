#!/usr/bin/env bash
# Set up and run the whole test suite (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
python3 -m pytest tests -q -p no:cacheprovider "$@"
