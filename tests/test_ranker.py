import dataclasses

import pytest
import torch

from hashrec import ACTIONS, HashConfig, PhoenixRanker, RankerConfig, RecsysBatch, TransformerConfig
from hashrec.models.losses import ranking_loss
from hashrec.nn.attention import full_mask_attention, isolated_attention
from hashrec.nn.transformer import choose_kernel

from conftest import make_batch


def tiny_config(**kw) -> RankerConfig:
    return RankerConfig(
        hash=HashConfig.uniform(num_buckets=97, num_hashes=2),
        transformer=TransformerConfig(dim=16, num_layers=2, num_q_heads=2, num_kv_heads=1),
        **kw,
    )


@pytest.fixture
def model():
    torch.manual_seed(0)
    return PhoenixRanker(tiny_config()).eval()


@pytest.fixture
def batch():
    return make_batch(tiny_config().hash, B=2, S=5, C=6, A=18, seed=1)


def _cands(batch, order=None, keep=None, **replace):
    d = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    for name in ("candidate_post_hashes", "candidate_author_hashes", "candidate_product_surface"):
        t = d[name]
        if order is not None:
            t = t[:, order]
        if keep is not None:
            t = t[:, keep]
        d[name] = t
    d.update(replace)
    return RecsysBatch(**d)


def test_actions_and_shapes(model, batch):
    assert len(ACTIONS) == 19 and ACTIONS[-1] == "dwell_time"
    out = model(batch)
    assert out.logits.shape == (2, 6, 18) and out.continuous.shape == (2, 6, 1)
    assert (out.continuous >= 0).all() and ((out.probs > 0) & (out.probs < 1)).all()


def test_dataset_action_list_drives_the_heads():
    cfg = tiny_config(actions=("click", "long_view", "like"), continuous_actions=())
    m = PhoenixRanker(cfg)
    b = make_batch(cfg.hash, A=3)
    assert m(b).logits.shape == (3, 4, 3) and m(b).continuous.shape == (3, 4, 0)
    with pytest.raises(ValueError, match="history_actions has 19 actions, config expects 3"):
        m(make_batch(cfg.hash, A=19))
    with pytest.raises(ValueError, match="binary and continuous"):
        tiny_config(actions=("click", "dwell_time"))


def test_fast_path_is_default_and_matches_full_mask(model, batch):
    assert model.config.transformer.attention == "auto"
    assert choose_kernel("auto", torch.device("cpu"), 2, 4, 30) is isolated_attention
    labels = torch.randint(0, 2, (2, 6, 18)).float()
    outs, grads = [], []
    for kernel in (None, full_mask_attention):
        model.zero_grad(set_to_none=True)
        out = model(batch, kernel=kernel)
        ranking_loss(out, labels).backward()
        outs.append(out.logits)
        grads.append(
            {n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None}
        )
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert (g - grads[1][name]).abs().max() <= 1e-5, name


def test_permuting_candidates_permutes_logits(model, batch):
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a, b = model(batch).logits, model(_cands(batch, order=perm)).logits
    torch.testing.assert_close(b, a[:, perm], atol=1e-6, rtol=1e-5)


def test_changing_adding_removing_one_candidate_leaves_others_unchanged(model, batch):
    base = model(batch).logits
    valid = batch.candidate_post_hashes[..., 0] != 0
    # change candidate 2
    cp, ca = batch.candidate_post_hashes.clone(), batch.candidate_author_hashes.clone()
    cp[:, 2] = batch.history_post_hashes[:, 0]
    ca[:, 2] = batch.history_author_hashes[:, 0]
    changed = model(_cands(batch, candidate_post_hashes=cp, candidate_author_hashes=ca)).logits
    others = [i for i in range(6) if i != 2]
    torch.testing.assert_close(changed[:, others], base[:, others], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(changed[:, 2], base[:, 2])
    # remove candidate 4
    keep = torch.tensor([0, 1, 2, 3, 5])
    removed = model(_cands(batch, keep=keep)).logits
    torch.testing.assert_close(removed, base[:, keep], atol=1e-6, rtol=1e-5)
    # add one (duplicate of candidate 0 at the end), with padding between (batch has a padded slot)
    assert not valid.all()
    add = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    added = model(_cands(batch, order=add)).logits
    torch.testing.assert_close(added[:, :6], base, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(added[:, 6], base[:, 0], atol=1e-6, rtol=1e-5)  # slot-independent


def test_padding_candidates_produce_no_loss(model, batch):
    out = model(batch)
    assert not out.candidate_mask.all()
    out.logits.retain_grad()
    labels = torch.randint(0, 2, out.logits.shape).float()
    ranking_loss(out, labels, continuous_targets=torch.rand_like(out.continuous)).backward()
    pad = ~out.candidate_mask
    assert out.logits.grad[pad].abs().sum() == 0
    assert out.logits.grad[~pad].abs().sum() > 0
    labels2 = labels.clone()
    labels2[pad] = 1 - labels2[pad]
    torch.testing.assert_close(ranking_loss(out, labels2), ranking_loss(out, labels))


def test_label_mask_drops_entries(model, batch):
    out = model(batch)
    labels = torch.zeros_like(out.logits)
    lm = torch.ones_like(labels, dtype=torch.bool)
    lm[..., 0] = False
    l1 = ranking_loss(out, labels, lm)
    labels[..., 0] = 1
    torch.testing.assert_close(ranking_loss(out, labels, lm), l1)
    with pytest.raises(ValueError, match="labels has shape"):
        ranking_loss(out, labels[..., :2])


def test_same_seed_same_logits(batch):
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(PhoenixRanker(tiny_config())(batch).logits)
    assert torch.equal(outs[0], outs[1])


def test_gradients_reach_only_looked_up_table_rows(model, batch):
    model.train()
    out = model(batch)
    ranking_loss(
        out, torch.ones_like(out.logits), continuous_targets=torch.ones_like(out.continuous)
    ).backward()
    g = model.table.weight.grad.coalesce()
    touched = set(g.indices()[0].tolist())
    looked_up = torch.cat(
        [
            getattr(batch, f.name).reshape(-1)
            for f in dataclasses.fields(batch)
            if f.name.endswith("hashes")
        ]
    )
    assert touched == set(looked_up.tolist()) - {0}
    assert all(p.grad is not None for p in model.dense_parameters())


def test_config_roundtrip():
    cfg = tiny_config(actions=("click", "like"), continuous_actions=())
    assert RankerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ranker config fields"):
        RankerConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_ranker_refuses_a_batch_without_candidates(small_config):
    from conftest import make_batch, without_candidates

    cfg = RankerConfig(
        hash=small_config,
        transformer=TransformerConfig(dim=16, num_layers=1, num_q_heads=2, num_kv_heads=1),
    )
    b = make_batch(small_config)
    user_only = without_candidates(b)
    with pytest.raises(ValueError, match="no candidates"):
        PhoenixRanker(cfg)(user_only)


def _packed_and_padded(model, forward):
    """Outputs at valid candidates and every gradient, with pack_tokens True then False."""
    results = []
    for pack in (True, False):
        model.pack_tokens = pack
        model.zero_grad(set_to_none=True)
        out = forward()
        labels = (torch.arange(out.logits.numel()).view_as(out.logits) % 3 == 0).float()
        ranking_loss(out, labels).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits[out.candidate_mask], grads))
    model.pack_tokens = True
    return results


