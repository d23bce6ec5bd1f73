#!/usr/bin/env bash
# One node, several GPUs: one instance per GPU (instance r uses cuda:r), NCCL data plane.
#   bash launch/serve_gpu.sh [--model PATH] [more `loong serve` options]
# NUM_GPUS defaults to what nvidia-smi lists; LOONG_HOST / LOONG_PORT set the gRPC address
# (loopback by default; use LOONG_HOST=0.0.0.0 with --api-key and TLS to expose it).
set -euo pipefail
NUM_GPUS="${NUM_GPUS:-$(nvidia-smi -L | wc -l)}"
exec loong serve --device cuda --instances "$NUM_GPUS" --host "${LOONG_HOST:-127.0.0.1}" \
  --port "${LOONG_PORT:-50051}" "$@"
