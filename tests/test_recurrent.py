"""Recurrent layers (Sequencer's LSTM token mixers): input features prune, hidden states stay whole, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mdprune
from mdprune.latency.ops import op_module

from .conftest import check_plan, measured_macs, rel_err


class RowMixer(nn.Module):
    """Sequencer's block: a bidirectional recurrent layer along each row of an NHWC map, then a linear layer back
    to the channels, in a residual branch."""

    def __init__(self, cell: type[nn.RNNBase]):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 2, 2)
        self.norm, self.rnn = nn.LayerNorm(32), cell(32, 8, batch_first=True, bidirectional=True)
        self.fc, self.head = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        b, h, w, c = y.shape
        rows, _ = self.rnn(self.norm(y).reshape(b * h, w, c))
        y = y + self.fc(rows.reshape(b, h, w, -1))
        return self.head(y.mean((1, 2)))


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_prune_their_inputs_exactly(cell: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    space = mdprune.analyze(RowMixer(cell).eval(), x)
    assert space.dims["embed"].prunable and "hidden state" in space.dims["rnn"].protected
    assert len(space.removable_blocks()) == 1
    plans = [mdprune.Plan.uniform(space, 0.5), mdprune.Plan.random(space, seed=1, block_prob=0.5)]
    for plan in plans:
        sizes, removed = plan.sizes(space), set(plan.removed)
        if cell is nn.LSTM:  # PyTorch's counter sees no MACs in the fused CPU LSTM: outputs and parameters here
            slim, masked = mdprune.slim(space, plan).eval(), mdprune.masked(space, plan).eval()
            with torch.no_grad():
                assert rel_err(masked(x), slim(x)) <= 1e-4
            assert sum(p.numel() for p in slim.parameters()) == space.count_params(sizes, removed)
            lstm = sum(o.macs(sizes) for o in space.ops if o.kind == "recurrent" and o.block not in removed)
            assert measured_macs(slim, x) + lstm == space.count_macs(sizes, removed)
        else:
            check_plan(space, plan, x)
    op = next(o for o in space.ops if o.kind == "recurrent")
    module, inputs = op_module(op.kind, op.fixed, {"in": 16}, 1, "cpu", torch.float32)
    assert module(*inputs)[0].shape == (4, 4, 16)  # one image: 4 rows of 4 steps, both directions' hidden states
