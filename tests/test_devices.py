"""The model on each available device against a float64 reference on the CPU.

Every test takes ``device``: "cpu" always, "cuda" where a CUDA device is present (skipped
otherwise; ``benchmarks/device_check.sh`` runs this file on a GPU machine). The CPU case checks
float32 against float64 truth; the CUDA case checks that nothing in the model (the fused table,
the layouts, side features, the fast attention kernel and its hand-written backward, the
row-wise Adagrad step) depends on running on the host.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_side_features import SIDE_SCHEMA, _write_side_log

from hashrec import PhoenixRanker, TransformerConfig
from hashrec.data import ExampleConfig, LogSchema, RowHashes, batches, build_requests, load_log
from hashrec.data.tables import table_config
from hashrec.models.losses import ranking_loss
from hashrec.nn.attention import AttentionLayout, full_mask_attention, isolated_attention
from hashrec.nn.optim import RowWiseAdagrad
from hashrec.nn.transformer import Transformer
from hashrec.nn.varlen import plan_varlen, varlen_isolated_attention

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
    """TF32 would round matmul inputs to 10 bits: exact float32 for the comparisons."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _dense_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    return g.to_dense() if g.is_sparse else g


@pytest.fixture(scope="module")
def side_log(tmp_path_factory):
    path, posts, users = _write_side_log(tmp_path_factory.mktemp("side"))
    return load_log(str(path), LogSchema.from_dict(SIDE_SCHEMA), authors=str(posts),
                    users=str(users))  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("layout", "attention"),
    [("multihash", "auto"), ("hybrid", "auto"), ("qr", "auto"), ("weighted", "auto"),
     ("hybrid", "isolated")],  # auto: the full mask on a GPU at this size
)  # fmt: skip
def test_ranker_step_on_device_matches_the_float64_reference(device, layout, attention, side_log):
    """Forward, loss, backward and one step of both optimizers: probabilities, every
    parameter's gradient and every weight after the step, within float32 rounding."""
    if attention == "isolated" and device == "cpu":
        pytest.skip("on a CPU auto is the isolated kernel: the hybrid/auto case runs it")
    from hashrec.evaluation.experiment import ModelSpec, ranker_config

    hash_cfg = table_config(side_log, np.ones(len(side_log.user), dtype=bool), layout, 0.5, 2)
    spec = ModelSpec("m", hash_cfg,
                     TransformerConfig(dim=16, num_layers=2, num_q_heads=4, num_kv_heads=2,
                                       attention=attention))  # fmt: skip
    torch.manual_seed(0)
    base = PhoenixRanker(ranker_config(side_log, spec))
    req = build_requests(side_log, side_log.days(20220428, None), ExampleConfig(6, 4))
    lb = next(batches(side_log, RowHashes(side_log, hash_cfg), req, 8))
    results = {}
    for name, dev, dtype in (("ref", "cpu", torch.float64), ("dev", device, torch.float32)):
        model = copy.deepcopy(base).to(device=dev, dtype=dtype)
        dense = torch.optim.AdamW(model.dense_parameters(), lr=1e-2)
        table = RowWiseAdagrad(model.table.parameters(), lr=0.1)
        side = lb.side.to(dev)
        for field, t in vars(side).items():  # the numeric fields follow the model's dtype
            if t.is_floating_point():
                setattr(side, field, t.to(dtype))
        out = model(lb.batch.to(dev), side=side)
        ranking_loss(out, lb.labels.to(dev, dtype), lb.label_mask.to(dev)).backward()
        grads = {
            n: _dense_grad(p).clone() for n, p in model.named_parameters() if p.grad is not None
        }
        dense.step()
        table.step()
        results[name] = out.probs, grads, dict(model.named_parameters())
    (p_ref, g_ref, w_ref), (p_dev, g_dev, w_dev) = results["ref"], results["dev"]
    assert p_dev.device.type == torch.device(device).type
    assert _relative(p_dev, p_ref) < 1e-5
    assert g_ref.keys() == g_dev.keys() and "table.weight" in g_ref
    for n in g_ref:
        assert _relative(g_dev[n], g_ref[n]) < 1e-4, n
    for n in w_ref:  # (Adam's first step is lr * sign(g) where g is tiny: rounding shows there)
        assert _relative(w_dev[n], w_ref[n]) < 1e-4, n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("causal", "cap"), [(False, 30.0), (True, 30.0), (False, None)])
