"""Channel layouts that change structure: refining a space, aligning two layouts, splitting one.

A space (a union-find class of channels) can be *refined* after the fact: into a row-major product of new
spaces (a grouped convolution sees its input as groups x width per group) or into a concatenation of new
spaces (a split, a chunk, a slice). The refinement is recorded on the class's root and applies to everything
that refers to the space, before or after: :meth:`Layouts.leaves` expands any segments into segments of
unrefined spaces, which is what the assembled pruning space is made of.

Two layouts of the same channels with different structures are aligned by refining both to their common
refinement (:meth:`Layouts.unify`); where none exists the channels involved are kept whole, never guessed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import AnalysisError, where
from .values import RawSeg

if TYPE_CHECKING:
    import torch.fx as fx

    from .channels import SpaceInfo

MAX_REPLICAS = 256  # a kept-whole outer factor is unrolled into copies of its inner segments up to this size
Item = tuple[int | None, int]  # a factor of a segment: (space, size), or (None, inner) for repeated positions


class Layouts:
    """Refinement and alignment of channel layouts; mixed into :class:`~mdprune.space.channels.Propagation`."""

    spaces: list[SpaceInfo]
    attention: dict[str, dict[str, Any]]

    def find(self, i: int) -> int:  # pragma: no cover - provided by Propagation
        raise NotImplementedError

    def new_space(self, size: int, kind: str, name: str, protected: str | None = None) -> int:  # pragma: no cover
        raise NotImplementedError

    def _union(self, a: int, b: int, node: fx.Node | None) -> None:  # pragma: no cover
        raise NotImplementedError

    # ---- expansion ---------------------------------------------------------------------------------------
    def leaves(self, segs: tuple[RawSeg, ...]) -> tuple[RawSeg, ...]:
        """``segs`` made of unrefined spaces (union-find roots): every refined space replaced by its parts.

        A concatenation refinement behind an outer factor (``a x (b1 + b2)``) unrolls that factor, which is
        therefore kept whole (protected).
        """
        out: list[RawSeg] = []
        for s in segs:
            out += self._expand([self.find(i) for i in s.spaces], s.inner)
        return tuple(out)

    def _expand(self, spaces: list[int], inner: int) -> list[RawSeg]:
        for k, r in enumerate(spaces):
            info = self.spaces[r]
            if not info.parts:
                continue
            parts = [self.find(p) for p in info.parts]
            if not info.concat:
                return self._expand(spaces[:k] + parts + [self.find(i) for i in spaces[k + 1:]], inner)
            head, tail = spaces[:k], [self.find(i) for i in spaces[k + 1:]]
            for h in head:
                if self.spaces[self.find(h)].size > 1:
                    self._protect_leaf(h, f"outer factor of {self.spaces[r].name}, which is split into parts")
            reps = math.prod(self.spaces[self.find(h)].size for h in head)
            return [s for _ in range(reps) for p in parts for s in self._expand([p, *tail], inner)]
        return [RawSeg(tuple(spaces), inner)]

    def seg_width(self, s: RawSeg) -> int:
        return math.prod(self.spaces[self.find(i)].size for i in s.spaces) * s.inner

    def _protect_leaf(self, i: int, reason: str) -> None:
        for s in self.leaves((RawSeg((i,)),)):
            for j in s.spaces:
                info = self.spaces[self.find(j)]
                if reason not in info.protected:
                    info.protected.append(reason)

    # ---- refinement --------------------------------------------------------------------------------------
    def refine(self, i: int, sizes: tuple[int, ...], concat: bool, node: fx.Node | None = None) -> tuple[int, ...]:
        """Split space ``i`` (its whole class) into new spaces of ``sizes``: end to end, or a row-major product.

        Returns the new spaces. A space that must stay one (an attention dimension) is kept whole instead, and
        the new spaces are kept whole with it.
        """
        r = self.find(i)
        info = self.spaces[r]
        if (sum(sizes) if concat else math.prod(sizes)) != info.size:
            raise AnalysisError(f"{where(node) if node is not None else 'mdprune'}: cannot split {info.name} "
                                f"({info.size} channels) into {sizes}")
        if len(sizes) == 1:
            return (r,)
        parts = tuple(self._part(info, n, self._part_name(info, sizes, k, concat), 1 if concat else
                                 math.prod(sizes) // n) for k, n in enumerate(sizes))
        if self._atomic(r):
            reason = f"{info.name} is one attention dimension and cannot be split"
            self._protect_leaf(r, reason)
            for p in parts:
                self.spaces[p].protected.append(reason)
        elif info.parts:  # refined already: the two refinements must agree
            self.unify(self.layout(r), _layout(parts, concat), node)
        else:
            info.parts, info.concat = parts, concat
        return parts

    def _part(self, info: SpaceInfo, size: int, name: str, times: int) -> int:
        p = self.new_space(size, info.kind, name)
        part = self.spaces[p]
        part.protected = list(info.protected)
        part.normalized = info.normalized
        part.repeat = info.repeat * times
        part.origin = info.origin
        return p

    @staticmethod
    def _part_name(info: SpaceInfo, sizes: tuple[int, ...], k: int, concat: bool) -> str:
        if concat:  # positions in the original space (a part of a part: offsets added up)
            m = re.fullmatch(r"(.*)\[(\d+):\d+\]", info.name)
            base, start = (m.group(1), int(m.group(2))) if m else (info.name, 0)
            start += sum(sizes[:k])
            return f"{base}[{start}:{start + sizes[k]}]"
        if k == len(sizes) - 1:
            return info.name  # the innermost factor: the width per group
        return f"{info.name}:groups" if len(sizes) == 2 else f"{info.name}:groups{k}"

    def _atomic(self, r: int) -> bool:
        return any(isinstance(a.get(k), int) and self.find(a[k]) == r
                   for a in self.attention.values() for k in ("heads", "qk", "v"))

    def layout(self, r: int) -> tuple[RawSeg, ...]:
        """The segments a refined root is made of."""
        info = self.spaces[self.find(r)]
        return _layout(info.parts, info.concat)

    def push(self, r: int) -> None:
        """Hand a refined root's protections and norm flag down to its parts (after a union gave it more)."""
        info = self.spaces[self.find(r)]
        for p in info.parts:
            part = self.spaces[self.find(p)]
            new = [x for x in info.protected if x not in part.protected]
            changed = bool(new) or (info.normalized and not part.normalized)
            part.protected += new
            part.normalized = part.normalized or info.normalized
            if changed and part.parts:
                self.push(p)

    # ---- alignment ---------------------------------------------------------------------------------------
    def unify(self, a: tuple[RawSeg, ...], b: tuple[RawSeg, ...], node: fx.Node | None) -> None:
        """Tie two layouts of the same channels position by position.

        Layouts of different structure are refined to their common refinement (e.g. ``(c)`` and
        ``(g x w)``: ``c`` becomes a product); where there is none, the channels involved are kept whole.
        """
        if a == b:
            return
        la, lb = self.leaves(a), self.leaves(b)
        if la == lb:
            return
        wa, wb = sum(map(self.seg_width, la)), sum(map(self.seg_width, lb))
        if wa != wb:
            raise AnalysisError(f"{_where(node)} ties {wa} channels ({self.describe(la)}) to {wb} channels "
                                f"({self.describe(lb)})")
        qa, qb = list(la), list(lb)
        while qa and qb:
            if self._reexpand(qa) or self._reexpand(qb):
                continue
            sa, sb = qa[0], qb[0]
            wa, wb = self.seg_width(sa), self.seg_width(sb)
            if wa != wb:
                q, s, at = (qa, sa, wb) if wa > wb else (qb, sb, wa)
                cut = self._cut(s, at, node)
                if cut is None:
                    self._cannot_align(qa + qb, node)
                    return
                q[0:1] = cut
                continue
            if not self._tie(sa, sb, node):
                continue  # one factor was refined: look again
            del qa[0], qb[0]

    def _reexpand(self, q: list[RawSeg]) -> bool:
        """Replace the queue's head by its leaves if an earlier step refined one of its spaces."""
        ex = self.leaves(q[:1])
        if ex == tuple(q[:1]):
            return False
        q[0:1] = ex
        return True

    def _items(self, s: RawSeg) -> list[Item]:
        roots = [self.find(i) for i in s.spaces]
        items: list[Item] = [(i, self.spaces[i].size) for i in roots if self.spaces[i].size > 1]
        return items + ([(None, s.inner)] if s.inner > 1 else [])

    def _tie(self, sa: RawSeg, sb: RawSeg, node: fx.Node | None) -> bool:
        """Tie two equal-width segments factor by factor; False if a factor had to be refined first."""
        ia, ib = self._items(sa), self._items(sb)
        if [n for _, n in ia] == [n for _, n in ib]:
            for (i, _), (j, _) in zip(ia, ib, strict=True):
                if i is not None and j is not None:
                    self._union(i, j, node)
                elif i is not None or j is not None:
                    self._protect_leaf(i if i is not None else j,  # type: ignore[arg-type]
                                       f"{_where(node)} ties these channels to repeated positions")
            return True
        ends = sorted({*_cumprod(ia), *_cumprod(ib)})
        if any(b % a for a, b in zip(ends, ends[1:], strict=False)):  # no common refinement
            self._cannot_align([sa, sb], node)
            return True
        for items in (ia, ib):
            lo = 1
            for (i, _), hi in zip(items, _cumprod(items), strict=True):
                inside = [lo, *(e for e in ends if lo < e < hi), hi]
                if len(inside) > 2:
                    if i is None:  # repeated positions would have to be split: keep both sides whole
                        self._cannot_align([sa, sb], node)
                        return True
                    self.refine(i, tuple(y // x for x, y in zip(inside, inside[1:], strict=False)), False, node)
                    if not self.spaces[self.find(i)].parts:  # kept whole instead (an attention dimension)
                        self._cannot_align([sa, sb], node)
                        return True
                    return False
                lo = hi
        raise AssertionError("unreachable: equal widths with no boundary to refine")

    def _cut(self, s: RawSeg, at: int, node: fx.Node | None) -> list[RawSeg] | None:
        """Segments equal to ``s`` with a boundary at (or, unrolling a kept-whole factor, closer to) ``at``."""
        sp = [self.find(i) for i in s.spaces if self.spaces[self.find(i)].size > 1]
        if not sp:
            return None
        f, tail = sp[0], tuple(sp[1:])
        size = self.spaces[f].size
        rest = self.seg_width(RawSeg(tail, s.inner))
        q, r = divmod(at, rest)
        if r == 0:
            a, b = self.refine(f, (q, size - q), True, node)
            return [RawSeg((a, *tail), s.inner), RawSeg((b, *tail), s.inner)]
        if tail and self.spaces[f].protected and size <= MAX_REPLICAS:
            return [RawSeg(tail, s.inner)] * size
        return None

    def _cannot_align(self, segs: list[RawSeg], node: fx.Node | None) -> None:
        reason = f"{_where(node)} mixes channel layouts mdprune cannot align"
        for s in segs:
            for i in s.spaces:
                self._protect_leaf(i, reason)

    # ---- splits ------------------------------------------------------------------------------------------
    def split(self, segs: tuple[RawSeg, ...], sizes: list[int], node: fx.Node) -> list[tuple[RawSeg, ...]]:
        """The layouts of consecutive parts of ``sizes`` channels of the layout ``segs``.

        A part boundary inside a segment refines the segment's outer space into a concatenation; where that
        is impossible, the channels are kept whole and each part is a new kept-whole space.
        """
        q, out = list(self.leaves(segs)), []
        for n in sizes:
            part: list[RawSeg] = []
            w = 0
            while w < n:
                if not q:
                    raise AnalysisError(f"{where(node)} takes {sum(sizes)} channels from {self.describe(segs)}")
                if self._reexpand(q):
                    continue
                s = q[0]
                sw = self.seg_width(s)
                if w + sw <= n:
                    part.append(q.pop(0))
                    w += sw
                    continue
                cut = self._cut(s, n - w, node)
                if cut is None:
                    return self._split_whole(segs, sizes, node)
                q[0:1] = cut
            out.append(tuple(part))
        return out

    def _split_whole(self, segs: tuple[RawSeg, ...], sizes: list[int], node: fx.Node) -> list[tuple[RawSeg, ...]]:
        reason = f"{where(node)} splits channels at a position mdprune cannot follow"
        for s in segs:
            for i in s.spaces:
                self._protect_leaf(i, reason)
        return [(RawSeg((self.new_space(n, "channel", f"{node.name}[{k}]", protected=reason),)),) if n else ()
                for k, n in enumerate(sizes)]

    def describe(self, segs: tuple[RawSeg, ...]) -> str:
        return " + ".join("x".join(self.spaces[i].name for i in s.spaces) + (f"(x{s.inner})" if s.inner > 1 else "")
                          for s in self.leaves(segs))

    # ---- assembly ----------------------------------------------------------------------------------------
    def defer(self, check: Callable[[], object]) -> None:
        """Run ``check`` once every union is known (at :meth:`finish`): a check that may protect channels."""
        self.__dict__.setdefault("_deferred", []).append(check)

    def finish(self, segs: list[tuple[RawSeg, ...]]) -> list[int]:
        """Settle refinements before assembly; returns the unrefined roots (one dimension each).

        Deferred checks run first. Expanding every recorded layout once protects the outer factors that
        concatenations unroll; then refined roots hand their protections down to their parts.
        """
        for check in self.__dict__.pop("_deferred", []):
            check()
        for ss in segs:
            self.leaves(ss)
        roots = sorted({self.find(i) for i in range(len(self.spaces))})
        for r in roots:
            if self.spaces[r].parts:
                self.push(r)
        return [r for r in roots if not self.spaces[r].parts]


def _layout(parts: tuple[int, ...], concat: bool) -> tuple[RawSeg, ...]:
    return tuple(RawSeg((p,)) for p in parts) if concat else (RawSeg(parts),)


def _cumprod(items: list[Item]) -> list[int]:
    out, acc = [], 1
    for _, n in items:
        acc *= n
        out.append(acc)
    return out


def _where(node: fx.Node | None) -> str:
    return where(node) if node is not None else "mdprune"
