"""Table layouts: how one entity's raw IDs become rows of its block in the fused table.

Every layout owns a contiguous block of ``EntityHash.block_rows`` rows; block-local index 0 is
padding (an ID of 0), hashed rows are 1 .. N-1 (N = ``num_buckets``) and a layout's extra rows
follow at N .. N + extra - 1. An ID yields ``num_slots`` block-local indices:

* ``multihash`` (Phoenix): k hashes into the N rows; k slots.
* ``hybrid`` (frequency-aware, Zhang et al. 2020): the IDs of ``head_ids`` (the most frequent
  on training days, sorted) own one private row each, at N + their rank in ``head_ids``, repeated
  in all k slots; every other ID (the tail, and IDs first seen after training) is multi-hashed.
* ``qr`` (quotient-remainder, Shi et al. 2020): the ID is mixed into u in [0, Q * (N - 1)), then
  slot 0 is the remainder row 1 + u mod (N - 1) and slot 1 the quotient row N + u // (N - 1)
  (Q = ``extra_rows``); two IDs share both rows only if their u collide. Two slots. Past 2^31
  values of u (the hash's range), remainder and quotient come from two independent hashes:
  the same uniform pairs.
* ``weighted`` (hash embeddings with importance weights, Svenstrup et al. 2017): k hashes into
  the N component rows, plus one slot naming an importance-weight row N + (hash mod W)
  (W = ``extra_rows``). A weight row of D columns packs G = D // k weight vectors of k entries;
  the model picks group ``(sum of the k component rows) mod G`` and scales component j by
  ``1 + w_j`` (``hashrec.nn.layouts``). k + 1 slots.

Numpy in, numpy out; no Python loop per ID.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from hashrec.hashing.functions import default_hash, ids_to_int64

if TYPE_CHECKING:
    from hashrec.hashing.config import EntityHash

__all__ = ["LAYOUTS", "Layout", "local_indices", "local_indices_reference"]

Layout = Literal["multihash", "hybrid", "qr", "weighted"]
LAYOUTS: tuple[str, ...] = ("multihash", "hybrid", "qr", "weighted")

# Seed offsets of the layouts' own hashes, apart from the entity's k hash functions.
_QR_SALT = 0x5152
_WEIGHT_SALT = 0x4957
_QR_ONE_HASH = 2**31 - 1  # below this Q (N - 1), u is one hash; above, q and r hash apart


def _mixed(entity: EntityHash, ids: np.ndarray, salt: int, buckets: int) -> np.ndarray:
    """A well-mixed hash of ``ids`` in 1 .. buckets - 1 (ID 0 -> 0), independent of the k."""
    return default_hash(ids, 1, buckets, seed=entity.seed + salt)[..., 0]


def local_indices(entity: EntityHash, ids: np.ndarray | list) -> np.ndarray:
    """Block-local indices of raw ``ids``: int64 ``ids.shape + (num_slots,)``, 0 = padding."""
    x = ids_to_int64(ids) if entity.scheme != "identity" else np.asarray(ids, dtype=np.int64)
    if entity.layout == "multihash":
        return entity.hash(x)
    N = entity.num_buckets
    if entity.layout == "hybrid":
        h = entity.hash(x)
        head = entity.head_array
        pos = np.searchsorted(head, x)
        pos_c = np.minimum(pos, max(len(head) - 1, 0))
        is_head = (x != 0) & (len(head) > 0)
        if len(head):
            is_head &= head[pos_c] == x
        return np.where(is_head[..., None], N + pos_c[..., None], h)
    if entity.layout == "qr":
        Q = entity.extra_rows
        if Q * (N - 1) < _QR_ONE_HASH:
            u = _mixed(entity, x, _QR_SALT, Q * (N - 1) + 1) - 1  # 0 .. Q(N-1)-1
            r, q = u % (N - 1), u // (N - 1)
        else:  # u past the hash's range: two independent hashes give the same uniform pairs
            r = _mixed(entity, x, _QR_SALT, N) - 1
            q = _mixed(entity, x, _QR_SALT + 1, Q + 1) - 1
        out = np.stack([1 + r, N + q], axis=-1)
        out[x == 0] = 0
        return out
    if entity.layout == "weighted":
        h = entity.hash(x)
        w = _mixed(entity, x, _WEIGHT_SALT, entity.extra_rows + 1)  # 1 .. W
        w = np.where(x == 0, 0, N - 1 + w)
        return np.concatenate([h, w[..., None]], axis=-1)
    raise ValueError(f"{entity.name}: layout must be one of {LAYOUTS}, got {entity.layout!r}")


def local_indices_reference(entity: EntityHash, ids: list[int]) -> list[list[int]]:
    """``local_indices`` one ID at a time, straight from the definitions above (for tests)."""
    N, out = entity.num_buckets, []
    for i in ids:
        if i == 0:
            out.append([0] * entity.num_slots)
            continue
        h = [int(v) for v in entity.hash(np.array([i]))[0]]
        if entity.layout == "multihash":
            out.append(h)
        elif entity.layout == "hybrid":
            head = list(entity.head_ids)
            out.append([N + head.index(i)] * entity.num_hashes if i in head else h)
        elif entity.layout == "qr":
            Q, s = entity.extra_rows, entity.seed + _QR_SALT
            if Q * (N - 1) < _QR_ONE_HASH:
                u = int(default_hash(np.array([i]), 1, Q * (N - 1) + 1, s)[0, 0]) - 1
                r, q = u % (N - 1), u // (N - 1)
            else:
                r = int(default_hash(np.array([i]), 1, N, s)[0, 0]) - 1
                q = int(default_hash(np.array([i]), 1, Q + 1, s + 1)[0, 0]) - 1
            out.append([1 + r, N + q])
        else:
            W = entity.extra_rows
            w = int(default_hash(np.array([i]), 1, W + 1, entity.seed + _WEIGHT_SALT)[0, 0])
            out.append([*h, N - 1 + w])
    return out
