"""The mdprune command line."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from mdprune.cli import main


def test_inspect_prints_dimensions_blocks_and_ops(capsys, tmp_path):
    out_json = tmp_path / "space.json"
    assert main(["inspect", "resnet18", "--input-size", "32", "--num-classes", "10", "--ops",
                 "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "Dimensions" in text and "Blocks" in text and "Ops" in text and "layer4.1" in text
    data = json.loads(out_json.read_text())
    assert data["summary"]["removable_blocks"] == 8
    assert any(o["name"] == "layer1.0.conv1" and o["kind"] == "conv2d" for o in data["ops"])


def test_inspect_vit_with_model_args(capsys):
    assert main(["inspect", "deit_tiny_patch16_224", "--input-size", "32", "--step", "embed=32"]) == 0
    text = capsys.readouterr().out
    assert "blocks.0.attn.heads" in text and "embed" in text


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["inspect", "no_such_model_xyz"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "mdprune", "--help"], capture_output=True, text=True, check=True)
    assert "inspect" in r.stdout


def test_every_package_folder_is_a_regular_package():
    """A folder without __init__.py would be left out of the wheel."""
    from pathlib import Path

    import mdprune

    root = Path(mdprune.__file__).parent
    missing = [str(d.relative_to(root)) for d in root.rglob("*") if d.is_dir() and d.name != "__pycache__"
               and any(d.glob("*.py")) and not (d / "__init__.py").exists()]
    assert not missing


def test_example_inputs_follow_the_models_channels_and_size(capsys):
    from mdprune.models import default_input_size
    from mdprune.zoo import small_resnet18, small_vit

    assert default_input_size(small_resnet18()) == (1, 28, 28)
    assert default_input_size(small_vit(in_chans=3)) == (3, 28, 28)
    space_to_depth = torch.nn.Sequential(torch.nn.PixelUnshuffle(2), torch.nn.Conv2d(12, 4, 3))
    assert default_input_size(space_to_depth)[0] == 12  # (the first convolution's inputs, for want of better)
    space_to_depth.in_chans = 3  # timm's attribute (TResNet's stem: space-to-depth, then the first convolution)
    assert default_input_size(space_to_depth)[0] == 3
    assert main(["inspect", "small_resnet18"]) == 0  # a 1-channel model, no --input-size needed
    assert "layer1.0" in capsys.readouterr().out
