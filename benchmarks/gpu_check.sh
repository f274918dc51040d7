#!/usr/bin/env bash
# The GPU check, ready to run on one CUDA machine in under 10 minutes:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: runs/gpu_check
#
#   1. installs mamba-ssm (>= 2.3, the first to import with transformers 5) with its CUDA kernel into the
#      current Python, at most 5 minutes (SKIP_INSTALL=1 to skip; without network, a matching wheel or nvcc the
#      check goes on without it and says so), the [cuda] extra;
#   2. runs benchmarks/gpu_check.py: the scan through storm_vlm's dispatch (mamba-ssm's kernel) against the
#      float64 reference, a bf16 training step, a 2-process NCCL step when 2 GPUs exist, and the profiler on the
#      real widths with random weights at 32/128/256 frames; everything goes into OUT_DIR/gpu_check.json.
#
# Needs: a CUDA build of torch in the Python it runs (PYTHON=..., default python), the project importable
# (pip install -e . or PYTHONPATH=src). Exit status: 0 all checks passed, 1 a check failed, 2 no CUDA.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-python}
BUDGET=570                      # seconds for the whole script (10 minutes, less a margin)
START=$SECONDS
mkdir -p "$OUT"
log() { echo "[gpu_check.sh $(date +%H:%M:%S)] $*"; }

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    log "no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
    exit 2
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

if [ -z "${SKIP_INSTALL:-}" ]; then
    log "installing mamba-ssm (log: $OUT/pip.log)"
    # --no-build-isolation: build against this torch; MAMBA_KEEP_CUDA_BUILD: newer mamba-ssm releases build their
    # kernel (selective_scan_cuda) only when asked, and import without it
    if MAMBA_KEEP_CUDA_BUILD=TRUE timeout 300 "$PY" -m pip install --no-build-isolation 'mamba-ssm>=2.3' \
            > "$OUT/pip.log" 2>&1; then
        log "installed: $("$PY" -c 'import mamba_ssm, selective_scan_cuda; print("mamba-ssm", mamba_ssm.__version__)' 2>&1)"
    else
        log "mamba-ssm did not install within 5 minutes (no network, no matching wheel, or no nvcc);"
        log "going on: the scan check then runs selective_scan's pure-PyTorch path and the JSON says so"
    fi
fi

LEFT=$((BUDGET - (SECONDS - START)))
log "checks (at most ${LEFT} s)"
timeout "$LEFT" "$PY" benchmarks/gpu_check.py --output "$OUT/gpu_check.json" --budget-s "$LEFT"
STATUS=$?
[ "$STATUS" -eq 124 ] && log "timed out after ${LEFT} s"
log "done in $((SECONDS - START)) s, status $STATUS; results: $OUT/gpu_check.json"
exit "$STATUS"
