import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hashrec.hashing.config import PHOENIX_ENTITIES
from hashrec.hashing.functions import (
    default_hash,
    default_hash_torch,
    ids_to_int64,
    phoenix_hash,
    phoenix_hash_reference,
    phoenix_hash_torch,
)

IDS = [0, 1, 7582, 7349781, 2**62 + 12345, 2**63 - 1, -1, -(2**63), 2**60 + 987654321]
# Computed with Python integers emulating int64 wrap-around (see _bigint_phoenix below).
XXH64_ALICE = 0x73A3EA485F2E6049
GOLDEN = {
    "user": [
        [0, 0],
        [4710, 35698],
        [52452, 19469],
        [53045, 13255],
        [76800, 85374],
        [15371, 79616],
        [15371, 79616],
        [60040, 8911],
        [69575, 68223],
    ],
    "post": [
        [0, 0],
        [93148, 85286],
        [43474, 39907],
        [79365, 24332],
        [25174, 66319],
        [46071, 31532],
        [26932, 31532],
        [41904, 8911],
        [48356, 82527],
    ],
    "author": [
        [0, 0],
        [3211, 1947],
        [3933, 8027],
        [323, 3557],
        [7918, 8047],
        [796, 9263],
        [796, 9263],
        [231, 8832],
        [8477, 761],
    ],
}


def _bigint_phoenix(i, scales, biases, modulus, n):
    def wrap(x):
        return ((x + 2**63) % 2**64) - 2**63

    return [
        0 if i == 0 else wrap(i * s + b) % modulus % (n - 1) + 1
        for s, b in zip(scales, biases, strict=True)
    ]


def _args(name):
    e = PHOENIX_ENTITIES[name]
    return e.scales, e.biases, e.modulus, e.num_buckets


@pytest.mark.parametrize("name", ["user", "post", "author"])
def test_phoenix_golden_vectors(name):
    ids = np.array(IDS, dtype=np.int64)
    got = phoenix_hash(ids, *_args(name))
    assert got.dtype == np.int64 and got.shape == (len(IDS), 2)
    assert got.tolist() == GOLDEN[name]
    assert [_bigint_phoenix(i, *_args(name)) for i in IDS] == GOLDEN[name]
    assert PHOENIX_ENTITIES[name].hash(ids).tolist() == GOLDEN[name]


def test_product_wraps_above_2_62():
    s, b, m, n = _args("post")
    i = 2**62 + 12345
    assert i * s[0] > 2**63  # the product overflows int64: wrap-around is part of the function
    assert phoenix_hash(np.array([i]), s, b, m, n)[0].tolist() == _bigint_phoenix(i, s, b, m, n)


def test_fast_path_matches_plain_formula_and_torch():
    rng = np.random.default_rng(0)
    ids = np.concatenate(
        [
            rng.integers(-(2**63), 2**63 - 1, 200_000, dtype=np.int64),
            np.arange(-1000, 1000),
            rng.integers(0, 10_000, 1000),
        ]
    )
    for name in ("user", "post", "author"):
        for n in (2, 3, 1000, 100_000, 2**31, 2**32):
            args = (*_args(name)[:3], n)
            fast = phoenix_hash(ids, *args)
            np.testing.assert_array_equal(fast, phoenix_hash_reference(ids, *args))
            np.testing.assert_array_equal(
                fast, phoenix_hash_torch(torch.from_numpy(ids), *args).numpy()
            )
            nz = ids != 0
            assert fast[nz].min() >= 1 and fast[nz].max() <= n - 1
            assert (fast[~nz] == 0).all()


def test_phoenix_shape_and_uint64():
    s, b, m, n = _args("post")
    ids = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    assert phoenix_hash(ids, s, b, m, n).shape == (2, 3, 4, 2)
    big = np.array([2**64 - 1], dtype=np.uint64)  # same bits as int64 -1
    assert (
        phoenix_hash(big, s, b, m, n).tolist() == phoenix_hash(np.array([-1]), s, b, m, n).tolist()
    )


def test_phoenix_bad_input():
    s, b, m, n = _args("post")
    with pytest.raises(ValueError, match="integer array"):
        phoenix_hash(np.array([1.5]), s, b, m, n)
    with pytest.raises(ValueError, match="same non-zero length"):
        phoenix_hash(np.array([1]), s, b[:1], m, n)
    with pytest.raises(ValueError, match="num_buckets"):
        phoenix_hash(np.array([1]), s, b, m, 1)
    with pytest.raises(ValueError, match="modulus"):
        phoenix_hash(np.array([1]), s, b, 2**40, n)
    with pytest.raises(ValueError, match="int32/int64"):
        phoenix_hash_torch(torch.tensor([1.0]), s, b, m, n)


