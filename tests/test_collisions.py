import itertools

import numpy as np
import pytest

from hashrec import EntityHash
from hashrec.analysis.collisions import (
    expected,
    format_table,
    lecture_pair_probability,
    measure,
    plot_study,
    study,
)


def _count(tuples, layout):
    """Naive counts for one assignment of k-tuples (lists of rows) to n IDs."""
    n = len(tuples)
    full_ids = sum(any(tuples[i] == tuples[j] for j in range(n) if j != i) for i in range(n))
    full_pairs = sum(tuples[i] == tuples[j] for i in range(n) for j in range(i + 1, n))

    def rows(t):
        return set(t) if layout == "fused" else set(enumerate(t))

    shared = sum(
        any(rows(tuples[i]) & rows(tuples[j]) for j in range(n) if j != i) for i in range(n)
    )
    return full_ids, shared / n, full_pairs


@pytest.mark.parametrize("layout", ["fused", "separate"])
@pytest.mark.parametrize(("n", "k", "M"), [(3, 2, 3), (2, 3, 2), (4, 1, 3), (3, 3, 2)])
def test_expected_is_exact_by_enumeration(layout, n, k, M):
    """Average over every equally likely assignment of hashes equals the closed form."""
    per_id = list(itertools.product(range(M), repeat=k))
    totals = np.zeros(3)
    count = 0
    for assignment in itertools.product(per_id, repeat=n):
        totals += _count(list(assignment), layout)
        count += 1
    want = totals / count
    got = expected(n, k, M + 1, layout)
    np.testing.assert_allclose([got.full_ids, got.any_frac, got.full_pairs], want, rtol=1e-12)


def test_lecture_number_is_only_the_pair_probability():
    s = expected(n=10_000, k=2, num_buckets=10_001)
    assert lecture_pair_probability(2, 10_001) == pytest.approx(1e-8)
    # 1e-8 per pair, but ~0.5 colliding pairs and >90% of IDs share a row in a fused block
    assert s.full_pairs == pytest.approx(10_000 * 9_999 / 2 * 1e-8)
    assert s.any_frac > 0.9


def _naive_measure(ids, ent, layout):
    ids = sorted(set(int(i) for i in ids) - {0})
    tuples = [tuple(ent.hash(np.array([i]))[0].tolist()) for i in ids]
    return _count(tuples, layout)


@pytest.mark.parametrize("layout", ["fused", "separate"])
@pytest.mark.parametrize("scheme", ["default", "phoenix"])
def test_measure_matches_naive_count(layout, scheme):
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(0, 5000, 150), [0, 0, 7, 7]])
    if scheme == "default":
        ent = EntityHash("x", 2, 40, "default", seed=1)
    else:
        ent = EntityHash(
            "x", 2, 40, "phoenix", (2161410491, 1754358832), (1935840681, 167407236), 2361375383
        )
    m = measure(ids, ent, layout)
    full_ids, any_frac, full_pairs = _naive_measure(ids, ent, layout)
    assert m.n == len(set(ids.tolist()) - {0})
    assert (m.full_ids, m.full_pairs) == (full_ids, full_pairs)
    assert m.any_frac == pytest.approx(any_frac)


def test_random_hash_measurement_agrees_with_theory():
    ids = np.arange(1, 20_001)
    for k in (1, 2, 3):
        m = measure(ids, EntityHash("x", k, 20_000, seed=5))
        t = expected(m.n, k, 20_000)
        assert abs(m.any_frac - t.any_frac) < 0.02
        assert abs(m.full_ids - t.full_ids) < 5 * np.sqrt(t.full_ids + 1)


def test_study_table_and_plot(tmp_path):
    rows = study({"seq": np.arange(1, 3000)}, [500, 5000], [1, 2, 3], ["default", "phoenix-post"])
    assert len(rows) == 2 * 3 + 2 * 2  # phoenix has no third hash
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "phoenix-post" in table
    plot_study(rows, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="layout"):
        expected(10, 2, 100, "tables")  # type: ignore[arg-type]
