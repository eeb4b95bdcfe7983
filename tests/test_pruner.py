"""The pruning step of any training loop (mdprune.Pruner): the README's loop as written, masks held through
training, constraints as users write them (any subset, the table, refusals), checkpoints, unreachable steps,
the command line's --constraint, and prune runs taking the model's input size."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mdprune.latency import LatencySettings, TimingSettings
from mdprune.solve import InfeasibleBudget
from mdprune.train import Pruner, PruneSchedule

from .conftest import build, rel_err

README = Path(__file__).resolve().parents[1] / "README.md"
# measurements from operation counts, not a clock: nothing here depends on the machine's load
FAST = LatencySettings(grid_points=2, grid_points_3d=2, backend="flops",
                       timing=TimingSettings(warmup=1, reps=1, rounds=1, min_sample_ms=0.0))


def _data(x: torch.Tensor, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, *x.shape[1:], generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def _pruner(key: str, constraints: dict[str, Any], tmp_path: Path, **kw: Any) -> tuple[Pruner, torch.Tensor]:
    model, x, space = build(key)
    return Pruner(model.train(), x, constraints, settings=FAST, lut=tmp_path / "lut", space=space, **kw), x


def _train(pruner: Pruner, opt: torch.optim.Optimizer, data: list, check: bool = False) -> None:
    """The loop of the README, checking after every step that what the plan prunes is held at zero."""
    for inputs, targets in data:
        loss = F.cross_entropy(pruner.model(inputs), targets)
        opt.zero_grad()
        loss.backward()
        pruner.after_backward()
        opt.step()
        pruner.step(opt)
        if check:
            _assert_held(pruner, opt)


def _assert_held(pruner: Pruner, opt: torch.optim.Optimizer) -> None:
    named = dict(pruner.model.named_parameters()) | dict(pruner.model.named_buffers())
    for name, axes in pruner._masker.masks.items():  # noqa: SLF001 - the masks the plan set
        t = named[name]
        tensors = [t] + [v for v in opt.state.get(t, {}).values() if isinstance(v, torch.Tensor) and v.shape == t.shape]
        if t.grad is not None:
            tensors.append(t.grad)
        for v in tensors:
            for axis, keep in axes.items():
                pruned = (keep == 0).nonzero().flatten().to(v.device)
                assert not v.detach().index_select(axis, pruned).any(), (name, axis)


def test_readme_loop_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("MDPRUNE_CACHE", str(tmp_path))  # the example's latency table goes here, not to ~/.cache
    text = README.read_text()
    section = text[text.index("### Prune inside your own training loop"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's example, run as the test
    pruner, slim, report = ns["pruner"], ns["slim"], ns["report"]
    assert [h["step"] for h in report.history] == [0, 1] and pruner.done
    assert [r["name"] for r in report.constraints] == ["latency", "params"]
    assert all(r["satisfiable"] for r in report.constraints)
    assert sum(p.numel() for p in slim.parameters()) == report.params[1] <= 0.7 * report.params[0]
    assert report.predicted_ms <= next(c for c in report.checks if c["kept"])["budget_ms"] * (1 + 1e-6)
    pruner.model.eval()
    slim.eval()
    x = ns["x"]
    with torch.no_grad():  # masks held through training: the slim model computes what the masked one does
        assert rel_err(slim(x), pruner.model(x)) <= 1e-4


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masks_hold_weights_gradients_statistics_and_optimizer_state(optimizer, tmp_path):
    pruner, x = _pruner("tiny_cnn", {"latency": "70%"}, tmp_path,
                        schedule=PruneSchedule("iterative", steps=2, every=2))
    params = pruner.model.parameters()
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9) if optimizer == "sgd" else \
        torch.optim.AdamW(params, lr=0.01)
    _train(pruner, opt, _data(x, 6), check=True)
    assert pruner.done and len(pruner.history) == 2 and pruner.iteration == 6
    assert pruner.history[0]["budget_ms"] > pruner.history[1]["budget_ms"] == pytest.approx(pruner.targets["latency"])
    slim, report = pruner.finish()
    assert report.plan == pruner.plan.to_dict() and report.measured_ms is not None
    pruner.model.eval()
    with torch.no_grad():
        assert rel_err(slim.eval()(x), pruner.model(x)) <= 1e-4


def test_constraints_any_subset_and_the_table(tmp_path):
    said: list[str] = []
    pruner, x = _pruner("tiny_cnn", {"macs": "60%", "params": "2000"}, tmp_path, log=said.append)
    table = "\n".join(said)
    assert "smallest reachable" in table and table.count("satisfiable") == 2 and "NOT" not in table
    assert pruner.targets == {"macs": pytest.approx(0.6 * pruner.dense["macs"]), "params": 2000.0}
    pruner.accumulate(_data(x, 2))
    slim, report = pruner.finish()
    assert report.target_ms is None and report.measured_ms is not None  # no latency target; still measured
    assert report.macs[1] <= 0.6 * report.macs[0] * (1 + 1e-9) and report.params[1] <= 2000
    assert sum(p.numel() for p in slim.parameters()) == report.params[1]


def test_unreachable_constraints_are_refused_before_training(tmp_path):
    said: list[str] = []
    with pytest.raises(InfeasibleBudget, match=r"params target 0.01% .* smallest reachable is [0-9.]+ parameters"):
        _pruner("tiny_cnn", {"latency": "90%", "params": "0.01%"}, tmp_path, log=said.append)
    assert "NOT satisfiable" in "\n".join(said)
    with pytest.raises(ValueError, match="nothing would be pruned"):
        _pruner("tiny_cnn", {"latency": "1000ms"}, tmp_path)
    with pytest.raises(ValueError, match="unknown constraint 'energy'"):
        Pruner(torch.nn.Linear(2, 2), torch.randn(1, 2), {"energy": "50%"})  # before anything is analysed


def test_state_dict_continues_where_it_stopped(tmp_path):
    data = _data(torch.zeros(1, 3, 8, 8), 6)
    sched = PruneSchedule("iterative", steps=2, every=2)

    def run(stop: int | None) -> Pruner:
        torch.manual_seed(0)
        pruner, _ = _pruner("tiny_cnn", {"latency": "70%"}, tmp_path, schedule=sched)
        opt = torch.optim.SGD(pruner.model.parameters(), lr=0.05, momentum=0.9)
        if stop is None:
            _train(pruner, opt, data)
            return pruner
        _train(pruner, opt, data[:stop])
        saved = (pruner.state_dict(), pruner.model.state_dict(), opt.state_dict())
        model, x, space = build("tiny_cnn")
        again = Pruner(model.train(), x, {"latency": "70%"}, settings=FAST, lut=tmp_path / "lut", space=space,
                       schedule=sched, state=saved[0])
        again.model.load_state_dict(saved[1])
        opt = torch.optim.SGD(again.model.parameters(), lr=0.05, momentum=0.9)
        opt.load_state_dict(saved[2])
        _train(again, opt, data[stop:])
        return again

    full, resumed = run(None), run(3)
    assert [h["plan_digest"] for h in full.history] == [h["plan_digest"] for h in resumed.history]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k], b[k]) for k in a)


@pytest.mark.parametrize("final", [False, True])
def test_a_step_below_the_smallest_reachable_latency_takes_the_smallest_plan(final, tmp_path):
    from mdprune.report import write_report

    said: list[str] = []
    pruner, _ = _pruner("tiny_cnn", {"latency": "90%"}, tmp_path, log=said.append,
                        schedule=PruneSchedule("iterative", steps=1 if final else 2, every=1))
    floor, dense = pruner.search.smallest("latency"), pruner.dense["latency"]
    # a target whose first step (or only step) lies below the floor, as a noisy dense measurement can make it
    target = 0.5 * floor if final else 0.5 * floor**2 / dense
    pruner.calibration = {**pruner.calibration, "targets": {"latency": target}}
    budget = pruner.targets_at(0)["latency"]
    assert budget < floor
    scores = {d.name: torch.rand(d.size).numpy() for d in pruner.space.prunable_dims()}
    record = pruner.prune(scores=scores)
    assert record["unreachable"] == {"latency": {"budget": pytest.approx(budget), "smallest": pytest.approx(floor)}}
    assert record["predicted_ms"] == pytest.approx(floor, rel=1e-6)
    assert any("taking the smallest reachable plan" in s for s in said)
    assert bool(record["checks"]) == final  # the final step still measures what it kept
    files = write_report({"history": [record]}, tmp_path / "report")
    assert "the smallest reachable plan was taken" in Path(files["markdown"]).read_text()


def test_report_of_a_pruner_is_written_like_a_run(tmp_path):
    from mdprune.report import write_report
    from mdprune.train import RunResult

    pruner, x = _pruner("tiny_cnn", {"latency": "80%", "params": "90%"}, tmp_path)
    pruner.accumulate(_data(x, 2))
    _, report = pruner.finish()
    result = RunResult.from_report(report, model="tiny_cnn")
    assert result.budget == "80%" and result.constraints == {"latency": "80%", "params": "90%"}
    text = Path(write_report(report, tmp_path / "report")["markdown"]).read_text()
    assert text.splitlines()[0].endswith("at latency=80%, params=90%") and "## Constraints" in text
    assert "| params | 90% |" in text


def test_command_line_constraints(tmp_path):
    from mdprune.cli import make_parser
    from mdprune.cli.prune import default_run_dir, run_config

    args = make_parser().parse_args(["prune", "small_resnet18", "--constraint", "latency=40%", "--constraint",
                                     "macs=2G", "--params", "60%"])
    cfg = run_config(args)
    assert cfg.constraint_set() == {"latency": "40%", "macs": "2G", "params": "60%"}
    assert default_run_dir("a:b", cfg.constraint_set()) == Path("runs/a_b-latency40pct-macs2G-params60pct")
    assert run_config(make_parser().parse_args(["prune", "m"])).constraint_set() == {"latency": "50%"}
    assert run_config(make_parser().parse_args(["prune", "m", "--budget", "3ms"])).constraint_set() == {
        "latency": "3ms"}
    with pytest.raises(ValueError, match="given twice"):
        run_config(make_parser().parse_args(["prune", "m", "--budget", "3ms", "--constraint",
                                             "latency=40%"])).constraint_set()


def test_prune_runs_take_the_model_input_size(tmp_path):
    from PIL import Image

    from mdprune.train.config import RunConfig, data_spec, run_data, run_model

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (12, 12), (200, 30, 30)).save(tmp_path / split / c / "0.png")
    cfg = RunConfig(model="small_vit", data=str(tmp_path))
    model = run_model(cfg.model, {"num_classes": 2}, data_spec(cfg))
    assert run_data(cfg, model, True)[0][0][0].shape == (3, 28, 28)  # small_vit's own size, not 224
    cfg = RunConfig(model="small_vit", data=str(tmp_path), input_size=16)
    model = run_model(cfg.model, {"num_classes": 2}, data_spec(cfg), cfg.input_size)  # built for 16x16
    x = run_data(cfg, model, False)[0][0][0]
    assert x.shape == (3, 16, 16) and model(x.unsqueeze(0)).shape == (1, 2)
