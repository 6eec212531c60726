"""What a table layout does after the gather: importance weights of the ``weighted`` layout.

Lookup gathers ``num_slots`` rows per ID (``hashrec.hashing.layouts``). For ``multihash``,
``hybrid`` and ``qr`` those rows are the K vectors the reducers concatenate. For ``weighted`` the
last slot is an importance-weight row: G = D // K groups of K weights packed in D columns; the
ID's group is ``(sum of its K component rows) mod G``, and component j is scaled by ``1 + w_j``
(weights start near 0, so training starts as plain multi-hash). Everything stays in the one fused
parameter, so row-wise Adagrad updates the touched weight rows like any other row.

Two paths give the same outputs and gradients: ``weighted_combine`` takes the gathered slots
(the weight row D wide, as any lookup returns it; the sharded table's path), and
``weighted_lookup`` reads the table itself: it gathers only the K weights an ID uses and scales
its component rows inside the gather: a table training step 1.2-1.9x a plain multi-hash step's,
where the D-wide path's took 4-8x (README, "Speed of the table schemes";
``benchmarks/bench_table.py --layouts-only``).
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F

from hashrec.hashing.config import HashConfig
from hashrec.nn.batch import HASH_FIELDS, RecsysBatch, RecsysEmbeddings
from hashrec.nn.table import FusedEmbeddingTable, segment_sum, table_grad

__all__ = [
    "apply_layouts",
    "lookup_layouts",
    "weighted_combine",
    "weighted_combine_reference",
    "weighted_lookup",
]


class _WeightedCombine(torch.autograd.Function):
    """out_j = v_j * (1 + w[cols_j]); backward writes both gradients into one [..., K+1, D]."""

    @staticmethod
    def forward(ctx, vectors: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        K = cols.shape[-1]
        comp = vectors[..., :K, :]
        scale = vectors[..., K, :].gather(-1, cols).add_(1.0)  # [..., K]
        ctx.save_for_backward(vectors, cols, scale)
        return comp * scale.unsqueeze(-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        vectors, cols, scale = ctx.saved_tensors
        K = cols.shape[-1]
        grad = torch.empty_like(vectors)
        torch.mul(g, scale.unsqueeze(-1), out=grad[..., :K, :])
        gw = torch.linalg.vecdot(g, vectors[..., :K, :])  # [..., K]: d out / d w_j
        grad[..., K, :].zero_().scatter_(-1, cols, gw)
        return grad, None


_DOT_CHUNK = 16384  # rows per chunk of _rowwise_dot: 4 MiB at D = 64, stays in cache


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a[i], b[i]> for a, b [m, D] -> [m].

    Chunk by chunk through one cache-sized buffer (multiply, then sum): about 2x faster on CPU
    than ``(a * b).sum(-1)``, whose [m, D] product is fresh memory on every call.
    """
    m, D = a.shape
    out = torch.empty(m, dtype=a.dtype, device=a.device)
    buf = torch.empty(min(m, _DOT_CHUNK), D, dtype=a.dtype, device=a.device)
    for lo in range(0, m, _DOT_CHUNK):
        hi = min(lo + _DOT_CHUNK, m)
        torch.sum(torch.mul(a[lo:hi], b[lo:hi], out=buf[: hi - lo]), -1, out=out[lo:hi])
    return out


