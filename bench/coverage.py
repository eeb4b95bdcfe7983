"""Does mdprune take the models users bring? (issue: model coverage)

For each model (default: the list of the coverage issue): build it with random weights (norm scales drawn
around 1 and other degenerate initial values replaced, see ``trained_like``), analyse it with no
ignored layers, report the share of parameters and MACs a plan can change, check one random plan's slim model
against its masked model (output, parameter count, MACs), then prune it one-shot to 50% of its measured dense
latency with a small latency table (importance from two random batches), and measure the slim model beside the
dense one. Prints a line per model and writes every figure to bench/results/coverage.json.

Run it alone: ``python bench/coverage.py [NAMES...] [--input-size N]``.
Targets: every listed model analyses and prunes with no ignored layers; at least 80% of the MACs changeable in
each; no model pruned below 25% of its dense latency for a 50% budget.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import mdprune
from mdprune.latency import LatencySettings, TimingSettings
from mdprune.latency.backends import count_flops

MODELS = [
    "torchvision:resnext50_32x4d", "torchvision:regnet_x_400mf", "torchvision:regnet_y_400mf",
    "torchvision:efficientnet_b0", "torchvision:efficientnet_v2_s", "torchvision:mobilenet_v3_large",
    "torchvision:convnext_tiny", "torchvision:densenet121", "torchvision:googlenet",
    "torchvision:shufflenet_v2_x1_0", "torchvision:mnasnet1_0", "torchvision:swin_t", "torchvision:vit_b_16",
    "torchvision:maxvit_t",
    "timm:efficientnet_b0", "timm:mobilenetv3_large_100", "timm:regnety_002", "timm:convnext_atto",
    "timm:swin_tiny_patch4_window7_224", "timm:beit_base_patch16_224", "timm:eva02_tiny_patch14_224",
    "timm:levit_128s", "timm:efficientformer_l1", "timm:mobilevit_xxs", "timm:fastvit_t8", "timm:repvgg_a0",
    "timm:cspresnet50", "timm:ghostnet_100", "timm:resnet50d", "timm:seresnet50",
    "timm:deit_tiny_distilled_patch16_224", "timm:vit_small_patch16_224?class_token=False&global_pool=avg",
    "timm:resnetv2_50x1_bit", "timm:nf_regnet_b0", "timm:convnext_atto_rms",
    "timm:caformer_s18", "timm:mixer_s16_224", "timm:resmlp_12_224", "timm:gmlp_ti16_224", "timm:ecaresnet26t",
    "timm:visformer_tiny", "timm:pvt_v2_b0", "timm:tiny_vit_5m_224", "timm:twins_svt_small",
    "timm:edgenext_xx_small", "timm:efficientvit_b0",
    "timm:tresnet_m", "timm:crossvit_tiny_240", "timm:convit_tiny", "timm:swiftformer_xs", "timm:mvitv2_tiny",
    "timm:halonet26t", "timm:bat_resnext26ts", "timm:resnetv2_50d_evos",
    "timm:vit_small_patch16_224?class_token=False&global_pool=map",
]


def parse(entry: str) -> tuple[str, dict]:
    """``name?key=value&...``: a model name with constructor arguments (values read as Python literals)."""
    import ast

    name, _, query = entry.partition("?")
    kwargs = {}
    for part in filter(None, query.split("&")):
        k, _, v = part.partition("=")
        try:
            kwargs[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            kwargs[k] = v
    return name, kwargs


def trained_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights that look trained where random initialisation leaves them degenerate.

    Norm scales are drawn around 1 and shifts around 0. Random initialisation sets some to exactly 0 (timm
    zero-initialises the last norm of every residual branch), layer scales to 1e-6 (ConvNeXt) and some
    classifiers to zero (torchvision's ViT head): the loss then ignores whole branches or everything before the
    head, every importance score is 0 there, and removing those blocks is free. Zero weight matrices get small
    random values and constant layer scales below 1e-3 get values around 0.1, as trained models have.
    """
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norms) and getattr(m, "weight", None) is not None:
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:  # bias-free norms (MetaFormer's LayerNorm2d without bias)
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
        for _, p in model.named_parameters():
            first = p.flatten()[0]
            if p.numel() > 1 and bool((p == first).all()):
                if p.dim() >= 2 and float(first) == 0.0:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
                elif 0.0 < abs(float(first)) < 1e-3:
                    p.copy_(0.1 * (1.0 + 0.3 * torch.randn(p.shape, generator=g)))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def macs_of(model: torch.nn.Module, x: torch.Tensor) -> int:
    with sdpa_kernel(SDPBackend.MATH):
        return count_flops(model, (x,))[0] // 2


