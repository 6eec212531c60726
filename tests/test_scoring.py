import pytest
import torch

from hashrec import ACTIONS
from hashrec.models.scoring import X_HOME_MIXER_WEIGHTS, ScoringConfig, WeightedScorer


def test_weighted_sum_and_x_offset_rule():
    cfg = ScoringConfig(weights={"favorite": 1.0, "reply": 2.0, "report": -10.0})
    s = WeightedScorer(cfg, ("favorite", "reply", "report"))
    assert s.negative_sum == 10.0 and s.total_sum == 13.0
    p = torch.tensor([[0.5, 0.25, 0.0], [0.1, 0.0, 0.2]])
    combined = s.combined(p)
    torch.testing.assert_close(combined, torch.tensor([1.0, -1.9], dtype=torch.float64))
    scores = s.score(p)
    assert scores[0].item() == pytest.approx(1.0 + 0.001)
    assert scores[1].item() == pytest.approx((-1.9 + 10.0) / 13.0 * 0.001)
    assert 0 <= scores[1] < 0.001 < scores[0]  # negatives squeezed below every positive


def test_x_preset_covers_phoenix_actions_and_continuous_head():
    assert set(X_HOME_MIXER_WEIGHTS) == set(ACTIONS)
    binary = [a for a in ACTIONS if a != "dwell_time"]
    s = WeightedScorer(ScoringConfig.x_home_mixer(), binary, ("dwell_time",))
    p = torch.zeros(2, len(binary))
    p[0, binary.index("share_via_copy_link")] = 0.1
    cont = torch.tensor([[0.0], [100.0]])
    sc = s.score(p, cont)
    assert sc[0].item() == pytest.approx(2.0 + 0.001) and sc[1].item() == pytest.approx(0.4 + 0.001)
    with pytest.raises(ValueError, match="continuous has None values"):
        s.score(p)


def test_rank_diversity_oon_and_ties():
    cfg = ScoringConfig(
        weights={"click": 1.0},
        author_diversity_decay=0.5,
        author_diversity_floor=0.0,
        out_of_network_factor=0.5,
    )
    s = WeightedScorer(cfg, ("click",))
    scores = torch.tensor([0.9, 0.8, 0.7, 0.8, 0.3])
    authors = torch.tensor([1, 1, 2, 3, 1])
    order, final = s.rank(scores, authors)
    # author 1: 0.9 (k=0), 0.8 (k=1 -> 0.4), 0.3 (k=2 -> 0.075); ties keep input order
    assert order.tolist() == [0, 3, 2, 1, 4]
    torch.testing.assert_close(
        final, torch.tensor([0.9, 0.8, 0.7, 0.4, 0.075], dtype=torch.float64)
    )
    in_net = torch.tensor([True, True, False, True, True])
    order, final = s.rank(
        scores, authors, in_network=in_net, mask=torch.tensor([True] * 4 + [False])
    )
    assert order.tolist() == [0, 3, 1, 2] and final[-1].item() == pytest.approx(0.35)
    tied = s.rank(torch.ones(4, dtype=torch.float64), torch.tensor([5, 6, 7, 8]))[0]
    assert tied.tolist() == [0, 1, 2, 3]


def test_bad_inputs():
    with pytest.raises(ValueError, match="no weight applies"):
        WeightedScorer(ScoringConfig(weights={"click": 1.0}), ("like",))
    s = WeightedScorer(ScoringConfig(weights={"click": 1.0}), ("click",))
    with pytest.raises(ValueError, match="probs has 2 actions, scorer expects 1"):
        s.score(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="author_diversity_floor"):
        ScoringConfig(author_diversity_floor=2.0)
    with pytest.raises(ValueError, match="1-D of equal length"):
        s.rank(torch.zeros(3), torch.zeros(2))


def test_scores_stay_on_the_inputs_device():
    scorer = WeightedScorer(ScoringConfig.x_home_mixer(), ACTIONS[:-1], ("dwell_time",))
    probs = torch.rand(3, 5, len(ACTIONS) - 1, device="meta")
    s = scorer.score(probs, torch.rand(3, 5, 1, device="meta"))
    assert s.device.type == "meta" and s.shape == (3, 5)
