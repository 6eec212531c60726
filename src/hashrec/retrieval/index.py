"""Top-k maximum inner product search over a corpus of post embeddings.

* ``ExactIndex``: exact top-k by chunked matrix products. Memory is bounded by the chunk: the
  scores of B queries against ``chunk_size`` posts at a time, never against the whole corpus.
  Ties are broken by corpus position (the lower position first), the same for every chunk
  size, so results are deterministic.
* ``FaissIndex``: the same interface over faiss (optional extra ``hashrec[retrieval]``): flat
  inner product (exact), IVF-flat and HNSW (approximate).
* ``reference_top_k``: the obviously correct reference (score everything, one stable sort) the
  tests hold ``ExactIndex`` to.

Shapes: corpus [N, D], queries [B, D]; results [B, k]. ``exclude`` names, per query, corpus
positions never to return (e.g. posts the user has already seen). A slot that cannot be filled
(fewer than k posts left after exclusions) holds position -1 and score -inf.

``bias`` [N] (optional, every index): a per-post term added to every query's inner product,
score = q . e + bias, e.g. a popularity prior (``Corpus.log_prior``). Faiss takes it as one more
dimension (the post [e, bias], the query [q, 1]), which is the same inner product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ExactIndex", "FaissIndex", "SearchResult", "reference_top_k"]

Exclusions = Sequence[np.ndarray | torch.Tensor | Sequence[int]] | None


@dataclass
class SearchResult:
    """scores [B, k] float32 (descending per row), indices [B, k] int64 corpus positions (-1:
    no post left to fill the slot).

    >>> r = SearchResult(torch.tensor([[0.9, 0.5]]), torch.tensor([[7, -1]]))
    >>> r.indices[0][r.indices[0] >= 0].tolist()  # the filled slots
    [7]
    """

    scores: torch.Tensor
    indices: torch.Tensor


def _check_corpus(embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
    e = torch.as_tensor(embeddings)
    if e.dim() != 2:
        raise ValueError(f"embeddings has shape {list(e.shape)}, expected [N, D]")
    if not e.is_floating_point():
        raise ValueError(f"embeddings has dtype {e.dtype}, expected a floating dtype")
    if e.numel() and not bool(torch.isfinite(e).all()):
        raise ValueError("embeddings holds NaN or infinite values")
    return e.float().contiguous()


def _check_bias(bias: torch.Tensor | np.ndarray | None, n: int) -> torch.Tensor | None:
    if bias is None:
        return None
    b = torch.as_tensor(bias)
    if b.shape != (n,):
        raise ValueError(f"bias has shape {list(b.shape)}, expected [{n}] (one per post)")
    if not b.is_floating_point():
        raise ValueError(f"bias has dtype {b.dtype}, expected a floating dtype")
    if b.numel() and not bool(torch.isfinite(b).all()):
        raise ValueError("bias holds NaN or infinite values")
    return b.float().contiguous()


def _check_query(queries: torch.Tensor | np.ndarray, dim: int, n: int, k: int) -> torch.Tensor:
    q = torch.as_tensor(queries)
    if q.dim() != 2 or q.shape[1] != dim:
        raise ValueError(f"queries has shape {list(q.shape)}, expected [B, {dim}]")
    if not q.is_floating_point():
        raise ValueError(f"queries has dtype {q.dtype}, expected a floating dtype")
    if q.numel() and not bool(torch.isfinite(q).all()):
        raise ValueError("queries holds NaN or infinite values")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k is {k}, larger than the corpus ({n} posts)")
    return q.float().contiguous()


def _exclusion_pairs(exclude: Exclusions, B: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query positions -> (query row [E], corpus position [E]) int64."""
    if exclude is None:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    if len(exclude) != B:
        raise ValueError(f"exclude has {len(exclude)} entries, expected one per query ({B})")
    cols = [torch.as_tensor(np.asarray(e, dtype=np.int64)).reshape(-1) for e in exclude]
    rows = torch.cat([torch.full((len(c),), i, dtype=torch.int64) for i, c in enumerate(cols)])
    col = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.int64)
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= n):
        bad = int(col.min()) if int(col.min()) < 0 else int(col.max())
        raise ValueError(f"exclude holds position {bad}, expected 0..{n - 1} (corpus positions)")
    return rows, col


