#!/usr/bin/env bash
# The GPU check (see scripts/gpu_check.py): on one CUDA GPU, within 8 minutes, the cuda-marked tests, the SFT,
# reward and PPO benchmarks at GPU sizes with TRL's rows, FSDP2 (and ZeRO-3) on CUDA, and a shortened
# configs/gpu.yaml pipeline; writes gpu_check.json and gpu_check.md. On CPU: scripts/gpu_check.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" scripts/gpu_check.py "$@"
