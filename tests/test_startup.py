"""The command line starts fast: nothing heavy is imported until a command runs; user models are found."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_help_imports_neither_torch_nor_timm():
    code = textwrap.dedent("""
        import sys
        from mdprune.cli import make_parser
        try:
            make_parser().parse_args(["prune", "--help"])
        except SystemExit:
            pass
        heavy = sorted(m for m in ("torch", "torchvision", "timm") if m in sys.modules)
        print("HEAVY", heavy)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in r.stdout


def test_public_names_load_on_first_use():
    import mdprune
    import mdprune.train.run  # noqa: F401 - imports every stage: no submodule may shadow a public name

    assert sorted(mdprune.__all__) == sorted(mdprune._EXPORTS)
    assert all(callable(getattr(mdprune, n)) for n in mdprune.__all__)


def test_models_in_the_current_directory_are_found_without_pythonpath(tmp_path):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        from torch import nn

        def net(num_classes=10):
            return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, num_classes))
    """))
    r = subprocess.run([sys.executable, "-m", "mdprune", "inspect", "mymodels:net", "--input-size", "8"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "prunable dimensions" in r.stdout


def test_eval_on_a_run_checkpoint_says_which_file_to_use(tmp_path, capsys):
    import torch

    from mdprune.cli import main

    torch.save({"phase": "finetune", "rng": {}}, tmp_path / "checkpoint.pt")
    assert main(["eval", str(tmp_path / "checkpoint.pt")]) == 2
    assert "model.pt" in capsys.readouterr().err
