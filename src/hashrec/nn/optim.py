"""Row-wise Adagrad for hash-embedding tables (one accumulator per row; touched rows only)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["RowWiseAdagrad"]


def _unique_rows(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, values) of a sparse gradient, one entry per row, rows ascending.

    Autograd drops the coalesced flag that ``_GatherRows`` sets, and ``coalesce()`` would sort
    again; a strictly increasing index is already coalesced, which costs one O(U) check.
    """
    rows, vals = g._indices()[0], g._values()
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        g = g.coalesce()
        rows, vals = g.indices()[0], g.values()
    return rows, vals


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad, as X (and FBGEMM's EXACT_ROWWISE_ADAGRAD) train embedding tables.

    One fp32 accumulator per row: ``acc[r] += mean(g[r]^2)``; ``w[r] -= lr * g[r] / (sqrt(acc[r])
    + eps)``. Only rows present in the gradient are touched; row 0 (padding) never is. Takes
    sparse gradients (from ``FusedEmbeddingTable(sparse=True)``) or dense ones, where rows with
    an all-zero gradient count as untouched.

    >>> from hashrec import FusedEmbeddingTable
    >>> table = FusedEmbeddingTable(10, 4)
    >>> opt = RowWiseAdagrad(table.parameters(), lr=0.1)
    >>> table(torch.tensor([3])).sum().backward(); opt.step()
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 0.05,
        eps: float = 1e-8,
        initial_accumulator_value: float = 0.0,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        defaults = dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"RowWiseAdagrad needs 2-D tables, got shape {list(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.full(
                        (p.shape[0],),
                        group["initial_accumulator_value"],
                        dtype=torch.float32,
                        device=p.device,
                    )
                acc = state["sum"]
                g = p.grad
                if g.is_sparse:
                    rows, vals = _unique_rows(g)
                else:
                    rows = g.ne(0).any(dim=1).nonzero().squeeze(1)
                    vals = g.index_select(0, rows)
                if rows.numel() and int(rows[0]) == 0:  # coalesced/nonzero() give sorted rows
                    rows, vals = rows[1:], vals[1:]
                vals = vals.float()  # no-op for fp32 tables
                a = acc.index_select(0, rows)
                a += torch.linalg.vector_norm(vals, dim=1).square_() / p.shape[1]  # mean(g^2)
                acc.index_copy_(0, rows, a)
                scale = a.sqrt_().add_(eps).reciprocal_().mul_(lr)
                # select + copy back beats index_add_ (serial on CPU) ~2x; rows are unique
                new = p.index_select(0, rows).float()
                new.addcmul_(vals, scale.unsqueeze(1), value=-1.0)
                p.index_copy_(0, rows, new.to(p.dtype))
        return loss
