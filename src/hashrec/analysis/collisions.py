"""Collision analysis: the birthday view of hashing n IDs k times into N buckets.

The lecture's "collision probability drops from 1/V to 1/V^k" is only the chance that two *given*
IDs agree on all k hashes. What matters for a table is, among n IDs:

* ``full_ids``: IDs whose ordered k-tuple of rows equals another ID's. The model cannot tell such
  IDs apart (Phoenix concatenates the k vectors in hash order before ``proj_mat``).
* ``any_frac``: the fraction of IDs that share at least one row with another ID (their vectors
  are partly trained by someone else's gradients).
* ``full_pairs``: pairs of IDs with identical k-tuples.

Two layouts: ``separate`` (the lecture: one table per hash) and ``fused`` (Phoenix: the k hashes
of one entity type land in the same block of N rows, so hash 1 of one ID can share a row with
hash 2 of another). Expected values are exact for independent, uniform hashes over the
M = N - 1 non-padding rows; ``measure`` counts the same things for a real ID set through the real
hasher. A linear hash like Phoenix's, (a*id + b) mod p, is not random on sequential IDs, so the
two can differ a lot: that gap is what the table and plot show.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from hashrec.hashing.config import EntityHash

__all__ = [
    "CollisionStats",
    "StudyRow",
    "entity_for",
    "expected",
    "format_table",
    "lecture_pair_probability",
    "measure",
    "plot_study",
    "study",
]

Layout = Literal["fused", "separate"]


@dataclass(frozen=True)
class CollisionStats:
    """Collision counts for n distinct IDs, k hashes, N buckets (expected or measured).

    >>> s = measure(np.arange(1, 101), EntityHash("ids", num_hashes=2, num_buckets=50))
    >>> s.n, 0.0 <= s.full_frac <= s.any_frac <= 1.0
    (100, True)
    """

    n: int
    k: int
    num_buckets: int
    layout: str
    full_ids: float
    any_frac: float
    full_pairs: float

    @property
    def full_frac(self) -> float:
        return self.full_ids / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "full_frac": self.full_frac}


def _pow1m(p: float, m: float) -> float:
    """(1 - p) ** m, accurate for tiny p and huge m."""
    if p >= 1.0:
        return 0.0 if m > 0 else 1.0
    return math.exp(m * math.log1p(-p))


def _distinct_rows_pmf(k: int, M: int) -> list[float]:
    """P(k uniform draws from M rows hit exactly r distinct rows), r = 0..k (Stirling numbers)."""
    stirling = [[0] * (k + 1) for _ in range(k + 1)]
    stirling[0][0] = 1
    for i in range(1, k + 1):
        for r in range(1, i + 1):
            stirling[i][r] = r * stirling[i - 1][r] + stirling[i - 1][r - 1]
    pmf = []
    for r in range(k + 1):
        falling = math.prod(range(M - r + 1, M + 1)) if r <= M else 0
        pmf.append(stirling[k][r] * falling / M**k)
    return pmf


def lecture_pair_probability(k: int, num_buckets: int) -> float:
    """The lecture's 1/V^k: chance that two given IDs agree on every hash (V = N - 1 rows)."""
    return float((num_buckets - 1) ** -k)


def expected(n: int, k: int, num_buckets: int, layout: Layout = "fused") -> CollisionStats:
    """Exact expectations for n distinct IDs under independent uniform hashes into 1..N-1.

    >>> s = expected(n=1000, k=2, num_buckets=1001)
    >>> round(s.full_pairs, 4)  # C(1000, 2) / 1000^2
    0.4995
    """
    if n < 0 or k < 1 or num_buckets < 2:
        raise ValueError(f"need n >= 0, k >= 1, num_buckets >= 2; got {n}, {k}, {num_buckets}")
    if layout not in ("fused", "separate"):
        raise ValueError(f"layout must be 'fused' or 'separate', got {layout!r}")
    M = num_buckets - 1
    p_full = float(M) ** -k
    full_pairs = n * (n - 1) / 2 * p_full
    full_ids = n * (1.0 - _pow1m(p_full, n - 1))
    if layout == "separate":
        # Hash j of the others is uniform over table j, independently per j.
        alone = _pow1m(1.0 / M, k * (n - 1))
    else:
        # Each of the other n-1 IDs throws k rows into the same block: all must miss my r rows.
        alone = sum(
            pr * _pow1m(r / M, k * (n - 1)) for r, pr in enumerate(_distinct_rows_pmf(k, M))
        )
    return CollisionStats(n, k, num_buckets, layout, full_ids, 1.0 - alone, full_pairs)


