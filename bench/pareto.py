"""At the latency I need, which method keeps the most accuracy? (issue: benchmarks against the baselines)

On this CPU, with Fashion-MNIST (Debian package dataset-fashion-mnist; scikit-learn digits where missing):
- two dense models trained once and cached: small_resnet18 (ResNet-18 at width 0.25, 3x3 stem, no max-pool)
  and small_vit (timm VisionTransformer, 28x28 images in 4x4 patches, 96 wide, 6 blocks);
- three latency budgets: 70%, 50% and 30% of the dense model's measured latency;
- methods: mdprune's MDP (channels + blocks + table model) and the paper's three ablations (channels + linear
  = HALP, channels + blocks + linear, channels + table), each aiming at the budget with its own latency model;
  MDP with a removed block's share of the dimensions it shares still counted (the objective before MDP's block
  semantics), and MDP's plan fine-tuned with distillation from the dense model (``--kd-budgets``);
  Torch-Pruning's global pruner with Taylor importance and uniform pruner with magnitude importance, at the
  pruning ratio whose *measured* latency matches the budget (bisection, measured against the dense model);
- every pruned model gets the same BatchNorm recalibration and fine-tuning recipe, then its latency is
  measured interleaved with the dense model and its test accuracy computed, for each seed.
Prints a table, writes bench/results/pareto.json and bench/results/pareto.png.

Run it alone on the machine: ``python bench/pareto.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import mdprune
from mdprune.importance import SHARE_PREFIX, estimate
from mdprune.latency import LatencySettings, RatioSettings, TimingSettings, measure_models_ratio, open_table
from mdprune.search import Search, calibrated_model, solve_within_measured_budget
from mdprune.solve import InfeasibleBudget, Solution
from mdprune.train import (
    Distiller,
    TrainConfig,
    budget_path,
    builtin,
    evaluate,
    loader,
    make_optimizer,
    make_scheduler,
    recalibrate_bn,
    train_epoch,
)

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "mdprune" / "bench"
MDP = "MDP (channels+blocks, table)"
MDP_VARIANTS = {  # name -> (latency model, blocks, removed blocks' shares of shared dims leave the objective)
    MDP: ("table", True, True),
    "MDP, block shares kept": ("table", True, False),
    "channels, table": ("table", False, True),
    "channels+blocks, linear": ("linear", True, True),
    "HALP (channels, linear)": ("linear", False, True),
}
KD = "MDP + distillation"
TP_VARIANTS = {"TP global Taylor": (True, "taylor"), "TP uniform magnitude": (False, "magnitude")}
MODELS = {"small_resnet18": {"lr": 0.1, "optimizer": "sgd"}, "small_vit": {"lr": 1e-3, "optimizer": "adamw"}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data and dense models ---------------------------------------------------------------------------------

def data(train_limit: int, test_limit: int | None, seed: int = 0):
    train, spec = builtin(True, train_limit, seed)
    test, _ = builtin(False, test_limit, seed)
    return train, test, spec


def dense_model(name: str, train, test, spec, epochs: int) -> nn.Module:
    """The dense model, trained once and cached."""
    path = CACHE / f"{name}-{spec.name}-{len(train)}-{epochs}.pt"
    model = mdprune.create_model(name, num_classes=spec.num_classes, in_chans=spec.channels)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"{name}: cached dense model {path}")
        return model.eval()
    recipe = MODELS[name]
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=recipe["lr"], optimizer=recipe["optimizer"],
                      weight_decay=5e-4 if recipe["optimizer"] == "sgd" else 0.05, warmup_epochs=0.3)
    torch.manual_seed(0)
    tl = loader(train, cfg.batch_size, True, seed=0)
    opt = make_optimizer(model, cfg)
    sch = make_scheduler(opt, cfg, len(tl))
    for epoch in range(epochs):
        t = time.monotonic()
        stats = train_epoch(model, tl, opt, sch, cfg, torch.device("cpu"))
        log(f"{name}: dense epoch {epoch}: loss {stats['loss']:.3f} ({time.monotonic() - t:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def finetune(model: nn.Module, name: str, train, iterations: int, seed: int, teacher: nn.Module | None = None
             ) -> nn.Module:
    """The same recipe for every pruned model: BatchNorm recalibration, then a short cosine fine-tuning (with
    ``teacher``: its soft targets mixed in, weight 0.5, temperature 4)."""
    torch.manual_seed(seed)
    tl = loader(train, 128, True, seed=seed)
    recalibrate_bn(model, tl, 20)
    recipe = MODELS[name]
    cfg = TrainConfig(epochs=1, batch_size=128, lr=recipe["lr"] / 5, optimizer=recipe["optimizer"],
                      weight_decay=5e-4 if recipe["optimizer"] == "sgd" else 0.05, max_iterations=iterations)
    opt = make_optimizer(model, cfg)
    sch = make_scheduler(opt, cfg, min(iterations, len(tl)))
    loss_fn = Distiller(copy.deepcopy(teacher), weight=0.5, temperature=4.0) if teacher is not None else None
    train_epoch(model, tl, opt, sch, cfg, torch.device("cpu"), loss_fn=loss_fn)
    return model.eval()


# ---- methods -----------------------------------------------------------------------------------------------

class Pruner:
    """mdprune on one dense model: one space, one latency table, one calibration shared by every variant."""

    def __init__(self, dense: nn.Module, x: torch.Tensor, settings: LatencySettings, lut: Path):
        self.dense, self.settings = dense, settings
        self.space = mdprune.analyze(dense, x)
        table = open_table(settings, lut)
        self.models = {}
        for mode in ("table", "linear"):
            self.models[mode], self.dense_ms = calibrated_model(self.space, table, settings, mode)
        self.scores: dict[int, dict] = {}

    def importance(self, train, seed: int) -> dict:
        if seed not in self.scores:
            torch.manual_seed(seed)
            self.scores[seed] = estimate(self.space, self.space.module, loader(train, 64, True, seed=seed),
                                         max_batches=16)
        return self.scores[seed]

    def prune(self, budget: float, mode: str, blocks: bool, shares: bool, train, seed: int, steps: int = 4,
              measured_check: bool = True) -> nn.Module:
        """Every variant steps down the same exponential latency path (importance fixed), as HALP's linear
        model needs: it freezes input widths at their current values, so one step from dense cannot see
        that shrinking a layer's input makes it faster. The last step's plan gets mdprune's measured check
        (re-solved at a corrected budget while its measured latency misses the target), as the tool does."""
        scores = self.importance(train, seed)
        if not shares:
            scores = {k: v for k, v in scores.items() if not k.startswith(SHARE_PREFIX)}
        plan = mdprune.Plan()
        dense = self.dense_ms["ms"]
        path = budget_path(dense, budget * dense, steps)
        search = Search(self.space, self.models[mode], {"latency": budget * dense}, blocks=blocks)
        for t, b in enumerate(path):

            def solve_at(ms: float, current=plan) -> tuple[mdprune.Plan, Solution]:
                return search.solve(scores, ms, current=current)

            if t == len(path) - 1 and measured_check:
                plan, _, _ = solve_within_measured_budget(self.space, self.models[mode], self.settings, solve_at,
                                                          b, dense)
            else:
                plan, _ = solve_at(b)
        return mdprune.slim(self.space, plan)


def tp_prune(dense: nn.Module, x: torch.Tensor, ratio: float, global_pruning: bool, importance: str, train,
             seed: int) -> nn.Module:
    """Torch-Pruning at one ratio (attention heads kept whole, head widths and embedding pruned for ViTs)."""
    import timm
    import torch_pruning as tp

    model = copy.deepcopy(dense).eval()
    imp = (tp.importance.GroupTaylorImportance() if importance == "taylor"
           else tp.importance.GroupMagnitudeImportance(p=2))
    num_heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, timm.layers.Attention)}
    head = model.fc if hasattr(model, "fc") else model.head
    pruner = tp.pruner.MetaPruner(model, x, importance=imp, pruning_ratio=ratio, global_pruning=global_pruning,
                                  ignored_layers=[head], num_heads=num_heads, prune_head_dims=True, round_to=8)
    if importance == "taylor":
        torch.manual_seed(seed)
        model.train()
        for i, (xb, yb) in enumerate(loader(train, 64, True, seed=seed)):
            if i >= 16:
                break
            nn.functional.cross_entropy(model(xb), yb).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    for m in model.modules():
        if isinstance(m, timm.layers.Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim
    return model.eval()


# Each result against the dense model: at least 10 s (over shorter windows the host's state moves the ratio by
# several percent), as mdprune's own check and final measurement do. Torch-Pruning's ratio search: shorter.
FINAL = RatioSettings(tolerance=0.02, min_seconds=10.0, time_cap=15.0)
SEARCH = RatioSettings(tolerance=0.04, min_seconds=3.0, time_cap=4.0)


def latency_ratio(model: nn.Module, dense: nn.Module, space, settings: LatencySettings,
                  how: RatioSettings = SEARCH) -> tuple[float, float, float, float, float]:
    """``model``'s latency as a fraction of the dense model's, timed in alternating pairs in one run (the ratio
    statistic of mdprune's measured check): (ms, dense ms, ratio, low, high)."""
    r = measure_models_ratio(model, dense, space, settings, how)
    return r.a_ms, r.b_ms, r.ratio, r.low, r.high


def tp_ratio_at_budget(dense, x, space, budget, global_pruning, importance, train, settings
                       ) -> tuple[float | None, float]:
    """The smallest Torch-Pruning ratio whose measured latency ratio is within the budget: a sweep of ratios
    (latency is not monotonic in the ratio near the top, where layers cannot shrink further), then bisection
    below the first ratio that fits. Returns (ratio or None if no ratio fits, smallest latency ratio seen)."""
    def lat(r: float) -> float:
        return latency_ratio(tp_prune(dense, x, r, global_pruning, importance, train, 0), dense, space,
                             settings)[2]

    sweep = [(r, lat(r)) for r in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    best = min(v for _, v in sweep)
    fits = [r for r, v in sweep if v <= budget]
    if not fits:
        return None, best
    hi = min(fits)
    lo = max((r for r, _ in sweep if r < hi), default=0.0)
    for _ in range(3):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if lat(mid) <= budget else (mid, hi)
    return hi, best


# ---- the benchmark -----------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(2)
    train, test, spec = data(args.train_limit, args.test_limit)
    settings = LatencySettings(batch=args.batch, timing=TimingSettings(rounds=3, reps=5))
    lut = CACHE / "lut"
    out = {"settings": vars(args), "data": spec.name, "models": {}}
    for name in args.models:
        dense = dense_model(name, train, test, spec, args.dense_epochs)
        x = train[0][0].unsqueeze(0)
        pruner = Pruner(dense, x, settings, lut)
        space = pruner.space
        tp_ratio: dict[tuple[str, float], tuple[float | None, float]] = {}
        acc0 = evaluate(dense, loader(test, 512, False), torch.device("cpu"))["accuracy"]
        rows = []
        log(f"{name}: dense test accuracy {100 * acc0:.2f}%")
        for budget in args.budgets:
            for seed in range(args.seeds):
                candidates = {}
                for method, (mode, blocks, shares) in MDP_VARIANTS.items():
                    try:
                        candidates[method] = pruner.prune(budget, mode, blocks, shares, train, seed,
                                                          measured_check=not args.no_measured_check)
                    except InfeasibleBudget as e:
                        rows.append({"method": method, "budget": budget, "seed": seed, "unreachable": str(e)})
                if MDP in candidates and budget in args.kd_budgets:  # the same plan, fine-tuned with distillation
                    candidates[KD] = copy.deepcopy(candidates[MDP])
                for method, (glob, imp) in TP_VARIANTS.items():
                    if (method, budget) not in tp_ratio:  # the ratio matching the budget, searched once
                        tp_ratio[(method, budget)] = tp_ratio_at_budget(dense, x, space, budget, glob, imp, train,
                                                                        settings)
                    ratio, lowest = tp_ratio[(method, budget)]
                    if ratio is None:
                        rows.append({"method": method, "budget": budget, "seed": seed, "unreachable":
                                     f"no pruning ratio fits: the lowest measured latency was {lowest:.1%} of dense"})
                        continue
                    candidates[method] = tp_prune(dense, x, ratio, glob, imp, train, seed)
                for method, model in candidates.items():
                    t = time.monotonic()
                    model = finetune(model, name, train, args.finetune_iterations, seed,
                                     teacher=dense if method == KD else None)
                    ms, dense_ms, ratio, low, high = latency_ratio(model, dense, space, settings, FINAL)
                    acc = evaluate(model, loader(test, 512, False), torch.device("cpu"))["accuracy"]
                    params = sum(p.numel() for p in model.parameters())
                    rows.append({"method": method, "budget": budget, "seed": seed, "ms": ms, "dense_ms": dense_ms,
                                 "ratio": ratio, "ratio_low": low, "ratio_high": high, "accuracy": acc,
                                 "params": params})
                    log(f"{name} budget {budget:.0%} seed {seed} {method:30s}: latency {ratio:6.1%} of dense "
                        f"[{low:.1%}, {high:.1%}] ({ms:.2f} ms), accuracy {100 * acc:.2f}% "
                        f"({time.monotonic() - t:.0f} s)")
        out["models"][name] = {"dense_accuracy": acc0, "params": space.count_params(), "rows": rows}
        write(out, args.out)
    return out


def summarise(out: dict) -> list[dict]:
    """Mean and spread per (model, budget, method)."""
    table = []
    for name, res in out["models"].items():
        groups: dict[tuple, list[dict]] = {}
        for r in res["rows"]:
            groups.setdefault((r["budget"], r["method"]), []).append(r)
        for (budget, method), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
            ok = [r for r in rs if "accuracy" in r]
            if not ok:
                table.append({"model": name, "budget": budget, "method": method, "unreachable": True})
                continue
            accs = [r["accuracy"] for r in ok]
            ratios = [r["ratio"] for r in ok]
            table.append({"model": name, "budget": budget, "method": method, "seeds": len(ok),
                          "accuracy": statistics.fmean(accs), "accuracy_std": statistics.pstdev(accs),
                          "ratio": statistics.fmean(ratios), "ratio_max": max(ratios),
                          "dense_accuracy": res["dense_accuracy"]})
    return table


def write(out: dict, path: str) -> None:
    out["summary"] = summarise(out)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))