@pytest.mark.parametrize("chunks", ["one", "many"])
def test_fast_attention_on_device_matches_the_full_mask(device, causal, cap, chunks, monkeypatch):
    """``isolated_attention`` (hand-written backward) and the packed varlen kernel against the
    masked reference on the same device: outputs and q, k, v gradients, with the candidate
    kernel in one chunk (a GPU's default) and in many (a CPU's on long inputs)."""
    budget = 1 << 30 if chunks == "one" else 64
    monkeypatch.setattr("hashrec.nn.attention._CHUNK_ELEMENTS", budget)
    monkeypatch.setattr("hashrec.nn.attention._GPU_CHUNK_ELEMENTS", budget)
    torch.manual_seed(0)
    B, Hq, Hkv, S, C, hd = 3, 4, 2, 12, 7, 8
    T = 1 + S + C
    valid = torch.rand(B, T) > 0.2
    valid[:, 0] = True
    valid[1, : 1 + S] = False  # a request without context: its candidates see themselves only
    valid, w = valid.to(device), torch.randn(B, Hq, T, hd, device=device)
    qkv = [torch.randn(B, h, T, hd, device=device, requires_grad=True) for h in (Hq, Hkv, Hkv)]
    layout = AttentionLayout(valid, C, causal, cap)
    ref = full_mask_attention(*qkv, layout)
    g_ref = torch.autograd.grad((ref * w).sum(), qkv)
    got = isolated_attention(*qkv, layout)
    g_got = torch.autograd.grad((got * w).sum(), qkv)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # packed tokens (the varlen kernel) on the same device
    plan = plan_varlen(valid, C)
    index = valid.reshape(-1).nonzero().squeeze(1)
    packed = [t.transpose(1, 2).reshape(B * T, -1, hd).index_select(0, index) for t in qkv]
    out = varlen_isolated_attention(*packed, plan, causal, cap)
    want = ref.transpose(1, 2).reshape(B * T, Hq, hd).index_select(0, index)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_candidate_kernel_chunks_for_the_cpu_cache_and_runs_whole_on_a_gpu():
    """The chunk policy itself (no GPU needed: only the device's type is read)."""
    from hashrec.nn.attention import _CHUNK_ELEMENTS, _GPU_CHUNK_ELEMENTS, _chunk_step

    per_slice = 2 * 1024 * 129  # G * C query rows x Tc context keys, C = 1,024
    assert _chunk_step(torch.device("cpu"), 16, per_slice) == _CHUNK_ELEMENTS // per_slice == 1
    assert _chunk_step(torch.device("cpu"), 16, 1000) == 16  # never more slices than there are
    assert _chunk_step(torch.device("cuda"), 16, per_slice) == 16  # one chunk
    assert _chunk_step(torch.device("cuda"), 16, _GPU_CHUNK_ELEMENTS // 4) == 4  # memory bound


@pytest.mark.parametrize("device", DEVICES)
def test_transformer_kernels_agree_on_device(device):
    """The whole transformer with the fast kernel and with the full mask, on the device."""
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=32, num_layers=2, num_q_heads=4, num_kv_heads=2)
    tf = Transformer(cfg).to(device)
    S, C = 10, 6
    x = torch.randn(4, 1 + S + C, 32, device=device)
    valid = torch.rand(4, 1 + S + C, device=device) > 0.2
    valid[:, 0] = True
    outs, grads = [], []
    for kernel in (full_mask_attention, isolated_attention):
        tf.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = tf(xi, valid, C, kernel)
        (out * torch.linspace(-1, 1, 32, device=device)).sum().backward()
        outs.append(out)
        grads.append([xi.grad, *(p.grad.clone() for p in tf.parameters())])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        assert _relative(a, b) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_flex_attention_on_cuda_matches_the_full_mask_with_gradients():
    """FlexAttention (compiled) trains on CUDA: outputs and gradients against the full mask.
    (On the CPU, torch's FlexAttention has no backward; tests/test_transformer.py checks its
    forward there.)"""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from hashrec.nn.flex import flex_attention_kernel

    torch.manual_seed(0)
    B, Hq, Hkv, S, C, hd = 2, 4, 2, 100, 40, 16
    T = 1 + S + C
    valid = torch.ones(B, T, dtype=torch.bool, device="cuda")
    valid[0, 3:30] = False
    valid[1, -5:] = False
    w = torch.randn(B, Hq, T, hd, device="cuda")
    for causal, cap in ((False, 30.0), (True, 30.0)):
        layout = AttentionLayout(valid, C, causal, cap)
        qkv = [torch.randn(B, h, T, hd, device="cuda", requires_grad=True) for h in (Hq, Hkv, Hkv)]
        ref = full_mask_attention(*qkv, layout)
        got = flex_attention_kernel(*qkv, layout)
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)
        g_ref = torch.autograd.grad((ref * w).sum(), qkv)
        g_got = torch.autograd.grad((got * w).sum(), qkv)
        for a, b in zip(g_got, g_ref, strict=True):
            assert _relative(a, b) < 1e-3
