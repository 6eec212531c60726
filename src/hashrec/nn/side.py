"""Side features of users and posts: their container and the reducer that folds them into tokens.

Phoenix's newer model sums extra hashed user fields into the user token and adds continuous and
post-age embeddings; here every categorical side field is hashed into the fused table's
``feature`` block (k rows per value), numeric fields arrive as standardised log values, and
``SideReduce`` projects both to one D-vector that is *added* to the user / history / candidate
token. History events also carry continuous signals (e.g. play time / duration).

Glossary: B batch, S history length, C candidates, K hashes, D width; Fu / Fp categorical user /
post fields, Nu / Np numeric user / post fields, Ah history signals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

__all__ = ["SideBatch", "SideConfig", "SideReduce"]


@dataclass(frozen=True)
class SideConfig:
    """How many side fields the model takes (all 0: no side features).

    >>> SideConfig(user_fields=2, post_numeric=1).any
    True
    """

    user_fields: int = 0
    post_fields: int = 0
    user_numeric: int = 0
    post_numeric: int = 0
    history_signals: int = 0

    def __post_init__(self) -> None:
        bad = {k: v for k, v in asdict(self).items() if v < 0}
        if bad:
            raise ValueError(f"side feature counts must be >= 0, got {bad}")

    @property
    def any(self) -> bool:
        return any(asdict(self).values())


@dataclass
class SideBatch:
    """Side inputs of one batch, passed alongside its ``RecsysBatch``.

    user_feature_rows [B, Fu, K] int (fused-table rows, 0 = missing); user_numeric [B, Nu];
    history_signals [B, S, Ah]; candidate_feature_rows [B, C, Fp, K]; candidate_numeric
    [B, C, Np] (floats). History events carry their post's identity through the post and
    author hashes and their continuous signals here; their post's side fields are left out
    (they would triple the table gathers for little: the candidate side is where they count).

    >>> b = SideBatch.empty(2, 3, 4)
    >>> b.candidate_feature_rows.shape, b.config()
    (torch.Size([2, 4, 0, 1]), SideConfig(user_fields=0, post_fields=0, user_numeric=0, post_numeric=0, history_signals=0))
    """  # noqa: E501

    user_feature_rows: torch.Tensor
    user_numeric: torch.Tensor
    history_signals: torch.Tensor
    candidate_feature_rows: torch.Tensor
    candidate_numeric: torch.Tensor

    @classmethod
    def empty(cls, B: int, S: int, C: int) -> SideBatch:
        i, f = torch.int64, torch.float32
        return cls(torch.zeros(B, 0, 1, dtype=i), torch.zeros(B, 0, dtype=f),
                   torch.zeros(B, S, 0, dtype=f), torch.zeros(B, C, 0, 1, dtype=i),
                   torch.zeros(B, C, 0, dtype=f))  # fmt: skip

    def config(self) -> SideConfig:
        return SideConfig(self.user_feature_rows.shape[1], self.candidate_feature_rows.shape[2],
                          self.user_numeric.shape[1], self.candidate_numeric.shape[2],
                          self.history_signals.shape[2])  # fmt: skip

    def validate(self, config: SideConfig, B: int, S: int, C: int) -> SideBatch:
        """Check every field's shape against the model's ``SideConfig`` and the batch's B, S, C."""
        expected = {
            "user_feature_rows": (B, config.user_fields),
            "user_numeric": (B, config.user_numeric),
            "history_signals": (B, S, config.history_signals),
            "candidate_feature_rows": (B, C, config.post_fields),
            "candidate_numeric": (B, C, config.post_numeric),
        }
        for name, exp in expected.items():
            t = getattr(self, name)
            got = tuple(t.shape[: len(exp)])
            if got != exp or t.dim() != len(exp) + name.endswith("_rows"):
                raise ValueError(f"side.{name} has shape {list(t.shape)}, expected {list(exp)}"
                                 + (" + [K]" if name.endswith("_rows") else ""))  # fmt: skip
            if name.endswith("_rows") and t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"side.{name} has dtype {t.dtype}, expected int32 or int64")
        return self

    def to(self, device: torch.device | str) -> SideBatch:
        return SideBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class SideReduce(nn.Module):
    """Categorical embeddings [..., F, K, D] and numeric values [..., N] -> one vector [..., D].

    concat(flattened embeddings, numeric) @ ``proj``: added to a token, as Phoenix sums extra
    hashed fields into its user token. Missing values (row 0) embed to zero.

    >>> red = SideReduce(num_fields=3, num_hashes=2, num_numeric=1, dim=8)
    >>> red(torch.randn(4, 3, 2, 8), torch.randn(4, 1)).shape
    torch.Size([4, 8])
    """

    def __init__(self, num_fields: int, num_hashes: int, num_numeric: int, dim: int) -> None:
        super().__init__()
        self.num_fields, self.num_hashes, self.num_numeric = num_fields, num_hashes, num_numeric
        in_dim = num_fields * num_hashes * dim + num_numeric
        self.proj = nn.Parameter(torch.randn(in_dim, dim) / max(in_dim, 1) ** 0.5)

    def forward(self, embeddings: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        *lead, F, K, D = embeddings.shape
        if (F, K) != (self.num_fields, self.num_hashes) or numeric.shape[-1] != self.num_numeric:
            raise ValueError(
                f"side inputs have (F, K, N) = {(F, K, numeric.shape[-1])}, expected "
                f"{(self.num_fields, self.num_hashes, self.num_numeric)}"
            )
        x = torch.cat([embeddings.reshape(*lead, F * K * D).to(self.proj.dtype),
                       numeric.to(self.proj.dtype)], dim=-1)  # fmt: skip  # [..., F*K*D + N]
        return x @ self.proj