def test_default_numpy_matches_torch_and_range():
    rng = np.random.default_rng(1)
    ids = np.concatenate(
        [rng.integers(-(2**63), 2**63 - 1, 50_000, dtype=np.int64), np.arange(-5, 5)]
    )
    for k, n in ((1, 2), (3, 97), (2, 1_000_000), (4, 2**31)):
        a = default_hash(ids, k, n, seed=7)
        b = default_hash_torch(torch.from_numpy(ids), k, n, seed=7).numpy()
        np.testing.assert_array_equal(a, b)
        nz = ids != 0
        assert a.shape == (ids.size, k) and a[nz].min() >= 1 and a[nz].max() <= n - 1
        assert (a[~nz] == 0).all()


def test_default_is_well_mixed_on_sequential_ids():
    h = default_hash(np.arange(1, 100_001), 2, 1001)
    counts = np.bincount(h[:, 0], minlength=1001)[1:]
    # 100 expected per bucket; a chi-square far beyond 1000 dof would mean poor mixing
    chi2 = ((counts - 100) ** 2 / 100).sum()
    assert 800 < chi2 < 1200
    assert np.corrcoef(h[:, 0], h[:, 1])[0, 1] ** 2 < 1e-3  # the two hashes are unrelated


def test_default_seeds_differ_and_strings_are_stable():
    ids = np.arange(1, 1000)
    assert not np.array_equal(
        default_hash(ids, 2, 1000, seed=0), default_hash(ids, 2, 1000, seed=1)
    )
    s = ids_to_int64(np.array(["alice", "bob", ""], dtype=object))
    assert s[2] == 0 and s[0] != s[1]
    # xxh64(b"alice", seed=0): a fixed published function, never Python's randomised hash()
    assert int(s[0:1].view(np.uint64)[0]) == XXH64_ALICE
    assert default_hash(["alice"], 2, 1000).tolist() == [[870, 316]]
    np.testing.assert_array_equal(
        default_hash(["a", "b"], 2, 100), default_hash(np.array(["a", "b"]), 2, 100)
    )
    with pytest.raises(ValueError, match="integers or strings"):
        ids_to_int64(np.array([1.5]))


def test_same_hashes_in_a_fresh_process():
    code = (
        "import numpy as np; from hashrec.hashing.functions import default_hash, phoenix_hash;"
        "from hashrec.hashing.config import PHOENIX_ENTITIES as P; e = P['post'];"
        "ids = np.array([1, 2**62 + 5, -7]);"
        "print([default_hash(ids, 2, 1000, seed=3).tolist(), default_hash(['x', 'yz'], 2, 1000).tolist(),"
        " phoenix_hash(ids, e.scales, e.biases, e.modulus, 1000).tolist()])"
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    ]
    e = PHOENIX_ENTITIES["post"]
    ids = np.array([1, 2**62 + 5, -7])
    here = [
        default_hash(ids, 2, 1000, seed=3).tolist(),
        default_hash(["x", "yz"], 2, 1000).tolist(),
        phoenix_hash(ids, e.scales, e.biases, e.modulus, 1000).tolist(),
    ]
    assert outs[0] == outs[1] == str(here)


EDGE_IDS = np.array(
    [0, 1, -1, 2, -2, 2**31, 2**32 - 1, 2**32, 2**62, 2**62 + 12345, 2**63 - 1, -(2**63),
     -(2**63) + 1, -(2**62)], dtype=np.int64
)  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_phoenix_fast_path_is_exact_for_every_modulus(seed):
    """Property: the fast path equals the plain formula (and Python integers) for random and
    edge moduli, constants, bucket counts and IDs over the whole documented range."""
    rng = np.random.default_rng(seed)
    moduli = [1, 2, 3, 7, 1000, 2**11 - 1, 2**16 - 1, 2**16, 2**16 + 1, 2**32 - 1]
    moduli += rng.integers(1, 2**32, 4).tolist() + rng.integers(1, 2**12, 4).tolist()
    ids = np.concatenate([EDGE_IDS, rng.integers(-(2**63), 2**63 - 1, 20_000, dtype=np.int64)])
    for m in moduli:
        k = int(rng.integers(1, 4))
        s = rng.integers(-(2**63), 2**63 - 1, k, dtype=np.int64).tolist()
        b = rng.integers(-(2**63), 2**63 - 1, k, dtype=np.int64).tolist()
        n = int(rng.choice([2, 3, 97, 2**20, 2**32, int(rng.integers(2, 2**32))]))
        fast = phoenix_hash(ids, s, b, m, n)
        np.testing.assert_array_equal(fast, phoenix_hash_reference(ids, s, b, m, n), err_msg=m)
        for i in EDGE_IDS.tolist():
            assert fast[EDGE_IDS.tolist().index(i)].tolist() == _bigint_phoenix(i, s, b, m, n)
