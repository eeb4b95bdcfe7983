"""Random problems for tests and benchmarks: tiny unstructured ones, and ResNet / ViT shaped ones at real sizes.

Latency tables follow a MAC count (product of the widths involved) with a fixed per-op overhead, GPU-like
rounding of widths to tiles of 32 and a few percent of noise, so they rise roughly, not exactly, with each width.
Values are cumulative sums of sorted positive scores (gamma distributed, one random scale per dim).
"""

from __future__ import annotations

import numpy as np

from .problem import CostTerm, DimChoice, Problem, Resource

MS_PER_GMAC = 1.0  # about 1 TMAC/s


def widths_for(full: int, step: int, max_choices: int = 64) -> list[int]:
    """Multiples of ``step`` (coarsened so there are at most ``max_choices``) up to ``full``."""
    step = max(step, -(-full // max_choices))
    return sorted({*range(step, full, step), full})


def cumulative_value(rng: np.random.Generator, widths: list[int], scale: float = 1.0) -> np.ndarray:
    """Value of keeping each width: sum of the top scores of ``widths[-1]`` gamma-distributed ones."""
    scores = np.sort(rng.gamma(2.0, 1.0, widths[-1]))[::-1] * scale * rng.lognormal(0.0, 0.5)
    return np.cumsum(scores)[np.asarray(widths) - 1]


def latency_table(rng: np.random.Generator, macs_per_unit: float, *axes: list[int], overhead: float = 0.01,
                  noise: float = 0.03) -> np.ndarray:
    """Milliseconds for an op whose MACs are ``macs_per_unit`` times the product of its (tiled) widths."""
    table = np.full(tuple(len(a) for a in axes), macs_per_unit * 1e-9 * MS_PER_GMAC)
    for i, a in enumerate(axes):
        w = np.asarray(a, dtype=np.float64)
        tiled = 0.5 * w + 0.5 * np.ceil(w / 32.0) * 32.0
        shape = [1] * len(axes)
        shape[i] = len(a)
        table = table * tiled.reshape(shape)
    return np.maximum(table * (1.0 + noise * rng.standard_normal(table.shape)) + overhead, 0.0)


def _dense(resource: Resource) -> float:
    return resource.constant + sum(float(np.max(t.table)) for t in resource.terms)


def set_budgets(problem: Problem, fractions: list[float]) -> Problem:
    """Set each resource's budget to a fraction of its dense use (every width at its maximum, every block kept)."""
    for r, f in zip(problem.resources, fractions, strict=True):
        r.budget = f * _dense(r)
    return problem


def resnet_problem(depths: tuple[int, ...] = (3, 4, 6, 3), seed: int = 0, budget: float = 0.5,
                   params_budget: float | None = None, max_choices: int = 64) -> Problem:
    """A bottleneck ResNet (ResNet-50 for depths (3, 4, 6, 3), ResNet-101 for (3, 4, 23, 3)) at 224x224.

    Dims: the stem (64), one per stage shared by its blocks' outputs and its projection shortcut
    (256..2048) and two per bottleneck block (64..512), in steps of 8 coarsened to at most ``max_choices``.
    Every block is removable; the first block of a stage reads the previous stage's dim. With
    ``params_budget`` a second resource counts parameters.
    """
    rng = np.random.default_rng(seed)
    dims = [DimChoice("stem", widths_for(64, 8, max_choices), np.zeros(0))]
    latency: list[CostTerm] = [CostTerm("conv1", ("stem",), latency_table(rng, 112 * 112 * 49 * 3, dims[0].widths))]
    params: list[CostTerm] = [CostTerm("conv1", ("stem",), 49 * 3 * np.asarray(dims[0].widths, dtype=float))]
    blocks: list[str] = []
    hw_in, prev = 56, "stem"
    for s, depth in enumerate(depths):
        mid, out = 64 * 2**s, 256 * 2**s
        hw = 56 // 2**s
        stage = f"layer{s + 1}"
        dims.append(DimChoice(stage, widths_for(out, 8, max_choices), np.zeros(0)))
        by_name = {d.name: d.widths for d in dims}
        latency.append(CostTerm(f"{stage}.downsample", (prev, stage),
                                latency_table(rng, hw * hw, by_name[prev], by_name[stage])))
        params.append(CostTerm(f"{stage}.downsample", (prev, stage), np.outer(by_name[prev], by_name[stage]) * 1.0))
        for i in range(depth):
            block = f"{stage}.{i}"
            blocks.append(block)
            a, b = f"{block}.conv1", f"{block}.conv2"
            src = prev if i == 0 else stage
            for name in (a, b):
                dims.append(DimChoice(name, widths_for(mid, 8, max_choices), np.zeros(0), block))
            w = {d.name: d.widths for d in dims}
            convs = [(a, (src, a), (hw_in if i == 0 else hw) ** 2, 1), (b, (a, b), hw * hw, 9),
                     (f"{block}.conv3", (b, stage), hw * hw, 1)]
            for name, pair, pixels, kernel in convs:
                latency.append(CostTerm(name, pair, latency_table(rng, pixels * kernel, w[pair[0]], w[pair[1]]), block))
                params.append(CostTerm(name, pair, kernel * np.outer(w[pair[0]], w[pair[1]]) * 1.0, block))
        hw_in, prev = hw, stage
    last = dims[[d.name for d in dims].index(prev)].widths
    latency.append(CostTerm("fc", (prev,), latency_table(rng, 1000, last)))
    params.append(CostTerm("fc", (prev,), 1000.0 * np.asarray(last, dtype=float)))
    for d in dims:
        d.value = cumulative_value(rng, d.widths)
    resources = [Resource("latency", latency, constant=0.3, budget=0.0)]
    if params_budget is not None:
        resources.append(Resource("params", params, constant=1000.0, budget=0.0))
    problem = Problem(dims=dims, blocks=blocks, resources=resources)
    return set_budgets(problem, [budget] + ([params_budget] if params_budget is not None else []))


def vit_problem(depth: int = 12, seed: int = 0, budget: float = 0.5, embed: int = 768, heads: int = 12,
                head_dim: int = 64, mlp: int = 3072, tokens: int = 197,
                steps: tuple[int, int, int, int] = (16, 1, 2, 32), min_blocks_kept: int = 0) -> Problem:
    """A ViT (ViT-Base by default): embedding E shared by all blocks; per block heads H, q/k width Q, v width V
    (attention sub-block) and MLP width M (MLP sub-block), each sub-block removable. Latency terms: q and k
    projections over (E, H, Q), v and output projections over (E, H, V), attention core over (H, Q, V), fc1 and
    fc2 over (E, M), layer norms over E. ``steps`` are the width steps of E, H, Q/V and M."""
    rng = np.random.default_rng(seed)
    t = float(tokens)
    e_w = widths_for(embed, steps[0], 1 << 30)
    dims = [DimChoice("embed", e_w, np.zeros(0))]
    terms = [
        CostTerm("patch_embed", ("embed",), latency_table(rng, t * 768, e_w)),
        CostTerm("norm", ("embed",), latency_table(rng, t * 4, e_w)),
        CostTerm("head", ("embed",), latency_table(rng, 1000, e_w)),
    ]
    blocks = []
    for i in range(depth):
        attn, ffn = f"blocks.{i}.attn", f"blocks.{i}.mlp"
        blocks += [attn, ffn]
        h_w = widths_for(heads, steps[1], 1 << 30)
        q_w = widths_for(head_dim, steps[2], 1 << 30)
        m_w = widths_for(mlp, steps[3], 1 << 30)
        names = [f"{attn}.heads", f"{attn}.qk", f"{attn}.v", f"{ffn}.hidden"]
        h, q, v, m = names
        dims += [DimChoice(h, h_w, np.zeros(0), attn), DimChoice(q, q_w, np.zeros(0), attn),
                 DimChoice(v, list(q_w), np.zeros(0), attn), DimChoice(m, m_w, np.zeros(0), ffn)]
        terms += [
            CostTerm(f"{attn}.norm", ("embed",), latency_table(rng, t * 4, e_w), attn),
            CostTerm(f"{attn}.q", ("embed", h, q), latency_table(rng, t, e_w, h_w, q_w), attn),
            CostTerm(f"{attn}.k", ("embed", h, q), latency_table(rng, t, e_w, h_w, q_w), attn),
            CostTerm(f"{attn}.v", ("embed", h, v), latency_table(rng, t, e_w, h_w, q_w), attn),
            CostTerm(f"{attn}.core", (h, q, v), _attention_core(rng, t, h_w, q_w), attn),
            CostTerm(f"{attn}.proj", ("embed", h, v), latency_table(rng, t, e_w, h_w, q_w), attn),
            CostTerm(f"{ffn}.norm", ("embed",), latency_table(rng, t * 4, e_w), ffn),
            CostTerm(f"{ffn}.fc1", ("embed", m), latency_table(rng, t, e_w, m_w), ffn),
            CostTerm(f"{ffn}.fc2", ("embed", m), latency_table(rng, t, e_w, m_w), ffn),
        ]
    scale = {"embed": 4.0, "heads": 2.0, "qk": 0.2, "v": 0.2, "hidden": 0.05}
    for d in dims:
        d.value = cumulative_value(rng, d.widths, scale[d.name.split(".")[-1]])
    problem = Problem(dims=dims, blocks=blocks, resources=[Resource("latency", terms, 0.2, 0.0)],
                      min_blocks_kept=min_blocks_kept)
    return set_budgets(problem, [budget])


V100_SMS, V100_FLOPS, V100_BYTES = 80, 14e12, 800e9  # streaming multiprocessors, fp32 FLOP/s, memory bytes/s


def _gpu_gemm_ms(m: float, k: np.ndarray, n: np.ndarray, batch: float = 1.0) -> np.ndarray:
    """A GEMM (m x k) @ (k x n) on a V100-like GPU: 128x128 output tiles run in waves over the SMs, each tile's
    time proportional to k rounded up to 16, plus a launch overhead: a staircase in n and k."""
    tiles = batch * np.ceil(m / 128.0) * np.ceil(np.asarray(n, dtype=np.float64) / 128.0)
    waves = np.ceil(tiles / V100_SMS)
    k16 = np.ceil(np.asarray(k, dtype=np.float64) / 16.0) * 16.0
    return waves * 128 * 128 * 2 * k16 / (V100_FLOPS / V100_SMS) * 1e3 + 0.005


def _gpu_memory_ms(elements: np.ndarray) -> np.ndarray:
    """An elementwise op (softmax, GELU, layer norm) reading and writing float32 ``elements``."""
    return np.asarray(elements, dtype=np.float64) * 8.0 / V100_BYTES * 1e3 + 0.005


def deit_v100_problem(seed: int = 0, budget: float = 0.5, depth: int = 12, batch: int = 576, tokens: int = 198,
                      value_shape: float = 0.3, block_value: float = 1.0) -> Problem:
    """DeiT-Base with latency tables laid out as the MDP authors' V100 look-up tables (deit/latency_estimation.py
    of NVlabs/MDP; the tables themselves are not available here, so a GPU model stands in for the measurements).

    Per block: ``qk`` over (embedding, heads, q/k width) (q and k projections, scores and softmax), ``vandproj``
    over (embedding, heads, v width) (v projection, attention times v, output projection) and ``mlp`` over
    (embedding, hidden) (fc1, GELU, fc2), at the authors' steps: embedding 16, heads 2, q/k and v 8, hidden 16
    (192 choices). Latencies are GEMM staircases (tiles and waves) at batch 576 with 1% noise. Values are heavy
    tailed (gamma shape ``value_shape``), and each attention/MLP sub-block has its own score (``block_value``
    times an average dim's value, gamma distributed), as mdprune's importance gives.
    """
    rng = np.random.default_rng(seed)

    def noisy(table: np.ndarray) -> np.ndarray:
        return table * (1.0 + 0.01 * rng.standard_normal(table.shape))

    e_w, m_w = widths_for(768, 16, 1 << 30), widths_for(3072, 16, 1 << 30)
    h_w, q_w = widths_for(12, 2), widths_for(64, 8)
    rows = float(batch * tokens)
    e = np.asarray(e_w, dtype=np.float64)
    dims = [DimChoice("embed", e_w, np.zeros(0))]
    terms = [CostTerm("patch_embed", ("embed",), noisy(_gpu_gemm_ms(batch * (tokens - 2), 768, e))),
             CostTerm("norm", ("embed",), noisy(_gpu_memory_ms(rows * e))),
             CostTerm("head", ("embed",), noisy(_gpu_gemm_ms(batch, e, 1000)))]
    E, H, Q = np.meshgrid(e, np.asarray(h_w, dtype=np.float64), np.asarray(q_w, dtype=np.float64), indexing="ij")
    E2, M = np.meshgrid(e, np.asarray(m_w, dtype=np.float64), indexing="ij")
    blocks = []
    for i in range(depth):
        attn, ffn = f"blocks.{i}.attn", f"blocks.{i}.mlp"
        blocks += [attn, ffn]
        h, q, v, m = f"{attn}.heads", f"{attn}.qk", f"{attn}.v", f"{ffn}.hidden"
        dims += [DimChoice(h, h_w, np.zeros(0), attn), DimChoice(q, q_w, np.zeros(0), attn),
                 DimChoice(v, list(q_w), np.zeros(0), attn), DimChoice(m, m_w, np.zeros(0), ffn)]
        qk = (2 * _gpu_gemm_ms(rows, E, H * Q) + _gpu_gemm_ms(tokens, Q, tokens, batch * H)
              + _gpu_memory_ms(batch * H * tokens * tokens))
        vproj = _gpu_gemm_ms(rows, E, H * Q) + _gpu_gemm_ms(tokens, tokens, Q, batch * H) + _gpu_gemm_ms(rows, H * Q, E)
        mlp = _gpu_gemm_ms(rows, E2, M) + _gpu_memory_ms(rows * M) + _gpu_gemm_ms(rows, M, E2)
        terms += [CostTerm(f"{attn}.norm", ("embed",), noisy(_gpu_memory_ms(rows * e)), attn),
                  CostTerm(f"{attn}.qk", ("embed", h, q), noisy(qk), attn),
                  CostTerm(f"{attn}.vandproj", ("embed", h, v), noisy(vproj), attn),
                  CostTerm(f"{ffn}.norm", ("embed",), noisy(_gpu_memory_ms(rows * e)), ffn),
                  CostTerm(f"{ffn}.mlp", ("embed", m), noisy(mlp), ffn)]
    for d in dims:
        scores = np.sort(rng.gamma(value_shape, 1.0, d.widths[-1]))[::-1] * rng.lognormal(0.0, 1.0)
        d.value = np.cumsum(scores)[np.asarray(d.widths) - 1] / d.widths[-1]
    average = sum(float(d.value[-1]) for d in dims) / len(dims)
    problem = Problem(dims=dims, blocks=blocks, resources=[Resource("latency", terms, 0.2, 0.0)],
                      block_value={b: block_value * average * float(rng.gamma(0.5, 1.0)) for b in blocks})
    return set_budgets(problem, [budget])


def _attention_core(rng: np.random.Generator, tokens: float, h_w: list[int], q_w: list[int]) -> np.ndarray:
    """Softmax(QK^T)V: T^2 H (Q + V) MACs plus a softmax cost per head."""
    h = np.asarray(h_w, dtype=np.float64)[:, None, None]
    q = np.asarray(q_w, dtype=np.float64)
    macs = tokens * tokens * h * (q[None, :, None] + q[None, None, :] + 8.0)
    noise = 1.0 + 0.03 * rng.standard_normal(macs.shape)
    return np.maximum(macs * 1e-9 * MS_PER_GMAC * noise + 0.01, 0.0)


def random_problem(seed: int, max_choices: int = 4, max_blocks: int = 2, max_dims: int = 5,
                   max_terms: int = 5) -> Problem:
    """A tiny random problem: 2-5 dims, 0-2 blocks, terms over 0-3 dims, 1-2 resources, budgets in 20-100%."""
    rng = np.random.default_rng(seed)
    blocks = [f"b{i}" for i in range(int(rng.integers(0, max_blocks + 1)))]
    dims = []
    for i in range(int(rng.integers(2, max_dims + 1))):
        n = int(rng.integers(1, max_choices + 1))
        owner = blocks[int(rng.integers(len(blocks)))] if blocks and rng.random() < 0.5 else None
        widths = [8 * (k + 1) for k in range(n)]
        dims.append(DimChoice(f"d{i}", widths, cumulative_value(rng, widths), owner))
    resources = []
    for r in range(int(rng.integers(1, 3))):
        terms = []
        for t in range(int(rng.integers(1, max_terms + 1))):
            pick = int(rng.integers(len(blocks) + 1))
            block = blocks[pick - 1] if pick else None
            usable = [d for d in dims if d.block is None or d.block == block]
            arity = int(rng.integers(0, min(3, len(usable)) + 1))
            chosen = [usable[i] for i in rng.choice(len(usable), size=arity, replace=False)]
            table = latency_table(rng, 1e6 * rng.uniform(0.5, 2.0), *(d.widths for d in chosen), noise=0.2)
            terms.append(CostTerm(f"t{r}.{t}", tuple(d.name for d in chosen), table, block))
        resources.append(Resource(f"r{r}", terms, constant=float(rng.uniform(0.0, 0.05)), budget=0.0))
    problem = Problem(dims, blocks, resources)
    if blocks and rng.random() < 0.3:
        problem.block_value = {b: float(rng.uniform(0, 5)) for b in blocks}
    if blocks and rng.random() < 0.3:
        problem.min_blocks_kept = int(rng.integers(1, len(blocks) + 1))
    return set_budgets(problem, list(rng.uniform(0.2, 1.0, len(resources))))
