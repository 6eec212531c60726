"""The fused hash-embedding table and the notebook-style wrapper (optimizer: ``hashrec.nn.optim``).

One parameter ``weight [rows, D]`` holds every entity block (layout: ``hashrec.hashing.config``).
A whole ``RecsysBatch`` is looked up with one gather over the concatenated indices; the backward
pass de-duplicates the looked-up rows (one sort, then a segment sum) and hands the optimizer a
coalesced sparse gradient with one row per touched table row, so the row-wise Adagrad step is
O(touched rows), never O(table). Row 0 is padding: zero at init, dropped from every gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hashrec.hashing.config import HashConfig
from hashrec.nn.batch import HASH_FIELDS, RecsysBatch, RecsysEmbeddings

__all__ = [
    "FusedEmbeddingTable",
    "MemoryReport",
    "MultiHashEmbedding",
    "gather_rows",
]


class _GatherRows(torch.autograd.Function):
    """rows = weight[idx]; backward emits one gradient row per distinct non-padding index.

    Both directions run on ``embedding_bag``'s multi-threaded kernel: forward as bags of one
    row (bit-identical to ``index_select``, faster on CPU); backward sorts idx once, and sums each
    run of equal indices as one bag of gradient rows -- about 2x faster than ``index_add_``.
    On a GPU the forward is ``F.embedding``'s gather (1.2-1.3x ``embedding_bag`` there, H200).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, idx: torch.Tensor, sparse: bool) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.shape = weight.shape
        ctx.sparse = sparse
        if weight.device.type != "cpu":
            return F.embedding(idx, weight)
        # detached: embedding_bag picks its forward-only kernel for a weight that needs no
        # gradient (ours comes from backward below); the other builds bag bookkeeping it never
        # reads, ~10% of a 1M-row gather
        return F.embedding_bag(idx.view(-1, 1), weight.detach(), mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (idx,) = ctx.saved_tensors
        uniq, acc = segment_sum(idx, grad, num_rows=ctx.shape[0])
        return table_grad(uniq, acc.to(grad.dtype), ctx.shape, ctx.sparse), None, None


def segment_sum(
    idx: torch.Tensor,
    grad: torch.Tensor,
    scale: torch.Tensor | None = None,
    tail: int = 0,
    num_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient rows of a gather: idx [m] int64, grad [m, D], optional scale [m] ->
    (rows [U] int64 ascending without padding row 0, sums [U + tail, D] fp32), where
    ``sums[u] = sum over i with idx[i] = rows[u] of scale[i] * grad[i]`` and the last ``tail``
    rows are zeros for the caller to fill (more rows of the same gradient, no concatenation).

    One sort of idx, then each run of equal indices summed as one bag of ``embedding_bag``
    (``scale`` rides along as its per-sample weights: no separate pass). Sums are fp32, also
    for bf16 tables. ``num_rows`` (the table's) below 2^31: the sort runs on int32 keys, about
    twice as fast on CPU as int64 ones (cast included).
    """
    narrow = num_rows is not None and num_rows <= torch.iinfo(torch.int32).max
    sorted_idx, order = torch.sort(idx.int() if narrow else idx)
    uniq, counts = torch.unique_consecutive(sorted_idx, return_counts=True)
    uniq = uniq.long()  # no-op for int64
    first, run = torch.stack([uniq[0], counts[0]]).tolist() if uniq.numel() else (1, 0)
    if first == 0:  # padding row: never summed, never in the gradient
        # dropped before the sum, where its run would be one long bag for one thread: at 30%
        # padding the sum takes 0.82x the time (2 threads), level at 3%
        order = order[run:]
        uniq, counts = uniq[1:], counts[1:]
    starts = torch.cumsum(counts, 0) - counts
    if tail:  # empty bags sum to zero rows
        starts = torch.cat([starts, starts.new_full((tail,), order.numel())])
    g32 = grad.contiguous().float()  # no-op for fp32
    w = None if scale is None else scale.float().index_select(0, order)
    acc = F.embedding_bag(order, g32, starts, mode="sum", per_sample_weights=w)  # [U+tail, D]
    return uniq, acc


def table_grad(
    rows: torch.Tensor, vals: torch.Tensor, shape: torch.Size, sparse: bool
) -> torch.Tensor:
    """The table's gradient from ascending unique ``rows`` [U] and their ``vals`` [U, D]: a
    coalesced sparse tensor, or a dense one of ``shape``."""
    if sparse:
        return torch.sparse_coo_tensor(
            rows[None], vals, shape, is_coalesced=True, check_invariants=False
        )
    g = torch.zeros(shape, dtype=vals.dtype, device=vals.device)
    return g.index_copy_(0, rows, vals)


def gather_rows(weight: torch.Tensor, idx: torch.Tensor, sparse: bool = True) -> torch.Tensor:
    """``weight[idx]`` for 1-D int64 ``idx`` with the de-duplicating, padding-free backward."""
    return _GatherRows.apply(weight, idx, sparse)


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held by a table, its optimizer state and any frequency map (hybrid layouts).

    >>> r = MemoryReport(rows=1000, dim=8, dtype="float32", table_bytes=32_000,
    ...                  optimizer_bytes=4_000)
    >>> r.total_bytes
    36000
    """

    rows: int
    dim: int
    dtype: str
    table_bytes: int
    optimizer_bytes: int
    frequency_map_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.table_bytes + self.optimizer_bytes + self.frequency_map_bytes

    def __str__(self) -> str:
        mib = 1024**2
        parts = [
            f"table {self.rows:,} x {self.dim} {self.dtype}: {self.table_bytes / mib:.1f} MiB",
            f"optimizer state {self.optimizer_bytes / mib:.1f} MiB",
        ]
        if self.frequency_map_bytes:
            parts.append(f"frequency map {self.frequency_map_bytes / mib:.2f} MiB")
        return ", ".join([*parts, f"total {self.total_bytes / mib:.1f} MiB"])


class FusedEmbeddingTable(nn.Module):
    """One ``[rows, D]`` table for every entity type and hash (row 0 = padding).

    Args:
        num_rows: rows including padding (``HashConfig.num_rows``).
        dim: embedding width D.
        dtype: ``torch.float32`` or ``torch.bfloat16`` storage.
        sparse: emit sparse (coalesced) gradients; the default, and what ``RowWiseAdagrad`` wants.
        init_std: standard deviation of the normal initialisation.

    >>> cfg = HashConfig.uniform(num_buckets=1000)
    >>> table = FusedEmbeddingTable.from_config(cfg, dim=8)
    >>> table(torch.tensor([[0, 1001]])).shape
    torch.Size([1, 2, 8])
    """

    def __init__(
        self,
        num_rows: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        sparse: bool = True,
        init_std: float = 0.05,
    ) -> None:
        super().__init__()
        if num_rows < 2:
            raise ValueError(f"num_rows must be >= 2 (row 0 is padding), got {num_rows}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.num_rows, self.dim, self.sparse = num_rows, dim, sparse
        self.weight = nn.Parameter(torch.empty(num_rows, dim, dtype=dtype))
        self.init_std = init_std
        # A lookup that stands in for the local gather: flat int64 rows [n] -> [n, D], row 0
        # zero. Set while the table is sharded over processes (hashrec.training.sharded).
        self.backend: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: HashConfig, dim: int, **kwargs) -> FusedEmbeddingTable:
        table = cls(config.num_rows, dim, **kwargs)
        table.hash_config = config
        return table

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.normal_(0.0, self.init_std)
        self.weight[0].zero_()

    def check_indices(self, name: str, idx: torch.Tensor) -> None:
        """ValueError naming ``name`` unless ``idx`` is int32/int64 within the table's rows
        (reads the min and max: a host sync on GPU; batches carry their bounds instead)."""
        if idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} has dtype {idx.dtype}, expected torch.int32 or torch.int64")
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_rows:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{name} holds row {bad}, expected 0..{self.num_rows - 1} (table rows)"
                )

    def _gather(self, flat: torch.Tensor) -> torch.Tensor:
        if self.backend is not None:
            return self.backend(flat)
        return gather_rows(self.weight, flat, self.sparse)

    def check_batch(self, batch: RecsysBatch, names: Sequence[str]) -> None:
        """``check_indices`` on the hash fields ``names`` of ``batch``, only when the bounds the
        batch recorded when built say one may be out of range (no host sync otherwise)."""
        if batch.max_index(tuple(names)) >= self.num_rows:
            for name in names:
                self.check_indices(name, getattr(batch, name))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [...] int -> vectors [..., D] in the table's dtype."""
        self.check_indices("indices", indices)
        flat = indices.reshape(-1).to(torch.int64)
        return self._gather(flat).view(*indices.shape, self.dim)

    def lookup(self, batch: RecsysBatch) -> RecsysEmbeddings:
        """Every hash field of a batch (``HASH_FIELDS``) in one gather -> ``RecsysEmbeddings``.

        Index bounds come from the values the batch recorded when it was built: no host sync.
        """
        return RecsysEmbeddings(**self.lookup_fields(batch))

    def lookup_fields(
        self, batch: RecsysBatch, skip: Collection[str] = ()
    ) -> dict[str, torch.Tensor | None]:
        """``lookup``'s gather as ``{embedding name: [..., D] or None}``; the hash fields named
        in ``skip`` (and absent ones) are not gathered and map to None."""
        present = [
            f for f in HASH_FIELDS if getattr(batch, f.name) is not None and f.name not in skip
        ]
        looked_up: dict[str, torch.Tensor | None] = {f.embedding: None for f in HASH_FIELDS}
        if not present:
            return looked_up
        self.check_batch(batch, [f.name for f in present])
        parts = [getattr(batch, f.name) for f in present]
        flat = torch.cat([p.reshape(-1).to(torch.int64) for p in parts])
        out = self._gather(flat)
        pieces = torch.split(out, [p.numel() for p in parts])
        for f, p, piece in zip(present, parts, pieces, strict=True):
            looked_up[f.embedding] = piece.view(*p.shape, self.dim)
        return looked_up

    def memory_report(self, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
        """Bytes of the table, of the optimizer state held for it, and of the frequency map of
        a hybrid layout (``HashConfig.frequency_map_bytes``)."""
        opt_bytes = 0
        if optimizer is not None:
            state = optimizer.state.get(self.weight, {})
            opt_bytes = sum(
                v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v)
            )
        w = self.weight
        config = getattr(self, "hash_config", None)
        return MemoryReport(
            rows=self.num_rows,
            dim=self.dim,
            dtype=str(w.dtype).removeprefix("torch."),
            table_bytes=w.numel() * w.element_size(),
            optimizer_bytes=opt_bytes,
            frequency_map_bytes=config.frequency_map_bytes if config is not None else 0,
        )

    def extra_repr(self) -> str:
        return f"{self.num_rows}, {self.dim}, dtype={self.weight.dtype}, sparse={self.sparse}"


class MultiHashEmbedding(nn.Module):
    """The lecture notebook's ``MultiHashEmbedding(vocab_size, emb_size, num_hashes)``, fused.

    Semantics are the notebook's -- hash j of an ID indexes its own table j of ``vocab_size``
    rows, index 0 is padding -- but the k tables live in one ``FusedEmbeddingTable`` (``.table``):
    local index h of hash j is row ``j * vocab_size + h`` (0 stays 0), and a lookup is one
    gather, not a loop over hashes.

    >>> emb = MultiHashEmbedding(vocab_size=100, emb_size=8, num_hashes=2)
    >>> emb(torch.tensor([[3, 7], [0, 0]])).shape  # [B, K] -> [B, K, D]
    torch.Size([2, 2, 8])
    >>> emb.table.weight.shape  # the k tables, fused
    torch.Size([200, 8])
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int,
        num_hashes: int,
        sparse: bool = False,
        init_std: float = 1.0,
    ) -> None:
        super().__init__()
        if vocab_size < 2 or num_hashes < 1:
            raise ValueError(
                f"need vocab_size >= 2 and num_hashes >= 1, got {vocab_size} and {num_hashes}"
            )
        # init_std=1.0 matches nn.Embedding, which the notebook uses per hash.
        self.table = FusedEmbeddingTable(
            num_hashes * vocab_size, emb_size, sparse=sparse, init_std=init_std
        )
        self.vocab_size, self.num_hashes, self.dim = vocab_size, num_hashes, emb_size
        self.register_buffer(
            "hash_offsets",
            torch.arange(num_hashes, dtype=torch.int64) * vocab_size,
            persistent=False,
        )

    @property
    def weight(self) -> nn.Parameter:
        """The fused ``[num_hashes * vocab_size, D]`` parameter."""
        return self.table.weight

    def rows(self, hashes: torch.Tensor) -> torch.Tensor:
        """hashes [..., K] (per-table indices) -> fused-table rows [..., K]."""
        if hashes.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"hashes has dtype {hashes.dtype}, expected torch.int32 or torch.int64"
            )
        if hashes.dim() == 0 or hashes.shape[-1] != self.num_hashes:
            raise ValueError(
                f"hashes has shape {list(hashes.shape)}, expected [..., {self.num_hashes}] "
                "(last dim = num_hashes)"
            )
        if hashes.numel() and (int(hashes.min()) < 0 or int(hashes.max()) >= self.vocab_size):
            bad = int(hashes.min()) if int(hashes.min()) < 0 else int(hashes.max())
            raise ValueError(f"hashes holds {bad}, expected 0..{self.vocab_size - 1}")
        h = hashes.to(torch.int64)
        return torch.where(h == 0, h, h + self.hash_offsets)

    def forward(self, hashes: torch.Tensor) -> torch.Tensor:
        """hashes [..., K] in 0 .. vocab_size-1 -> [..., K, D]."""
        return self.table(self.rows(hashes))
