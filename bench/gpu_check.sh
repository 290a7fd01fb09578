#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): rollout tokens/s four ways against the memory-bandwidth
# bound, update MFU and memory per engine, for random-init Qwen2.5-0.5B/1.5B shapes in bf16 on one GPU.
#
#   bash bench/gpu_check.sh [--out bench/results/gpu_check.json]   # one GPU, under 8 minutes, no download
#   bash bench/gpu_check.sh --smoke --out /tmp/gpu_check.json      # CPU, fp32, tiny shapes, seconds
#
# Any other arguments go to bench/gpu_check.py (see its --help).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
for arg in "$@"; do
  if [[ "$arg" == "--smoke" ]]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  fi
done
if [[ " $* " != *" --smoke "* ]] && ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: no CUDA device visible; run with --smoke for the CPU check" >&2
  exit 2
fi

python "$ROOT/bench/gpu_check.py" "$@"
