#!/usr/bin/env bash
# One prepared run for a machine with one GPU and no network, in under 8 minutes:
#   1. the CUDA-path tests (device noise, batched guidance and resize, the training loop's fast path),
#   2. bench/train.py and bench/sample.py (eager fp32 baseline vs the optimised paths, same run),
#   3. the Neon table at GPU scale (bench/gpu_params.yaml) for flow and edm, classifier space.
# Every part writes into $OUT as it finishes, so a part that fails or runs out of time loses only itself.
#
#   bash bench/gpu.sh                                    # on the GPU machine (OUT defaults to bench/runs/gpu-<date>)
#   NEON_GPU_SCALE=tiny PYTHON=... bash bench/gpu.sh     # a dry run of the same script on a CPU, in about 2 minutes
#   NEON_GPU_PARTS="table" bash bench/gpu.sh             # only some parts (tests bench-train bench-sample table)
# At the end everything under $OUT is also packed into $OUT/gpu-run.tgz: the device tool brings back only a
# limited number of files.
#
# The GPU machine's python has torch, numpy, scipy, pandas, safetensors, PyYAML, Pillow, matplotlib (see
# ../shared/measurements/gpu-machine.md); the wheels it lacks travel in bench/wheels/ (`make gpu-wheels`).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SCALE=${NEON_GPU_SCALE:-full}
OUT=${OUT:-bench/runs/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SITE=$(mktemp -d)/site
started=$(date +%s)
PARTS=" ${NEON_GPU_PARTS:-tests bench-train bench-sample table} "
part() {  # part NAME SECONDS CMD...: run one part with a time limit, its output in $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  [[ $PARTS == *" $name "* ]] || return 0
  local t0; t0=$(date +%s)
  echo "=== $name (limit ${limit}s, at +$((t0 - started))s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s"
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$OUT/parts.txt"
}

# --- environment: the carried wheels, and two shims for a newer stack than the project pins ---
{
  date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  nproc; "$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
"$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" --find-links bench/wheels \
  pydantic pydantic_core annotated-types typing-inspection clean-fid mlxtend pytest pluggy iniconfig pygments \
  > "$OUT/install.log" 2>&1 || { echo "wheel install failed:"; tail "$OUT/install.log"; }
SHIMS=$SITE/../shims
mkdir -p "$SHIMS"
# clean-fid calls sqrtm(..., disp=False), which scipy >= 1.18 rejects; the shim restores the old return
# value (sqrtm, error estimate) for that one call form. No number changes.
cat > "$SHIMS/sitecustomize.py" <<'PYEOF'
import inspect
from scipy import linalg
if "disp" not in inspect.signature(linalg.sqrtm).parameters:
    _sqrtm = linalg.sqrtm
    def sqrtm(a, disp=True, **kw):
        root = _sqrtm(a, **kw)
        if disp:
            return root
        import numpy as np
        return root, float(np.linalg.norm(root @ root - a, "fro") / max(np.linalg.norm(a, "fro"), 1e-300))
    linalg.sqrtm = sqrtm
PYEOF
# clean-fid imports torchvision; PyPI's torchvision 0.26.0 is the cu130 build that matches torch 2.11.
if ! "$PY" -c "import torchvision" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" --find-links bench/wheels torchvision==0.26.0 \
    >> "$OUT/install.log" 2>&1 && echo "torchvision: installed the carried wheel"
fi
export PYTHONPATH="$SHIMS:$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg NEON_CURVES=off  # no dvclive there: no training curves

if [ "$SCALE" = tiny ]; then
  T_ARGS=(--steps 4 --warmup 2 --budget 30); S_ARGS=(--batch-sizes 8 --n 8 --noise-batch 64)
  TABLE_PARAMS=bench/gpu_params_tiny.yaml
else
  T_ARGS=(--budget 80); S_ARGS=(); TABLE_PARAMS=bench/gpu_params.yaml
fi

# Limits sum to under 8 minutes. The CPU half of the two test files already runs in CI: only the CUDA tests here.
part tests 90 "$PY" -m pytest -q -p no:cacheprovider --noconftest -k cuda tests/test_gpu_paths.py tests/test_training_paths.py
part bench-train 100 "$PY" bench/train.py --device auto --json "$OUT/train.json" "${T_ARGS[@]}"
part bench-sample 45 "$PY" bench/sample.py --device auto --json "$OUT/sample.json" "${S_ARGS[@]}"
part table 240 "$PY" bench/reproduce.py --families flow edm --no-toys --no-controls \
  --params "$TABLE_PARAMS" --results "$OUT/table"
echo "=== done in $(( $(date +%s) - started ))s; parts (name exit seconds):"
cat "$OUT/parts.txt"
tar czf "$OUT/gpu-run.tgz" --exclude gpu-run.tgz -C "$OUT" . 2>/dev/null || true
