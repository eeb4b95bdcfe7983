#!/usr/bin/env bash
# MDP end to end on one GPU, as deployed: latency tables at batch 256 in float16 for resnet50 and
# deit_base_patch16_224, `mdprune lut validate` on both (predicted against measured latency of random plans),
# then both pruned to 50% of their measured latency with the measured check. Written for one H200, about
# 5 minutes (8 at most: every part has its own timeout), so the sizes are small:
#   tables: 3 widths per role for convolutions and linear layers, 3 per role for attention (heads x q/k x v),
#           2 timing rounds of 3 samples; validation: 4 random plans;
#   pruning: importance from 2 batches of 32 images, 4 fine-tuning iterations (the models are untrained: the
#           run checks latency and the pipeline, not accuracy), measured check with up to 2 re-solves.
# The data is scikit-learn's digits written as an RGB ImageFolder (nothing is downloaded).
#
#   bash bench/gpu.sh OUT_DIR                 # on a CUDA machine
#   bash bench/gpu.sh OUT_DIR --device cpu    # the same flow on the CPU at tiny sizes (batch 2, 64 px)
#
# Each part logs to OUT_DIR/<part>.log; OUT_DIR/summary.json gathers the figures (PYTHON overrides python).
set -u

OUT_DIR=${1:?usage: bash bench/gpu.sh OUT_DIR [--device cpu]}
DEVICE=cuda
if [ "${2:-}" = "--device" ]; then DEVICE=${3:?--device needs a value}; fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export MDPRUNE_CACHE="$OUT_DIR/cache" PYTHONUNBUFFERED=1 OUT_DIR DEVICE
SUMMARY="$OUT_DIR/parts.jsonl"
: > "$SUMMARY"

if [ "$DEVICE" = cpu ]; then
    BATCH=2 DTYPE=float32 SIZE=64 GRID=2 GRID3=2 ROUNDS=1 REPS=2 SAMPLES=2 SCALE=4
else
    BATCH=256 DTYPE=float16 SIZE=224 GRID=3 GRID3=3 ROUNDS=2 REPS=3 SAMPLES=4 SCALE=1
fi
TIMING=(--device "$DEVICE" --batch "$BATCH" --dtype "$DTYPE" --grid-points "$GRID" --grid-points-3d "$GRID3"
        --rounds "$ROUNDS" --reps "$REPS" --num-classes 10 --input-size "$SIZE")

part() {  # part NAME SECONDS COMMAND...: run under a timeout, log, record rc and seconds
    local name=$1 limit=$(( $2 * SCALE ))
    shift 2
    echo "=== $name (at most ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    tail -n 12 "$OUT_DIR/$name.log"
    echo "--- $name: rc=$rc in $(( $(date +%s) - t0 ))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
    echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >> "$SUMMARY"
}

part env 30 "$PY" - <<'EOF'
import json, os, torch
from mdprune.latency import LatencySettings
dev = os.environ["DEVICE"]
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
fp = LatencySettings(device=dev, dtype="float16" if dev.startswith("cuda") else "float32").fingerprint()
print(json.dumps(fp, indent=1))
json.dump(fp, open(os.path.join(os.environ["OUT_DIR"], "env.json"), "w"), indent=1)
EOF

part data 30 "$PY" - <<'EOF'
# scikit-learn's digits as an RGB ImageFolder: 8x8 images scaled to 32x32 PNGs, a fixed split
import os
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
d = load_digits()
root = os.path.join(os.environ["OUT_DIR"], "digits")
rng = np.random.default_rng(0)
for i in rng.permutation(len(d.target))[:600]:
    split = "val" if i % 4 == 0 else "train"
    folder = os.path.join(root, split, str(d.target[i]))
    os.makedirs(folder, exist_ok=True)
    img = (d.images[i] * (255 / 16)).astype(np.uint8)
    Image.fromarray(img).convert("RGB").resize((32, 32), Image.NEAREST).save(os.path.join(folder, f"{i}.png"))
print("images:", {s: sum(len(f) for _, _, f in os.walk(os.path.join(root, s))) for s in ("train", "val")})
EOF

for MODEL in resnet50 deit_base_patch16_224; do
    ARGS=()
    case $MODEL in deit*) ARGS=(--model-arg "img_size=$SIZE");; esac
    part "lut_build_$MODEL" 75 "$PY" -m mdprune lut build "$MODEL" "${TIMING[@]}" "${ARGS[@]}" \
        --time-budget $(( 55 * SCALE ))
    part "lut_validate_$MODEL" 40 "$PY" -m mdprune lut validate "$MODEL" "${TIMING[@]}" "${ARGS[@]}" \
        --samples "$SAMPLES" --json "$OUT_DIR/validate_$MODEL.json"
    part "prune_$MODEL" 95 "$PY" -m mdprune prune "$MODEL" "${ARGS[@]}" --data "$OUT_DIR/digits" \
        --input-size "$SIZE" --budget 50% --device "$DEVICE" --latency-batch "$BATCH" --latency-dtype "$DTYPE" \
        --grid-points "$GRID" --grid-points-3d "$GRID3" --timing-rounds "$ROUNDS" --timing-reps "$REPS" \
        --importance-batches 2 --batch-size 32 --epochs 1 --max-iterations 4 --train-limit 256 --val-limit 128 \
        --verify-rounds 2 --run-dir "$OUT_DIR/runs/$MODEL"
done

part summary 30 "$PY" bench/gpu_summary.py "$OUT_DIR"
cat "$OUT_DIR/summary.json" 2>/dev/null
