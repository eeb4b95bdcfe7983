"""Coverage: the share of parameters and MACs a plan can change, and what is kept whole and why."""

from __future__ import annotations

import torch

import mdprune
from mdprune.cli import main
from mdprune.report import write_report

from .models import TinyCNN


def test_a_fully_prunable_model_is_fully_covered(resnet18):
    _, _, space = resnet18
    cov = space.coverage()
    assert cov["macs"]["share"] == 1.0 and cov["params"]["changeable"] == cov["params"]["total"] - 10
    assert cov["params"]["total"] == space.count_params() and cov["macs"]["total"] == space.count_macs()
    # only the classifier's bias is kept whole: its one axis is the model's output
    assert cov["kept_whole"] == [{"module": "fc", "params": 10, "reasons": ["model output"]}]


def test_ignored_layers_are_listed_as_kept_whole_with_their_reason():
    model = TinyCNN().eval()
    space = mdprune.analyze(model, torch.randn(1, 3, 8, 8), ignored_layers=["right"])
    cov = space.coverage()
    assert 0.0 < cov["params"]["share"] < 1.0 and 0.0 < cov["macs"]["share"] < 1.0
    right = next(k for k in cov["kept_whole"] if k["module"] == "right")
    assert right["params"] == sum(p.numel() for p in model.right.parameters())
    assert any("ignored layer right" in r for r in right["reasons"])
    changeable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("right."))
    kept = sum(k["params"] for k in cov["kept_whole"])
    assert cov["params"]["changeable"] + kept == cov["params"]["total"] and kept >= cov["params"]["total"] - changeable


def test_inspect_and_report_state_the_coverage(capsys, tmp_path):
    assert main(["inspect", "resnet18", "--input-size", "32", "--num-classes", "10"]) == 0
    assert "a plan can change 100.0% of the parameters and 100.0% of the MACs" in capsys.readouterr().out
    # (11.69M parameters less the classifier's 10 biases rounds to 100.0%)
    model = TinyCNN().eval()
    space = mdprune.analyze(model, torch.randn(1, 3, 8, 8), ignored_layers=["right"])
    files = write_report({"model": "tiny", "coverage": space.coverage()}, tmp_path)
    text = files["markdown"].read_text()
    assert "## Coverage" in text and "| right |" in text and "ignored layer right" in text


def test_report_compares_fractions_of_the_dense_latency_measured_in_the_same_run(tmp_path):
    result = {"model": "m", "budget": "50%", "target_ms": 2.1, "dense_ms_calibration": 4.2, "measured_ms": 2.3,
              "measured_dense_ms": 4.6, "measured_noise": 0.02}
    text = write_report(result, tmp_path)["markdown"].read_text()
    # 2.3 ms is 9.5% over 2.1 ms in absolute terms, but 50.0% of the dense model measured beside it
    assert "50.0% of the dense latency beside it; target 50.0%" in text
    assert "fraction of the dense latency measured in the same run" in text and "vs target" not in text
