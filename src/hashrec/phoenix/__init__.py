"""Run X's released Phoenix in hashrec: ``load(dir)`` -> ``.rank`` / ``.user_representation``.

``artifacts_dir`` is the unzipped ``phoenix/artifacts/oss-phoenix-artifacts.zip`` of
xai-org/x-algorithm: ``ranker/`` and ``retrieval/``, each with ``config.json``,
``model_params.npz`` and ``embedding_tables.npz``. The ranker becomes a ``PhoenixRanker`` with
``RankerConfig.phoenix_mini()`` shapes, the retrieval model a ``PhoenixRetrieval``; both compute
what X's JAX code computes (float32; see the README for the tolerances).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hashrec.models.phoenix_retrieval import PhoenixRetrieval, l2_normalize
from hashrec.models.ranker import PhoenixRanker
from hashrec.phoenix.artifacts import load_params, read_config, stream_tables
from hashrec.phoenix.requests import request_batches, validate_request

__all__ = [
    "PhoenixArtifacts",
    "PhoenixRetrieval",
    "l2_normalize",
    "load",
    "load_ranker",
    "load_retrieval",
    "request_batches",
    "request_lengths",
    "validate_request",
]


def _folder(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such artifact folder")
    return p


def load_ranker(folder: str | Path) -> tuple[PhoenixRanker, dict]:
    """X's ``ranker/`` folder -> (``PhoenixRanker`` in eval mode, its config.json dict)."""
    folder = _folder(folder)
    raw, config = read_config(folder)
    model = PhoenixRanker(config).eval()
    load_params(folder, model, "ranker")
    stream_tables(folder, model.table.weight, config.hash)
    return model, raw


def load_retrieval(folder: str | Path) -> tuple[PhoenixRetrieval, dict]:
    """X's ``retrieval/`` folder -> (``PhoenixRetrieval`` in eval mode, its config.json dict)."""
    folder = _folder(folder)
    raw, config = read_config(folder)
    model = PhoenixRetrieval(config).eval()
    load_params(folder, model, "retrieval")
    stream_tables(folder, model.table.weight, config.hash)
    return model, raw


class PhoenixArtifacts:
    """X's ranker and (when present) retrieval model, ready to score requests.

    >>> from pathlib import Path
    >>> fx = Path("tests/fixtures/phoenix")
    >>> if fx.exists():  # the test fixture: tiny artifacts in X's format
    ...     px = load(fx / "artifacts")
    ...     req = {"user_id": 7, "history": [], "candidates": [{"post_id": 1, "author_id": 2}]}
    ...     print(px.rank(req).shape, px.user_representation(req).shape)
    ... else:
    ...     print((1, 19), (16,))
    (1, 19) (16,)
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


def load(artifacts_dir: str | Path) -> PhoenixArtifacts:
    """Load X's exported Phoenix from ``artifacts_dir`` (with ``ranker/`` and/or ``retrieval/``).

    Reads each ``config.json``, ``model_params.npz`` (numeric arrays only; every key must be
    known and present, every shape must fit the config) and streams ``embedding_tables.npz``
    into the fused table without a second copy.
    """
    root = _folder(artifacts_dir)
    ranker = retrieval = None
    rank_cfg = ret_cfg = None
    if (root / "ranker").is_dir():
        ranker, rank_cfg = load_ranker(root / "ranker")
    if (root / "retrieval").is_dir():
        retrieval, ret_cfg = load_retrieval(root / "retrieval")
    if ranker is None and retrieval is None:
        raise FileNotFoundError(f"{root}: no ranker/ or retrieval/ folder (X's artifact layout)")
    return PhoenixArtifacts(ranker, rank_cfg, retrieval, ret_cfg)
