from dataclasses import replace

import pytest
import torch

from hashrec.nn import transformer as tf_module
from hashrec.nn.attention import (
    AttentionLayout,
    candidate_isolation_mask,
    candidates_attend,
    full_mask_attention,
    isolated_attention,
    masked_attention,
)
from hashrec.nn.transformer import Transformer, TransformerConfig, choose_kernel
from hashrec.nn.varlen import plan_varlen, varlen_isolated_attention


def _table(text: str) -> list[list[int]]:
    """Rows of 'x' (may attend) and '.' (may not), one row per query token."""
    return [
        [1 if ch == "x" else 0 for ch in line.split("|")[1].strip().replace(" ", "")]
        for line in text.strip().splitlines()
    ]


def _mask(valid, C, causal=False):
    return candidate_isolation_mask(torch.tensor([valid]), C, causal).int()[0].tolist()


def test_mask_user_history_candidates():
    # tokens: u h1 h2 c1 c2 c3
    expected = _table("""
        u  | x x x . . .
        h1 | x x x . . .
        h2 | x x x . . .
        c1 | x x x x . .
        c2 | x x x . x .
        c3 | x x x . . x
    """)
    assert _mask([1, 1, 1, 1, 1, 1], 3) == expected


def test_mask_causal_history():
    expected = _table("""
        u  | x . . . .
        h1 | x x . . .
        h2 | x x x . .
        c1 | x x x x .
        c2 | x x x . x
    """)
    assert _mask([1, 1, 1, 1, 1], 2, causal=True) == expected


def test_mask_padding_is_never_attended():
    # h2 and c2 are padding: nobody attends to them; they attend to themselves only as a row filler
    expected = _table("""
        u  | x x . . . .
        h1 | x x . . . .
        h2 | x x x . . .
        c1 | x x . x . .
        c2 | x x . . x .
        c3 | x x . . . x
    """)
    assert _mask([1, 1, 0, 1, 0, 1], 3) == expected


def test_mask_one_candidate_no_history_all_padding():
    assert _mask([1, 1], 1) == _table("""
        u  | x .
        c1 | x x
    """)
    assert _mask([0, 0, 0], 2) == _table("""
        u  | x . .
        c1 | . x .
        c2 | . . x
    """)
    assert _mask([1, 1, 1], 0) == _table("""
        u  | x x x
        h1 | x x x
        h2 | x x x
    """)
    with pytest.raises(ValueError, match="num_candidates must be in 0..3"):
        candidate_isolation_mask(torch.ones(1, 3, dtype=torch.bool), 4)


PHOENIX_OPTIONS = dict(attn_scale=0.125, candidate_positions="slots", gelu="tanh")


@pytest.mark.parametrize("cap", [30.0, None])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("S", "C"), [(6, 5), (0, 3), (4, 1)])
@pytest.mark.parametrize("options", [{}, PHOENIX_OPTIONS], ids=["hashrec", "phoenix"])
def test_fast_path_matches_full_mask_outputs_and_gradients(cap, causal, S, C, options):
    torch.manual_seed(0)
    cfg = TransformerConfig(
        dim=32,
        num_layers=2,
        num_q_heads=4,
        num_kv_heads=2,
        attn_logit_cap=cap,
        causal=causal,
        **options,
    )
    tf = Transformer(cfg)
    T = 1 + S + C
    x = torch.randn(3, T, 32)
    valid = torch.rand(3, T) > 0.25
    valid[:, 0] = True
    valid[2] = False  # a request that is all padding
    outs, grads = [], []
    for kernel in (full_mask_attention, isolated_attention):
        xi = x.clone().requires_grad_(True)
        tf.zero_grad()
        out = tf(xi, valid, C, kernel)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad.clone() for p in tf.parameters()])
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    # Gradients: 1e-5 of each gradient's scale. This sum-loss gives gradients up to ~30, where
    # fp32 itself is only good to ~5e-5 (the full-mask path against float64 truth), so an
    # absolute 1e-5 would test rounding, not agreement.
    for a, b in zip(grads[0], grads[1], strict=True):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("cap", [30.0, None])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("C", [3, 0])
