#!/usr/bin/env bash
# GPU check for the Triton attention kernels, in one go (about 5 minutes on an H100, under 8):
#   1. every tests/kernels case compiled on CUDA: the CPU cases plus the @pytest.mark.gpu sweeps
#      (bf16, all head dims x block sizes, long contexts);
#   2. decode kernel timing vs the copy-bandwidth roofline and torch SDPA
#      (pagedserve/bench/gpu_kernels.py);
#   3. a full decode step, if the lead's pagedserve.bench.decode_step module exists.
# Usage, from anywhere: bash pagedserve/bench/gpu_check.sh   (PYTHON=... to pick the interpreter)
# Exit status: 0 all passed, 1 something failed, 2 no CUDA device / no triton (nothing ran).
set -uo pipefail
cd "$(dirname "$0")/../.."

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device (python: $PY); this check needs a GPU. Nothing ran." >&2
  exit 2
fi
if ! "$PY" -c 'import triton' 2>/dev/null; then
  echo "gpu_check: triton is not importable with $PY; install it (pip install triton). Nothing ran." >&2
  exit 2
fi
unset TRITON_INTERPRET  # compile for the GPU, whatever the caller's shell has
"$PY" -c 'import torch, triton; print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")'

status=0
step() {  # step <seconds> <label> <command...>
  local limit=$1 label=$2; shift 2
  local t0=$SECONDS
  echo; echo "=== $label"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    status=1
    [[ $rc -eq 124 || $rc -eq 137 ]] && echo "gpu_check: $label timed out after ${limit}s" >&2
    echo "gpu_check: $label FAILED (exit $rc)" >&2
  fi
  echo "--- $label: $((SECONDS - t0))s"
}

step 270 "kernel tests on CUDA (CPU cases + -m gpu sweeps)" \
  "$PY" -m pytest tests/kernels -q -p no:cacheprovider -rfEs
step 120 "decode kernel timing" "$PY" -m pagedserve.bench.gpu_kernels

if "$PY" - <<'PYEOF' 2>/dev/null
import importlib.util, sys
try:
    found = importlib.util.find_spec("pagedserve.bench.decode_step") is not None
except ModuleNotFoundError:
    found = False
sys.exit(0 if found else 1)
PYEOF
then
  step 60 "SmolLM2 decode step" "$PY" -m pagedserve.bench.decode_step
else
  echo; echo "=== SmolLM2 decode step: skipped (pagedserve.bench.decode_step does not exist yet)"
fi

echo
[[ $status -eq 0 ]] && echo "gpu_check: OK" || echo "gpu_check: FAILED" >&2
exit $status
