#!/usr/bin/env bash
# The CUDA path's mechanics on one GPU (about 15 minutes at most). Each part runs under its own timeout and
# says what it checked; figures go to $OUT (else bench/results/gpu-path) as JSON, a summary in summary.jsonl.
# Run from the repository root: `bash bench/gpu_path.sh`. PYTHON overrides the interpreter; PARTS="env amp_finetune"
# runs only the parts named.
# bench/gpu.sh is the shorter end-to-end run (tables, validation and pruning of resnet50 and DeiT-B).
#
# Parts: environment and fingerprint; the CPU tests of the CUDA path; a latency table built on the GPU at
# batch 256 (chunks sized by free memory); predicted against measured latency in fp16 channels-last; the
# attention kernel jump on and off the q/k == v diagonal; a 2-process DDP pruning run on one GPU (two ranks
# cannot share a GPU under NCCL: mdprune picks gloo, said on stderr); an --amp fine-tuning run.
set -u

export OUT_DIR="${OUT:-bench/results/gpu-path}"
mkdir -p "$OUT_DIR"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export MDPRUNE_CACHE="$OUT_DIR/cache"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT_DIR/summary.jsonl"
: > "$SUMMARY"
RUNS="$OUT_DIR/runs"
rm -rf "$RUNS"

part() {  # part NAME SECONDS COMMAND...: run with a timeout, log, record rc and seconds
    local name=$1 limit=$2
    if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then return; fi  # PARTS="a b": only these
    shift 2
    echo "=== $name (at most ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT_DIR/$name.log"
    echo "--- $name: rc=$rc in $(( $(date +%s) - t0 ))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
    echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >> "$SUMMARY"
}

# 1. what this machine is, and the fingerprint a table measured here gets
part env 60 "$PY" - <<'EOF'
import json, os, torch
from mdprune.latency import LatencySettings
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
fp = LatencySettings(device="cuda", dtype="float16", channels_last=True).fingerprint()
print(json.dumps(fp, indent=1))
free, total = torch.cuda.mem_get_info()
print(f"free {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB")
assert fp["driver"] and fp["cudnn"] and fp["capability"], "fingerprint lacks driver, cuDNN or capability"
json.dump({"fingerprint": fp, "free_gib": free / 2**30}, open(os.path.join(os.environ["OUT_DIR"], "env.json"), "w"))
EOF

# 2. the CPU tests of the CUDA path (they fake CUDA; here they run beside a real one)
part cpu_tests 120 "$PY" -m pytest -q -x tests/test_cuda_path.py

# 3. a table at batch 256 on the GPU: no out-of-memory (chunks sized by free memory), inputs drawn on the GPU
part lut_build_b256 150 "$PY" -m mdprune lut build resnet50 --num-classes 10 --device cuda --batch 256 \
    --dtype float16 --grid-points 4 --rounds 2 --reps 3 --time-budget 110

# 4. fp16 channels-last deployment: predicted against measured latency (ops and end to end alike)
part lut_validate_fp16_nhwc 120 "$PY" -m mdprune lut validate resnet18 --num-classes 10 --device cuda \
    --batch 64 --dtype float16 --channels-last --grid-points 4 --samples 4 --rounds 2 --reps 3 \
    --json "$OUT_DIR/validate_resnet18_fp16_nhwc.json"

# 4b. does a finer grid shrink the table model's error at batch 256 fp16? (bench/gpu.sh validates on 3 widths
#     per role; the same 4 random plans, seed 0, on 8)
part lut_validate_resnet50_grid8 240 "$PY" -m mdprune lut validate resnet50 --num-classes 10 --device cuda \
    --batch 256 --dtype float16 --grid-points 8 --samples 4 --rounds 2 --reps 3 \
    --json "$OUT_DIR/validate_resnet50_grid8.json"

# 4c. a detector end to end on the GPU (transform, backbone, heads, post-processing)
part detect_validate_ssdlite 120 "$PY" -m mdprune lut validate ssdlite320_mobilenet_v3_large --task detection \
    --num-classes 4 --input-size 320 --device cuda --batch 8 --dtype float16 --grid-points 3 --samples 4 \
    --rounds 2 --reps 3 --json "$OUT_DIR/validate_ssdlite_fp16.json"

