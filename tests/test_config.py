import numpy as np
import pytest
import torch

from hashrec import EntityHash, HashConfig


def test_phoenix_layout_matches_x():
    cfg = HashConfig.phoenix()
    # Phoenix's HashTable: offset_user = 1 + 64, then user, item, author blocks
    assert cfg.offset("user") == 65
    assert cfg.offset("post") == 65 + 100_000
    assert cfg.offset("author") == 65 + 200_000
    assert cfg.num_rows == 65 + 210_000
    assert cfg.row_range("author") == (200_066, 210_064)


def test_rows_add_offsets_and_keep_padding():
    cfg = HashConfig.phoenix(post=1000)
    ids = np.array([[0, 5], [7, 0]])
    rows = cfg.rows("post", ids)
    assert rows.shape == (2, 2, 2)
    assert (rows[0, 0] == 0).all() and (rows[1, 1] == 0).all()
    local = cfg["post"].hash(ids)
    np.testing.assert_array_equal(rows[0, 1], local[0, 1] + cfg.offset("post"))
    lo, hi = cfg.row_range("post")
    nz = rows[rows != 0]
    assert nz.min() >= lo and nz.max() <= hi
    np.testing.assert_array_equal(rows, cfg.rows_torch("post", torch.from_numpy(ids)).numpy())


def test_uniform_and_roundtrip():
    cfg = HashConfig.uniform(num_buckets=50, num_hashes=3, scheme="default", seed=4)
    assert [e.num_hashes for e in cfg.entities] == [3, 3, 3]
    assert HashConfig.from_dict(cfg.to_dict()) == cfg
    ph = HashConfig.uniform(num_buckets=50, num_hashes=1, scheme="phoenix")
    assert ph["post"].scheme == "phoenix" and HashConfig.from_dict(ph.to_dict()) == ph


def test_bad_configs():
    with pytest.raises(ValueError, match="num_hashes"):
        EntityHash("post", num_hashes=0)
    with pytest.raises(ValueError, match="num_buckets"):
        EntityHash("post", num_buckets=1)
    with pytest.raises(ValueError, match="3 scales"):
        EntityHash("post", 3, 100, "phoenix", (1, 2), (1, 2), 101)
    with pytest.raises(ValueError, match="scheme"):
        EntityHash("post", scheme="md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a 'author'"):
        HashConfig(entities=(EntityHash("user"), EntityHash("post")))
    with pytest.raises(ValueError, match="unique"):
        HashConfig(
            entities=(
                EntityHash("user"),
                EntityHash("post"),
                EntityHash("author"),
                EntityHash("post"),
            )
        )
    with pytest.raises(ValueError, match="unknown entity"):
        HashConfig.phoenix(item=10)
    with pytest.raises(KeyError, match="no entity 'ip'"):
        HashConfig().offset("ip")


def test_extra_entity_types_get_their_own_block():
    ents = (
        EntityHash("user"),
        EntityHash("post"),
        EntityHash("author"),
        EntityHash("ip", 2, 500, seed=9),
    )
    cfg = HashConfig(entities=ents)
    assert cfg.offset("ip") == cfg.offset("author") + 100_000
    assert cfg.num_rows == cfg.offset("ip") + 500