def run_model(entry: str, input_size: int | None, budget: str, seed: int) -> dict:
    name, kwargs = parse(entry)
    row: dict = {"model": entry}
    t0 = time.monotonic()
    torch.manual_seed(seed)
    try:
        model = trained_like(mdprune.create_model(name, num_classes=10, **kwargs).eval(), seed)
        c, h, w = mdprune.default_input_size(model)
        if input_size is not None:
            h = w = input_size
        x = torch.randn(1, c, h, w)
        row["input"] = [c, h, w]
        space = mdprune.analyze(model, x)
    except Exception as e:  # noqa: BLE001 - the benchmark reports every failure and goes on
        row.update(stage="analyse", error=f"{type(e).__name__}: {e}", seconds=time.monotonic() - t0)
        return row
    cov = space.coverage()
    row.update(params_share=cov["params"]["share"], macs_share=cov["macs"]["share"],
               macs_widths_share=cov["macs"]["widths_share"], dims=len(space.prunable_dims()),
               blocks=len(space.removable_blocks()), kept_whole=cov["kept_whole"][:5])
    try:
        plan = mdprune.Plan.random(space, seed=seed + 1, block_prob=0.3)
        sizes, removed = plan.sizes(space), set(plan.removed)
        slim, masked = mdprune.slim(space, plan).eval(), mdprune.masked(space, plan).eval()
        with torch.no_grad():
            row["slim_vs_masked"] = rel_err(masked(x), slim(x))
        row["params_exact"] = sum(p.numel() for p in slim.parameters()) == space.count_params(sizes, removed)
        row["macs_exact"] = macs_of(slim, x) == space.count_macs(sizes, removed)
    except Exception as e:  # noqa: BLE001
        row.update(stage="slim", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=-3))
        row["seconds"] = time.monotonic() - t0
        return row
    try:
        g = torch.Generator().manual_seed(seed)
        data = [(torch.randn(4, c, h, w, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
        settings = LatencySettings(grid_points=2, grid_points_3d=2,
                                   timing=TimingSettings(warmup=1, reps=3, rounds=2, min_sample_ms=0.5))
        with tempfile.TemporaryDirectory() as cache:
            def prune_at(b: str | float):
                return mdprune.prune(model, x, b, data=data, lut=cache, settings=settings, space=space,
                                     importance_batches=2, verify_rounds=1, time_limit=30.0)[1]

            attempt: str | float = budget
            for tries in range(3):  # an unreachable budget: say how far width pruning goes, and prune that far
                try:
                    report = prune_at(attempt)
                    break
                except mdprune.InfeasibleBudget as e:
                    fraction = float(str(attempt).rstrip("%")) / 100
                    floor = e.minimum / (e.budget / fraction)  # the smallest latency as a share of dense
                    row.setdefault("unreachable", {"budget": budget, "smallest_fraction": floor})
                    if tries == 2:
                        raise
                    # next try as a share of dense, with room: each call calibrates on a fresh measurement
                    attempt = f"{min(99.0, 100 * floor * (1.1 + 0.1 * tries)):.1f}%"
        row.update(target_fraction=report.target_ms / report.dense_ms,
                   measured_fraction=report.measured_ms / report.measured_dense_ms,
                   params_after=report.params[1], params_before=report.params[0],
                   blocks_removed=len(report.removed_blocks), solver=report.solver["status"])
    except Exception as e:  # noqa: BLE001
        row.update(stage="prune", error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=-3))
    row["seconds"] = time.monotonic() - t0
    return row


def line(r: dict) -> str:
    if "error" in r:
        return f"{r['model'][:48]:48s} FAILED at {r['stage']}: {r['error'][:200]}"
    note = f" (budget unreachable: smallest {100 * r['unreachable']['smallest_fraction']:.1f}% of dense)" \
        if r.get("unreachable") and r["unreachable"].get("smallest_fraction") else ""
    return (f"{r['model'][:48]:48s} params {100 * r['params_share']:5.1f}% MACs {100 * r['macs_share']:5.1f}% "
            f"changeable | slim=masked {r['slim_vs_masked']:.1e} params {'ok' if r['params_exact'] else 'OFF'} "
            f"MACs {'ok' if r['macs_exact'] else 'OFF'} | 50% budget -> measured "
            f"{100 * r['measured_fraction']:5.1f}% of dense, {r['blocks_removed']}/{r['blocks']} blocks removed "
            f"| {r['seconds']:.0f} s{note}")


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    return {
        "models": len(rows), "pruned": len(ok),
        "failed": {r["model"]: f"{r['stage']}: {r['error']}" for r in rows if "error" in r},
        "below_80pct_macs": [r["model"] for r in ok if r["macs_share"] < 0.8],
        "below_25pct_latency": [r["model"] for r in ok if r["measured_fraction"] < 0.25],
        "unreachable": {r["model"]: r["unreachable"] for r in ok if r.get("unreachable")},
        "inexact": [r["model"] for r in ok if r["slim_vs_masked"] > 1e-4 or not (r["params_exact"]
                                                                                  and r["macs_exact"])],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=MODELS, help="model names (name?key=value&... for arguments)")
    ap.add_argument("--input-size", type=int, default=None, help="image size (default: each model's own)")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "coverage.json"))
    ap.add_argument("--update", action="store_true", help="replace only these models' rows in --out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for entry in args.models:
        rows.append(run_model(entry, args.input_size, args.budget, args.seed))
        print(line(rows[-1]), flush=True)
    out = Path(args.out)
    if args.update and out.exists():  # keep the other models' rows of the earlier run
        fresh = {r["model"] for r in rows}
        earlier = json.loads(out.read_text())["rows"]
        rows = [r for r in earlier if r["model"] not in fresh] + rows
    summary = summarize(rows)
    print(json.dumps(summary, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                               "budget": args.budget, "summary": summary, "rows": rows}, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