class _WeightedGather(torch.autograd.Function):
    """out[i, j] = weight[comp[i, j]] * (1 + weight[wrow[i], first[i] + j]), from the table.

    Forward gathers the n*K weights as scalars and the component rows with ``embedding_bag``,
    the weights as its per-sample weights (one pass, no [n, K, D] temporary). Backward forms
    the table's gradient directly: component rows by one segment sum with the same per-sample
    weights; the weights' gradients <g_ij, weight[comp_ij]> (from the saved output) summed into
    U_w more rows of that sum, one per distinct weight row, K columns per ID. The weight rows
    never travel D wide through a gather and its backward.
    """

    @staticmethod
    def forward(
        ctx,
        weight: torch.Tensor,
        comp: torch.Tensor,
        wrow: torch.Tensor,
        first: torch.Tensor,
        sparse: bool,
    ) -> torch.Tensor:
        D, K = weight.shape[1], comp.numel() // max(wrow.numel(), 1)
        ks = torch.arange(K, device=comp.device)
        pos = (wrow * D + first).unsqueeze(-1) + ks  # [n, K] flat positions of the weights
        scale = weight.reshape(-1).index_select(0, pos.view(-1)).add_(1.0)  # [n*K]
        out = F.embedding_bag(  # detached: the forward-only kernel (see _GatherRows)
            comp.view(-1, 1), weight.detach(), mode="sum", per_sample_weights=scale[:, None]
        )  # [n*K, D]
        ctx.save_for_backward(weight, comp, wrow, first, scale, out)
        ctx.sparse = sparse
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        weight, comp, wrow, first, scale, out = ctx.saved_tensors
        D, K = weight.shape[1], comp.numel() // max(wrow.numel(), 1)
        g = g.contiguous()
        # d out / d w_ij = <g_ij, weight[comp_ij]> = <g_ij, out_ij> / scale_ij: both read in
        # order, no second gather of the rows (out_ij = scale_ij * row exactly up to rounding)
        gs = _rowwise_dot(g, out).div_(scale)  # [n*K]
        zero = scale == 0  # weight exactly -1: out_ij is 0, so read the row itself
        if bool(zero.any()):
            i = zero.nonzero().squeeze(1)
            gs[i] = _rowwise_dot(g[i], weight.index_select(0, comp[i]))
        # distinct weight rows [U_w] ascending and each ID's among them [n] (int32 sorts faster)
        narrow = wrow.int() if weight.shape[0] <= torch.iinfo(torch.int32).max else wrow
        wrows, inv = torch.unique(narrow, return_inverse=True)
        wrows, tail = wrows.long(), wrows.numel()
        pos = (inv * D + first).unsqueeze(-1) + torch.arange(K, device=g.device)  # [n, K]
        pad = tail > 0 and int(wrows[0]) == 0
        if pad:  # padding row never receives a gradient: its weights go to a last, dropped row
            wrows = wrows[1:]
            pos = pos.sub_(D).remainder_(tail * D)  # row 0 -> row tail - 1, others one up
        # component rows (sum of scale * g), then the weight rows, in one [U_c + U_w, D] sum
        crows, acc = segment_sum(comp, g, scale, tail=tail, num_rows=weight.shape[0])
        acc[crows.numel() :].view(-1).scatter_add_(0, pos.view(-1), gs.float())
        if pad:
            acc = acc[:-1]
        rows, vals = torch.cat([crows, wrows]), acc.to(g.dtype)
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            # the blocks interleave or share a row (any rows, not a layout's): sum duplicates
            merged = torch.sparse_coo_tensor(
                rows[None], vals, weight.shape, check_invariants=False
            ).coalesce()
            rows, vals = merged.indices()[0], merged.values()
        return table_grad(rows, vals, weight.shape, ctx.sparse), None, None, None, None


