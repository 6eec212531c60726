"""RankerEnsemble: the mean of its members' logits and continuous outputs, one member is that
member, and members of other configurations are refused."""

import pytest
import torch

from hashrec import HashConfig, PhoenixRanker, RankerConfig, RankerEnsemble, TransformerConfig
from hashrec.nn.batch import RecsysBatch


def _config(dim: int = 8) -> RankerConfig:
    return RankerConfig(
        hash=HashConfig.uniform(num_buckets=31),
        transformer=TransformerConfig(dim=dim, num_layers=1, num_q_heads=2, num_kv_heads=1),
        actions=("click", "like"),
        continuous_actions=("dwell_time",),
    )


def _batch(B: int = 3, S: int = 4, C: int = 5) -> RecsysBatch:
    h = _config().hash
    g = torch.Generator().manual_seed(0)

    def ids(*shape: int):
        return torch.randint(1, 10**6, shape, generator=g).numpy()

    return RecsysBatch(
        user_hashes=torch.from_numpy(h.rows("user", ids(B))),
        history_post_hashes=torch.from_numpy(h.rows("post", ids(B, S))),
        history_author_hashes=torch.from_numpy(h.rows("author", ids(B, S))),
        history_actions=torch.randint(0, 2, (B, S, 2), generator=g).float(),
        history_product_surface=torch.randint(0, 4, (B, S), generator=g),
        candidate_post_hashes=torch.from_numpy(h.rows("post", ids(B, C))),
        candidate_author_hashes=torch.from_numpy(h.rows("author", ids(B, C))),
        candidate_product_surface=torch.randint(0, 4, (B, C), generator=g),
    )


def test_ensemble_averages_its_members_logits_and_continuous_outputs():
    torch.manual_seed(0)
    members = [PhoenixRanker(_config()).eval() for _ in range(3)]
    batch = _batch()
    with torch.no_grad():
        outs = [m(batch) for m in members]
        got = RankerEnsemble(members).eval()(batch)
    want = sum(o.logits for o in outs) / 3
    assert (outs[0].logits - outs[1].logits).abs().max() > 1e-3  # the members differ
    torch.testing.assert_close(got.logits, want)
    torch.testing.assert_close(got.continuous, sum(o.continuous for o in outs) / 3)
    assert torch.equal(got.candidate_mask, outs[0].candidate_mask)
    alone = RankerEnsemble(members[:1])(batch)
    torch.testing.assert_close(alone.logits, outs[0].logits)


def test_ensemble_trains_every_member():
    torch.manual_seed(0)
    ens = RankerEnsemble([PhoenixRanker(_config()), PhoenixRanker(_config())])
    ens(_batch()).logits.sum().backward()
    for i, m in enumerate(ens.members):
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), i


def test_ensemble_refuses_other_configurations_and_non_rankers():
    with pytest.raises(ValueError, match="at least one ranker"):
        RankerEnsemble([])
    with pytest.raises(ValueError, match="member 1's configuration differs from member 0's"):
        RankerEnsemble([PhoenixRanker(_config()), PhoenixRanker(_config(dim=16))])
    with pytest.raises(ValueError, match="member 0 is a Linear, expected a PhoenixRanker"):
        RankerEnsemble([torch.nn.Linear(2, 2)])
