"""Isolated attention over packed tokens, requests grouped by context length.

The packed path (``Transformer.pack_tokens``) runs the token-wise work on the N valid tokens of
a [B, T] batch, but ``isolated_attention`` needs each request's tokens side by side in [B, T]:
scattered back there, attention pays for every padding slot. KuaiRand batches at the demo
config hold contexts (user + history) of 5 tokens on average while their longest is 28, so most
of the [B, Tc, Tc] logits are padding. Here the requests are grouped by context length (powers
of two) and each group computes what ``isolated_attention`` does -- context against context,
each candidate against the context plus its own key -- trimmed to the group's longest context
and slate, in one ``candidates_attend`` call per group: the context tokens are query rows
without an own key (their own key is already among the context's; with causality a key bias
per row hides their later keys), so the two parts share their gathers and operations (a
training step at the demo config 0.93x the time of two calls). Rotary positions were applied
to q and k before (from each token's slot), so dropping padding slots changes nothing; the
tests hold this path to the padded one, outputs and gradients.

A request's valid tokens are contiguous in the packed order (row-major over [B, T], context
slots before candidate slots), so a group gathers them with one index per slot. Padding slots
point at token 0: every mask hides a padding key from the valid queries, and a padding query's
output is never read (so its gradient is exactly zero), so no zero row is appended (that cost
a copy of q, k and v per layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hashrec.nn.attention import candidates_attend, context_bias

__all__ = ["VarlenPlan", "plan_varlen", "varlen_isolated_attention"]

# Requests are first binned by context length rounded up to a power of two (at least
# _MIN_GROUP_LEN), then neighbouring bins merge when that is cheaper: a group costs a fixed
# ~85 ops forward and as many backward (_GROUP_OVERHEAD, in padded logits) plus its padded
# logits n * (L^2 + Cg * (L + 1)). Small bins of long contexts (a few requests each) join the
# next one instead of paying their own ops.
_MIN_GROUP_LEN = 16
_GROUP_OVERHEAD = 32_768
# Every group keeps at least this many key slots (the extra ones padding, masked). torch's CPU
# softmax over a last dimension shorter than one vector register (16 floats with AVX-512) takes
# a scalar path ~13x slower per element (measured, torch 2.13: 894 us for [3540, 15], 73 us
# for [3540, 16]), and the attention's softmax runs over the group's keys.
_MIN_KEYS = 16


def _merge_bins(n: list[int], ctx: list[int], cand: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs [a, b) of bins (sorted by context length; ``n`` requests, longest
    context, fullest slate each) of least total cost: one group per run.

    >>> _merge_bins([100, 3, 1], [16, 28, 33], [4, 6, 1])  # the two small bins join
    [(0, 1), (1, 3)]
    """
    m = len(n)
    best, cut = [0] + [float("inf")] * m, [0] * (m + 1)
    for b in range(1, m + 1):
        rows = L = C = 0
        for a in range(b - 1, -1, -1):  # the run a..b-1, grown leftwards
            rows, L, C = rows + n[a], max(L, ctx[a]), max(C, cand[a])
            cost = best[a] + _GROUP_OVERHEAD + rows * (L * L + C * (L + 1))
            if cost < best[b]:
                best[b], cut[b] = cost, a
    runs, b = [], m
    while b:
        runs.append((cut[b], b))
        b = cut[b]
    return runs[::-1]


