"""Loading a file never runs code: model files rebuild only library names, checkpoints hold plain data only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import mdprune
from mdprune.apply.io import FORMAT
from mdprune.cli import main
from mdprune.models import ModelError
from mdprune.train.rundir import RunDir


def _crafted_model_file(path: Path, name: str, kwargs: dict) -> Path:
    info = {"source": {"name": name, "kwargs": kwargs}, "plan": {}, "input_shapes": [[1, 3, 8, 8]], "options": {}}
    torch.save({"format": FORMAT, "info": info, "state_dict": {}}, path)
    return path


def test_a_model_file_naming_a_command_runner_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = _crafted_model_file(tmp_path / "evil.pt", "subprocess:run", {"args": ["touch", str(marker)]})
    with pytest.raises(ModelError, match="trust_code=True"):
        mdprune.load(path)
    assert main(["eval", str(path), "--data", str(tmp_path)]) == 2
    assert "--trust-code" in capsys.readouterr().err
    assert not marker.exists()


def test_a_model_file_asking_to_load_other_files_is_refused(tmp_path):
    path = _crafted_model_file(tmp_path / "m.pt", "resnet18", {"checkpoint_path": str(tmp_path / "x.pt")})
    with pytest.raises(ModelError, match="checkpoint_path"):
        mdprune.load(path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    payload = _RunsCode()
    payload.marker = marker
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    torch.save({"phase": "prune", "rng": {}, "evil": payload}, run.checkpoint)
    with pytest.raises(ValueError, match="never unpickles"):
        run.load_checkpoint()
    with pytest.raises(ValueError, match="never unpickles"):
        mdprune.load(run.checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x00random bytes\xff" * 10, "truncated"])
def test_unreadable_files_are_named(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "truncated":
        torch.save({"format": FORMAT, "state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"bad\.pt cannot be read"):
        mdprune.load(path)
    with pytest.raises(ValueError, match="does not exist"):
        mdprune.load(tmp_path / "missing.pt")


def test_trusted_user_code_still_loads(tmp_path):
    from .conftest import build

    _, x, space = build("tiny_cnn")
    s = mdprune.slim(space, mdprune.Plan.random(space, seed=1)).eval()
    mdprune.save(s, tmp_path / "m.pt")
    with pytest.raises(ModelError, match="tests.models:tiny_cnn"):
        mdprune.load(tmp_path / "m.pt")
    assert "tests.models" in sys.modules
    with torch.no_grad():
        assert torch.equal(mdprune.load(tmp_path / "m.pt", trust_code=True).eval()(x), s(x))
