#!/usr/bin/env bash
# The GPU check, one command for the day a CUDA machine is lent (<= 8 minutes in all):
#   bash benchmarks/gpu_check.sh            # from the repo root, after `make setup`
# 1. the `gpu` marker tests (bf16-mixed run, fused AdamW, FSDP and NCCL DDP on one GPU);
# 2. the default experiment on trainer=gpu for 300 steps (its metrics table);
# 3. the base CLIP (ViT-B/16 + 12-layer text, 224 px) step at batch 256 in bf16-mixed:
#    samples/s, TFLOP/s, MFU against $PEAK_TFLOPS (H100/H200 dense bf16: 989), peak memory.
# Without a CUDA device it says so and exits 0. Each part has its own time limit; the
# exit status is 1 when any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; nothing to check"
  exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
status=0
run() {  # run <seconds> <what> <command...>
  local limit=$1 what=$2
  shift 2
  echo "== $what"
  timeout "$limit" "$@" || { echo "gpu_check: $what failed (exit $?)"; status=1; }
}
run 180 "gpu marker tests" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/apps/test_gpu.py
run 180 "default experiment, trainer=gpu, 300 steps" "$PY" -m polymodal.train trainer=gpu \
  trainer.max_steps=300 trainer.val_check_interval=300 data.num_workers=8 logger=csv \
  hydra.run.dir=logs/gpu_check/train
run 120 "base CLIP step" "$PY" benchmarks/clip_step.py --model base --batch-sizes 256 \
  --precisions bf16-mixed --device cuda --steps 10 --peak-tflops "$PEAK_TFLOPS" data.image_size=224
exit $status
