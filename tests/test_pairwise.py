"""The pairwise loss over each user's candidates, and the user-grouped epoch order it needs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hashrec.models.losses import pairwise_loss


def pairwise_reference(logits, labels, mask, groups) -> torch.Tensor:
    """One (positive, negative) pair at a time."""
    B, C, A = logits.shape
    terms = []
    for a in range(A):
        for i in range(B * C):
            for j in range(B * C):
                bi, ci, bj, cj = i // C, i % C, j // C, j % C
                gi, gj = int(groups[bi, ci]), int(groups[bj, cj])
                if gi < 0 or gi != gj or not (mask[bi, ci, a] and mask[bj, cj, a]):
                    continue
                if labels[bi, ci, a] == 1 and labels[bj, cj, a] == 0:
                    terms.append(F.softplus(logits[bj, cj, a] - logits[bi, ci, a]))
    return torch.stack(terms).mean() if terms else logits.sum() * 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pairwise_loss_matches_the_pair_by_pair_reference_values_and_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    B, C, A = 4, 3, 2
    labels = (torch.rand(B, C, A, generator=g) < 0.4).float()
    mask = torch.rand(B, C, A, generator=g) < 0.85
    groups = torch.tensor([[5, 5, -1], [5, 9, 9], [9, 2, 2], [7, 7, 7]])
    if seed:  # groups scattered over the batch in any order, some candidates in none
        groups = torch.randint(-1, 4, (B, C), generator=g)
    grads = []
    for fn in (pairwise_loss, pairwise_reference):
        logits = torch.randn(B, C, A, generator=torch.Generator().manual_seed(1))
        logits.requires_grad_(True)
        loss = fn(logits, labels, mask, groups)
        loss.backward()
        grads.append((loss.detach(), logits.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert grads[0][0] > 0


def test_pairwise_loss_never_pairs_across_users_or_masked_entries():
    s = torch.tensor([[[0.0], [9.0]], [[-9.0], [0.0]]])  # [B=2, C=2, A=1]
    y = torch.tensor([[[1.0], [0.0]], [[1.0], [0.0]]])
    ones = torch.ones_like(y, dtype=torch.bool)
    # users 1 and 2: one pair each, (s=0 vs 9) and (s=-9 vs 0), both softplus(9)
    loss = pairwise_loss(s, y, ones, torch.tensor([[1, 1], [2, 2]]))
    assert math.isclose(float(loss), float(F.softplus(torch.tensor(9.0))), rel_tol=1e-6)
    # one user per candidate: no pair at all -> 0, still differentiable
    logits = s.clone().requires_grad_(True)
    none = pairwise_loss(logits, y, ones, torch.tensor([[1, 2], [3, 4]]))
    none.backward()
    assert float(none.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(s))
    # -1 (no group) and a masked entry drop their pairs
    assert float(pairwise_loss(s, y, ones, torch.tensor([[1, -1], [2, 2]]))) == pytest.approx(
        float(F.softplus(torch.tensor(9.0)))
    )
    masked = ones.clone()
    masked[0, 1] = False
    assert float(pairwise_loss(s, y, masked, torch.tensor([[1, 1], [1, 1]]))) == pytest.approx(
        float(F.softplus(torch.tensor(-0.0)) + F.softplus(torch.tensor(9.0))) / 2
    )
    with pytest.raises(ValueError, match="groups has shape"):
        pairwise_loss(s, y, ones, torch.tensor([1, 2]))


def test_pairwise_training_batches_whole_users_in_a_seeded_order(tmp_path):
    from hashrec.data import ExampleConfig, load_kuairand
    from hashrec.data.collate import RowHashes
    from hashrec.data.requests import build_requests
    from hashrec.datasets import kuairand_sample_dir
    from hashrec.evaluation.experiment import ModelSpec, hashed_config, ranker_config
    from hashrec.models.ranker import PhoenixRanker
    from hashrec.nn.transformer import TransformerConfig
    from hashrec.training.trainer import TrainConfig, Trainer

    log = load_kuairand(kuairand_sample_dir())
    spec = ModelSpec("tiny", hashed_config(log, 0.25, 2),
                     TransformerConfig(dim=8, num_layers=1, num_q_heads=1, num_kv_heads=1))  # fmt: skip
    req = build_requests(log, log.days(20220425, 20220426), ExampleConfig(4, 4))
    users = log.user[req.user_row]

    def trainer(weight: float, seed: int = 0) -> Trainer:
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=1, max_steps=3, batch_size=32, pairwise_weight=weight, seed=seed)
        return Trainer(PhoenixRanker(ranker_config(log, spec)), cfg, tmp_path / f"{weight}_{seed}",
                       progress=False)  # fmt: skip

    t = trainer(1.0)
    state = t.fit(log, RowHashes(log, spec.hash_config), req)
    assert state.global_step == 3 and all(np.isfinite(state.losses))
    order = t.epoch_order(0, len(req))
    assert sorted(order.tolist()) == list(range(len(req)))  # a permutation
    seq = users[order]
    changes = np.flatnonzero(seq[1:] != seq[:-1]) + 1
    runs = np.split(seq, changes)
    assert len(runs) == len(np.unique(users)) < len(req)  # every user's requests in one run
    np.testing.assert_array_equal(order, t.epoch_order(0, len(req)))  # seeded: resumable
    assert not np.array_equal(order, t.epoch_order(1, len(req)))  # a new order every epoch
    # off: the plain seeded permutation, as before the option existed
    plain = trainer(0.0)
    np.testing.assert_array_equal(
        plain.epoch_order(0, len(req)), np.random.default_rng([0, 0]).permutation(len(req))
    )
    with pytest.raises(ValueError, match="pairwise_weight"):
        TrainConfig(pairwise_weight=-1.0)
