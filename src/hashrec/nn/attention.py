"""Candidate isolation: the mask and the attention kernels that apply it.

``candidate_isolation_mask`` says who may attend to whom. Two kernels compute the same
attention: ``full_mask_attention`` (every token against every token through the mask, the
obviously correct reference) and ``isolated_attention`` (context once, then each candidate
against the context plus its own key; the fast default). Tests assert they agree, outputs and
gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AttentionKernel",
    "AttentionLayout",
    "candidate_isolation_mask",
    "candidates_attend",
    "context_bias",
    "full_mask_attention",
    "isolated_attention",
    "masked_attention",
]


def candidate_isolation_mask(
    valid: torch.Tensor, num_candidates: int, causal: bool = False
) -> torch.Tensor:
    """Who may attend to whom: bool [B, T, T], True = query (row) may attend to key (column).

    ``valid`` [B, T] marks real tokens; the last ``num_candidates`` tokens are candidates.

    * context (user + history) -> valid context keys (and only earlier ones if ``causal``);
    * candidate -> valid context keys and itself; never another candidate;
    * padding keys are never attended to; every query may attend to itself, so a padding query
      (whose output nobody reads) still has a non-empty row.

    >>> m = candidate_isolation_mask(torch.tensor([[True, True, True, True]]), num_candidates=2)
    >>> m.int()[0].tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    """
    B, T = valid.shape
    if not 0 <= num_candidates <= T:
        raise ValueError(f"num_candidates must be in 0..{T}, got {num_candidates}")
    idx = torch.arange(T, device=valid.device)
    q, k = idx[:, None], idx[None, :]
    ctx_len = T - num_candidates
    ctx_k = k < ctx_len
    ctx_rule = (q < ctx_len) & ctx_k
    if causal:
        ctx_rule = ctx_rule & (k <= q)
    cand_rule = (q >= ctx_len) & (ctx_k | (k == q))
    allowed = (ctx_rule | cand_rule)[None] & valid[:, None, :]
    return allowed | torch.eye(T, dtype=torch.bool, device=valid.device)[None]


@dataclass
class AttentionLayout:
    """What a kernel needs beyond q, k, v: candidate count, key validity, causality, soft-cap,
    and the q.k multiplier (None = 1/sqrt(head_dim)).

    >>> layout = AttentionLayout(torch.ones(1, 5, dtype=torch.bool), num_candidates=2,
    ...                          causal=False, cap=30.0)
    >>> layout.context_len  # user + history tokens
    3
    """

    valid: torch.Tensor  # [B, T] bool
    num_candidates: int
    causal: bool
    cap: float | None
    scale: float | None = None

    @property
    def context_len(self) -> int:
        return self.valid.shape[1] - self.num_candidates


AttentionKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionLayout], torch.Tensor
]


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, hd] -> [B, Hkv, G, T, hd]: query heads grouped under their key/value head."""
    B, Hq, T, hd = q.shape
    return q.view(B, num_kv_heads, Hq // num_kv_heads, T, hd)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    cap: float | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention, GQA, soft-cap: q [B,Hq,Tq,hd], k/v [B,Hkv,Tk,hd], mask [B,Tq,Tk].

    ``scale`` multiplies q.k before the soft-cap (None = 1/sqrt(hd))."""
    B, Hq, Tq, hd = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    if cap is None:  # no soft-cap: PyTorch's fused kernel
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], enable_gqa=Hq != Hkv, scale=scale
        )
    qg = _grouped(q, Hkv) * (scale / cap)  # scale folded into the small tensor
    t = torch.tanh(qg @ k[:, :, None].transpose(-1, -2))  # [B, Hkv, G, Tq, Tk]
    logits = (t * cap).masked_fill_(~mask[:, None, None], float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v[:, :, None]  # [B, Hkv, G, Tq, hd]
    return out.view(B, Hq, Tq, hd)


def full_mask_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout
) -> torch.Tensor:
    """Reference kernel: all T tokens against all T through ``candidate_isolation_mask``."""
    mask = candidate_isolation_mask(layout.valid, layout.num_candidates, layout.causal)
    return masked_attention(q, k, v, mask, layout.cap, layout.scale)


def isolated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout
) -> torch.Tensor:
    """Fast kernel: the context attends within itself; candidates see the context plus themselves.

    Same result as ``full_mask_attention`` at O(Tc^2 + C*Tc) instead of O((Tc+C)^2).
    """
    Tc, C = layout.context_len, layout.num_candidates
    ctx_valid = layout.valid[:, :Tc]
    ctx_mask = candidate_isolation_mask(ctx_valid, 0, layout.causal)
    out_ctx = masked_attention(
        q[:, :, :Tc], k[:, :, :Tc], v[:, :, :Tc], ctx_mask, layout.cap, layout.scale
    )
    if C == 0:
        return out_ctx
    out_c = candidates_attend(
        q[:, :, Tc:], k[:, :, Tc:], v[:, :, Tc:], k[:, :, :Tc], v[:, :, :Tc], ctx_valid,
        layout.cap, layout.scale,
    )  # fmt: skip
    return torch.cat([out_ctx, out_c], dim=2)


def candidates_attend(
    qc: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    kx: torch.Tensor,
    vx: torch.Tensor,
    ctx_valid: torch.Tensor,
    cap: float | None,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    own_from: int = 0,
) -> torch.Tensor:
    """Each candidate against the context keys plus its own key: qc [B, Hq, C, hd], kc/vc
    [B, Hkv, C, hd] (the candidates' own), kx/vx [B, Hkv, Tc, hd] (the context's), ctx_valid
    [B, Tc] -> [B, Hq, C, hd]. ``bias``: ``context_bias(ctx_valid, Hkv, dtype)`` [B*Hkv, 1, Tc]
    when the caller reuses it across layers, or an additive bias per query row [B*Hkv, G*C, Tc]
    (the G query heads of a kv head side by side; 0 where the row may see a key, -inf where
    not), e.g. to make context query rows causal.

    Query slots before ``own_from`` attend to the context keys only (their own key gets no
    weight, kc/vc there are ignored): with the context's own tokens there, one call is the
    non-causal context attention and the candidates' together (``varlen_isolated_attention``).
    """
    B, Hq, C, hd = qc.shape
    Hkv, Tc = kx.shape[1], kx.shape[2]
    G = Hq // Hkv
    if not 0 <= own_from <= C:
        raise ValueError(f"own_from must be in 0..{C}, got {own_from}")
    if C == 0:  # no query slot
        return qc.new_zeros(B, Hq, 0, hd)
    if Tc == 0:  # no context: each candidate attends to its own key alone
        out = vc[:, :, None].expand(B, Hkv, G, C, hd).reshape(B, Hq, C, hd)
        if own_from:  # no own key either: nothing to attend to
            out = out.index_fill(2, torch.arange(own_from, device=out.device), 0.0)
        return out
    # Query rows of one kv head side by side: [B*Hkv, G*C, hd]; scales folded into q (small).
    s = 1.0 / math.sqrt(hd) if scale is None else scale
    q_scale = s if cap is None else 2.0 * s / cap
    q = (_grouped(qc, Hkv) * q_scale).reshape(B * Hkv, G * C, hd)
    kx, vx = kx.reshape(B * Hkv, Tc, hd), vx.reshape(B * Hkv, Tc, hd)
    kc, vc = kc.reshape(B * Hkv, C, hd), vc.reshape(B * Hkv, C, hd)  # shared by the G heads
    if bias is None:
        bias = context_bias(ctx_valid, Hkv, q.dtype)
    out = _CandidateAttention.apply(q, kx, vx, kc, vc, bias, cap, own_from)  # [B*Hkv, G*C, hd]
    return out.view(B, Hq, C, hd)


def context_bias(ctx_valid: torch.Tensor, num_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive key bias of ``candidates_attend``: [B * Hkv, 1, Tc], 0 at valid context
    keys and -inf at padding.

    >>> context_bias(torch.tensor([[True, False]]), 1, torch.float32).tolist()
    [[[0.0, -inf]]]
    """
    B, Tc = ctx_valid.shape
    bias = torch.zeros(B, num_kv_heads, 1, Tc, dtype=dtype, device=ctx_valid.device)
    bias.masked_fill_(~ctx_valid[:, None, None, :], float("-inf"))
    return bias.view(B * num_kv_heads, 1, Tc)


_CHUNK_ELEMENTS = 1 << 19  # logits per chunk of (batch, kv-head) slices: ~2 MB of fp32
# On a GPU, chunks buy no cache and cost kernel launches (16 chunks of ~15 launches made the
# kernel 4x slower than the full mask at C = 1024 on an H200): one chunk up to ~1 GB of fp32.
_GPU_CHUNK_ELEMENTS = 1 << 28


def _chunk_step(device: torch.device, n: int, per_slice: int) -> int:
    """(batch, kv-head) slices per chunk: cache-sized chunks on the CPU, few on a GPU."""
    budget = _CHUNK_ELEMENTS if device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    return min(max(1, n), max(1, budget // max(1, per_slice)))


class _CandidateAttention(torch.autograd.Function):
    """Each query row attends to the shared context keys plus its own key; hand-written backward.

    Shapes (N = B*Hkv, M = G*C query rows, the G query heads of a kv head side by side): q [N,
    M, hd]; kc, vc [N, C, hd] (the own keys and values, shared by the G heads); kx, vx [N, Tc,
    hd]; bias [N, 1, Tc] or per row [N, M, Tc] (0, or -inf where hidden); slots before
    ``own_from`` have no own key. q
    arrives scaled by 1/sqrt(hd), or by 2/(sqrt(hd)*cap) with a soft-cap, because
    ``cap*tanh(z/cap) = 2cap*sigmoid(2z/cap) - cap`` and the ``-cap`` cancels in the softmax:
    sigmoid is ~4x cheaper than tanh on CPU.

    The own key joins the context softmax through the context's log-sum-exp, recovered from the
    fused softmax as ``max(l) - log(max(softmax(l)))``: the own key gets ``p_self =
    sigmoid(l_self - lse_ctx)`` and the context ``(1 - p_self) * softmax(l)``, with nothing
    concatenated. Forward walks over chunks of (batch, kv-head) slices whose [n, M, Tc] logits stay
    in cache (on the CPU; one chunk on a GPU, see ``_chunk_step``) and keeps the softmax and the
    sigmoid derivative s(1 - s) for backward (on CPU, exp/sigmoid cost more than reading them
    back). The composed-autograd reference is ``full_mask_attention``; tests hold the two
    together on outputs and gradients.
    """

    @staticmethod
    def forward(ctx, q, kx, vx, kc, vc, bias, cap, own_from):  # type: ignore[override]
        N, M, hd = q.shape
        Tc, C = kx.shape[1], kc.shape[1]
        G = M // C
        out = torch.empty_like(q)
        keep = any(ctx.needs_input_grad[:5])  # store for backward only when there is one
        # with a cap, backward needs d sigmoid = s * (1 - s), s = sigmoid(2z/cap): kept per element
        capped = cap is not None
        dsig = torch.empty(N, M, Tc, dtype=q.dtype, device=q.device) if keep and capped else None
        p_self = torch.empty(N, M, 1, dtype=q.dtype, device=q.device)
        no_ctx = bias.amax(-1, keepdim=True) == float("-inf")  # [N, 1, 1]: only the own key
        # the check is a host sync: on a GPU, masking unconditionally is cheaper than waiting
        any_no_ctx = q.device.type != "cpu" or bool(no_ctx.any())
        step = _chunk_step(q.device, N, M * Tc)
        chunks = [slice(a, min(N, a + step)) for a in range(0, N, step)]
        # the softmax kept for backward: one chunk's own tensor, or chunks copied into one
        probs = None
        if keep and len(chunks) > 1:
            probs = torch.empty(N, M, Tc, dtype=q.dtype, device=q.device)
        for n in chunks:
            part = (lambda t: t) if len(chunks) == 1 else (lambda t, n=n: t[n])  # one: no slicing
            qn, kcn = part(q), part(kc)
            zs = (qn.reshape(-1, G, C, hd) * kcn[:, None]).sum(-1, keepdim=True).view(-1, M, 1)
            if cap is None:
                logits = torch.baddbmm(part(bias), qn, part(kx).transpose(1, 2))
                logit_self = zs
            else:
                z = torch.bmm(qn, part(kx).transpose(1, 2), out=part(dsig) if keep else None)
                s = z.sigmoid_()
                logits = torch.add(part(bias), s, alpha=2.0 * cap)
                logit_self = torch.sigmoid(zs) * (2.0 * cap)
                if keep:
                    s.addcmul_(s, s, value=-1.0)  # s - s^2, in place while the chunk is in cache
            p = torch.softmax(logits, dim=-1)
            lse_ctx = logits.amax(-1, keepdim=True) - p.amax(-1, keepdim=True).log()
            attended = torch.bmm(p, part(vx))  # [n, M, hd]
            if any_no_ctx:
                empty = part(no_ctx)
                p.masked_fill_(empty, 0.0)
                lse_ctx.masked_fill_(empty, float("-inf"))
                attended.masked_fill_(empty, 0.0)
            ps = torch.sigmoid(logit_self - lse_ctx, out=part(p_self))
            if own_from:  # slots without an own key: the context's softmax alone
                ps.view(-1, G, C)[:, :, :own_from].zero_()
            torch.lerp(attended.view(-1, G, C, hd), part(vc)[:, None], ps.view(-1, G, C, 1),
                       out=part(out).view(-1, G, C, hd))  # fmt: skip
            if keep:
                if len(chunks) == 1:
                    probs = p
                else:
                    probs[n] = p
        ctx.save_for_backward(q, kx, vx, kc, vc, out, probs, dsig, p_self)
        ctx.cap, ctx.step = cap, step
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, kx, vx, kc, vc, out, probs, dsig, p_self = ctx.saved_tensors
        cap, step = ctx.cap, ctx.step
        N, M, hd = q.shape
        C = kc.shape[1]
        G = M // C
        dout = dout.contiguous()
        # softmax backward: r_i = sum_j P_ij dP_ij = dout_i . out_i (flash attention's D)
        r = (dout * out).sum(-1, keepdim=True)
        w = 1.0 - p_self  # the context's share; folded into the small [N, M, hd] tensors
        dout_ctx = dout * w
        dvc = (p_self * dout).view(N, G, C, hd).sum(1)  # the G heads' shares of each own value
        own_dot = (dout.view(N, G, C, hd) * vc[:, None]).sum(-1, keepdim=True).view(N, M, 1)
        dz_self = p_self * (own_dot - r)  # d l_self
        alpha = 1.0
        if cap is not None:  # d(2cap*sigmoid(z'))/dz' = 2cap * s * (1 - s)
            zs = (q.reshape(N, G, C, hd) * kc[:, None]).sum(-1, keepdim=True).view(N, M, 1)
            ss = torch.sigmoid(zs)
            dz_self = dz_self * ss * (1.0 - ss) * (2.0 * cap)
            alpha = 2.0 * cap
        # the own keys' term of dq, each kv head's own key broadcast over its G query heads
        dq_self = (dz_self.view(N, G, C, 1) * kc[:, None]).view(N, M, hd)
        dq, dkx, dvx = torch.empty_like(q), torch.empty_like(kx), torch.empty_like(vx)
        for a in range(0, N, step):
            n = slice(a, min(N, a + step))
            p = probs[n]
            torch.bmm(p.transpose(1, 2), dout_ctx[n], out=dvx[n])
            dz = torch.bmm(dout_ctx[n], vx[n].transpose(1, 2))  # (1 - p_self) * dP
            dz.sub_(r[n] * w[n]).mul_(p)  # d logits (context)
            if cap is not None:
                dz.mul_(dsig[n])  # * s * (1 - s)
            torch.baddbmm(dq_self[n], dz, kx[n], alpha=alpha, out=dq[n])
            torch.bmm(dz.transpose(1, 2), q[n], out=dkx[n])
        if cap is not None:
            dkx.mul_(alpha)
        dkc = (dz_self * q).reshape(N, G, C, hd).sum(1)
        return dq, dkx, dvx, dkc, dvc, None, None, None
