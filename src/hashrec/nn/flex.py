"""Candidate isolation through PyTorch's FlexAttention: the anchor a PyTorch user reaches for.

``flex_attention_kernel`` expresses the same attention as ``full_mask_attention``: the
candidate-isolation rule as a ``mask_mod`` (compiled into a sparse ``BlockMask``, so blocks with
no allowed pair are skipped) and the soft-cap as a ``score_mod``. It is an ``AttentionKernel``
like the others, so ``Transformer(..., kernel=flex_attention_kernel)`` runs it; the benchmark
compares it with hashrec's hand-written ``isolated_attention``. It needs torch >= 2.5 and runs
compiled (``torch.compile``, which on CPU needs a C++ compiler); the first call pays the compile.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from hashrec.nn.attention import AttentionLayout

__all__ = ["flex_attention_kernel"]


@lru_cache(maxsize=2)
def _flex(compiled: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return (torch.compile(flex_attention, dynamic=False) if compiled else flex_attention), (
        create_block_mask
    )


def flex_attention_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: AttentionLayout,
    compiled: bool = True,
) -> torch.Tensor:
    """q [B, Hq, T, hd], k/v [B, Hkv, T, hd] -> [B, Hq, T, hd] under candidate isolation.

    ``compiled=False`` runs FlexAttention's eager reference (slow; for tests). On CPU, torch
    2.13's FlexAttention has no backward: training needs another kernel there.
    """
    flex, create_block_mask = _flex(compiled)
    B, Hq, T, hd = q.shape
    ctx_len, causal, cap = layout.context_len, layout.causal, layout.cap
    valid = layout.valid

    def mask_mod(b, h, q_idx, kv_idx):
        ctx_k = kv_idx < ctx_len
        ctx_rule = (q_idx < ctx_len) & ctx_k
        if causal:
            ctx_rule = ctx_rule & (kv_idx <= q_idx)
        cand_rule = (q_idx >= ctx_len) & (ctx_k | (kv_idx == q_idx))
        return ((ctx_rule | cand_rule) & valid[b, kv_idx]) | (q_idx == kv_idx)

    block_mask = create_block_mask(mask_mod, B, None, T, T, device=q.device)
    score_mod = None
    if cap is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

    return flex(
        q, k, v, score_mod=score_mod, block_mask=block_mask,
        scale=1.0 / math.sqrt(hd) if layout.scale is None else layout.scale,
        enable_gqa=Hq != k.shape[1],
    )  # fmt: skip