# 5. attention on and off the q/k == v diagonal (fp16, DeiT-S shapes): is there a jump, and how large
part attention_diagonal 90 "$PY" - <<'EOF'
import json, os, torch
from mdprune.latency import TimingSettings, measure_many
from mdprune.latency.ops import op_module
from mdprune.latency.regimes import without_flash
t = TimingSettings(device="cuda", warmup=5, reps=5, rounds=3)
fixed = {"tokens": 197}
points = [(6, 64, 64), (6, 64, 56), (6, 56, 64), (6, 56, 56), (6, 48, 64), (6, 64, 48), (6, 48, 48), (6, 32, 64)]
out = {}
for batch in (1, 64):
    runs = {}
    for h, q, v in points:
        m, x = op_module("attention", fixed, {"heads": h, "qk": q, "v": v}, batch, "cuda", torch.float16)
        runs[(h, q, v)] = (lambda m=m, x=x: m(*x))
    ms = {k: r.ms for k, r in measure_many(runs, t).items()}
    with without_flash():
        off = {k: r.ms for k, r in measure_many({k: r for k, r in runs.items() if k[1] == k[2]}, t).items()}
    for k in points:
        print(f"batch {batch} heads {k[0]} qk {k[1]} v {k[2]}: {ms[k]:.4f} ms"
              + (f" (fast kernel excluded: {off[k]:.4f} ms)" if k in off else ""))
    out[batch] = {"x".join(map(str, k)): {"ms": ms[k], "no_flash_ms": off.get(k)} for k in points}
json.dump(out, open(os.path.join(os.environ["OUT_DIR"], "attention_diagonal.json"), "w"), indent=1)
EOF

# 6. DDP: 2 ranks on this one GPU (gloo; NCCL refuses two ranks per GPU), iterative pruning with two steps:
#    importance all-reduced (the batch count on the GPU), plan broadcast, every rank the same plan
part ddp_two_ranks_one_gpu 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m mdprune prune \
    small_resnet18 --device cuda:0 --schedule iterative --steps 2 --every 3 --epochs 1 --batch-size 64 \
    --max-iterations 8 --train-limit 2048 --val-limit 256 --backend flops --grid-points 2 --verify-rounds -1 \
    --run-dir "$RUNS/ddp"
grep -h "pruning step" "$OUT_DIR/ddp_two_ranks_one_gpu.log" | sort | uniq -c | head -8
grep -h "share" "$OUT_DIR/ddp_two_ranks_one_gpu.log" | head -2

# 7. --amp fine-tuning: fp16 autocast with a GradScaler, importance skipping overflowed steps
part amp_finetune 120 "$PY" - <<'EOF'
import json, os, torch
from torch import nn
from mdprune.train.loop import TrainConfig, _SCALERS, train_epoch
from mdprune.zoo import small_resnet18
dev = torch.device("cuda")
model = small_resnet18(in_chans=3).to(dev)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
data = [(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))) for _ in range(20)]
seen = []
stats = train_epoch(model, data, opt, sch, TrainConfig(amp=True), dev,
                    after_backward=lambda: seen.append(all(torch.isfinite(p.grad).all().item()
                                                          for p in model.parameters() if p.grad is not None)))
scaler = _SCALERS.get(opt)
print(f"loss {stats['loss']:.4f}; scaler scale {scaler.get_scale() if scaler else None}; "
      f"after_backward on {len(seen)} of 20 steps, all finite: {all(seen)}")
assert scaler is not None and all(seen) and stats["loss"] == stats["loss"]
m = model.float()
from mdprune.latency import LatencySettings, measure_models
from mdprune.space import analyze
space = analyze(m, torch.randn(1, 3, 32, 32, device=dev))
r = measure_models({"m": m}, space, LatencySettings(device="cuda", dtype="float16", batch=64))
assert next(m.parameters()).dtype == torch.float32, "measuring changed the model's dtype"
print(f"fp16 end-to-end {r['m'].ms:.3f} ms; the model stayed float32")
json.dump({"loss": stats["loss"], "scale": scaler.get_scale(), "steps_with_importance": len(seen),
           "fp16_ms": r["m"].ms}, open(os.path.join(os.environ["OUT_DIR"], "amp.json"), "w"))
EOF
part amp_prune_cli 100 "$PY" -m mdprune prune small_resnet18 --device cuda --amp --epochs 1 --batch-size 64 \
    --max-iterations 10 --train-limit 2048 --val-limit 256 --backend flops --grid-points 2 --verify-rounds -1 \
    --run-dir "$RUNS/amp"

echo "=== summary ($SUMMARY)"
cat "$SUMMARY"
