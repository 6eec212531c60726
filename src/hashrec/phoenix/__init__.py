"""Run X's released Phoenix in hashrec: ``load(dir)`` -> ``.rank`` / ``.user_representation``.

``artifacts_dir`` is the unzipped ``phoenix/artifacts/oss-phoenix-artifacts.zip`` of
xai-org/x-algorithm: ``ranker/`` and ``retrieval/``, each with ``config.json``,
``model_params.npz`` and ``embedding_tables.npz``. The ranker becomes a ``PhoenixRanker`` with
``RankerConfig.phoenix_mini()`` shapes, the retrieval model a ``PhoenixRetrieval``; both compute
what X's JAX code computes (float32; see the README for the tolerances).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hashrec.models.phoenix_retrieval import PhoenixRetrieval, l2_normalize
from hashrec.models.ranker import PhoenixRanker
from hashrec.phoenix.artifacts import load_params, read_config, stream_tables
from hashrec.phoenix.requests import request_batches, validate_request

__all__ = [
    "PIPELINE_WEIGHTS",
    "PhoenixArtifacts",
    "PhoenixRetrieval",
    "Recommendations",
    "l2_normalize",
    "load",
    "load_corpus",
    "load_imported",
    "load_ranker",
    "load_retrieval",
    "request_batches",
    "request_lengths",
    "validate_request",
]


# run_pipeline.py's final score: sum of weight * probability over these head columns. X's script
# indexes the ranker's heads with history-action indices (its IDX_FAV = 1, IDX_REPLY = 4,
# IDX_RT = 6, IDX_DWELL = 11), i.e. heads reply, click, vqv and quote of ``ACTIONS``; kept as is
# so the ranked list is the one X's script prints.
PIPELINE_WEIGHTS: dict[int, float] = {1: 1.0, 4: 0.5, 6: 0.3, 11: 0.2}


@dataclass
class Recommendations:
    """A ranked list, best first: post_ids, author_ids [K], score (weighted) [K],
    retrieval_score [K], probs [K, 19], corpus_index [K] (rows of the corpus)."""

    post_ids: np.ndarray
    author_ids: np.ndarray
    score: np.ndarray
    retrieval_score: np.ndarray
    probs: np.ndarray
    corpus_index: np.ndarray


def _folder(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such artifact folder")
    return p


def _load(folder: str | Path, model_cls: type, kind: str) -> tuple[Any, dict]:
    """X's ``<kind>/`` folder -> (``model_cls`` in eval mode, its config.json dict)."""
    folder = _folder(folder)
    raw, config = read_config(folder)
    model = model_cls(config).eval()
    load_params(folder, model, kind)
    stream_tables(folder, model.table.weight, config.hash)
    return model, raw


def load_ranker(folder: str | Path) -> tuple[PhoenixRanker, dict]:
    """X's ``ranker/`` folder -> (``PhoenixRanker`` in eval mode, its config.json dict)."""
    return _load(folder, PhoenixRanker, "ranker")


def load_retrieval(folder: str | Path) -> tuple[PhoenixRetrieval, dict]:
    """X's ``retrieval/`` folder -> (``PhoenixRetrieval`` in eval mode, its config.json dict)."""
    return _load(folder, PhoenixRetrieval, "retrieval")


