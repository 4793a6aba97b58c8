#!/usr/bin/env bash
# A model-release step with hydracc: check the plan under review, convert by it, verify, export ONNX.
#
#   examples/ci/release.sh MODEL PLAN OUT
#
# MODEL  the original checkpoint (folder or .safetensors file)
# PLAN   the plan JSON committed for review (hydracc convert MODEL --plan --plan-out PLAN $PLAN_ARGS)
# OUT    a new folder: OUT/model (the converted checkpoint, with OUT/model/onnx) and the JSON reports
#
# Environment: PLAN_ARGS (the planning options the plan was made with, default "--full-ratio 0.25"),
# MAX_PPL_INCREASE, MIN_RECALL_RATIO, MIN_AGREEMENT (verify's thresholds; hydracc's defaults if unset).
# Exits non-zero at the first failing step: 1 the plan is stale, 2 bad input, 3 the quality gate failed.
set -euo pipefail
MODEL=${1:?usage: release.sh MODEL PLAN OUT}
PLAN=${2:?usage: release.sh MODEL PLAN OUT}
OUT=${3:?usage: release.sh MODEL PLAN OUT}
mkdir "$OUT"

# 1. The plan under review must still be what hydracc chooses for this model (head kinds, not score digits).
# shellcheck disable=SC2086
hydracc convert "$MODEL" --plan ${PLAN_ARGS:---full-ratio 0.25} --plan-out "$OUT/replanned.json" -q
python3 - "$PLAN" "$OUT/replanned.json" <<'PY'
import json, sys
kinds = lambda p: [[h["kind"] if isinstance(h, dict) else h for h in lp["heads"]] for lp in json.load(open(p))["layers"]]
if kinds(sys.argv[1]) != kinds(sys.argv[2]):
    sys.exit(f"the plan under review ({sys.argv[1]}) is stale: hydracc now plans {sys.argv[2]}; review and commit it")
PY

# 2. Convert by the reviewed plan (deterministic: the same inputs give the same files).
hydracc convert "$MODEL" -o "$OUT/model" --plan-file "$PLAN" --json -q > "$OUT/convert.json"

# 3. The quality gate: exit 3 when a threshold does not hold.
verify_args=()
[[ -n "${MAX_PPL_INCREASE:-}" ]] && verify_args+=(--max-ppl-increase "$MAX_PPL_INCREASE")
[[ -n "${MIN_RECALL_RATIO:-}" ]] && verify_args+=(--min-recall-ratio "$MIN_RECALL_RATIO")
[[ -n "${MIN_AGREEMENT:-}" ]] && verify_args+=(--min-agreement "$MIN_AGREEMENT")
hydracc verify "$MODEL" "$OUT/model" "${verify_args[@]}" --update-card --json -q > "$OUT/verify.json"

# 4. ONNX graphs, checked with onnxruntime.
hydracc export-onnx "$OUT/model" --json > "$OUT/onnx.json"
echo "release artifacts in $OUT"
