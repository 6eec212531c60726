"""The Grok-style transformer of Phoenix, with candidate isolation and a fast candidate path.

Layer (as Grok-1 / Phoenix): ``h = x + norm(attn(norm(x)))``, ``out = h + norm(ffn(norm(h)))``:
RMSNorm before and after each sub-layer, rotary positions, grouped-query attention, gated GELU
feed-forward, attention logits soft-capped at ``cap * tanh(x / cap)`` (cap = 30).

Sequence = [user (1) | history (S) | candidates (C)]. Candidate isolation
(``candidate_isolation_mask``): user + history attend to user + history; each candidate attends
to user + history and to itself, never to another candidate; all candidates share one position.
So the context never depends on the candidates, and a candidate's output depends only on the
context and itself. The attention kernel is pluggable:

* ``full_mask_attention``: every token against every token through the mask, O((S+C)^2);
* ``isolated_attention``: context against context, then each candidate against the context
  plus its own key, O(S^2 + C*S). Tests assert both agree (outputs and gradients).

``TransformerConfig.attention = "auto"`` (the default) picks per call: ``choose_kernel``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from hashrec.nn.attention import (
    AttentionKernel,
    AttentionLayout,
    full_mask_attention,
    isolated_attention,
)
from hashrec.nn.varlen import VarlenPlan, plan_varlen, varlen_isolated_attention

__all__ = [
    "GPU_FULL_MASK_LOGITS",
    "DecoderLayer",
    "RMSNorm",
    "Transformer",
    "TransformerConfig",
    "choose_kernel",
]


@dataclass
class TransformerConfig:
    """Transformer shape. ``head_dim`` 0 means ``dim // num_q_heads``.

    >>> TransformerConfig(dim=64, num_q_heads=4, num_kv_heads=2).head_dim
    16
    """

    dim: int = 128
    num_layers: int = 2
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 0
    widening_factor: float = 4.0  # Grok: ffn width = int(wf * dim) * 2 // 3, rounded up to 8
    attn_logit_cap: float | None = 30.0
    rope_base: float = 10_000.0
    causal: bool = False  # user + history attention; candidates are isolated either way
    norm_eps: float = 1e-5
    attention: Literal["auto", "isolated", "full"] = "auto"  # the kernel: ``choose_kernel``
    # Phoenix-exact options (``RankerConfig.phoenix_mini``); the defaults are hashrec's own.
    attn_scale: float | None = None  # q.k multiplier; None = 1/sqrt(head_dim) (Phoenix: 0.125)
    candidate_positions: Literal["shared", "slots"] = "shared"  # Phoenix: "slots"
    gelu: Literal["exact", "tanh"] = "exact"  # Phoenix (jax.nn.gelu): "tanh"
    final_norm: bool = True  # Phoenix's retrieval user tower has none

    def __post_init__(self) -> None:
        for name in ("dim", "num_layers", "num_q_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim < 0:
            raise ValueError(f"head_dim must be >= 0 (0: dim // num_q_heads), got {self.head_dim}")
        if self.head_dim == 0:
            if self.dim % self.num_q_heads:
                raise ValueError(
                    f"dim {self.dim} is not divisible by num_q_heads {self.num_q_heads}; "
                    "set head_dim explicitly"
                )
            self.head_dim = self.dim // self.num_q_heads
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads {self.num_q_heads} must be a multiple of num_kv_heads "
                f"{self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {self.head_dim}")
        if self.attention not in ("auto", "isolated", "full"):
            raise ValueError(
                f"attention must be 'auto', 'isolated' or 'full', got {self.attention!r}"
            )
        if self.attn_logit_cap is not None and self.attn_logit_cap <= 0:
            raise ValueError(f"attn_logit_cap must be > 0 or None, got {self.attn_logit_cap}")
        if self.attn_scale is not None and self.attn_scale <= 0:
            raise ValueError(f"attn_scale must be > 0 or None, got {self.attn_scale}")
        if self.candidate_positions not in ("shared", "slots"):
            raise ValueError(
                f"candidate_positions must be 'shared' or 'slots', got {self.candidate_positions!r}"
            )
        if self.gelu not in ("exact", "tanh"):
            raise ValueError(f"gelu must be 'exact' or 'tanh', got {self.gelu!r}")

    @property
    def scale(self) -> float:
        """Multiplier of q.k before the soft-cap: ``attn_scale`` or 1/sqrt(head_dim)."""
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def ffn_dim(self) -> int:
        width = int(self.widening_factor * self.dim) * 2 // 3
        return width + (-width) % 8


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in fp32.

    >>> y = RMSNorm(4)(torch.tensor([[3.0, 4.0, 0.0, 0.0]]))  # rms = 2.5
    >>> [round(v, 3) for v in y[0].tolist()]
    [1.2, 1.6, 0.0, 0.0]
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.scale).to(x.dtype)


def rotary_tables(
    positions: torch.Tensor, head_dim: int, base: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, head_dim/2]."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) = halves of the head dim; x [B, H, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class DecoderLayer(nn.Module):
    """One Grok-style block: pre/post-norm GQA attention, pre/post-norm gated-GELU feed-forward.

    >>> from hashrec.nn.attention import AttentionLayout, full_mask_attention
    >>> cfg = TransformerConfig(dim=16, num_layers=1, num_q_heads=2, num_kv_heads=1)
    >>> layer = DecoderLayer(cfg)
    >>> rope = rotary_tables(torch.arange(5), cfg.head_dim, cfg.rope_base)
    >>> layout = AttentionLayout(torch.ones(2, 5, dtype=torch.bool), 2, False, 30.0)
    >>> layer(torch.randn(2, 5, 16), rope, layout, full_mask_attention).shape  # [B, T, D]
    torch.Size([2, 5, 16])
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        D, hd = c.dim, c.head_dim
        self.pre_attn_norm, self.post_attn_norm = RMSNorm(D, c.norm_eps), RMSNorm(D, c.norm_eps)
        self.pre_ffn_norm, self.post_ffn_norm = RMSNorm(D, c.norm_eps), RMSNorm(D, c.norm_eps)
        self.q_proj = nn.Linear(D, c.num_q_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, c.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, c.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(c.num_q_heads * hd, D, bias=False)
        self.gate_proj = nn.Linear(D, c.ffn_dim, bias=False)
        self.up_proj = nn.Linear(D, c.ffn_dim, bias=False)
        self.down_proj = nn.Linear(c.ffn_dim, D, bias=False)
        self._gelu = "tanh" if c.gelu == "tanh" else "none"

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        layout: AttentionLayout,
        kernel: AttentionKernel,
    ) -> torch.Tensor:
        B, T, D = x.shape
        c = self.config
        h = self.pre_attn_norm(x)
        q = self.q_proj(h).view(B, T, c.num_q_heads, c.head_dim).transpose(1, 2)  # [B, Hq, T, hd]
        k = self.k_proj(h).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        a = kernel(q, k, v, layout).transpose(1, 2).reshape(B, T, -1)  # [B, T, Hq*hd]
        x = x + self.post_attn_norm(self.o_proj(a))
        return self._feed_forward(x)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre_ffn_norm(x)
        f = self.down_proj(F.gelu(self.gate_proj(h), approximate=self._gelu) * self.up_proj(h))
        return x + self.post_ffn_norm(f)

    def forward_packed(
        self,
        x: torch.Tensor,
        index: torch.Tensor,
        shape: tuple[int, int],
        rope: tuple[torch.Tensor, torch.Tensor],
        layout: AttentionLayout,
        kernel: AttentionKernel,
        plan: VarlenPlan | None = None,
    ) -> torch.Tensor:
        """``forward`` on the valid tokens only: x [N, D] are the tokens at flat positions
        ``index`` [N] of a [B, T] batch (``shape``), rope the cos, sin [N, hd/2] of their
        positions. Everything but attention works token by token, so it runs on the N tokens.
        With a ``plan``, attention is ``varlen_isolated_attention`` on the packed tokens;
        without, q, k, v are scattered into [B, H, T, hd] for ``kernel`` (padding masked)."""
        B, T = shape
        N = x.shape[0]
        c = self.config
        cos, sin = rope[0][:, None], rope[1][:, None]  # [N, 1, hd/2]: broadcast over heads
        h = self.pre_attn_norm(x)
        q = apply_rotary(self.q_proj(h).view(N, c.num_q_heads, c.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(h).view(N, c.num_kv_heads, c.head_dim), cos, sin)
        v = self.v_proj(h).view(N, c.num_kv_heads, c.head_dim)
        width = c.num_q_heads * c.head_dim  # explicit: N may be 0 (a batch of padding)
        if plan is not None:
            a = varlen_isolated_attention(q, k, v, plan, layout.causal, layout.cap, layout.scale)
        else:
            a = kernel(_padded(q, index, B, T), _padded(k, index, B, T), _padded(v, index, B, T),
                       layout)  # [B, Hq, T, hd]  # fmt: skip
            a = a.transpose(1, 2).reshape(B * T, width).index_select(0, index)
        x = x + self.post_attn_norm(self.o_proj(a.reshape(N, width)))
        return self._feed_forward(x)


def _padded(t: torch.Tensor, index: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Packed [N, H, hd] at flat positions ``index`` -> [B, H, T, hd], zeros elsewhere."""
    full = t.new_zeros(B * T, *t.shape[1:]).index_copy(0, index, t)
    return full.view(B, T, *t.shape[1:]).transpose(1, 2)


KERNELS: dict[str, AttentionKernel] = {"isolated": isolated_attention, "full": full_mask_attention}

# On a GPU the isolated kernel's extra, smaller launches cost more than the full mask's O(T^2)
# work until the logits are large (H200: whole training steps of the demo config 1.11-1.30x
# faster with the full mask at S = 32 / 128, B = 128 / 512; one request of S = 128, C = 1,000
# p50 3.1 against 3.8 ms; forward at B = 8, C = 1,024, S = 128 (43M logits) 1.7x; at B = 64
# (340M) the isolated kernel 1.8x faster). On a CPU the isolated kernel: README, "Performance".
GPU_FULL_MASK_LOGITS = 1 << 27  # B * H * T^2: 512 MiB of fp32 logits per layer


def choose_kernel(
    attention: str, device: torch.device, batch: int, heads: int, tokens: int
) -> AttentionKernel:
    """The kernel for ``TransformerConfig.attention``: "isolated" and "full" name theirs;
    "auto" is the isolated kernel on a CPU and, on other devices, the full mask while
    ``batch * heads * tokens**2 <= GPU_FULL_MASK_LOGITS``. Both give the same outputs.

    >>> choose_kernel("auto", torch.device("cpu"), 128, 4, 49) is isolated_attention
    True
    >>> choose_kernel("auto", torch.device("cuda"), 128, 4, 49) is full_mask_attention
    True
    """
    if attention != "auto":
        if attention not in KERNELS:
            raise ValueError(f"attention must be 'auto', 'isolated' or 'full', got {attention!r}")
        return KERNELS[attention]
    logits = batch * heads * tokens * tokens
    if device.type != "cpu" and logits <= GPU_FULL_MASK_LOGITS:
        return full_mask_attention
    return isolated_attention


class Transformer(nn.Module):
    """Stack of ``DecoderLayer`` with a final RMSNorm; candidates share one rotary position.

    ``candidate_positions="slots"`` gives candidate i position Tc + i instead (Phoenix), and
    ``final_norm=False`` drops the final norm (Phoenix's retrieval user tower).

    >>> tf = Transformer(TransformerConfig(dim=16, num_layers=1, num_q_heads=2, num_kv_heads=1))
    >>> tf(torch.randn(2, 7, 16), torch.ones(2, 7, dtype=torch.bool), num_candidates=3).shape
    torch.Size([2, 7, 16])
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.dim, config.norm_eps) if config.final_norm else None
        # Run the token-wise work (projections, feed-forward, norms) on the valid tokens only.
        # Recommendation batches are mostly padding (KuaiRand at the demo config: 86% of the
        # history slots, 70% of the candidate slots), so this does a fraction of the work; the
        # padded path (False) is the reference the tests compare with. Valid positions agree;
        # padding positions come out as zeros instead of values nobody reads.
        self.pack_tokens = True

    def positions(self, T: int, num_candidates: int, device: torch.device) -> torch.Tensor:
        """Context tokens at 0..Tc-1; every candidate at Tc: no candidate depends on its slot.

        With ``candidate_positions="slots"`` (Phoenix) every token sits at its index 0..T-1.
        """
        Tc = T - num_candidates
        pos = torch.arange(T, device=device)
        if self.config.candidate_positions == "slots":
            return pos
        return pos.clamp(max=Tc)

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        num_candidates: int,
        kernel: AttentionKernel | None = None,
        input_dropout: nn.Module | None = None,
    ) -> torch.Tensor:
        """x [B, T, D], valid [B, T] bool -> hidden states [B, T, D] after the final norm.

        ``input_dropout`` (the ranker's) applies to the input tokens: on the packed path to the
        valid ones only (padding is most of a batch, and nothing reads it)."""
        drop = input_dropout if input_dropout is not None else nn.Identity()
        B, T, D = x.shape
        if valid.shape != (B, T):
            raise ValueError(f"valid has shape {list(valid.shape)}, expected {[B, T]}")
        if D != self.config.dim:
            raise ValueError(f"x has width {D}, config expects {self.config.dim}")
        if kernel is None:
            kernel = choose_kernel(self.config.attention, x.device, B, self.config.num_q_heads, T)
        layout = AttentionLayout(
            valid,
            num_candidates,
            self.config.causal,
            self.config.attn_logit_cap,
            self.config.attn_scale,
        )
        rope = rotary_tables(
            self.positions(T, num_candidates, x.device), self.config.head_dim, self.config.rope_base
        )
        index = valid.reshape(-1).nonzero().squeeze(1) if self.pack_tokens else None
        if index is not None and len(index) < B * T:  # [N] flat positions of valid tokens
            slot = index % T
            rope_p = rope[0].index_select(0, slot), rope[1].index_select(0, slot)
            xp = drop(x.reshape(B * T, D).index_select(0, index))
            # the isolated kernel runs on the packed tokens, requests grouped by length
            plan = plan_varlen(valid, num_candidates) if kernel is isolated_attention else None
            for layer in self.layers:
                xp = layer.forward_packed(xp, index, (B, T), rope_p, layout, kernel, plan)
            if self.final_norm is not None:
                xp = self.final_norm(xp)
            return xp.new_zeros(B * T, D).index_copy(0, index, xp).view(B, T, D)
        x = drop(x)
        for layer in self.layers:
            x = layer(x, rope, layout, kernel)
        return x if self.final_norm is None else self.final_norm(x)