class PhoenixArtifacts:
    """X's ranker and (when present) retrieval model, ready to score requests.

    ``load`` builds one from X's artifacts; here, an untrained tiny model of the same form:

    >>> from hashrec.models.ranker import RankerConfig
    >>> cfg = RankerConfig.phoenix_mini(dim=16, num_layers=1, num_heads=2, head_dim=8,
    ...                                 vocab_sizes={"user": 50, "post": 50, "author": 50})
    >>> lengths = {"history_seq_len": 4, "candidate_seq_len": 2}
    >>> px = PhoenixArtifacts(PhoenixRanker(cfg), lengths, PhoenixRetrieval(cfg), lengths)
    >>> req = {"user_id": 7, "history": [{"post_id": 3, "author_id": 4, "actions": {"0": 1}}],
    ...        "candidates": [{"post_id": p, "author_id": 2} for p in (10, 11, 12)]}
    >>> px.rank(req).shape, px.user_representation(req).shape
    ((3, 19), (16,))
    """

    def __init__(
        self,
        ranker: PhoenixRanker | None,
        ranker_config: dict | None,
        retrieval: PhoenixRetrieval | None = None,
        retrieval_config: dict | None = None,
    ) -> None:
        self.ranker, self.ranker_config = ranker, ranker_config
        self.retrieval, self.retrieval_config = retrieval, retrieval_config

    def _batches(self, request: dict, raw: dict | None, model) -> list:
        c = model.config
        S, C = request_lengths(raw, request)
        return request_batches(request, c.hash, S, C, c.num_actions)

    @torch.no_grad()
    def rank(self, request: dict) -> np.ndarray:
        """Probabilities [C, 19] of every candidate, in Phoenix's head order (``ACTIONS``)."""
        if self.ranker is None:
            raise ValueError("these artifacts have no ranker/ folder")
        out = []
        for batch, n in self._batches(request, self.ranker_config, self.ranker):
            out.append(self.ranker(batch).probs[0, :n].float().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def user_representation(self, request: dict) -> np.ndarray:
        """The retrieval tower's normalised user vector [D] (candidates are not used)."""
        if self.retrieval is None:
            raise ValueError("these artifacts have no retrieval/ folder")
        req = validate_request_for_user(request)
        batch, _ = self._batches(req, self.retrieval_config, self.retrieval)[0]
        return self.retrieval.user(batch)[0].float().numpy()

    @torch.no_grad()
    def candidate_representations(self, request: dict) -> np.ndarray:
        """The retrieval candidate tower's normalised vectors [C, D] of the request's candidates."""
        if self.retrieval is None:
            raise ValueError("these artifacts have no retrieval/ folder")
        out = []
        for batch, n in self._batches(request, self.retrieval_config, self.retrieval):
            out.append(self.retrieval.candidates(batch)[0, :n].float().numpy())
        return np.concatenate(out)

    def recommend(
        self,
        sequence: dict,
        corpus_post_ids: np.ndarray,
        corpus_author_ids: np.ndarray,
        corpus_representations: np.ndarray,
        top_k_retrieval: int = 200,
    ) -> Recommendations:
        """``run_pipeline.py``: retrieve the top ``top_k_retrieval`` posts of the corpus by dot
        product with the user vector, rank them, order by the weighted score ``PIPELINE_WEIGHTS``.

        As X's script, only post_id, author_id and actions of the history are used (no product
        surfaces, dwell or timestamps). corpus_representations [N, D] are the candidate tower's
        normalised vectors (``sports_corpus.npz``'s ``candidate_representations``).
        """
        validate_request_for_user(sequence)
        N = len(corpus_post_ids)
        if corpus_representations.shape[0] != N or len(corpus_author_ids) != N:
            raise ValueError(
                f"corpus: {N} post_ids, {len(corpus_author_ids)} author_ids and "
                f"{corpus_representations.shape[0]} candidate_representations, expected equal"
            )
        K = min(int(top_k_retrieval), N)
        if K < 1:
            raise ValueError(f"top_k_retrieval must be >= 1, got {top_k_retrieval}")
        hist = [
            {"post_id": h["post_id"], "author_id": h["author_id"], "actions": h.get("actions", {})}
            for h in sequence["history"]
        ]
        req = {"user_id": sequence["user_id"], "history": hist, "candidates": []}
        user = self.user_representation(req)
        scores = corpus_representations @ user
        top = np.argpartition(scores, -K)[-K:]
        top = top[np.argsort(-scores[top])]
        req["candidates"] = [
            {"post_id": int(p), "author_id": int(a)}
            for p, a in zip(corpus_post_ids[top], corpus_author_ids[top], strict=True)
        ]
        probs = self.rank(req)
        weighted = sum(w * probs[:, i] for i, w in PIPELINE_WEIGHTS.items())
        order = np.argsort(-weighted)
        idx = top[order]
        return Recommendations(
            post_ids=corpus_post_ids[idx],
            author_ids=corpus_author_ids[idx],
            score=weighted[order],
            retrieval_score=scores[idx],
            probs=probs[order],
            corpus_index=idx,
        )


def load_corpus(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sports_corpus.npz`` -> (post_ids [N], author_ids [N], candidate_representations [N, D]).

    Numeric arrays only (``allow_pickle=False``); its optional ``topics`` are not read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such corpus file")
    need = ("post_ids", "author_ids", "candidate_representations")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in need if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        try:
            post, author, reprs = (z[k] for k in need)
        except ValueError as e:
            raise ValueError(f"{path}: not numeric arrays ({e})") from e
    for name, a in (("post_ids", post), ("author_ids", author)):
        if a.dtype.kind not in "iu" or a.ndim != 1:
            raise ValueError(
                f"{path}: {name} has dtype {a.dtype}, {a.ndim} dims; expected 1-D ints"
            )
    if reprs.dtype.kind != "f" or reprs.shape != (len(post), reprs.shape[-1]):
        raise ValueError(
            f"{path}: candidate_representations has dtype {reprs.dtype}, shape "
            f"{list(reprs.shape)}; expected floats [{len(post)}, D]"
        )
    return post, author, reprs.astype(np.float32, copy=False)


def request_lengths(raw: dict | None, request: dict) -> tuple[int, int]:
    """(history length, candidates per chunk): X's config.json values when known, else the
    request's own sizes (a model trained in hashrec has no fixed lengths)."""
    if raw and "history_seq_len" in raw and "candidate_seq_len" in raw:
        return int(raw["history_seq_len"]), int(raw["candidate_seq_len"])
    validate_request(request)
    return max(1, len(request["history"])), max(1, len(request["candidates"]))


def validate_request_for_user(request: dict) -> dict:
    """A user-only request (no candidates) gets one placeholder candidate; the tower ignores it."""
    if isinstance(request, dict) and not request.get("candidates"):
        request = {**request, "candidates": [{"post_id": 0, "author_id": 0}]}
    return validate_request(request)


def load_imported(folder: str | Path) -> PhoenixArtifacts:
    """The checkpoints ``hashrec import-phoenix`` wrote (``ranker.safetensors``,
    ``retrieval.safetensors``) as a ``PhoenixArtifacts``."""
    from hashrec.training.checkpoint import load_checkpoint

    root = _folder(folder)
    models: dict = {}
    for kind in ("ranker", "retrieval"):
        path = root / f"{kind}.safetensors"
        if path.is_file():
            model, info = load_checkpoint(path)
            models[kind] = (model.eval(), info.extra.get("phoenix_config"))
    if not models:
        raise FileNotFoundError(f"{root}: no ranker.safetensors or retrieval.safetensors")
    r, rc = models.get("ranker", (None, None))
    t, tc = models.get("retrieval", (None, None))
    return PhoenixArtifacts(r, rc, t, tc)


def load(artifacts_dir: str | Path) -> PhoenixArtifacts:
    """Load X's exported Phoenix from ``artifacts_dir`` (with ``ranker/`` and/or ``retrieval/``).

    Reads each ``config.json``, ``model_params.npz`` (numeric arrays only; every key must be
    known and present, every shape must fit the config) and streams ``embedding_tables.npz``
    into the fused table without a second copy. A folder written by ``hashrec import-phoenix``
    (``ranker.safetensors``, ``retrieval.safetensors``) loads too.
    """
    root = _folder(artifacts_dir)
    if (root / "ranker.safetensors").is_file() or (root / "retrieval.safetensors").is_file():
        return load_imported(root)
    ranker = retrieval = None
    rank_cfg = ret_cfg = None
    if (root / "ranker").is_dir():
        ranker, rank_cfg = load_ranker(root / "ranker")
    if (root / "retrieval").is_dir():
        retrieval, ret_cfg = load_retrieval(root / "retrieval")
    if ranker is None and retrieval is None:
        raise FileNotFoundError(f"{root}: no ranker/ or retrieval/ folder (X's artifact layout)")
    return PhoenixArtifacts(ranker, rank_cfg, retrieval, ret_cfg)
