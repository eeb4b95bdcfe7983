"""The CUDA path, checked on the CPU: device placement, deployment settings, fingerprints, chunk sizing, mixed
precision and the distributed helpers, with CUDA queries faked where a GPU would answer (no timing asserted)."""

from __future__ import annotations

import argparse
import os
import socket

import numpy as np
import pytest
import torch
from torch import nn

import mdprune
from mdprune.latency import LatencyModel, LatencySettings, LatencyTable, TimingSettings, build, signature
from mdprune.latency import table as table_module
from mdprune.latency.build import deployment, measure_models, offdiag_missing, plan_chunks, suspects
from mdprune.latency.regimes import OFFDIAG, attention_ms, regime_signature, split_values, without_flash
from mdprune.train import distributed as dist_module
from mdprune.train.loop import TrainConfig, grad_scaler, train_epoch

from .conftest import build as build_model


def fast(**kw) -> LatencySettings:
    kw = {"grid_points": 2, "grid_points_3d": 2, "chunk": 4, "backend": "flops", **kw}
    return LatencySettings(timing=TimingSettings(warmup=1, reps=1, rounds=1, min_sample_ms=0.0), **kw)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """CUDA queries answered as an H200 would, without a GPU."""
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n")
    monkeypatch.setattr(table_module, "NVIDIA_VERSION_FILE", str(version))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", lambda: 12080, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")


# ---- importance state -------------------------------------------------------------------------------------
def test_importance_state_follows_the_device_of_the_sums():
    model, x, space = build_model("tiny_cnn")
    acc = mdprune.importance.ImportanceAccumulator(space, mdprune.masked(space, mdprune.Plan()))
    acc.batches = 3
    acc.sums = {k: v.to("meta") for k, v in acc.sums.items()}  # stands for a GPU: nothing may stay on the host
    state = acc.state()
    assert {t.device.type for t in state.values()} == {"meta"}
    acc2 = mdprune.importance.ImportanceAccumulator(space, mdprune.masked(space, mdprune.Plan()))
    acc2.load_state({"__batches__": torch.tensor(5.0, dtype=torch.float64), **{k: torch.ones_like(v)
                                                                                 for k, v in acc2.sums.items()}})
    assert acc2.batches == 5 and all(v.device.type == "cpu" for v in acc2.sums.values())


