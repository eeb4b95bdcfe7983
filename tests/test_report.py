"""The run report: markdown, JSON and plots from a synthetic run result (the RunResult schema that runs write),
complete or minimal."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from mdprune.report import write_report
from mdprune.report.plots import plot_widths
from mdprune.search import ConstraintRow
from mdprune.train import RunResult

PLOTS = ["widths", "blocks", "latency", "budget_path", "accuracy"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def full_result() -> RunResult:
    """A realistic result of an iterative run on a small ResNet: 14 dimensions, 8 blocks, 2 of them removed."""
    blocks = {f"layer{s}.{b}": True for s in range(1, 5) for b in range(2)}
    blocks["layer2.1"] = blocks["layer3.1"] = False
    widths = {"stem": [40, 64, "channel", None]}
    for s in range(1, 5):
        size = 64 * 2 ** (s - 1)
        widths[f"layer{s}.out"] = [size * 3 // 4, size, "channel", None]
        for b in range(2):
            widths[f"layer{s}.{b}.conv1"] = [size // 2 + b, size, "channel", f"layer{s}.{b}"]
    widths["fc.in"] = [400, 512, "linear", None]
    assert len(widths) == 14
    history = [{"step": t, "budget_ms": budget, "predicted_ms": budget - 0.01 * (t + 1), "status": "optimal",
                "gap": 0.0, "seconds": 0.03 + t / 100, "method": "milp", "removed": removed,
                "plan_digest": f"ab12cd{t}"}
               for t, (budget, removed) in enumerate([(3.0, []), (2.5, ["layer3.1"]), (2.1, ["layer2.1", "layer3.1"])])]
    history[-1]["checks"] = [  # the final plan measured 55% for a 50% target, then solved again tighter
        {"budget_ms": 2.1, "predicted_ms": 2.09, "measured_ms": 2.31, "measured_dense_ms": 4.2, "fraction": 0.55,
         "target_fraction": 0.5, "kept": 0.0, "fraction_low": 0.54, "fraction_high": 0.56, "rounds": 12,
         "converged": True},
        {"budget_ms": 1.9, "predicted_ms": 1.89, "measured_ms": 2.05, "measured_dense_ms": 4.15,
         "fraction": 0.494, "target_fraction": 0.5, "kept": 1.0, "fraction_low": 0.485, "fraction_high": 0.503,
         "rounds": 40, "converged": False}]
    table = [ConstraintRow("latency", "50%", 4.2, 1.2, 2.1).to_dict(),
             ConstraintRow("macs", "60%", 556_651_520, 90_000_000, 333_990_912).to_dict()]
    return RunResult(
        model="small_resnet18", budget="50%", constraints={"latency": "50%", "macs": "60%"},
        constraint_table=table, schedule="iterative",
        target_ms=2.1, predicted_ms=2.09, dense_ms_calibration=4.2, measured_dense_ms=4.0,
        measured_ms=2.3, measured_noise=0.03, speedup=4.0 / 2.3,
        dense_accuracy=0.91, pruned_accuracy=0.28, accuracy=0.9012,
        params=[11_173_962, 5_321_000], macs=[556_651_520, 260_000_000],
        widths=widths, blocks=blocks, removed_blocks=["layer2.1", "layer3.1"], history=history,
        curve=[{"epoch": 0, "loss": 1.5, "accuracy": 0.46}, {"epoch": 1, "loss": 0.9, "accuracy": 0.9012}],
        budgets=[3.0, 2.5, 2.1],
        latency_model={"mode": "table", "scale": 1.1, "constant": 0.4},
        fingerprint={"device": "cpu", "processor": "Test CPU", "torch": "2.14.1", "threads": 1,
                     "dtype": "float32", "batch": 1, "backend": "eager"},
        finished="2026-11-23 23:24:15",
    )


def minimal_result() -> RunResult:
    """A run that skipped steps: no history, no curve, no final measurement, no accuracy after slimming."""
    return RunResult(model="tiny_cnn", budget="2.0ms", schedule="oneshot", target_ms=2.0,
                     dense_ms_calibration=3.0, dense_accuracy=0.5, accuracy=0.45, params=[1000, 800],
                     widths={"conv1": [6, 8, "channel", None]})


def assert_png(path: Path, min_side: int = 150) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    height, width = image.shape[:2]
    assert height >= min_side and width >= min_side
    assert image.std() > 0  # not a blank canvas


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, dict[str, Path]]:
    result = full_result()
    return result, write_report(result, tmp_path_factory.mktemp("report") / "nested" / "out")


def test_writes_all_files(full_report: tuple[RunResult, dict[str, Path]]) -> None:
    _, files = full_report
    assert set(files) == {"markdown", "json", *PLOTS}
    for name in PLOTS:
        assert files[name].name == f"{name}.png"
        assert_png(files[name])
    assert files["markdown"].name == "report.md" and files["json"].name == "report.json"
    assert len({p.parent for p in files.values()}) == 1


def test_markdown_has_key_figures(full_report: tuple[RunResult, dict[str, Path]]) -> None:
    _, files = full_report
    text = files["markdown"].read_text()
    assert text.startswith("# ") and text.splitlines()[0].endswith("small_resnet18 at latency=50%, macs=60%")
    for figure in ["2.100 ms", "2.090 ms", "2.300 ms", "4.000 ms", "1.74x", "± 3.0%",
                   "91.00%", "28.00%", "90.12%", "11.17 M", "5.32 M", "47.6%", "556.65 M"]:
        assert figure in text, figure
    for block in ["layer2.1", "layer3.1"]:
        assert f"- `{block}`" in text
    for digest in ["ab12cd0", "ab12cd1", "ab12cd2"]:
        assert digest in text
    assert "`layer1.0.conv1` | channel | `layer1.0` | 32/64 | 50.0%" in text
    assert "`layer2.1.conv1` | channel | `layer2.1` | removed with block" in text
    assert "float32" in text and "eager" in text and "table" in text
    assert "| 0 | 2.100 ms | 2.090 ms | 2.310 ms | 4.200 ms | 55.0% [54.0-56.0%], 12 pairs | 50.0% | " \
        "over (significant) | - |" in text
    assert "| 1 | 1.900 ms | 1.890 ms | 2.050 ms | 4.150 ms | 49.4% [48.5-50.3%], 40 pairs, time cap | 50.0% | " \
        "within noise of target | yes |" in text
    assert "timed alternately in the same run" in text  # what was compared, in one line
    for name in PLOTS:
        assert f"]({name}.png)" in text  # relative links
    assert "| latency | 50% | 4.200 ms | 1.200 ms (28.6%) | 2.100 ms (50.0%) | yes |" in text  # the constraints
    assert "| macs | 60% | 556.65 M | 90.00 M (16.2%) | 333.99 M (60.0%) | yes |" in text


def test_json_round_trips_the_figures(full_report: tuple[RunResult, dict[str, Path]]) -> None:
    result, files = full_report
    record = json.loads(files["json"].read_text())
    assert record["files"] == {name: path.name for name, path in files.items()}
    for key, value in result.to_dict().items():
        assert record[key] == value, key
    assert RunResult.from_dict(record) == result  # the report's JSON reads back as the schema


def test_widths_plot_grows_with_many_dimensions(tmp_path: Path) -> None:
    result = full_result()
    few = mpimg.imread(plot_widths(result.to_dict(), tmp_path / "few.png")).shape[0]
    result.widths = {f"blocks.{i}.{kind}": [i + 1, 64, kind, None]
                     for i in range(10) for kind in ["embed", "heads", "qk", "v", "mlp"]}
    many = mpimg.imread(plot_widths(result.to_dict(), tmp_path / "many.png")).shape[0]
    assert many > 2 * few


def test_minimal_result(tmp_path: Path) -> None:
    files = write_report(minimal_result(), str(tmp_path / "minimal"))
    assert {"markdown", "json", "latency", "accuracy", "widths"} <= set(files)
    for name in set(files) - {"markdown", "json"}:
        assert_png(files[name], min_side=100)
    text = files["markdown"].read_text()
    assert "tiny_cnn" in text and "2.000 ms" in text and "No solver steps recorded." in text
    assert "50.00% -> n/a (after slimming) -> 45.00% (final)" in text
    assert "Measured speedup | n/a" in text
    record = json.loads(files["json"].read_text())
    assert record["measured_ms"] is None and record["files"]["markdown"] == "report.md"


def test_empty_result_and_non_finite_values(tmp_path: Path) -> None:
    files = write_report({}, tmp_path / "empty")
    assert set(files) == {"markdown", "json"}
    assert "unknown model" in files["markdown"].read_text()
    result = minimal_result()
    result.accuracy, result.curve = float("nan"), [{"epoch": 0, "loss": float("inf"), "accuracy": 0.1}]
    files = write_report(result, tmp_path / "nan")
    record = json.loads(files["json"].read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN/Infinity
    assert record["accuracy"] is None and record["curve"][0]["loss"] is None
    assert "45.00%" not in files["markdown"].read_text()
