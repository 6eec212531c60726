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


def without_candidates(batch: RecsysBatch) -> RecsysBatch:
    """The same user and history, no candidates (what the two-tower user tower takes)."""
    return RecsysBatch(batch.user_hashes, batch.history_post_hashes, batch.history_author_hashes,
                       batch.history_actions, batch.history_product_surface)  # fmt: skip


@pytest.fixture
def small_config() -> HashConfig:
    return HashConfig.uniform(num_buckets=97, num_hashes=2)


SCHEMA_JSON = (
    '{"user": "uid", "post": "item", "author": "creator", "surface": "tab", "time": "ts",'
    ' "time_unit": "s", "actions": {"click": "clicked", "like": "liked", "hate": "hated"},'
    ' "negative_actions": ["hate"], "continuous": {"dwell_time": ["watch_ms", 1000.0]}}'
)


def write_synthetic_log(path, n_users=40, n_posts=120, days=6, seed=0) -> None:
    """A small log with learnable structure: users like some posts more than others."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    t0 = 1_650_844_800  # 2022-04-25 00:00 UTC
    taste = rng.normal(size=(n_users + 1, 4))
    style = rng.normal(size=(n_posts + 1, 4))
    for u in range(1, n_users + 1):
        n = rng.integers(10, 30)
        times = np.sort(rng.integers(t0, t0 + days * 86400, n))
        for t in times:
            p = int(rng.integers(1, n_posts + 1))
            logit = taste[u] @ style[p] - 0.5
            click = int(rng.random() < 1 / (1 + np.exp(-logit)))
            like = int(click and rng.random() < 0.3)
            hate = int(not click and rng.random() < 0.02)
            rows.append(
                (
                    u,
                    p,
                    p % 17 + 1,
                    int(rng.integers(0, 3)),
                    int(t),
                    click,
                    like,
                    hate,
                    int(rng.integers(0, 60_000)),
                )
            )
    header = "uid,item,creator,tab,ts,clicked,liked,hated,watch_ms\n"
    path.write_text(header + "".join(",".join(map(str, r)) + "\n" for r in rows))


@pytest.fixture
def log_file(tmp_path):
    """A synthetic log file (``write_synthetic_log``'s defaults) in the test's folder."""
    path = tmp_path / "log.csv"
    write_synthetic_log(path)
    return path


def cli_error(argv: list[str], capsys, code: int) -> str:
    """Run the CLI expecting it to fail with ``code``; return what it printed to stderr."""
    from hashrec.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, (e.value.code, err)
    assert "Traceback" not in err
    return err