@dataclass
class _Group:
    # [n, L + Cg] packed token of each slot: L context slots (padding: 0, masked as keys),
    # then Cg candidate slots (padding: 0, never read)
    slots: torch.Tensor
    ctx_valid: torch.Tensor  # [n, L] bool
    # the first slot's packed token when every slot holds a token and they follow the packed
    # order (slots = first, first + 1, ...: requests of one length side by side, or one request
    # alone, as in serving): the group then reads q, k and v as a view, without a gather
    first: int | None = None
    # key biases built by the first layer, reused by the others (keyed by their options)
    cache: dict = field(default_factory=dict)

    def key_bias(
        self, num_kv_heads: int, group: int, dtype: torch.dtype, causal: bool
    ) -> torch.Tensor:
        """``candidates_attend``'s additive key bias: 0 where a query slot may see a context
        key, -inf elsewhere. Without causality every slot sees the valid context keys: [n *
        Hkv, 1, L]. With it, context slot i sees valid keys j <= i (candidates all of them):
        one row per query row, [n * Hkv, G * (L + Cg), L], the G query heads of a kv head side
        by side."""
        key = ("bias", num_kv_heads, group, dtype, causal)
        if key not in self.cache:
            bias = context_bias(self.ctx_valid, num_kv_heads, dtype)
            if causal:
                n, S = self.slots.shape
                L = self.ctx_valid.shape[1]
                row = torch.arange(S, device=bias.device)[:, None]
                col = torch.arange(L, device=bias.device)[None]
                later = (col > row) & (row < L)  # [S, L]: a context slot's later keys
                bias = bias.view(n, num_kv_heads, 1, 1, L).masked_fill(later, float("-inf"))
                bias = bias.expand(n, num_kv_heads, group, S, L)
                bias = bias.reshape(n * num_kv_heads, group * S, L)
            self.cache[key] = bias
        return self.cache[key]


@dataclass
class VarlenPlan:
    """How ``varlen_isolated_attention`` groups a batch's requests; built once per forward
    (every layer reuses it) by ``plan_varlen``.

    >>> valid = torch.tensor([[True, False, True, True], [True, True, True, False]])
    >>> plan = plan_varlen(valid, num_candidates=1)  # contexts of 2 and 3 tokens
    >>> g = plan.groups[0]  # 16 context slots (the key floor), then 1 candidate slot
    >>> plan.num_tokens, len(plan.groups), g.slots.shape
    (6, 1, torch.Size([2, 17]))
    >>> g.slots[:, :4].tolist(), g.slots[:, -1].tolist()  # packed token ids; padding: 0
    ([[0, 1, 0, 0], [3, 4, 5, 0]], [2, 0])
    """

    groups: list[_Group]
    perm: torch.Tensor  # [N]: each packed token's row in the groups' concatenated outputs
    num_tokens: int
    # the concatenated outputs are the packed tokens in order (no padding row, perm = identity)
    in_order: bool = False


def plan_varlen(valid: torch.Tensor, num_candidates: int) -> VarlenPlan:
    """Group the requests of ``valid`` [B, T] (last ``num_candidates`` slots candidates) by
    context length; token ids follow ``valid.reshape(-1).nonzero()`` (the packed order).

    Planned on the host (``valid`` is copied there once per forward, and each group's index
    tensors copied back): on GPU one more sync beside the packed path's ``nonzero``."""
    B, T = valid.shape
    Tc = T - num_candidates
    if not 0 <= num_candidates <= T:
        raise ValueError(f"num_candidates must be in 0..{T}, got {num_candidates}")
    dev = valid.device
    if B == 0:
        return VarlenPlan([], torch.empty(0, dtype=torch.long, device=dev), 0)
    v = valid.cpu()
    ctx_len = v[:, :Tc].sum(1)
    cand_len = v[:, Tc:].sum(1)
    start = torch.cumsum(ctx_len + cand_len, 0) - (ctx_len + cand_len)  # first token per row
    N = int((ctx_len + cand_len).sum())
    # group key: the context length rounded up to a power of two (at least _MIN_GROUP_LEN)
    key = torch.clamp(ctx_len, min=_MIN_GROUP_LEN)
    key = torch.pow(2, torch.ceil(torch.log2(key.double()))).long()
    bins = torch.unique(key)
    in_bin = key[None] == bins[:, None]  # [bins, B]
    n_bin = in_bin.sum(1).tolist()
    ctx_bin = torch.where(in_bin, ctx_len[None], 0).amax(1).clamp(min=_MIN_KEYS).tolist()
    cand_bin = torch.where(in_bin, cand_len[None], 0).amax(1).tolist()
    groups, rows_out, perm = [], 0, torch.empty(N, dtype=torch.long)
    for a, b in _merge_bins(n_bin, ctx_bin, cand_bin):
        rows = torch.nonzero(in_bin[a:b].any(0)).squeeze(1)
        n = len(rows)
        cl, ca, st = ctx_len[rows], cand_len[rows], start[rows]
        L = max(_MIN_KEYS, int(cl.max()))  # key slots past the longest context: masked
        Cg = int(ca.max())
        slot = torch.arange(L)
        ctx_ok = slot[None] < cl[:, None]  # [n, L]
        ctx = torch.where(ctx_ok, st[:, None] + slot[None], 0)
        cslot = torch.arange(Cg)
        cand_ok = cslot[None] < ca[:, None]
        cand = torch.where(cand_ok, (st + cl)[:, None] + cslot[None], 0)
        # rows of this group's output: n * (L + Cg), request by request, slot by slot
        slots, ok = torch.cat([ctx, cand], 1), torch.cat([ctx_ok, cand_ok], 1)
        perm[slots[ok]] = rows_out + torch.nonzero(ok.reshape(-1)).squeeze(1)
        first = int(slots[0, 0])
        dense = bool(ok.all()) and torch.equal(
            slots.reshape(-1), torch.arange(first, first + slots.numel())
        )
        rows_out += n * (L + Cg)
        groups.append(_Group(slots.to(dev), ctx_ok.to(dev), first if dense else None))
    in_order = rows_out == N and torch.equal(perm, torch.arange(N))  # no padding row either
    return VarlenPlan(groups, perm.to(dev), N, in_order)