def _order(scores: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by (score descending, position ascending); -1 positions (empty) last."""
    key_idx = torch.where(idx < 0, torch.iinfo(torch.int64).max, idx)
    by_idx = torch.sort(key_idx, dim=1, stable=True).indices
    s, i = scores.gather(1, by_idx), idx.gather(1, by_idx)
    by_score = torch.sort(s, dim=1, descending=True, stable=True).indices
    return s.gather(1, by_score), i.gather(1, by_score)


def _chunk_top_k(s: torch.Tensor, k: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of scores [B, M] with ties at the cut-off resolved to the lowest positions.

    ``torch.topk`` picks arbitrarily among values equal to the k-th; asking for k + 1 shows
    which rows have such a tie (the (k+1)-th equals the k-th), and only those rows take the
    exact path: one stable sort of the row.
    """
    B, M = s.shape
    kk = min(k, M)
    if kk < M:
        val, pos = torch.topk(s, kk + 1, dim=1)
        tied = val[:, kk - 1] == val[:, kk]
        val, pos = val[:, :kk], pos[:, :kk]
        rows = torch.nonzero(tied & torch.isfinite(val[:, kk - 1])).flatten()
        if rows.numel():
            order = torch.sort(s[rows], dim=1, descending=True, stable=True).indices[:, :kk]
            pos[rows] = order
            val[rows] = s[rows].gather(1, order)
    else:
        val, pos = s, torch.arange(M).expand(B, M)
    idx = torch.where(torch.isfinite(val), pos + base, -1)
    return val, idx


class ExactIndex:
    """Exact top-k by inner product, a chunk of the corpus at a time.

    >>> corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    >>> index = ExactIndex(corpus, chunk_size=2)
    >>> r = index.search(torch.tensor([[1.0, 0.0]]), k=3, exclude=[[3]])
    >>> r.indices.tolist(), r.scores.tolist()  # the tie 0 / 2 goes to the lower position
    ([[0, 2, 1]], [[1.0, 1.0, 0.0]])
    >>> biased = ExactIndex(corpus, chunk_size=2, bias=torch.tensor([0.0, 2.0, 0.0, 0.0]))
    >>> biased.search(torch.tensor([[1.0, 0.0]]), k=2).indices.tolist()  # 0 + 2 beats 1 + 0
    [[1, 0]]
    """

    def __init__(
        self,
        embeddings: torch.Tensor | np.ndarray,
        chunk_size: int = 65_536,
        bias: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.embeddings = _check_corpus(embeddings)
        self.bias = _check_bias(bias, len(self.embeddings))
        self.chunk_size = chunk_size

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @torch.no_grad()
    def search(
        self, queries: torch.Tensor | np.ndarray, k: int, exclude: Exclusions = None
    ) -> SearchResult:
        """Top-k of every query: queries [B, D] -> ``SearchResult`` [B, k]."""
        n = len(self)
        q = _check_query(queries, self.dim, n, k)
        B = q.shape[0]
        ex_row, ex_col = _exclusion_pairs(exclude, B, n)
        best_s = torch.full((B, 0), float("-inf"))
        best_i = torch.full((B, 0), -1, dtype=torch.int64)
        # the only [B, *] buffer, reused by every chunk (a fresh one per chunk costs page faults)
        buf = torch.empty(B * min(n, self.chunk_size))
        for lo in range(0, n, self.chunk_size):
            hi = min(n, lo + self.chunk_size)
            s = buf[: B * (hi - lo)].view(B, hi - lo)
            torch.mm(q, self.embeddings[lo:hi].T, out=s)  # [B, M], M <= chunk
            if self.bias is not None:
                s += self.bias[lo:hi]
            if ex_col.numel():
                m = (ex_col >= lo) & (ex_col < hi)
                s[ex_row[m], ex_col[m] - lo] = float("-inf")
            val, idx = _chunk_top_k(s, k, lo)
            # running best (positions < lo) before this chunk: a stable sort keeps them first
            val, idx = _order(val, idx)
            cat_s, cat_i = torch.cat([best_s, val], 1), torch.cat([best_i, idx], 1)
            order = torch.sort(cat_s, dim=1, descending=True, stable=True).indices[:, :k]
            best_s, best_i = cat_s.gather(1, order), cat_i.gather(1, order)
        best_i = torch.where(torch.isfinite(best_s), best_i, -1)
        return SearchResult(best_s, best_i)


def reference_top_k(
    embeddings: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray,
    k: int,
    exclude: Exclusions = None,
    bias: torch.Tensor | np.ndarray | None = None,
) -> SearchResult:
    """Score every post, one stable sort per query: the reference ``ExactIndex`` must match."""
    e = _check_corpus(embeddings)
    q = _check_query(queries, e.shape[1], e.shape[0], k)
    s = q @ e.T  # [B, N]
    b = _check_bias(bias, e.shape[0])
    if b is not None:
        s = s + b
    if exclude is not None:
        rows, cols = _exclusion_pairs(exclude, len(q), len(e))
        s[rows, cols] = float("-inf")
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    val = s.gather(1, order)
    return SearchResult(val, torch.where(torch.isfinite(val), order, -1))


class FaissIndex:
    """The same search over faiss (``pip install hashrec[retrieval]``).

    ``kind``: "flat" (exact inner product), "ivf" (IVF-flat: ``nlist`` k-means cells, search
    ``nprobe`` of them) or "hnsw" (graph with ``m`` links, search breadth ``ef_search``).
    Exclusions are applied by asking faiss for k + (the query's exclusion count) and
    dropping the excluded posts.

    >>> pytest = __import__("pytest"); faiss = pytest.importorskip("faiss")
    >>> index = FaissIndex(torch.eye(3), kind="flat")
    >>> index.search(torch.tensor([[0.0, 1.0, 0.0]]), k=1).indices.tolist()
    [[1]]
    """

    def __init__(
        self,
        embeddings: torch.Tensor | np.ndarray,
        kind: str = "flat",
        nlist: int = 1024,
        nprobe: int = 16,
        m: int = 32,
        ef_search: int = 128,
        ef_construction: int = 80,
        seed: int = 0,
        bias: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        try:
            import faiss
        except ImportError as e:
            raise ImportError(
                "FaissIndex needs faiss: pip install 'hashrec[retrieval]' (faiss-cpu)"
            ) from e
        e = _check_corpus(embeddings)
        b = _check_bias(bias, len(e))
        self._biased = b is not None
        self._d = e.shape[1]  # the queries' width
        if b is not None:  # one more dimension: [e, bias] . [q, 1] = q . e + bias
            e = torch.cat([e, b[:, None]], dim=1)
        e = e.numpy()
        n, d = e.shape
        self.kind, self._n = kind, n
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            if not 1 <= nlist <= n:
                raise ValueError(f"nlist must be in 1..{n} (corpus size), got {nlist}")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.cp.spherical = True  # unit vectors: centroids on the sphere (faiss's IP advice)
            index.train(e)
            index.nprobe = nprobe
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
        else:
            raise ValueError(f"kind must be 'flat', 'ivf' or 'hnsw', got {kind!r}")
        index.add(e)
        self.index = index

    def __len__(self) -> int:
        return self._n

    def search(
        self, queries: torch.Tensor | np.ndarray, k: int, exclude: Exclusions = None
    ) -> SearchResult:
        """Top-k of every query: queries [B, D] -> ``SearchResult`` [B, k]."""
        q = _check_query(queries, self._d, self._n, k)
        if self._biased:
            q = torch.cat([q, torch.ones(len(q), 1)], dim=1)
        q = q.numpy()
        if exclude is None:
            s, i = self.index.search(q, k)
            s = np.where(i < 0, -np.inf, s).astype(np.float32)
            return SearchResult(torch.from_numpy(s), torch.from_numpy(i.astype(np.int64)))
        rows, cols = _exclusion_pairs(exclude, len(q), self._n)
        counts = np.bincount(rows.numpy(), minlength=len(q))
        extra = int(counts.max()) if len(counts) else 0
        s, i = self.index.search(q, min(self._n, k + extra))
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        for r in range(len(q)):
            banned = set(np.asarray(exclude[r], dtype=np.int64).tolist())
            keep = [j for j, p in enumerate(i[r]) if p >= 0 and int(p) not in banned][:k]
            out_s[r, : len(keep)], out_i[r, : len(keep)] = s[r, keep], i[r, keep]
        return SearchResult(torch.from_numpy(out_s), torch.from_numpy(out_i))