@pytest.mark.parametrize("groups", [3, 2, 1])
@pytest.mark.parametrize("chunk", [None, 64])
def test_varlen_kernel_matches_the_padded_kernel_across_groups(
    cap, causal, C, groups, chunk, monkeypatch
):
    """Packed tokens, requests grouped by context length (here 0 to 40 tokens: every group),
    against ``isolated_attention`` on the padded [B, T] layout: outputs and q, k, v gradients.
    Row 0 has candidates but no context; C = 0 is the two-tower's user tower. The group
    overhead of the planner's cost model decides how many groups the bins merge into."""
    overhead = {3: 0, 2: 2_000, 1: 10**6}[groups]
    monkeypatch.setattr("hashrec.nn.varlen._GROUP_OVERHEAD", overhead)
    if chunk is not None:  # many chunks of (batch, kv-head) slices in the candidate kernel
        monkeypatch.setattr("hashrec.nn.attention._CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    B, Tc = 9, 41
    valid = torch.zeros(B, Tc + C, dtype=torch.bool)
    for b, n in enumerate([0, 1, 3, 5, 9, 17, 33, 40, 2]):
        valid[b, Tc - n : Tc] = True  # right-aligned context, as collated histories
        valid[b, Tc : Tc + (b + 1) % (C + 1)] = True  # 0..C candidates
    plan = plan_varlen(valid, C)
    # bins of contexts of <= 16, 32, 64 tokens: apart, the last two merged, all merged
    assert len(plan.groups) == groups
    q, k, v = _assert_varlen_matches_padded(valid, C, causal, cap, plan)
    with pytest.raises(ValueError, match="the plan's"):
        varlen_isolated_attention(q[:-1], k, v, plan, causal, cap)


def _assert_varlen_matches_padded(valid, C, causal, cap, plan, Hq=4, Hkv=2, hd=8):
    """``varlen_isolated_attention`` on random packed q, k, v against ``isolated_attention``
    on the padded layout: outputs and q, k, v gradients. Returns the leaves."""
    B, T = valid.shape
    index = valid.reshape(-1).nonzero().squeeze(1)
    N = len(index)
    q, k, v = (torch.randn(N, h, hd, requires_grad=True) for h in (Hq, Hkv, Hkv))
    out = varlen_isolated_attention(q, k, v, plan, causal, cap)

    def padded(t):
        full = t.new_zeros(B * T, *t.shape[1:]).index_copy(0, index, t)
        return full.view(B, T, *t.shape[1:]).transpose(1, 2)

    layout = AttentionLayout(valid, C, causal, cap)
    ref = isolated_attention(padded(q), padded(k), padded(v), layout)
    ref = ref.transpose(1, 2).reshape(B * T, Hq, hd).index_select(0, index)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    grads = [torch.autograd.grad((o * w).sum(), (q, k, v)) for o in (out, ref)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    return q, k, v


@pytest.mark.parametrize("cap", [30.0, None])
@pytest.mark.parametrize("causal", [False, True])
def test_groups_without_padding_slots_read_the_tokens_in_place(cap, causal, monkeypatch):
    """A group whose slots are consecutive packed tokens (requests of one context length and
    slate side by side, or one request alone, as in serving) reads q, k, v as a view and, when
    the groups' outputs are already in packed order, skips the final reordering: the same
    outputs and gradients as the padded kernel."""
    torch.manual_seed(0)
    Tc, C = 24, 3
    same = torch.zeros(4, Tc + C, dtype=torch.bool)
    same[:, 2:] = True  # every request: 22 context tokens, 3 candidates
    plan = plan_varlen(same, C)
    assert [g.first for g in plan.groups] == [0] and plan.in_order
    _assert_varlen_matches_padded(same, C, causal, cap, plan)
    alone = plan_varlen(same[:1], C)
    assert [g.first for g in alone.groups] == [0] and alone.in_order
    _assert_varlen_matches_padded(same[:1], C, causal, cap, alone)
    # a short, padded request first (its own group), then the dense ones: a view at an offset
    monkeypatch.setattr("hashrec.nn.varlen._GROUP_OVERHEAD", 0)  # two groups, not merged
    mixed = torch.cat([torch.zeros(1, Tc + C, dtype=torch.bool), same])
    mixed[0, Tc - 3 :] = True  # 3 context tokens, 3 candidates
    plan = plan_varlen(mixed, C)
    assert [g.first for g in plan.groups] == [None, 6] and not plan.in_order
    _assert_varlen_matches_padded(mixed, C, causal, cap, plan)


@pytest.mark.parametrize("cap", [30.0, None])
@pytest.mark.parametrize("chunk", [None, 16])
def test_query_rows_without_an_own_key_are_the_context_attention(cap, chunk, monkeypatch):
    """``candidates_attend(own_from=L)`` with the context's own tokens as the first L query
    slots: those rows equal the non-causal context attention (``masked_attention``), the rest
    candidates against the context plus their own key, outputs and gradients (padding query
    rows, which nobody reads, aside). ``chunk``: logits per chunk small enough that every
    (batch, kv-head) slice is a chunk of its own."""
    if chunk is not None:
        monkeypatch.setattr("hashrec.nn.attention._CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    B, L, C, Hq, Hkv, hd = 3, 5, 2, 4, 2, 8
    ctx_valid = torch.rand(B, L) < 0.7
    ctx_valid[:, 0] = True
    qx, qc = torch.randn(B, Hq, L, hd), torch.randn(B, Hq, C, hd)
    kx, kc, vx, vc = (torch.randn(B, Hkv, n, hd) for n in (L, C, L, C))
    leaves = [t.requires_grad_() for t in (qx, qc, kx, kc, vx, vc)]
    cat = lambda a, b: torch.cat([a, b], 2)  # noqa: E731
    out = candidates_attend(cat(qx, qc), cat(kx, kc), cat(vx, vc), kx, vx, ctx_valid, cap,
                            own_from=L)  # fmt: skip
    mask = candidate_isolation_mask(ctx_valid, 0)
    ref = cat(masked_attention(qx, kx, vx, mask, cap),
              candidates_attend(qc, kc, vc, kx, vx, ctx_valid, cap))  # fmt: skip
    read = torch.cat([ctx_valid, torch.ones(B, C, dtype=torch.bool)], 1)[:, None, :, None]
    torch.testing.assert_close(out * read, ref * read, atol=1e-5, rtol=1e-5)  # padding: unread
    w = torch.randn_like(out) * read
    for a, b in zip(*(torch.autograd.grad((o * w).sum(), leaves) for o in (out, ref)),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # no context key: a row without an own key has nothing to attend to (zeros), the others
    # their own value
    none = candidates_attend(qc, kc, vc, kx[:, :, :0], vx[:, :, :0], ctx_valid[:, :0], cap,
                             own_from=1)  # fmt: skip
    assert not none[:, :, 0].any()
    torch.testing.assert_close(none[:, :, 1], vc[:, :, 1].repeat_interleave(Hq // Hkv, 1))
    no_slots = candidates_attend(qc[:, :, :0], kc[:, :, :0], vc[:, :, :0], kx, vx, ctx_valid, cap)
    assert no_slots.shape == (B, Hq, 0, hd)
    with pytest.raises(ValueError, match="own_from must be in 0..7, got 8"):
        candidates_attend(cat(qx, qc), cat(kx, kc), cat(vx, vc), kx, vx, ctx_valid, cap,
                          own_from=8)  # fmt: skip


def test_an_empty_batch_and_a_batch_of_candidates_only():
    """B = 0 plans no group and attends to nothing; with no context token (C = T) each
    candidate attends to itself alone, in the fast kernel as in the full mask."""
    plan = plan_varlen(torch.zeros(0, 5, dtype=torch.bool), 2)
    assert plan.num_tokens == 0 and plan.groups == []
    q = torch.randn(0, 2, 4)
    assert varlen_isolated_attention(q, q[:, :1], q[:, :1], plan, False, 30.0).shape == (0, 2, 4)
    torch.manual_seed(0)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[1, 2] = False
    for cap in (30.0, None):
        q, k, v = (torch.randn(3, h, 4, 8, requires_grad=True) for h in (2, 1, 1))
        layout = AttentionLayout(valid, 4, False, cap)
        fast, ref = isolated_attention(q, k, v, layout), full_mask_attention(q, k, v, layout)
        torch.testing.assert_close(fast, ref)
        torch.testing.assert_close(fast, v.expand(3, 2, 4, 8))  # its own value, every head
        w = torch.randn_like(fast)
        for a, b in zip(*(torch.autograd.grad((o * w).sum(), (q, k, v), allow_unused=True)
                          for o in (fast, ref)), strict=True):  # fmt: skip
            torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b)


@pytest.mark.parametrize("attention", ["isolated", "full"])
@pytest.mark.parametrize("C", [0, 2])
def test_a_batch_of_padding_only_gives_zeros(attention, C):
    tf = Transformer(TransformerConfig(dim=16, num_layers=1, num_q_heads=2, num_kv_heads=1,
                                       attention=attention))  # fmt: skip
    x = torch.randn(2, 6, 16, requires_grad=True)
    out = tf(x, torch.zeros(2, 6, dtype=torch.bool), C)
    assert out.shape == (2, 6, 16) and not out.any()
    out.sum().backward()
    assert not x.grad.any()


def test_auto_kernel_is_isolated_on_a_cpu_and_the_full_mask_for_small_gpu_batches():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    limit = tf_module.GPU_FULL_MASK_LOGITS
    assert choose_kernel("auto", cpu, 1, 1, 2) is isolated_attention
    assert choose_kernel("auto", gpu, 128, 4, 49) is full_mask_attention
    assert choose_kernel("auto", gpu, limit // 4, 4, 1) is full_mask_attention  # at the limit
    assert choose_kernel("auto", gpu, limit // 4 + 1, 4, 1) is isolated_attention
    assert choose_kernel("auto", gpu, 64, 4, 1153) is isolated_attention  # C = 1,024, S = 128
    for dev in (cpu, gpu):
        assert choose_kernel("isolated", dev, 1, 1, 2) is isolated_attention
        assert choose_kernel("full", dev, 10**6, 8, 10**4) is full_mask_attention


def test_the_transformer_runs_the_kernel_choose_kernel_picks(monkeypatch):
    """forward asks choose_kernel (config, the input's device, B, H, T) when no kernel is
    given, and runs what it returns: here the full mask, as on a GPU."""
    torch.manual_seed(4)
    calls = []

    def spy(*args):
        calls.append(args)
        return full_mask_attention

    tf = Transformer(TransformerConfig(dim=16, num_layers=1, num_q_heads=2, num_kv_heads=1))
    x, valid = torch.randn(3, 9, 16), torch.ones(3, 9, dtype=torch.bool)
    valid[0, 2:6] = False
    want = tf(x, valid, 4, kernel=full_mask_attention)
    monkeypatch.setattr(tf_module, "choose_kernel", spy)
    got = tf(x, valid, 4)
    assert calls == [("auto", torch.device("cpu"), 3, 2, 9)]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_context_never_depends_on_candidates():
    torch.manual_seed(1)
    tf = Transformer(TransformerConfig(dim=16, num_layers=2, num_q_heads=2, num_kv_heads=1))
    x = torch.randn(1, 8, 16)
    valid = torch.ones(1, 8, dtype=torch.bool)
    a = tf(x, valid, 3)
    x2 = x.clone()
    x2[:, -3:] = torch.randn(1, 3, 16)
    b = tf(x2, valid, 3)
    torch.testing.assert_close(a[:, :5], b[:, :5])


def test_phoenix_options_change_what_they_say():
    torch.manual_seed(2)
    base = TransformerConfig(dim=16, num_layers=1, num_q_heads=2, num_kv_heads=1)
    tf = Transformer(base)
    x, valid = torch.randn(1, 7, 16), torch.ones(1, 7, dtype=torch.bool)
    ref = tf(x, valid, 3)
    # the default scale is 1/sqrt(head_dim): giving it explicitly changes nothing
    tf.config = replace(base, attn_scale=base.head_dim**-0.5)
    torch.testing.assert_close(tf(x, valid, 3), ref)
    # slot positions: the context is unchanged, candidates move
    tf.config = replace(base, candidate_positions="slots")
    out = tf(x, valid, 3)
    torch.testing.assert_close(out[:, :4], ref[:, :4])
    assert (out[:, 5:] - ref[:, 5:]).abs().max() > 1e-4
    assert tf.positions(7, 3, x.device).tolist() == list(range(7))
    # no final norm: the rms of the output is no longer 1 * scale
    raw = Transformer(replace(base, final_norm=False))
    raw.load_state_dict({k: v for k, v in tf.state_dict().items() if "final" not in k})
    torch.testing.assert_close(tf.final_norm(raw(x, valid, 3)), ref)
    with pytest.raises(ValueError, match="candidate_positions must be"):
        TransformerConfig(candidate_positions="left")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attn_scale must be > 0"):
        TransformerConfig(attn_scale=0.0)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TransformerConfig(dim=32, num_q_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="not divisible"):
        TransformerConfig(dim=30, num_q_heads=4, num_kv_heads=1)
    with pytest.raises(ValueError, match="attention must be"):
        TransformerConfig(attention="flash")  # type: ignore[arg-type]
    assert TransformerConfig(dim=128, widening_factor=4.0).ffn_dim % 8 == 0
    tf = Transformer(TransformerConfig(dim=16, num_q_heads=2, num_kv_heads=1))
    with pytest.raises(ValueError, match="valid has shape"):
        tf(torch.randn(1, 4, 16), torch.ones(1, 5, dtype=torch.bool), 1)


def test_flex_attention_kernel_matches_the_full_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    import warnings

    from hashrec.nn.attention import AttentionLayout
    from hashrec.nn.flex import flex_attention_kernel

    torch.manual_seed(0)
    B, Hq, Hkv, S, C, hd = 2, 4, 2, 9, 5, 8
    T = 1 + S + C
    q, k, v = torch.randn(B, Hq, T, hd), torch.randn(B, Hkv, T, hd), torch.randn(B, Hkv, T, hd)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 3:6] = False  # history padding
    valid[1, -2:] = False  # candidate padding
    for causal, cap, scale in ((False, 30.0, None), (True, 30.0, None), (False, None, None),
                               (True, 30.0, 0.125)):  # fmt: skip  # last: Phoenix's multiplier
        layout = AttentionLayout(valid, C, causal, cap, scale)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the eager reference warns that it is unfused
            got = flex_attention_kernel(q, k, v, layout, compiled=False)
        torch.testing.assert_close(got, full_mask_attention(q, k, v, layout), atol=1e-5, rtol=1e-5)