def _first_col(rows: torch.Tensor, D: int) -> torch.Tensor:
    """rows [..., K+1] -> [...]: first column of the ID's group of K weights in its weight row
    (group = sum of the K component rows mod D // K)."""
    K = rows.shape[-1] - 1
    if K < 1 or D < K:
        raise ValueError(f"weighted layout needs 1 <= K <= D, got K={K}, D={D}")
    return rows[..., :K].sum(-1).remainder_(D // K).mul_(K)


def weighted_combine(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Importance-weighted components: rows [..., K+1] int, vectors [..., K+1, D] -> [..., K, D].

    >>> v = torch.ones(1, 3, 4)  # K = 2 components + 1 weight row of D = 4
    >>> weighted_combine(torch.tensor([[5, 6, 9]]), v).shape
    torch.Size([1, 2, 4])
    """
    first = _first_col(rows, vectors.shape[-1])
    cols = first.unsqueeze(-1) + torch.arange(rows.shape[-1] - 1, device=rows.device)
    return _WeightedCombine.apply(vectors, cols)  # cols [..., K]


def weighted_lookup(
    table: FusedEmbeddingTable, rows: torch.Tensor, check: bool = True
) -> torch.Tensor:
    """``weighted_combine(rows, table(rows))`` read straight from the table: rows [..., K+1]
    int -> [..., K, D] in the table's dtype; same outputs and gradients, close to the cost of a
    plain K-row lookup (the weight rows are read K scalars per ID, not D wide).

    A table with a ``backend`` (sharded over processes) takes ``weighted_combine``'s path.
    ``check=False`` skips the bounds check (a caller that knows them: ``lookup_layouts``).

    >>> table = FusedEmbeddingTable(20, 4)
    >>> weighted_lookup(table, torch.tensor([[5, 6, 19], [0, 0, 0]])).shape
    torch.Size([2, 2, 4])
    """
    if table.backend is not None:
        return weighted_combine(rows, table(rows))
    if check:
        table.check_indices("rows", rows)
    K, D = rows.shape[-1] - 1, table.dim
    r = rows.reshape(-1, K + 1).to(torch.int64)  # [n, K+1]
    first = _first_col(r, D)  # [n]
    comp, wrow = r[:, :K].reshape(-1), r[:, K].contiguous()  # [n*K], [n]
    out = _WeightedGather.apply(table.weight, comp, wrow, first, table.sparse)  # [n*K, D]
    return out.view(*rows.shape[:-1], K, D)


def weighted_combine_reference(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``weighted_combine`` one ID at a time (for tests)."""
    K, D = rows.shape[-1] - 1, vectors.shape[-1]
    G = D // K
    flat_r, flat_v = rows.reshape(-1, K + 1), vectors.reshape(-1, K + 1, D)
    out = []
    for r, v in zip(flat_r, flat_v, strict=True):
        g = int(sum(int(x) for x in r[:K])) % G
        out.append(torch.stack([v[j] * (1.0 + v[K, g * K + j]) for j in range(K)]))
    return torch.stack(out).reshape(*rows.shape[:-1], K, D)


def apply_layouts(
    config: HashConfig, batch: RecsysBatch, emb: RecsysEmbeddings
) -> RecsysEmbeddings:
    """Turn the gathered slots of every field into the K vectors per ID the reducers take."""
    if all(e.layout != "weighted" for e in config.entities):
        return emb
    out = {f.name: getattr(emb, f.name) for f in fields(emb)}
    for f in HASH_FIELDS:
        rows = getattr(batch, f.name)
        if rows is not None and config[f.entity].layout == "weighted":
            out[f.embedding] = weighted_combine(rows, out[f.embedding])
    return RecsysEmbeddings(**out)


def lookup_layouts(
    config: HashConfig, batch: RecsysBatch, table: FusedEmbeddingTable
) -> RecsysEmbeddings:
    """``apply_layouts(config, batch, table.lookup(batch))`` with the weighted fields read by
    ``weighted_lookup`` (one call per K): the same outputs and gradients, cheaper.

    >>> from hashrec.hashing.config import EntityHash
    >>> from hashrec.nn.batch import RecsysBatch
    >>> w = EntityHash("post", 2, 50, seed=2, layout="weighted", extra_rows=9)
    >>> cfg = HashConfig(entities=(EntityHash("user", 2, 50, seed=1), w,
    ...                            EntityHash("author", 2, 50, seed=3)))
    >>> table = FusedEmbeddingTable.from_config(cfg, dim=4)
    >>> batch = RecsysBatch(
    ...     torch.from_numpy(cfg.rows("user", [3])), torch.from_numpy(cfg.rows("post", [[7, 0]])),
    ...     torch.from_numpy(cfg.rows("author", [[5, 0]])), torch.zeros(1, 2, 1, dtype=torch.bool),
    ...     torch.zeros(1, 2, dtype=torch.int64))
    >>> lookup_layouts(cfg, batch, table).history_post_embeddings.shape  # [B, S, K, D]
    torch.Size([1, 2, 2, 4])
    """
    weighted = [
        f
        for f in HASH_FIELDS
        if getattr(batch, f.name) is not None and config[f.entity].layout == "weighted"
    ]
    if not weighted or table.backend is not None:
        return apply_layouts(config, batch, table.lookup(batch))
    out = table.lookup_fields(batch, skip={f.name for f in weighted})
    table.check_batch(batch, [f.name for f in weighted])
    by_k: dict[int, list] = {}
    for f in weighted:
        by_k.setdefault(getattr(batch, f.name).shape[-1], []).append(f)
    for slots, group in by_k.items():  # one gather and one gradient per K
        rows = [getattr(batch, f.name) for f in group]
        flat = torch.cat([r.reshape(-1, slots).to(torch.int64) for r in rows])  # [n, K+1]
        pieces = torch.split(weighted_lookup(table, flat, check=False),
                             [r[..., 0].numel() for r in rows])  # fmt: skip
        for f, r, piece in zip(group, rows, pieces, strict=True):
            out[f.embedding] = piece.view(*r.shape[:-1], slots - 1, table.dim)
    return RecsysEmbeddings(**out)
