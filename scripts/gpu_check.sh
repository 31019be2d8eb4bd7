#!/usr/bin/env bash
# One-shot GPU check (needs a CUDA device; installs nothing beyond the README's GPU command):
# CUDA tests, CPU-vs-GPU agreement of every method, bench ViT-T/S/B at 512² batch 1 and 32 in fp16 and fp32,
# and the app benchmark. Writes gpu_check/gpu_check.json and gpu_check/gpu_check.md; exits non-zero on a mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."
exec algm-viz gpu-check --out "${1:-gpu_check}" "${@:2}"