def varlen_isolated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: VarlenPlan,
    causal: bool,
    cap: float | None,
    scale: float | None = None,
) -> torch.Tensor:
    """``isolated_attention`` on packed tokens: q [N, Hq, hd], k/v [N, Hkv, hd] -> [N, Hq, hd].

    >>> valid = torch.tensor([[True, True, True], [True, False, True]])
    >>> q, k = torch.randn(5, 2, 4), torch.randn(5, 1, 4)
    >>> varlen_isolated_attention(q, k, k, plan_varlen(valid, 1), False, 30.0).shape
    torch.Size([5, 2, 4])
    """
    N = plan.num_tokens
    if q.shape[0] != N or k.shape[0] != N or v.shape[0] != N:
        raise ValueError(f"q, k, v must hold the plan's {N} tokens, got {q.shape[0]}, "
                         f"{k.shape[0]}, {v.shape[0]}")  # fmt: skip
    Hq, hd = q.shape[1], q.shape[2]
    if N == 0:  # an empty batch, or one of padding only
        return q.new_zeros(0, Hq, hd)

    def gather(t: torch.Tensor, g: _Group) -> torch.Tensor:  # [n, m] slots -> [n, H, m, hd]
        index = g.slots
        if g.first is None:
            # index_select: its backward is index_add_, where t[index]'s (index_put with
            # accumulate) sorts the indices first (every padding slot points at token 0)
            rows = t.index_select(0, index.reshape(-1))
        else:  # a view (the whole batch when the group is every token, in order)
            rows = t.narrow(0, g.first, index.numel())
        return rows.view(*index.shape, *t.shape[1:]).transpose(1, 2)

    pieces = []
    Hkv = k.shape[1]
    for g in plan.groups:
        n, S = g.slots.shape
        L = g.ctx_valid.shape[1]
        # one call: context queries attend to the context keys (with causality, the earlier
        # ones), candidate queries to all of them plus their own key (a context query's own
        # key is already among the context's)
        qa, ka, va = (gather(t, g) for t in (q, k, v))  # [n, H, L + Cg, hd]
        kx, vx = ka[:, :, :L], va[:, :, :L]
        bias = g.key_bias(Hkv, Hq // Hkv, q.dtype, causal)
        out = candidates_attend(qa, ka, va, kx, vx, g.ctx_valid, cap, scale, bias, own_from=L)
        pieces.append(out.transpose(1, 2).reshape(n * S, Hq, hd))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return out if plan.in_order else out.index_select(0, plan.perm)
