"""How much of a log the hybrid layout's private rows cover (``hashrec collisions --hybrid``).

For each entity: the head IDs (the most frequent on training days, ``hashrec.data.tables``), the
share of training impressions whose ID owns a private row, the same share on later days, the IDs
first seen after training (they fall to the hashed tail), and how crowded the tail is: the tail IDs
of the training days that share all k rows with another tail ID.
"""

from __future__ import annotations

import numpy as np

from hashrec.analysis.collisions import measure
from hashrec.data.schema import InteractionLog
from hashrec.hashing.config import HashConfig

__all__ = ["format_hybrid", "hybrid_coverage"]


def hybrid_coverage(
    log: InteractionLog, train_mask: np.ndarray, later_mask: np.ndarray, config: HashConfig
) -> list[dict]:
    """One dict per hybrid entity of ``config`` (see the module docstring for the fields)."""
    out = []
    for e in config.entities:
        if e.layout != "hybrid":
            continue
        ids = getattr(log, e.name)
        train_ids, later_ids = ids[train_mask], ids[later_mask]
        head = e.head_array
        in_head = np.isin(train_ids, head)
        seen = np.unique(train_ids[train_ids != 0])
        tail_ids = np.setdiff1d(seen, head)
        tail = measure(tail_ids, e)  # hash() is the tail's multi-hash, whatever the layout
        out.append({
            "entity": e.name,
            "train_ids": len(seen),
            "private_rows": len(head),
            "tail_rows": int(e.num_buckets - 1),
            "k": e.num_hashes,
            "train_impressions": len(train_ids),
            "train_private": int(in_head.sum()),
            "later_impressions": len(later_ids),
            "later_private": int(np.isin(later_ids, head).sum()),
            "later_unseen_ids": len(np.setdiff1d(np.unique(later_ids[later_ids != 0]), seen)),
            "tail_ids_fully_collided": float(tail.full_ids),
        })  # fmt: skip
    return out


def format_hybrid(rows: list[dict]) -> str:
    """Markdown table of ``hybrid_coverage``."""
    lines = [
        "| entity | training IDs | private rows | tail rows x k | training impressions on a "
        "private row | later impressions on a private row | IDs first seen later "
        "| tail IDs sharing all k rows |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tr = r["train_private"] / max(r["train_impressions"], 1)
        la = r["later_private"] / max(r["later_impressions"], 1)
        lines.append(
            f"| {r['entity']} | {r['train_ids']:,} | {r['private_rows']:,} "
            f"| {r['tail_rows']:,} x {r['k']} "
            f"| {r['train_private']:,} of {r['train_impressions']:,} ({tr:.1%}) "
            f"| {r['later_private']:,} of {r['later_impressions']:,} ({la:.1%}) "
            f"| {r['later_unseen_ids']:,} | {r['tail_ids_fully_collided']:,.0f} |"
        )
    return "\n".join(lines)
