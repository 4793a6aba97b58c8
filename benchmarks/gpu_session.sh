#!/usr/bin/env bash
# One call on a lent GPU machine, from the repository root: the chosen steps in order, each under
# a share of the time left, logs and JSON under $OUT (the files the device tool brings back).
#
#   bash benchmarks/gpu_session.sh [TOTAL_SECONDS] [STEP ...]     (default: 400 s; check model kernels tune)
#
# Steps: check   benchmarks/check_kernels_gpu.py (the prefill kernel against the fp32 reference)
#        model   benchmarks/gpu_model_check.py on gpu_models/*/ (converted models, CUDA against CPU)
#        kernels benchmarks/kernels.py (the table)
#        tune    benchmarks/tune_kernels.py (launch settings, parts alone)
#        speed   benchmarks/model_speed.py (whole Qwen3-1.7B-shaped models, original against converted)
# Optional inputs, brought along beside the checkout (both git-ignored):
#   .whl/*.whl       flash-linear-attention wheels (fla-core, flash-linear-attention), the linear peer
#   gpu_models/*/    `hydracc convert` outputs for the model step
# Exit code: 0 when every step passed its checks, else 1.
set -u -o pipefail
total=${1:-400}
shift || true
steps=${*:-check model kernels tune}
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/hydracc-gpu}
mkdir -p "$OUT"
left() { echo $(( total - SECONDS )); }
atleast() { if [ "$2" -lt "$1" ]; then echo "$1"; else echo "$2"; fi; }  # timeout 0 would mean no limit

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

rc=0
for step in $steps; do
  echo "== $step ($(left) s left)"
  case $step in
    check)   timeout "$(atleast 10 $(( $(left) / 3 )))" python3 benchmarks/check_kernels_gpu.py --deadline "$(atleast 5 $(( $(left) / 4 )))" 2>&1 | tee "$OUT/check.log" || rc=1 ;;
    model)   compgen -G "gpu_models/*/config.json" >/dev/null && { timeout "$(atleast 10 $(( $(left) / 4 )))" python3 benchmarks/gpu_model_check.py gpu_models/*/ --new-tokens 16 2>&1 | tee "$OUT/model.log" || rc=1; } ;;
    kernels) timeout "$(atleast 10 $(( $(left) - 10 )))" python3 benchmarks/kernels.py --keep-going --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" || rc=1 ;;
    speed)   timeout "$(atleast 10 $(( $(left) - 10 )))" python3 benchmarks/model_speed.py --deadline "$(atleast 5 $(( $(left) - 60 )))" --json "$OUT/model_speed.json" 2>&1 | tee "$OUT/model_speed.log" || rc=1 ;;
    tune)    [ "$(left)" -gt 60 ] && { timeout "$(atleast 10 $(( $(left) - 5 )))" python3 benchmarks/tune_kernels.py --deadline $(( $(left) - 45 )) --json "$OUT/tune.json" 2>&1 | tee "$OUT/tune.log" || rc=1; } ;;
    *) echo "unknown step $step"; rc=1 ;;
  esac
done
echo "== done in $SECONDS s, rc $rc"
exit $rc
