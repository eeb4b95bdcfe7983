"""Epilogues: the per-channel layers that directly follow a compute op (BatchNorm, activations).

Their cost scales with the op's output width, so the latency tables measure them together with the op
(``conv -> bn -> relu`` as one unit) instead of hiding them in the constant part of the model.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .op_names import op_name

# leaf module type -> epilogue name (None: free, skipped)
_MODULES: dict[type, str | None] = {
    nn.BatchNorm2d: "bn2d", nn.BatchNorm1d: "bn1d", nn.ReLU: "relu", nn.ReLU6: "relu6", nn.GELU: "gelu",
    nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
    nn.Identity: None, nn.Dropout: None,
}
_FUNCTIONS = {"relu": "relu", "relu_": "relu", "relu6": "relu6", "gelu": "gelu", "silu": "silu",
              "hardswish": "hardswish", "sigmoid": "sigmoid", "tanh": "tanh", "dropout": None}


def epilogue(gm: fx.GraphModule, node: fx.Node) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The epilogue names after ``node`` and the nodes they cover (followed while each has one user)."""
    names: list[str] = []
    covered: list[str] = []
    n = node
    while len(n.users) == 1:
        u = next(iter(n.users))
        if u.op == "call_module":
            m = gm.get_submodule(u.target)
            if type(m) not in _MODULES or (isinstance(m, nn.GELU) and m.approximate != "none"):
                break
            name = _MODULES[type(m)]
        elif u.op in ("call_function", "call_method") and op_name(u) in _FUNCTIONS and len(u.all_input_nodes) == 1:
            name = _FUNCTIONS[op_name(u)]
        else:
            break
        if name is not None:
            names.append(name)
        covered.append(u.name)
        n = u
    return tuple(names), tuple(covered)