def measure(ids: np.ndarray, entity: EntityHash, layout: Layout = "fused") -> CollisionStats:
    """Hash the distinct non-zero IDs with ``entity`` and count collisions exactly."""
    if layout not in ("fused", "separate"):
        raise ValueError(f"layout must be 'fused' or 'separate', got {layout!r}")
    uniq = np.unique(np.asarray(ids))
    uniq = uniq[uniq != 0] if uniq.dtype.kind in "iu" else uniq
    n, k = len(uniq), entity.num_hashes
    if n == 0:
        return CollisionStats(0, k, entity.num_buckets, layout, 0.0, 0.0, 0.0)
    h = entity.hash(uniq)  # [n, k] in 1..N-1
    _, inverse, counts = np.unique(h, axis=0, return_inverse=True, return_counts=True)
    per_id = counts[inverse.reshape(-1)]
    full_ids = float((per_id > 1).sum())
    full_pairs = float((counts * (counts - 1) // 2).sum())
    rows = h if layout == "fused" else h + np.arange(k) * entity.num_buckets  # table j apart
    owner = np.repeat(np.arange(n), k)
    pairs = np.unique(np.stack([rows.reshape(-1), owner], axis=1), axis=0)  # (row, id) once
    row_ids, users = np.unique(pairs[:, 0], return_counts=True)
    shared_rows = row_ids[users > 1]
    shared = np.zeros(n, dtype=bool)
    shared[pairs[np.isin(pairs[:, 0], shared_rows), 1]] = True
    return CollisionStats(
        n, k, entity.num_buckets, layout, full_ids, float(shared.mean()), full_pairs
    )


@dataclass(frozen=True)
class StudyRow:
    """One (ID set, scheme, k, N) point: theory next to measurement.

    >>> row = study({"ids": np.arange(1, 101)}, buckets=[1000], hashes=[2], schemes=["default"])[0]
    >>> row.measured.n, row.theory.n, row.scheme
    (100, 100, 'default')
    """

    id_set: str
    scheme: str
    theory: CollisionStats
    measured: CollisionStats

    def to_dict(self) -> dict:
        return {
            "id_set": self.id_set,
            "scheme": self.scheme,
            "theory": self.theory.to_dict(),
            "measured": self.measured.to_dict(),
            "lecture_pair_probability": lecture_pair_probability(
                self.theory.k, self.theory.num_buckets
            ),
        }


def entity_for(scheme: str, k: int, num_buckets: int, seed: int = 0) -> EntityHash | None:
    """The hasher of one study point; None where the scheme has no k-th hash (phoenix, k > 2)."""
    from hashrec.hashing.config import PHOENIX_ENTITIES

    if scheme == "default":
        return EntityHash("ids", k, num_buckets, "default", seed=seed)
    if scheme.startswith("phoenix-"):
        base = PHOENIX_ENTITIES[scheme.removeprefix("phoenix-")]
        if k > len(base.scales):
            return None
        return EntityHash("ids", k, num_buckets, "phoenix", base.scales, base.biases, base.modulus)
    raise ValueError(f"scheme must be 'default' or 'phoenix-user/post/author', got {scheme!r}")


def study(
    id_sets: dict[str, np.ndarray],
    buckets: list[int],
    hashes: list[int],
    schemes: list[str],
    layout: Layout = "fused",
    seed: int = 0,
) -> list[StudyRow]:
    """Theory and measurement for every ID set x scheme x k x N."""
    rows = []
    for name, ids in id_sets.items():
        for scheme in schemes:
            for k in hashes:
                for N in buckets:
                    ent = entity_for(scheme, k, N, seed)
                    if ent is None:
                        continue
                    m = measure(ids, ent, layout)
                    rows.append(StudyRow(name, scheme, expected(m.n, k, N, layout), m))
    return rows


def format_table(rows: list[StudyRow]) -> str:
    """Markdown table: expected vs measured, per ID set, scheme, k and N."""
    head = (
        "| IDs | scheme | n | k | N | identical k-tuple: expected | measured "
        "| share >= 1 row: expected | measured | lecture 1/V^k |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        t, m = r.theory, r.measured
        lines.append(
            f"| {r.id_set} | {r.scheme} | {m.n:,} | {m.k} | {m.num_buckets:,} "
            f"| {t.full_ids:,.1f} ({t.full_frac:.2%}) | {m.full_ids:,.0f} ({m.full_frac:.2%}) "
            f"| {t.any_frac:.2%} | {m.any_frac:.2%} "
            f"| {lecture_pair_probability(m.k, m.num_buckets):.1e} |"
        )
    return "\n".join(lines)


def plot_study(rows: list[StudyRow], path: str) -> None:
    """PNG: share-a-row and identical-tuple fractions against N, theory lines, measured markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    id_sets = sorted({r.id_set for r in rows})
    fig, axes = plt.subplots(
        2, len(id_sets), figsize=(6 * len(id_sets), 8), squeeze=False, sharex="col"
    )
    metrics = (("any_frac", "IDs sharing >= 1 row"), ("full_frac", "IDs with an identical k-tuple"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, name in enumerate(id_sets):
        sub = [r for r in rows if r.id_set == name]
        groups = sorted({(r.scheme, r.measured.k) for r in sub})
        for row_i, (attr, label) in enumerate(metrics):
            ax = axes[row_i][col]
            theory_done: set[int] = set()
            for gi, (scheme, k) in enumerate(groups):
                pts = sorted(
                    (r for r in sub if r.scheme == scheme and r.measured.k == k),
                    key=lambda r: r.measured.num_buckets,
                )
                xs = [r.measured.num_buckets for r in pts]
                c = colors[k % len(colors)]
                if k not in theory_done:
                    ax.plot(
                        xs,
                        [getattr(r.theory, attr) for r in pts],
                        "-",
                        color=c,
                        alpha=0.6,
                        label=f"theory k={k}",
                    )
                    theory_done.add(k)
                marker = "o" if scheme == "default" else "x"
                ax.plot(
                    xs,
                    [getattr(r.measured, attr) for r in pts],
                    marker,
                    color=c,
                    linestyle="none",
                    label=f"measured {scheme} k={k}",
                    markersize=6 + gi % 2,
                )
            ax.set_xscale("log")
            ax.set_yscale("symlog", linthresh=1e-4)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{name}: {label} (n = {sub[0].measured.n:,})")
            ax.set_xlabel("buckets N per hash")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Hash collisions, {rows[0].measured.layout} layout: theory vs measurement")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
