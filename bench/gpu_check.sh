#!/usr/bin/env bash
# The one script to run when a GPU machine is lent (<= 8 minutes on one H100, no network, random
# weights). Records, in $OUT (default outputs/gpu_check):
#   1. python -m pytest -m gpu                 the Ray Train job on CUDA workers (NCCL, bf16) and the
#                                              full-size step benchmark's test (tests/test_gpu.py)
#   2. bench/full_size_step.py --rows preset --fake
#                                              the L40S preset's full-size step (batch 2, checkpointing):
#                                              torch.cuda.max_memory_allocated beside the dry run's
#                                              fake-tensor peak of the same step and the planner's,
#                                              then a 28-step full-size try-on without and with the
#                                              first-block step cache
#
#   bash bench/gpu_check.sh                     # here: prints "not run: no GPU available"
#   OUT=/tmp/gpu bash bench/gpu_check.sh        # on a GPU machine
#
# The lent machines have torch, peft and transformers but not diffusers or ray: put their wheels in
# .whl/ (git-ignored; `pip download --no-deps diffusers==0.42.1 -d .whl`) and carry it; they are
# installed without dependencies first. A step whose packages are missing says so and the rest runs.
# Record what it prints in docs/PERFORMANCE.md ("GPU check"), with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p "$OUT"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "not run: no GPU available" | tee "$OUT/gpu_check.txt"
  exit 0
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-deps .whl/*.whl 2>&1 | tail -2
fi
{
  echo "== $(date -u +%FT%TZ) $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

  echo "== 1. pytest -m gpu"
  if "$PY" -c "import ray, diffusers" 2>/dev/null; then
    timeout 240 "$PY" -m pytest -m gpu -q -x -p no:randomly 2>&1 | tail -15
  else
    echo "skipped: ray or diffusers is not installed here (carry their wheels in .whl/)"
  fi

  echo "== 2. full-size step (L40S preset: batch 2, checkpointing on) and try-on, random weights"
  if "$PY" -c "import diffusers, peft" 2>/dev/null; then
    timeout 300 "$PY" bench/full_size_step.py --rows preset --fake --steps 3 --warmup 1 \
      --out "$OUT/full_size_preset.json" 2>&1 | grep -v Warning | tail -12
  else
    echo "skipped: diffusers or peft is not installed here (carry their wheels in .whl/)"
  fi
} 2>&1 | tee "$OUT/gpu_check.txt"
