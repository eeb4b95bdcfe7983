"""Bad input is refused before the expensive work, with a message that names the thing and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mdprune.cli import main
from mdprune.latency import LatencySettings, LatencyTable, TableError, fingerprint, open_table
from mdprune.search import parse_budget
from mdprune.train.loop import TrainConfig
from mdprune.train.run import PruneRun
from mdprune.train.rundir import RunDir, RunDirError

from .test_train import config


@pytest.mark.parametrize("budget, message", [("abc", "cannot read budget"), ("0%", "must be positive"),
                                             ("-5", "cannot read budget"), ("100%", "nothing would be pruned"),
                                             ("150%", "nothing would be pruned"), ("nan", "cannot read budget")])
def test_a_bad_budget_is_refused_before_anything_is_measured(budget, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        PruneRun(config(tmp_path, budget=budget), tmp_path / "run").run()
    assert not (tmp_path / "lut").exists() and not (tmp_path / "run").exists()  # no table, no directory
    PruneRun(config(tmp_path, train=TrainConfig(epochs=1, batch_size=32, max_iterations=1)), tmp_path / "run").run()


def test_budget_units():
    assert parse_budget("2G", 1) == 2e9 and parse_budget("500k", 1) == 5e5 and parse_budget("60%", 10) == 6.0
    assert parse_budget("1.5e3", 1) == 1500.0


def test_an_absolute_budget_at_or_above_dense_is_refused_after_measuring(tmp_path):
    with pytest.raises(ValueError, match=r"at or above the dense model's measured latency"):
        PruneRun(config(tmp_path, budget="1e6ms"), tmp_path / "run").run()
    assert not (tmp_path / "run" / "config.json").exists()  # the corrected command may use the same directory
    PruneRun(config(tmp_path, train=TrainConfig(epochs=1, batch_size=32, max_iterations=1)), tmp_path / "run").run()
    assert (tmp_path / "run" / "config.json").exists()


def test_resume_may_change_only_the_training_settings(tmp_path):
    d = tmp_path / "run"
    RunDir(d).open({"budget": "50%", "train": {"lr": 0.1}}, resume=False)
    run = RunDir(d)
    run.open({"budget": "50%", "train": {"lr": 0.1}}, resume=False)
    run.save_checkpoint({"phase": "finetune"})
    changed = RunDir(d)
    assert changed.open({"budget": "50%", "train": {"lr": 0.01}}, resume=True) and changed.changed == ["train"]
    changed.save_checkpoint({"phase": "finetune"})
    assert json.loads((d / "config.json").read_text())["train"] == {"lr": 0.01}
    with pytest.raises(RunDirError, match=r"differs in \['budget'\]\) \(only the training settings"):
        RunDir(d).open({"budget": "40%", "train": {"lr": 0.01}}, resume=True)


def _table_file(tmp_path: Path, points: dict) -> Path:
    t = LatencyTable(fingerprint())
    t.ops = {"sig": {"kind": "conv2d", "fixed": {}, "roles": ["in", "out"], "points": points}}
    return t.save(tmp_path / "t.json")


@pytest.mark.parametrize("value", [float("nan"), -5.0, 0.0])
def test_tables_with_non_positive_entries_are_refused_by_name(value, tmp_path):
    path = _table_file(tmp_path, {"8x8": [value, 0.0, 1]})
    with pytest.raises(TableError, match=r"t\.json is damaged .* build the table again"):
        LatencyTable.load(path)


def test_a_truncated_table_names_its_file_and_lut_show_flags_it(tmp_path, capsys):
    settings = LatencySettings(backend="flops")
    good = open_table(settings, tmp_path)
    good.ops = {"sig": {"kind": "conv2d", "fixed": {}, "roles": ["in", "out"], "points": {"8x8": [1.0, 0.0, 1]}}}
    good.save()
    bad = tmp_path / "lut-cpu-b1-t1-eager-000000000000.json"
    bad.write_text(good.path.read_text()[:50])
    with pytest.raises(TableError, match="lut-cpu-b1-t1-eager-000000000000.json cannot be read"):
        LatencyTable.load(bad)
    assert main(["lut", "show", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "000000000000.json: BAD" in out and f"{good.path.name}: cpu" in out


def test_checkpoint_mismatches_name_the_tensor_both_shapes_and_the_fix(tmp_path):
    import torch

    import mdprune
    from mdprune.models import ModelError, load_checkpoint

    other = mdprune.create_model("small_resnet18", num_classes=7, width=0.125)
    torch.save(other.state_dict(), tmp_path / "c.pt")
    model = mdprune.create_model("small_resnet18", num_classes=10, width=0.125)
    shapes = r"fc\.weight has shape \(7, .*\) in the checkpoint and \(10, .*--num-classes 7"
    with pytest.raises(ModelError, match=shapes):
        load_checkpoint(model, str(tmp_path / "c.pt"))
    torch.save({k: v for k, v in model.state_dict().items() if k != "fc.bias"}, tmp_path / "m.pt")
    with pytest.raises(ModelError, match="1 tensor\\(s\\) missing from the checkpoint, first 'fc.bias'"):
        load_checkpoint(model, str(tmp_path / "m.pt"))
    torch.save([1, 2], tmp_path / "l.pt")
    with pytest.raises(ModelError, match="holds a list, not a state_dict"):
        load_checkpoint(model, str(tmp_path / "l.pt"))
    torch.save(model, tmp_path / "module.pt")  # a pickled module: refused, never unpickled
    with pytest.raises(ModelError, match="never unpickles"):
        load_checkpoint(model, str(tmp_path / "module.pt"))


def _images(root: Path, classes: tuple[str, ...], n: int = 4, size: int = 12) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (size, size), (40 * k, 3 * i, 100)).save(root / split / c / f"{i}.png")


def test_image_data_problems_are_named_before_training(tmp_path):
    from mdprune.train.data import DataError

    _images(tmp_path / "one", ("cat",))
    with pytest.raises(DataError, match="has 1 class"):
        PruneRun(config(tmp_path, data=str(tmp_path / "one"), model="tests.models:tiny_cnn", model_kwargs={}),
                 tmp_path / "r1").run()
    _images(tmp_path / "bad", ("cat", "dog"))
    (tmp_path / "bad" / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"not readable images, first .*broken\.png"):
        PruneRun(config(tmp_path, data=str(tmp_path / "bad"), model="tests.models:tiny_cnn", model_kwargs={}),
                 tmp_path / "r2").run()
    assert not (tmp_path / "lut").exists()


def test_image_folder_data_takes_the_models_input_size(tmp_path):
    _images(tmp_path / "img", ("cat", "dog"), size=20)
    cfg = config(tmp_path, data=str(tmp_path / "img"), model="small_vit", model_kwargs={"img_size": 16, "depth": 1},
                 train_limit=None, val_limit=None, budget="90%",
                 train=TrainConfig(epochs=1, batch_size=4, lr=0.01, max_iterations=1))
    run = PruneRun(cfg, tmp_path / "run")
    run.setup()
    assert run.train_ds[0][0].shape == (3, 16, 16) and run.space.input_shapes[0][1:] == (3, 16, 16)


def test_a_training_set_smaller_than_one_batch_is_refused_before_anything_is_measured(tmp_path):
    from mdprune.train.data import DataError

    with pytest.raises(DataError, match="fewer than one batch of 32"):
        PruneRun(config(tmp_path, train_limit=20), tmp_path / "run").run()
    assert not (tmp_path / "lut").exists()


def test_a_run_directory_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path, capsys):
    import os

    blocked = tmp_path / "ro"
    blocked.mkdir()
    os.chmod(blocked, 0o500)
    try:
        if os.access(blocked, os.W_OK):  # root ignores permissions: simulate with a file in the way
            blocked = tmp_path / "file"
            blocked.write_text("x")
        code = main(["prune", "small_resnet18", "--model-arg", "width=0.125", "--train-limit", "64",
                     "--val-limit", "32", "--batch-size", "16", "--epochs", "1", "--max-iterations", "1",
                     "--grid-points", "2", "--timing-rounds", "1", "--timing-reps", "1", "--backend", "flops",
                     "--lut", str(tmp_path / "lut"), "--run-dir", str(blocked / "run")])
    finally:
        os.chmod(tmp_path / "ro", 0o700)
    err = capsys.readouterr().err
    assert code == 2 and "cannot read or write" in err and "Traceback" not in err


def test_a_model_whose_loss_ignores_every_prunable_element_is_refused():
    import torch
    from torch import nn

    import mdprune
    from mdprune.importance import estimate

    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 4))
    nn.init.zeros_(model[5].weight)  # a zero-initialised classifier, as torchvision's ViT head
    space = mdprune.analyze(model, torch.randn(1, 3, 8, 8))
    assert space.prunable_dims()
    data = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))]
    with pytest.raises(ValueError, match="every importance score is zero .* zero-initialised classifier"):
        estimate(space, model, data)