# ---- measurement leaves the caller's model alone, deploys like the table ----------------------------------
def test_measuring_never_changes_the_callers_model():
    model, x, space = build_model("tiny_cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = fast(backend="eager", dtype="bfloat16", channels_last=True)
    measure_models({"a": model, "b": model}, space, settings)
    assert model.training
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and v.device == before[k].device and torch.equal(v, before[k])
        if v.dim() == 4:
            assert v.is_contiguous()  # not turned channels-last
    settings = fast(backend="eager", dtype="bfloat16", autocast=True)
    measure_models({"a": model}, space, settings)
    assert next(model.parameters()).dtype == torch.float32


def test_deployment_settings_are_checked():
    with pytest.raises(ValueError, match="autocast needs a half dtype"):
        LatencySettings(autocast=True)
    with pytest.raises(ValueError, match="eager PyTorch settings"):
        LatencySettings(backend="onnxruntime", channels_last=True)
    with pytest.raises(ValueError, match="dtype"):
        LatencySettings(dtype="half")


def test_cuda_switches_are_set_explicitly_while_measuring_and_restored():
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    with deployment(LatencySettings(device="cuda", tf32=True, cudnn_benchmark=True)):
        assert cudnn.benchmark and cudnn.allow_tf32 and matmul.allow_tf32
    with deployment(LatencySettings(device="cuda", tf32=False, cudnn_benchmark=False)):
        assert not cudnn.benchmark and not cudnn.allow_tf32 and not matmul.allow_tf32
    with deployment(LatencySettings(device="cuda")):  # defaults: autotune; PyTorch's TF32 (convolutions only)
        assert cudnn.benchmark and cudnn.allow_tf32 and not matmul.allow_tf32
    assert (cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32) == old


# ---- fingerprint --------------------------------------------------------------------------------------------
def test_cuda_fingerprint_records_gpu_software_and_deployment(fake_gpu):
    fp = LatencySettings(device="cuda", dtype="float16", channels_last=True, tf32=True).fingerprint()
    assert fp["gpu"] == "NVIDIA H200" and fp["capability"] == "9.0" and fp["cuda"] == "12.8"
    assert fp["driver"] == "550.54.15" and fp["cuda_driver"] == 12080 and fp["cudnn"] == 91002
    assert fp["channels_last"] is True and fp["autocast"] is False and fp["cudnn_benchmark"] is True
    assert fp["tf32_cudnn"] is True and fp["float32_matmul_precision"] == "high"
    others = [LatencySettings(device="cuda", dtype="float16", channels_last=True, tf32=False),
              LatencySettings(device="cuda", dtype="float16", tf32=True),
              LatencySettings(device="cuda", dtype="float16", channels_last=True, tf32=True, cudnn_benchmark=False),
              LatencySettings(device="cuda", dtype="float16", channels_last=True, tf32=True, autocast=True)]
    names = {table_module.cache_name(s.fingerprint()) for s in others}
    assert table_module.cache_name(fp) not in names and len(names) == len(others)


def test_cpu_fingerprint_keeps_its_key_unless_deployment_changes():
    plain = LatencySettings().fingerprint()
    assert "channels_last" not in plain and "cudnn_benchmark" not in plain
    assert LatencySettings(channels_last=True).fingerprint()["channels_last"] is True


# ---- signatures -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["tiny_cnn", "tiny_vit"])
def test_signatures_do_not_depend_on_the_analysed_batch(key):
    model, x, space = build_model(key)
    steps = {"channel": 4} if key == "tiny_cnn" else {"embed": 8, "mlp": 16, "qk": 2, "v": 2}
    big = mdprune.analyze(model, x.repeat(3, 1, 1, 1)[:5], steps=steps)
    one = mdprune.analyze(model, x[:1], steps=steps)
    assert [signature(o) for o in big.ops] == [signature(o) for o in one.ops]
    assert any(o.kind == "node" for o in one.ops)


# ---- chunks sized by memory -------------------------------------------------------------------------------
def test_chunks_fit_the_free_memory(monkeypatch):
    from mdprune.latency.ops import ROLES, op_bytes

    _, _, space = build_model("tiny_cnn")
    settings = fast(batch=64, chunk=32)
    points = LatencyModel(space, LatencyTable({}), grid_points=4).needed()
    sizes = {(id(op), w): op_bytes(op.kind, op.fixed, dict(zip(ROLES[op.kind], w, strict=True)), 64)
             for op, w in points}
    assert all(h > 0 and r > 0 for h, r in sizes.values())
    free = 4 * max(h + r for h, r in sizes.values())
    chunks = plan_chunks(points, settings, free=free)
    assert [p for c in chunks for p in c] == points and len(chunks) > len(points) / settings.chunk
    for c in chunks:
        held = sum(sizes[(id(op), w)][0] for op, w in c) + max(sizes[(id(op), w)][1] for op, w in c)
        assert len(c) <= settings.chunk and (held <= settings.memory_fraction * free or len(c) == 1)
    assert len(plan_chunks(points, settings, free=10**15)) == -(-len(points) // settings.chunk)
    assert all(len(c) == 1 for c in plan_chunks(points, settings, free=1))  # nothing fits: one at a time
    # the free-memory query of the device is what sizes them
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (free, 8 * free))
    cuda = fast(device="cuda", batch=64, chunk=32)
    assert [len(c) for c in plan_chunks(points, cuda)] == [len(c) for c in chunks]


# ---- onnxruntime on cuda --------------------------------------------------------------------------------------
def test_onnxruntime_on_cuda_is_refused_without_its_cuda_provider(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from mdprune.latency.backends import get_backend

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="CUDA provider"):
        LatencySettings(device="cuda", backend="onnxruntime")
    with pytest.raises(ValueError, match="CUDA provider"):
        get_backend("onnxruntime", 1, "cuda")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    backend = get_backend("onnxruntime", 1, "cuda:1")
    assert backend.device == torch.device("cuda:1")


# ---- mixed precision ----------------------------------------------------------------------------------------
def _data(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")
@pytest.mark.parametrize("scale,expect", [(float("inf"), 0), (1.0, 4)])
def test_grad_scaler_steps_that_overflow_skip_importance(scale, expect):
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    before = model.weight.detach().clone()
    calls = []
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    train_epoch(model, _data(), opt, sch, TrainConfig(), torch.device("cpu"), scaler=scaler,
                after_backward=lambda: calls.append(bool(torch.isfinite(model.weight.grad).all())))
    assert len(calls) == expect and all(calls)  # importance only ever sees finite gradients
    assert torch.equal(model.weight, before) == (expect == 0)  # overflowed steps are skipped


def test_one_grad_scaler_per_optimizer_across_epochs():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert grad_scaler(opt, torch.device("cpu")) is grad_scaler(opt, torch.device("cpu"))


# ---- masks held on the device -------------------------------------------------------------------------------
def test_masks_live_with_their_tensors_and_follow_a_moved_model():
    from mdprune.train.masking import Masker

    _, _, space = build_model("tiny_cnn")
    masker = Masker(space)
    plan = mdprune.Plan.random(space, seed=1, block_prob=0.0)
    masker.set_plan(plan)
    named = dict(masker.model.named_parameters()) | dict(masker.model.named_buffers())
    assert masker.masks
    for name, axes in masker.masks.items():
        assert all(m.dtype == named[name].dtype and m.device == named[name].device for m in axes.values())
    masker.model.double()
    masker.hold()
    assert all(m.dtype == torch.float64 for axes in masker.masks.values() for m in axes.values())


# ---- trend re-checks off on the GPU ---------------------------------------------------------------------------
def test_gpu_tile_steps_are_not_rechecked_as_spikes():
    _, _, space = build_model("tiny_cnn")
    table = LatencyTable({})
    lm = LatencyModel(space, table, grid_points=3)
    for op, p in lm.needed():
        table.put(op, p, 0.01 * float(np.prod(p)) + 0.1, 0.0)
    g = next(g for g in lm.grids if g.op.kind == "conv2d" and not g.op.fixed["depthwise"]
             and [len(a) for a in g.axes] == [3, 3])
    table.ops[g.sig]["points"]["x".join(map(str, g.points()[4]))][0] *= 3  # a step up in the middle
    assert suspects(lm, table, fast(grid_points=3)) != []
    assert suspects(lm, table, fast(grid_points=3, device="cuda")) == []
    assert suspects(lm, table, fast(grid_points=3, device="cuda", trend_recheck=True)) != []


# ---- attention: the q/k == v diagonal ----------------------------------------------------------------------
def test_attention_surface_keeps_the_jump_on_the_diagonal():
    axes = [np.array([1.0, 2.0]), np.array([8.0, 16.0, 32.0]), np.array([8.0, 16.0, 32.0])]
    h, q, v = np.meshgrid(*axes, indexing="ij")
    slow = 0.01 * h * (q + v)  # the kernel off the diagonal
    values = np.where(q == v, 0.5 * slow, slow)  # the dispatcher's choice: twice as fast on the diagonal
    offdiag = {(int(a), int(b), int(b)): float(0.01 * a * 2 * b) for a in axes[0] for b in axes[1]}
    off, diag_axes, diag = split_values(axes, values, offdiag)
    at = lambda *p: float(attention_ms(axes, off, diag_axes, diag, [np.asarray(x) for x in p]))  # noqa: E731
    assert at(2, 16, 16) == pytest.approx(0.01 * 2 * 32 * 0.5)  # on the diagonal: the fast kernel
    assert at(2, 24, 24) == pytest.approx(0.01 * 2 * 48 * 0.5)  # between diagonal points: still fast
    assert at(2, 16, 24) == pytest.approx(0.01 * 2 * 40)  # next to it: the slow kernel, not a blend
    assert at(1, 8, 32) == pytest.approx(0.01 * 40)
    assert split_values(axes, values, {}) is None  # off-diagonal points not measured: no split


def test_build_measures_attention_off_the_diagonal_when_asked(tmp_path):
    _, _, space = build_model("tiny_vit")
    table = LatencyTable({}, tmp_path / "t.json")
    settings = fast(attention_regimes=True)
    build(space, table, settings, progress=False)
    lm = LatencyModel(space, table, grid_points=2, grid_points_3d=2)
    g = next(g for g in lm.grids if g.op.kind == "attention")
    key = regime_signature(g.sig, OFFDIAG)
    assert key in table.ops and table.ops[key]["regime"] == OFFDIAG
    assert all(p[1] == p[2] for p in map(lambda k: tuple(map(int, k.split("x"))), table.ops[key]["points"]))
    assert offdiag_missing(lm, table) == []
    plain = LatencyTable({}, tmp_path / "u.json")
    build(space, plain, fast(attention_regimes=False), progress=False)  # off: the ordinary surface only
    assert not any("#" in k for k in plain.ops)
    default = LatencyTable({}, tmp_path / "v.json")
    build(space, default, fast(), progress=False)  # on by default, on the CPU too
    assert key in default.ops


def test_without_flash_excludes_the_fast_kernel_and_restores_it():
    before = torch.backends.cuda.flash_sdp_enabled()
    with without_flash():
        assert not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() == before


# ---- distributed ------------------------------------------------------------------------------------------
def test_ranks_sharing_a_gpu_use_gloo(monkeypatch):
    monkeypatch.delenv("MDPRUNE_DIST_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dist_module.rank_device("cuda", 1) == torch.device("cuda:1")
    assert dist_module.rank_device("auto", 3) == torch.device("cuda:1")
    assert dist_module.rank_device("cuda:0", 1) == torch.device("cuda:0")
    assert dist_module.choose_backend(torch.device("cuda:1"), "cuda", 2) == "nccl"
    assert dist_module.choose_backend(torch.device("cuda:0"), "cuda:0", 2) == "gloo"  # NCCL refuses that
    assert dist_module.choose_backend(torch.device("cuda:1"), "auto", 4) == "gloo"  # more ranks than GPUs
    assert dist_module.choose_backend(torch.device("cpu"), "cpu", 2) == "gloo"


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    d = dist_module.init("cpu")
    try:
        state = {"phase": "finetune", "model": {"w": torch.arange(6.0).reshape(2, 3) + 10 * d.rank},
                 "list": [torch.ones(2, dtype=torch.int64) * (d.rank + 1), "x"]} if d.main else None
        got = dist_module.broadcast(state, d)
        sums = {"a": torch.full((3,), float(d.rank + 1), dtype=torch.float64),
                "__batches__": torch.tensor(2.0, dtype=torch.float64)}
        dist_module.all_reduce_sum_(sums, d)
        try:
            dist_module.run_on_main(lambda: 1 / 0, d)
            raised = False
        except ZeroDivisionError:
            raised = True
        value = dist_module.run_on_main(lambda: {"ms": 1.5}, d)
        dist_module.barrier(d)
        torch.save({"got": got, "sums": sums, "raised": raised, "value": value, "backend": d.backend},
                   f"{out}/{rank}.pt")
    finally:
        dist_module.shutdown(d)


def test_ddp_two_ranks_broadcast_state_and_reduce_on_gloo(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, str(tmp_path)), nprocs=2)
    r = [torch.load(tmp_path / f"{i}.pt") for i in range(2)]
    for x in r:
        assert x["backend"] == "gloo" and x["raised"] and x["value"] == {"ms": 1.5}
        assert torch.equal(x["got"]["model"]["w"], torch.arange(6.0).reshape(2, 3))
        assert torch.equal(x["got"]["list"][0], torch.ones(2, dtype=torch.int64)) and x["got"]["list"][1] == "x"
        assert x["got"]["phase"] == "finetune"
        assert torch.equal(x["sums"]["a"], torch.full((3,), 3.0, dtype=torch.float64))
        assert float(x["sums"]["__batches__"]) == 4.0


# ---- command line -------------------------------------------------------------------------------------------
def test_deployment_options_reach_the_settings():
    from mdprune.cli import lut, prune

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    lut.add_parser(sub)
    prune.add_parser(sub)
    a = p.parse_args(["lut", "build", "resnet18", "--device", "cuda", "--dtype", "float16", "--autocast",
                      "--channels-last", "--tf32", "on", "--no-cudnn-benchmark", "--attention-regimes", "off"])
    s = lut.settings_from(a)
    assert (s.autocast, s.channels_last, s.tf32, s.cudnn_benchmark, s.attention_regimes) == \
        (True, True, True, False, False)
    a = p.parse_args(["prune", "resnet18", "--latency-channels-last", "--tf32", "off"])
    lat = prune.run_config(a).latency
    assert lat["channels_last"] is True and lat["tf32"] is False and "autocast" not in lat
    a = p.parse_args(["prune", "resnet18"])
    assert not {"channels_last", "autocast", "tf32", "cudnn_benchmark"} & set(prune.run_config(a).latency)
    a = p.parse_args(["prune", "resnet18", "--grid-points", "3", "--grid-points-3d", "4"])
    from mdprune.train.config import latency_settings
    s = latency_settings(prune.run_config(a))  # the table a run reads is the one `lut build` with the same grids wrote
    assert (s.grid_points, s.grid_points_3d) == (3, 4)