def print_table(out: dict) -> None:
    print(f"\n{'model':15s} {'budget':>6s} {'method':30s} {'latency/dense':>13s} {'accuracy':>16s}")
    for r in out["summary"]:
        if r.get("unreachable"):
            print(f"{r['model']:15s} {r['budget']:6.0%} {r['method']:30s} {'unreachable':>13s}")
            continue
        print(f"{r['model']:15s} {r['budget']:6.0%} {r['method']:30s} {r['ratio']:12.1%}  "
              f"{100 * r['accuracy']:6.2f} +- {100 * r['accuracy_std']:4.2f}%  "
              f"(dense {100 * r['dense_accuracy']:.2f}%)")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in out["summary"] if r["model"] == name and not r.get("unreachable")]
        for method in dict.fromkeys(r["method"] for r in rows):
            rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["ratio"])
            ax.errorbar([100 * r["ratio"] for r in rs], [100 * r["accuracy"] for r in rs],
                        yerr=[100 * r["accuracy_std"] for r in rs], marker="o", capsize=3, label=method)
        for b in out["settings"]["budgets"]:
            ax.axvline(100 * b, color="grey", lw=0.6, ls=":")
        ax.axhline(100 * out["models"][name]["dense_accuracy"], color="black", lw=0.8, ls="--", label="dense")
        ax.set_xlabel("measured latency (% of dense, same run)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--budgets", nargs="*", type=float, default=[0.7, 0.5, 0.3])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--kd-budgets", nargs="*", type=float, default=[0.3],
                   help="budgets at which MDP's plan is also fine-tuned with distillation from the dense model")
    p.add_argument("--train-limit", type=int, default=20000)
    p.add_argument("--test-limit", type=int, default=5000)
    p.add_argument("--dense-epochs", type=int, default=5)
    p.add_argument("--finetune-iterations", type=int, default=120)
    p.add_argument("--batch", type=int, default=16, help="batch size latency is measured at")
    p.add_argument("--quick", action="store_true", help="a smoke run: one model, one budget, tiny settings")
    p.add_argument("--no-measured-check", action="store_true",
                   help="our variants keep the plan their latency model predicts fits (no re-solve on measurement)")
    p.add_argument("--out", default=str(RESULTS / "pareto.json"))
    args = p.parse_args()
    if args.quick:
        args.models, args.budgets, args.seeds = args.models[:1], [0.5], 1
        args.train_limit, args.test_limit, args.dense_epochs, args.finetune_iterations = 2000, 1000, 1, 5
        args.out = str(Path(args.out).with_name("pareto-quick.json"))
    t0 = time.monotonic()
    out = run(args)
    out["seconds"] = time.monotonic() - t0
    write(out, args.out)
    print_table(out)
    png = Path(args.out).with_suffix(".png")
    plot(out, png)
    print(f"\nwrote {args.out} and {png} ({out['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
