"""A per-user logit bias: one learned offset per (user, action), in a small table of its own.

Why it exists: with hashed user rows the ranker reads how much a user engages off the history,
which changes from one request to the next; that drift tells users apart (AUC) but reorders
one user's candidates between requests (per-user GAUC). A bias row per user takes over the
user's level, so the transformer has less of it to read off the history. Measured on
KuaiRand-Pure (README, "The ranker against the classic models"): it moves GAUC up and the AUCs
down along a better line than the pairwise loss; one offset per action is needed (a shared
scalar, or two columns mixed into every action, did not move GAUC).

The rows are found by hashing the user's own table rows (``user_hashes``), so the model needs
no extra input and a user first seen at serving time gets the row its IDs hash to, as in the
table (a padding user, one without an ID, gets no offset).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["UserBias", "user_bias_rows"]

_MIX = 1_000_003  # a prime: the k table rows fold into one key, then modulo the bias rows


def user_bias_rows(user_hashes: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[B, K] user table rows -> [B] int64 bias rows: ``key = (key * 1000003 + h_j) mod num_rows``
    over the k rows in order (distinct users share a bias row only if their keys collide).

    >>> user_bias_rows(torch.tensor([[5, 9], [5, 10]]), 1000).tolist()
    [24, 25]
    """
    h = user_hashes.long()
    key = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    for j in range(h.shape[1]):
        key = (key * _MIX + h[:, j]) % num_rows
    return key


class UserBias(nn.Module):
    """``num_rows`` x len(``columns``) offsets, added to the logits of the actions ``columns``
    (indices into the ranker's actions; the others get 0).

    ``gain``: the bias is ``gain * weight``, so AdamW (whose step does not scale with the
    gradient) moves it ``gain`` times as fast as the dense weights: a row is seen by a handful
    of steps an epoch. ``shrink``: in eval mode the bias is multiplied by it; the training
    days' offsets, fitted on few impressions per user, overstate how users differ (chosen on
    the validation split, as the gain).

    >>> b = UserBias(16, columns=[1], num_actions=3, gain=2.0, shrink=0.5)
    >>> with torch.no_grad():
    ...     _ = b.weight.fill_(1.0)
    >>> b(torch.tensor([[3, 4]])).tolist()
    [[0.0, 2.0, 0.0]]
    >>> b.eval()(torch.tensor([[3, 4]])).tolist()
    [[0.0, 1.0, 0.0]]
    """

    def __init__(
        self,
        num_rows: int,
        columns: Sequence[int],
        num_actions: int,
        gain: float = 1.0,
        shrink: float = 1.0,
    ) -> None:
        super().__init__()
        cols = list(columns)
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if not cols or len(set(cols)) != len(cols) or not all(0 <= c < num_actions for c in cols):
            raise ValueError(
                f"columns must be distinct action indices in [0, {num_actions}), got {cols}"
            )
        self.num_rows, self.num_actions = num_rows, num_actions
        self.gain, self.shrink = float(gain), float(shrink)
        self.all_columns = cols == list(range(num_actions))
        self.weight = nn.Parameter(torch.zeros(num_rows, len(cols)))  # no offset to begin with
        self.register_buffer("columns", torch.tensor(cols, dtype=torch.long), persistent=False)

    @property
    def num_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def forward(self, user_hashes: torch.Tensor) -> torch.Tensor:
        """[B, K] user table rows -> [B, num_actions] logit offsets (0 for a padding user:
        first row 0, e.g. a request without a user ID)."""
        rows = user_bias_rows(user_hashes, self.num_rows)
        scale = self.gain * (1.0 if self.training else self.shrink)
        present = (user_hashes[:, :1] != 0).to(self.weight.dtype)
        b = self.weight.index_select(0, rows) * (scale * present)
        if self.all_columns:
            return b
        return b.new_zeros(b.shape[0], self.num_actions).index_copy(1, self.columns, b)
