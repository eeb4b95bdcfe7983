"""Latency tables, the latency model and its validation (behaviour only: no timing is asserted)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

import mdprune
from mdprune import Plan
from mdprune.latency import (
    FingerprintMismatch,
    IncompleteTable,
    LatencyModel,
    LatencySettings,
    LatencyTable,
    TimingSettings,
    build,
    fingerprint,
    latency_model,
    measure_many,
    open_table,
    random_plans,
    signature,
    validate,
)
from mdprune.latency.backends import count_flops
from mdprune.latency.build import offdiag_missing
from mdprune.latency.model import interpolate
from mdprune.latency.ops import ROLES, op_module
from mdprune.latency.timing import Timer

from .conftest import build as build_model

FAST = TimingSettings(warmup=1, reps=1, rounds=1, min_sample_ms=0.0)


def fast_settings(**kw) -> LatencySettings:
    kw = {"grid_points": 2, "grid_points_3d": 2, "chunk": 4, **kw}
    return LatencySettings(timing=TimingSettings(warmup=1, reps=1, rounds=1, min_sample_ms=0.0), **kw)


def fake_table(space: mdprune.PruningSpace, f) -> LatencyTable:
    """A table filled without timing: entry = f(kind, widths)."""
    table = LatencyTable(fingerprint())
    lm = LatencyModel(space, table)
    for op, p in lm.needed():
        table.put(op, p, f(op.kind, p), 0.0)
    return table


def bilinear(kind: str, p: tuple[int, ...]) -> float:
    return 1e-3 * float(np.prod(p)) + 0.01  # multilinear in the widths: interpolation is exact everywhere


@pytest.mark.parametrize("key", ["tiny_cnn", "tiny_vit"])
def test_builder_measures_every_needed_point(key, tmp_path):
    _, _, space = build_model(key)
    settings = fast_settings()
    table = open_table(settings, tmp_path)
    empty = LatencyModel(space, table, grid_points=2, grid_points_3d=2)
    expected = len(empty.needed()) + len(offdiag_missing(empty, table))  # attention off its diagonal too
    report = build(space, table, settings, progress=False)
    assert report.remaining == 0 and report.measured == expected
    lm = latency_model(space, table, settings)
    assert lm.calibrated and lm.predict(space.dense_sizes()) == pytest.approx(
        table.models[next(iter(table.models))]["ms"])
    kinds = {e["kind"] for e in table.ops.values()}
    assert kinds >= ({"conv2d", "linear", "attention", "node"} if key == "tiny_vit" else {"conv2d", "linear"})
    again = open_table(settings, tmp_path)  # reopened from the cache: nothing left to measure
    assert build(space, again, settings, progress=False).measured == 0


def test_prediction_is_sum_of_entries_plus_constant():
    _, _, space = build_model("tiny_cnn")
    lm = LatencyModel(space, fake_table(space, bilinear))
    lm.calibrate(10.0)
    for seed in range(4):
        plan = Plan.random(space, seed=seed, block_prob=0.5)
        sizes, removed = plan.sizes(space), set(plan.removed)
        expected = sum(bilinear(op.kind, tuple(op.widths(sizes)[r] for r in ROLES[op.kind]))
                       for op in space.ops if op.block not in removed)
        assert lm.predict(sizes, removed) == pytest.approx(lm.constant + expected, rel=1e-9)
    assert lm.predict(space.dense_sizes()) == pytest.approx(10.0)


def test_interpolation_is_exact_at_grid_points():
    rng = np.random.default_rng(0)
    axes = [np.array([8, 16, 40]), np.array([4, 12])]
    values = rng.random((3, 2))
    for i, a in enumerate(axes[0]):
        for j, b in enumerate(axes[1]):
            assert interpolate(axes, values, [np.array(a), np.array(b)]) == pytest.approx(values[i, j])
    mid = interpolate(axes, values, [np.array(12), np.array(4)])
    assert mid == pytest.approx(0.5 * (values[0, 0] + values[1, 0]))


def test_grid_model_matches_table_at_grid_points():
    _, _, space = build_model("tiny_vit")
    rng = np.random.default_rng(1)
    table = fake_table(space, lambda k, p: float(rng.random()))
    lm = LatencyModel(space, table, grid_points=2, grid_points_3d=2)
    for i, g in enumerate(lm.grids):
        if g.op.kind != "attention":
            continue
        p = g.points()[-1]
        assert lm.op_ms(i, space.dense_sizes()) == pytest.approx(table.get(g.sig, p))


def test_linear_model_freezes_input_width():
    _, _, space = build_model("tiny_cnn")
    table = fake_table(space, bilinear)
    lin = LatencyModel(space, table, mode="linear")
    plan = Plan.uniform(space, 0.5)
    sizes = plan.sizes(space)
    i = next(k for k, op in enumerate(space.ops) if op.name == "res.3")
    dense_in = space.ops[i].widths(space.dense_sizes())["in"]
    out = space.ops[i].widths(sizes)["out"]
    assert lin.op_ms(i, sizes) == pytest.approx(bilinear("conv2d", (dense_in, out)))
    dims, t = lin.term(i)
    assert dims == ("stem",)  # only the output dimension drives it


def test_linear_model_frozen_at_current_widths():
    _, _, space = build_model("tiny_cnn")
    lin = LatencyModel(space, fake_table(space, bilinear), mode="linear")
    current = Plan.uniform(space, 0.5).sizes(space)
    i = next(k for k, op in enumerate(space.ops) if op.name == "res.3")
    now = lin.frozen_at(current)
    w_in = space.ops[i].widths(current)["in"]
    assert now.op_ms(i, space.dense_sizes()) == pytest.approx(
        bilinear("conv2d", (w_in, space.ops[i].widths(space.dense_sizes())["out"])))


def test_solver_terms_cover_every_choice():
    _, _, space = build_model("tiny_vit")
    lm = LatencyModel(space, fake_table(space, bilinear))
    i = next(k for k, op in enumerate(space.ops) if op.kind == "attention")
    dims, t = lm.term(i)
    assert t.shape == tuple(len(space.dims[d].widths()) for d in dims)
    sizes = space.dense_sizes()
    assert t[(-1,) * len(dims)] == pytest.approx(lm.op_ms(i, sizes))


def test_table_round_trip_and_foreign_fingerprint(tmp_path):
    _, _, space = build_model("tiny_cnn")
    table = fake_table(space, bilinear)
    table.models["m"] = {"ms": 1.5, "noise": 0.01}
    path = table.save(tmp_path / "t.json")
    again = LatencyTable.load(path, expect=fingerprint())
    assert again.ops == json.loads(json.dumps(table.ops)) and again.models == table.models
    op = space.ops[0]
    p = LatencyModel(space, table).grids[0].points()[0]
    assert again.get(signature(op), p) == table.get(signature(op), p)
    other = fingerprint(batch=8, threads=2)
    with pytest.raises(FingerprintMismatch, match=r"batch 1 \(table\) vs 8 \(now\)"):
        LatencyTable.load(path, expect=other)
    assert len(LatencyTable.load(path, expect=other, force=True)) == len(table)


def test_interrupted_build_resumes_without_measuring_twice(tmp_path):
    _, _, space = build_model("tiny_cnn")
    settings = fast_settings()
    first: list = []

    def stop_after_first_chunk(name, p):
        first.append((name, p))
        if len(first) == settings.chunk:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(space, open_table(settings, tmp_path), settings, progress=False, on_point=stop_after_first_chunk)
    second: list = []
    report = build(space, open_table(settings, tmp_path), settings, progress=False,
                   on_point=lambda n, p: second.append((n, p)))
    needed = LatencyModel(space, open_table(settings, tmp_path), grid_points=2, grid_points_3d=2).needed()
    assert report.skipped == len(first) and not set(first) & set(second)
    assert len(first) + len(second) == len(needed)


def test_time_budget_stops_early_and_model_refuses_incomplete_table(tmp_path):
    _, _, space = build_model("tiny_vit")
    settings = fast_settings()
    table = open_table(settings, tmp_path)
    report = build(space, table, settings, progress=False, time_budget=0.0)
    assert report.measured == 0 and report.remaining > 0
    with pytest.raises(IncompleteTable, match="lacks"):
        latency_model(space, table, settings).predict(space.dense_sizes())


def test_timer_drops_descheduled_samples():
    """A call that sleeps uses wall time without CPU time: it looks descheduled and is dropped."""
    timer = Timer(TimingSettings(reps=2, max_retakes=2))
    ms, dropped = timer.round(lambda: time.sleep(0.002), inner=1)
    assert dropped == 4 and ms >= 2.0
    busy = measure_many({"spin": lambda: sum(range(2000))}, TimingSettings(reps=3, rounds=2))["spin"]
    assert busy.ms > 0 and len(busy.rounds) == 2


def test_op_modules_build_at_any_width():
    _, _, space = build_model("tiny_vit")
    for op in space.ops:
        widths = op.widths(space.dense_sizes())
        module, inputs = op_module(op.kind, op.fixed, {r: widths[r] for r in ROLES[op.kind]}, batch=3)
        with torch.no_grad():
            out = module(*inputs)
        assert out.shape[0] == 3


def test_validation_reports_both_models(tmp_path):
    _, _, space = build_model("tiny_cnn")
    settings = fast_settings()
    table = open_table(settings, tmp_path)
    build(space, table, settings, progress=False, calibrate=False)
    v = validate(space, table, settings, random_plans(space, 3, seed=0), progress=False)
    assert len(v.rows) == 3
    s = v.summary()
    assert all(np.isfinite(s[k]) for k in ("table_median_pct", "linear_median_pct", "noise_floor_pct"))
    assert all(r["measured"] > 0 and r["table"] > 0 for r in v.rows)


def test_a_point_measured_again_keeps_its_fastest_value_and_counts():
    _, _, space = build_model("tiny_cnn")
    op = space.ops[0]
    table = LatencyTable(fingerprint())
    table.put(op, (1, 2), 0.5, 0.1)
    table.put(op, (1, 2), 0.7, 0.0)
    assert table.entry(signature(op), (1, 2)) == (0.5, 0.1, 2)
    table.put(op, (1, 2), 0.3, 0.2)
    assert table.entry(signature(op), (1, 2)) == (0.3, 0.2, 3)
    table.ops[signature(op)]["points"]["4x4"] = [1.0, 0.0]  # a point written before counts existed
    assert table.entry(signature(op), (4, 4)) == (1.0, 0.0, 1)


def test_build_remeasures_a_spike_and_stops_after_its_rechecks(tmp_path):
    _, _, space = build_model("tiny_cnn")
    settings = fast_settings(grid_points=3)
    table = open_table(settings, tmp_path)
    build(space, table, settings, progress=False)
    lm = LatencyModel(space, table, grid_points=3, grid_points_3d=2)
    g = next(g for g in lm.grids if g.op.kind == "conv2d" and not g.op.fixed["depthwise"]
             and [len(a) for a in g.axes] == [3, 3])
    p = g.points()[4]  # the middle of a 3 x 3 grid: four neighbours
    table.ops[g.sig]["points"]["x".join(map(str, p))] = [1000.0, 0.0, 1]  # measured while the machine stalled
    report = build(space, table, settings, progress=False)
    ms, _, times = table.entry(g.sig, p)
    assert report.measured == 0 and report.rechecked >= 1
    assert ms < 1000.0 and 2 <= times <= 1 + settings.recheck
    for _ in range(settings.recheck + 1):
        build(space, table, settings, progress=False)
    assert table.entry(g.sig, p)[2] <= 1 + settings.recheck


def test_suspects_are_noisy_points_and_spikes_above_every_neighbour():
    from mdprune.latency.build import suspects

    _, _, space = build_model("tiny_cnn")
    settings = fast_settings(grid_points=3)
    table = fake_table(space, lambda kind, p: 0.01 * float(np.prod(p)) + 0.1)
    lm = LatencyModel(space, table, grid_points=3, grid_points_3d=2)
    assert suspects(lm, table, settings) == []
    g = next(g for g in lm.grids if g.op.kind == "conv2d" and not g.op.fixed["depthwise"]
             and [len(a) for a in g.axes] == [3, 3])
    corner, middle = g.points()[-1], g.points()[4]
    table.ops[g.sig]["points"]["x".join(map(str, corner))][1] = 0.5  # noisy
    key = "x".join(map(str, middle))
    table.ops[g.sig]["points"][key][0] *= 3  # a spike
    found = {(signature(op), p) for op, p in suspects(lm, table, settings)}
    assert found == {(g.sig, corner), (g.sig, middle)}
    table.ops[g.sig]["points"][key][2] = 1 + settings.recheck  # re-checked enough already
    assert {p for _, p in suspects(lm, table, settings)} == {corner}


def test_load_watch_flags_chunks_whose_canary_ran_slow():
    from mdprune.latency.backends import EagerBackend
    from mdprune.latency.loadwatch import CANARY_KEY, LoadWatch
    from mdprune.latency.timing import Measurement

    watch = LoadWatch(EagerBackend(), 1, "cpu", torch.float32)
    runners: dict = {}
    watch.add_to(runners)
    assert runners[CANARY_KEY]() is not None  # the canary runs
    for points, ms in ((["a", "b"], 1.0), (["c"], 1.5), (["d"], 1.05), (["e"], 0.9)):
        watch.record(points, {CANARY_KEY: Measurement(ms, 0.0)})
    assert watch.best == 0.9 and watch.worst_slowdown == pytest.approx(0.5)
    assert watch.take_slow(0.1) == ["a", "b", "c", "d"]  # all more than 10% slower than the best (0.9)
    assert watch.take_slow(0.1) == []  # forgotten once handed out


def test_a_table_measured_by_another_method_version_is_refused(tmp_path):
    old = LatencyTable({**fingerprint(), "method": 1})
    path = old.save(tmp_path / "old.json")
    with pytest.raises(FingerprintMismatch, match="method 1 \\(table\\) vs 2 \\(now\\)"):
        LatencyTable.load(path, expect=fingerprint())


def test_flops_backend_measures_deterministically_without_a_clock(tmp_path):
    from mdprune.latency import FlopsBackend

    _, _, space = build_model("tiny_cnn")
    tables = []
    for run in ("a", "b"):
        settings = fast_settings(backend=FlopsBackend())
        tables.append(open_table(settings, tmp_path / run))
        build(space, tables[-1], settings, progress=False)
    assert tables[0].fingerprint["backend"] == "flops" and tables[0].ops == tables[1].ops
    lm = latency_model(space, tables[0], settings)
    small, dense = lm.predict(Plan.uniform(space, 0.5).sizes(space)), lm.predict(space.dense_sizes())
    assert 0 < small < dense  # counts shrink with the widths
    with pytest.raises(TypeError, match="only the runners it made"):
        FlopsBackend().measure({"x": lambda: None}, settings.timing)


def test_calibration_times_references_against_dense_in_pairs(monkeypatch):
    """Reference plans are timed as paired ratios against the dense model: separate measurements that read every
    model as slow as the dense one (a loaded machine) must not reach the fit."""
    import mdprune.search.calibrate as calibrate
    from mdprune.latency import Measurement, Ratio, calibration_plans

    _, _, space = build_model("tiny_cnn")
    table = fake_table(space, bilinear)
    raw = LatencyModel(space, table)
    raw.calibrate(1.0)

    def truth(plan: Plan) -> float:  # what the machine would measure when quiet: linear in the table's sum
        return 2.0 * (raw.predict_plan(plan) - raw.constant) / raw.scale + 1.0

    def separate(models, *a, **k):  # a loaded machine: every model measured alone reads the dense latency
        return {k: Measurement(ms=truth(Plan()), noise=0.01) for k in models}

    def paired(a, b, *args, **kw):
        ratio = truth(paired.plans.pop(0)) / truth(Plan())
        return Ratio(ratio, ratio, ratio, ratio, 1.0, 16, 0.0, True, 0.95)

    refs = calibration_plans(space)
    paired.plans = list(refs)
    monkeypatch.setattr(calibrate, "measure_models", separate)
    monkeypatch.setattr(calibrate, "measure_models_ratio", paired)
    lm, dense = calibrate.calibrated_model(space, table, fast_settings(backend="flops"))
    assert not paired.plans  # every reference was timed in pairs
    assert dense["ms"] == pytest.approx(truth(Plan()))
    assert min(truth(p) for p in refs) < 0.8 * truth(Plan())  # the references are well apart from dense
    for p in refs:  # interpolation between grid points leaves a little error
        assert lm.predict_plan(p) == pytest.approx(truth(p), rel=0.05)


class LatentQuery(nn.Module):
    """timm's attention pooling: a learned query, expanded over the batch, fed straight to a linear layer."""

    def __init__(self):
        super().__init__()
        self.latent, self.q = nn.Parameter(torch.randn(1, 1, 8)), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(self.latent.expand(x.shape[0], -1, -1)) + x


def test_flops_are_counted_when_a_layer_reads_a_parameter() -> None:
    model = LatentQuery()
    flops, out = count_flops(model, (torch.randn(2, 1, 8),))
    assert flops == 2 * (2 * 8 * 8) and out.shape == (2, 1, 8)
    assert all(p.requires_grad for p in model.parameters())  # frozen for the count only
