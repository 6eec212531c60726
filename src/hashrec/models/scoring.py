"""The weighted scorer of X's home-mixer: action probabilities -> one ranking score per candidate.

``combined = sum_a w_a * p_a`` (continuous heads included) with positive and negative weights;
then X's ``offset_score``: a negative total is squeezed into [0, offset) as
``(combined + negative_sum) / total_sum * offset``, a non-negative one becomes
``combined + offset`` (home-mixer/scorers/ranking_scorer.rs). Ranking a request's slate then
applies the out-of-network factor and the author-diversity decay
``(1 - floor) * decay ** k + floor`` for an author's k-th post (k = 0, 1, ...) in score order, and
sorts; ties keep the candidates' input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["X_HOME_MIXER_WEIGHTS", "ScoringConfig", "WeightedScorer"]

# X's published home-mixer weights (params of home-mixer/scorers/ranking_scorer.rs, 2026).
# They change between commits (ClickWeight 0.4 -> 0.3 in Sept 2026); treat as one preset.
X_HOME_MIXER_WEIGHTS: dict[str, float] = {
    "favorite": 0.5,
    "reply": 5.0,
    "repost": 1.0,
    "photo_expand": 0.05,
    "click": 0.4,
    "profile_click": 0.0,
    "vqv": 0.05,
    "share": 2.0,
    "share_via_dm": 5.0,
    "share_via_copy_link": 20.0,
    "dwell": 0.05,
    "quote": 5.0,
    "quoted_click": 0.05,
    "follow_author": 4.0,
    "not_interested": -43.2,
    "block_author": -31.2,
    "mute_author": -58.8,
    "report": -234.0,
    "dwell_time": 0.004,
}


@dataclass
class ScoringConfig:
    """Weights per action name plus the slate adjustments.

    ``author_diversity_decay/floor`` and ``out_of_network_factor`` are hashrec defaults: X's code
    has the formulas, its production values are not published.

    >>> ScoringConfig.x_home_mixer().weights["report"]
    -234.0
    >>> ScoringConfig(weights={"click": 1.0}, out_of_network_factor=1.0).weights
    {'click': 1.0}
    """

    weights: dict[str, float] = field(default_factory=lambda: dict(X_HOME_MIXER_WEIGHTS))
    negative_scores_offset: float = 0.001
    author_diversity_decay: float = 0.5
    author_diversity_floor: float = 0.25
    out_of_network_factor: float = 0.75

    def __post_init__(self) -> None:
        if not 0.0 <= self.author_diversity_floor <= 1.0:
            raise ValueError(
                f"author_diversity_floor must be in [0, 1], got {self.author_diversity_floor}"
            )
        if not 0.0 < self.author_diversity_decay <= 1.0:
            raise ValueError(
                f"author_diversity_decay must be in (0, 1], got {self.author_diversity_decay}"
            )
        if self.out_of_network_factor < 0:
            raise ValueError(
                f"out_of_network_factor must be >= 0, got {self.out_of_network_factor}"
            )

    @classmethod
    def x_home_mixer(cls) -> ScoringConfig:
        """X's published weights."""
        return cls()


class WeightedScorer:
    """Turns per-action predictions into scores and ranked slates.

    >>> scorer = WeightedScorer(ScoringConfig(weights={"click": 1.0, "report": -10.0}),
    ...                         actions=("click", "report"))
    >>> s = scorer.score(torch.tensor([[0.5, 0.0], [0.1, 0.2]]))  # 2nd total is negative
    >>> [round(v, 6) for v in s.tolist()]
    [0.501, 0.000736]
    """

    def __init__(
        self,
        config: ScoringConfig,
        actions: Sequence[str],
        continuous_actions: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.actions, self.continuous_actions = tuple(actions), tuple(continuous_actions)
        w = config.weights
        self.w_binary = torch.tensor([w.get(a, 0.0) for a in self.actions], dtype=torch.float64)
        self.w_cont = torch.tensor(
            [w.get(a, 0.0) for a in self.continuous_actions], dtype=torch.float64
        )
        used = torch.cat([self.w_binary, self.w_cont])
        if not bool(used.ne(0).any()):
            raise ValueError(
                f"no weight applies: actions {self.actions + self.continuous_actions} vs weights "
                f"for {sorted(w)}"
            )
        # X sums the weights that take part in scoring: negative_sum > 0 is -(sum of negatives)
        self.negative_sum = float(-used.clamp(max=0).sum())
        self.total_sum = float(used.clamp(min=0).sum()) + self.negative_sum

    def combined(self, probs: torch.Tensor, continuous: torch.Tensor | None = None) -> torch.Tensor:
        """sum_a w_a * p_a: probs [..., A] (+ continuous [..., Ac]) -> [...] in float64."""
        if probs.shape[-1] != len(self.actions):
            raise ValueError(
                f"probs has {probs.shape[-1]} actions, scorer expects {len(self.actions)}"
            )
        s = probs.double() @ self.w_binary.to(probs.device)  # stays on the inputs' device
        if self.continuous_actions:
            if continuous is None or continuous.shape[-1] != len(self.continuous_actions):
                got = None if continuous is None else continuous.shape[-1]
                raise ValueError(
                    f"continuous has {got} values, scorer expects {len(self.continuous_actions)}"
                )
            s = s + continuous.double() @ self.w_cont.to(continuous.device)
        return s

    def offset(self, combined: torch.Tensor) -> torch.Tensor:
        """X's offset_score for negative totals."""
        off = self.config.negative_scores_offset
        if self.total_sum == 0.0:
            return combined.clamp(min=0.0)
        neg = (combined + self.negative_sum) / self.total_sum * off
        return torch.where(combined < 0, neg, combined + off)

    def score(self, probs: torch.Tensor, continuous: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted score of each candidate, [...] float64."""
        return self.offset(self.combined(probs, continuous))

    def rank(
        self,
        scores: torch.Tensor,
        author_ids: torch.Tensor,
        in_network: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's slate: scores [C] -> (order [C'] of valid candidates, final scores [C']).

        Out-of-network candidates are multiplied by ``out_of_network_factor``; then, in score
        order, an author's k-th candidate by ``(1 - floor) * decay**k + floor``; then sorted
        again. Ties keep input order (stable sorts).
        """
        if scores.dim() != 1 or author_ids.shape != scores.shape:
            raise ValueError(
                f"scores and author_ids must be 1-D of equal length, got {list(scores.shape)} and "
                f"{list(author_ids.shape)}"
            )
        c = self.config
        idx = torch.arange(scores.numel(), device=scores.device)
        s = scores.double().clone()
        if in_network is not None:
            s = torch.where(in_network.bool(), s, s * c.out_of_network_factor)
        if mask is not None:
            idx, s, author_ids = idx[mask], s[mask], author_ids[mask]
        first = torch.sort(s, descending=True, stable=True).indices
        authors = author_ids[first]
        # k = how many higher-ranked candidates share this author
        by_author = torch.sort(authors, stable=True).indices
        sorted_auth = authors[by_author]
        starts = torch.ones_like(sorted_auth, dtype=torch.bool)
        starts[1:] = sorted_auth[1:] != sorted_auth[:-1]
        positions = torch.arange(len(sorted_auth), device=scores.device)
        run_start = torch.cummax(torch.where(starts, positions, 0), 0).values
        k = torch.empty_like(by_author)
        k[by_author] = positions - run_start
        mult = (
            1 - c.author_diversity_floor
        ) * c.author_diversity_decay ** k.double() + c.author_diversity_floor
        final = s[first] * mult
        second = torch.sort(final, descending=True, stable=True).indices
        return idx[first][second], final[second]
