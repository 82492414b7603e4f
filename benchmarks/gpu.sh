#!/usr/bin/env bash
# GPU benchmark on randomly initialised Llama-family models (no network, no model files); see
# benchmarks/gpu.py. Runs the measurements, then the influence pipeline under torchrun with one process
# (nccl on a GPU, gloo on a CPU), and ends with ONE JSON line merging both. About 6 minutes on a GPU.
#
#   benchmarks/gpu.sh                        # 1B and 8B shapes, bfloat16, on cuda
#   benchmarks/gpu.sh --tiny --device cpu    # seconds
#
# PYTHON selects the interpreter (default: .venv/bin/python when present, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

timeout 300 "$PYTHON" benchmarks/gpu.py "$@" | tee "$logs/measurements.log"
# torchrun, with the same interpreter
timeout 300 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 \
    benchmarks/gpu.py --pipeline "$@" | tee "$logs/pipeline.log"
"$PYTHON" benchmarks/gpu.py --merge "$logs/measurements.log" "$logs/pipeline.log"