@pytest.mark.parametrize("attention", ["isolated", "full"])
def test_packed_tokens_match_the_padded_reference(attention):
    """The default path (history reducer and transformer on the valid tokens only) against the
    padded reference: logits of every real candidate and every gradient."""
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg = dataclasses.replace(
        cfg, transformer=dataclasses.replace(cfg.transformer, attention=attention, causal=True)
    )
    model = PhoenixRanker(cfg)
    assert model.pack_tokens and model.transformer.pack_tokens
    b = make_batch(cfg.hash, B=4, S=7, C=5, A=18, seed=3)
    b.history_post_hashes[1:3, :4] = 0  # left padding, as collated histories have
    b.history_post_hashes[3] = 0  # a user with no history at all
    (lp, gp), (lr, gr) = _packed_and_padded(model, lambda: model(b))
    torch.testing.assert_close(lp, lr, atol=1e-5, rtol=1e-5)
    assert gp.keys() == gr.keys() and len(gp) > 10
    for name in gp:
        torch.testing.assert_close(gp[name], gr[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_tokens_match_on_collated_kuairand_batches_with_side_features():
    from hashrec.data import ExampleConfig, load_kuairand
    from hashrec.data.collate import RowHashes, batches
    from hashrec.data.requests import build_requests
    from hashrec.datasets import kuairand_sample_dir
    from hashrec.evaluation.experiment import ModelSpec, hashed_config, ranker_config

    log = load_kuairand(kuairand_sample_dir())
    spec = ModelSpec("tiny", hashed_config(log, 0.25, 2),
                     TransformerConfig(dim=8, num_layers=2, num_q_heads=2, num_kv_heads=1))  # fmt: skip
    torch.manual_seed(0)
    model = PhoenixRanker(ranker_config(log, spec))
    assert model.config.side.any
    req = build_requests(log, log.days(20220425, 20220427), ExampleConfig(8, 4))
    lb = next(batches(log, RowHashes(log, spec.hash_config), req, 64))
    assert (lb.batch.history_post_hashes[..., 0] == 0).any()  # real padding to skip
    (lp, gp), (lr, gr) = _packed_and_padded(model, lambda: model(lb.batch, side=lb.side))
    # the packed path's context attention soft-caps as 2cap*sigmoid(2z/cap) - cap (the constant
    # cancels), the padded one as cap*tanh(z/cap): equal up to fp32 rounding of ~cap-sized
    # logits (ulp(30) = 2e-6), which two layers carry to ~2e-5 here
    torch.testing.assert_close(lp, lr, atol=5e-5, rtol=1e-4)
    for name in gp:
        torch.testing.assert_close(gp[name], gr[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("pack", [True, False])
def test_dropout_drops_input_tokens_in_training_only(pack):
    """Dropout acts on the input tokens (the packed path: on the valid ones only, as [N, D])
    and on the candidate outputs, in training; eval mode is deterministic."""
    torch.manual_seed(0)
    model = PhoenixRanker(tiny_config(dropout=0.5))
    model.pack_tokens = pack
    b = make_batch(model.config.hash, B=3, S=6, C=4, A=18, seed=1)
    b.history_post_hashes[0, :4] = 0  # padding the packed path skips
    shapes = []
    model.dropout.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    model.eval()
    ref = model(b).logits
    torch.testing.assert_close(model(b).logits, ref)
    model.train()
    shapes.clear()
    out = model(b)
    assert not torch.allclose(out.logits, ref)
    B, T = 3, 1 + 6 + 4
    n_valid = 3 + int((b.history_post_hashes[..., 0] != 0).sum()) + int(out.candidate_mask.sum())
    assert shapes[0] == ((n_valid, 16) if pack else (B, T, 16))  # the input tokens
    assert shapes[1] == (B, 4, 16)  # the candidate outputs
