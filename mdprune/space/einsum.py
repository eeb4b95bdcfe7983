"""``torch.einsum`` with one or two operands: attention written with index letters (``"bhnd,bhmd->bhnm"``),
relative position terms (SAM's ``"bhwc,hkc->bhwk"``), products with parameters.

Each operand's channel axis names a letter. A letter that carries channels in one operand carries the same
channels in every operand that has it (operands unified, a parameter's axis bound); where the other operand
holds something else under that letter (a tensor made in the code, other channels), the channels are kept
whole. Channels under a letter of the output go there; contracted ones leave the product. Channels summed
within one operand, or more than one channel letter in the output, are kept whole. The latency op is the
einsum itself, at the width of its channel letter (a product without channels is a fixed cost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.fx as fx

from .errors import AnalysisError, where
from .values import Chan, ParamRef, RawSeg

if TYPE_CHECKING:
    from .channels import Propagation


def _parse(eq: str, n: int) -> tuple[list[str], str] | None:
    """Input and output index strings (an implicit output: the letters used once, sorted); None for ``...``."""
    eq = eq.replace(" ", "")
    if "." in eq:
        return None
    lhs, arrow, out = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != n:
        return None
    if not arrow:
        letters = "".join(ins)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return ins, out


def einsum_rule(prop: Propagation, node: fx.Node) -> Any:
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    vals = [prop.value(o) for o in ops]
    parsed = _parse(eq, len(ops)) if isinstance(eq, str) and len(ops) in (1, 2) else None
    if parsed is None:
        if any(isinstance(v, (Chan, ParamRef)) for v in vals):
            raise AnalysisError(f"{where(node)} is an einsum mdprune cannot follow ({eq!r}); not supported")
        return None
    ins, out = parsed
    shapes = [o.meta["mdp_shape"] if isinstance(o, fx.Node) else None for o in ops]
    sizes = {c: s[i] for spec, s in zip(ins, shapes, strict=True) if s for i, c in enumerate(spec)}

    def whole(segs: tuple[RawSeg, ...], what: str) -> None:
        prop.protect(segs, f"{where(node)} {what}")

    carried: dict[str, tuple[RawSeg, ...]] = {}  # letter -> the channels under it
    for v, spec in zip(vals, ins, strict=True):
        if isinstance(v, Chan):
            letter = spec[v.axis]
            if letter in carried:
                prop.unify(carried[letter], v.segs, node)
            else:
                carried[letter] = v.segs
    for letter, segs in list(carried.items()):
        for v, spec in zip(vals, ins, strict=True):
            if letter not in spec or (isinstance(v, Chan) and spec[v.axis] == letter):
                continue
            axis = spec.index(letter)
            if isinstance(v, ParamRef) and v.axes[axis] is not None:
                prop.bind(v.tensor, v.axes[axis], segs, node, "in" if letter not in out else "param")
            elif sizes.get(letter) != 1 or isinstance(v, Chan):
                whole(segs, "meets them in an einsum with entries that are not these channels")
                carried.pop(letter)
                break
    for v, spec in zip(vals, ins, strict=True):  # a parameter's other letters: kept as they are
        if isinstance(v, ParamRef):
            for letter, ax in zip(spec, v.axes, strict=False):
                if ax is not None and letter not in carried:
                    prop.unpruned_params.append((v.tensor, node, ax))
    for letter, segs in list(carried.items()):
        if letter not in out and sum(letter in spec for spec in ins) == 1:
            whole(segs, "sums them within one einsum operand")
            carried.pop(letter)
    kept = [c for c in out if c in carried]
    for letter in kept[1:]:
        whole(carried[letter], "puts a second channel letter in an einsum's output")
    if len(ins) == 2:  # (one operand: a permutation or a sum, no multiply-accumulates)
        _einsum_op(prop, node, ins, out, shapes, carried, kept)
    return Chan(out.index(kept[0]), carried[kept[0]]) if kept else None


def _einsum_op(prop: Propagation, node: fx.Node, ins: list[str], out: str, shapes: list[Any],
               carried: dict[str, tuple[RawSeg, ...]], kept: list[str]) -> None:
    """The latency op: the einsum at the width of its channel letter (an output one first)."""
    if not all(isinstance(s, tuple) for s in shapes):
        return
    letter = kept[0] if kept else next(iter(carried), None)
    if letter is None:  # no channels: a fixed cost, counted (at a letter other than the batch's)
        letter = ins[0][-1] if ins[0] else None
        size = dict(zip(ins[0], shapes[0], strict=True)).get(letter, 1)
        segs = (RawSeg((prop.new_space(size, "channel", f"{node.name}:fixed",
                                       protected=f"{where(node)}: an einsum without channels"),)),)
    else:
        segs = carried[letter]
    first = ins[0][0] if ins[0] else ""
    per_image = bool(prop.batch) and first != letter and first in out and out.startswith(first) and all(
        s[spec.index(first)] % prop.batch == 0 for spec, s in zip(ins, shapes, strict=True) if first in spec)
    fixed = {"equation": f"{','.join(ins)}->{out}",
             "shapes": [[-1 if c == letter else d for c, d in zip(spec, s, strict=True)]
                        for spec, s in zip(ins, shapes, strict=True)],
             "batch_letter": first if per_image else "", "batch": prop.batch}
    prop.add_op(node.name, "einsum", {"width": segs}, fixed, node)


EINSUM_RULES = {"einsum": einsum_rule}
