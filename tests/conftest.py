"""Shared fixtures: tiny configs and batches."""

from __future__ import annotations

import pytest
import torch

from hashrec import HashConfig, RecsysBatch


def make_batch(
    cfg: HashConfig, B: int = 3, S: int = 5, C: int = 4, A: int = 19, seed: int = 0
) -> RecsysBatch:
    """A random valid batch with some padding in history and candidates."""
    g = torch.Generator().manual_seed(seed)

    def rows(entity: str, *shape: int) -> torch.Tensor:
        ids = torch.randint(1, 10_000, shape, generator=g)
        return cfg.rows_torch(entity, ids)

    hp, ha = rows("post", B, S), rows("author", B, S)
    cp, ca = rows("post", B, C), rows("author", B, C)
    hp[0, -2:] = 0
    ha[0, -2:] = 0
    cp[1, -1] = 0
    ca[1, -1] = 0
    actions = (torch.rand(B, S, A, generator=g) < 0.2).float()
    actions[0, -2:] = 0
    return RecsysBatch(
        user_hashes=rows("user", B),
        history_post_hashes=hp,
        history_author_hashes=ha,
        history_actions=actions,
        history_product_surface=torch.randint(0, 16, (B, S), generator=g),
        candidate_post_hashes=cp,
        candidate_author_hashes=ca,
        candidate_product_surface=torch.randint(0, 16, (B, C), generator=g),
    )


@pytest.fixture
def small_config() -> HashConfig:
    return HashConfig.uniform(num_buckets=97, num_hashes=2)
