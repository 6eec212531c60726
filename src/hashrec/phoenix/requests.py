"""Phoenix requests (``example_sequence.json`` plus candidates) -> hashrec batches.

A request::

    {"user_id": 123,
     "history": [{"post_id": 1, "author_id": 2, "actions": {"1": 1, "11": 1},
                  "product_surface": 0, "dwell_time": 12.5}, ...],
     "candidates": [{"post_id": 3, "author_id": 4, "product_surface": 0,
                     "creation_ts": 1700000000, "impression_ts": 1700000600}, ...],
     "impression_ts": 1700000600}

``actions`` maps action indices (strings, as X's file) to values in [0, 1]; indices at or past the
action count are dropped, as ``run_pipeline.py`` does. ``product_surface``, ``dwell_time``
(seconds), ``creation_ts`` and ``impression_ts`` (seconds; per candidate or once per request) are
optional. The batches are built as ``run_pipeline.py`` builds them: the first ``history_len``
history items, padded at the end; candidates in chunks of ``candidate_len``, the last padded.
"""

from __future__ import annotations

import numpy as np
import torch

from hashrec.hashing.config import HashConfig
from hashrec.nn.batch import RecsysBatch

__all__ = ["request_batches", "validate_request"]


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"request: {what} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"request: {what} must be an integer, got {value!r}") from None


def _num(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"request: {what} must be a number, got {value!r}")
    return float(value)


def validate_request(request: object) -> dict:
    """Check the request's structure; returns it. ValueError names the offending field."""
    if not isinstance(request, dict):
        raise ValueError(f"request must be a JSON object, got {type(request).__name__}")
    for key in ("user_id", "history", "candidates"):
        if key not in request:
            raise ValueError(f"request: missing '{key}'")
    for key in ("history", "candidates"):
        if not isinstance(request[key], list):
            raise ValueError(f"request: '{key}' must be a list")
    if not request["candidates"]:
        raise ValueError("request: 'candidates' is empty")
    for key in ("history", "candidates"):
        for i, item in enumerate(request[key]):
            if not isinstance(item, dict):
                raise ValueError(f"request: {key}[{i}] must be an object")
            for k in ("post_id", "author_id"):
                if k not in item:
                    raise ValueError(f"request: {key}[{i}] is missing '{k}'")
            acts = item.get("actions", {})
            if not isinstance(acts, dict):
                raise ValueError(f"request: {key}[{i}].actions must be an object")
    return request


def _ids(values: list, what: str) -> np.ndarray:
    """Raw IDs as 64-bit patterns (X reads them as uint64, then hashes them as int64)."""
    out = np.zeros(len(values), dtype=np.uint64)
    for i, v in enumerate(values):
        x = _int(v, f"{what}[{i}]")
        if not -(2**63) <= x < 2**64:
            raise ValueError(f"request: {what}[{i}] = {x} does not fit in 64 bits")
        out[i] = x % 2**64
    return out.view(np.int64)


def request_batches(
    request: dict,
    hash_config: HashConfig,
    history_len: int,
    candidate_len: int,
    num_actions: int,
) -> list[tuple[RecsysBatch, int]]:
    """One ``RecsysBatch`` (B = 1) per chunk of candidates, with its count of real candidates."""
    validate_request(request)
    S, C, A = history_len, candidate_len, num_actions
    hist = request["history"][:S]
    user = hash_config.rows("user", _ids([request["user_id"]], "user_id"))  # [1, Ku]
    post = np.zeros(S, dtype=np.int64)
    author = np.zeros(S, dtype=np.int64)
    post[: len(hist)] = _ids([h["post_id"] for h in hist], "history.post_id")
    author[: len(hist)] = _ids([h["author_id"] for h in hist], "history.author_id")
    actions = np.zeros((1, S, A), dtype=np.float32)
    surface = np.zeros((1, S), dtype=np.int64)
    dwell = np.zeros((1, S), dtype=np.float32)
    has_dwell = False
    for i, item in enumerate(hist):
        for k, v in item.get("actions", {}).items():
            idx = _int(k, f"history[{i}].actions key")
            if 0 <= idx < A:
                actions[0, i, idx] = _num(v, f"history[{i}].actions[{k}]")
        surface[0, i] = _int(item.get("product_surface", 0), f"history[{i}].product_surface")
        if "dwell_time" in item:
            dwell[0, i] = _num(item["dwell_time"], f"history[{i}].dwell_time")
            has_dwell = True
    hp = hash_config.rows("post", post)[None]  # [1, S, Kp]
    ha = hash_config.rows("author", author)[None]
    default_impr = request.get("impression_ts", 0)
    cands = request["candidates"]
    out = []
    for a in range(0, len(cands), C):
        chunk = cands[a : a + C]
        n = len(chunk)
        cp = np.zeros(C, dtype=np.int64)
        ca = np.zeros(C, dtype=np.int64)
        cp[:n] = _ids([c["post_id"] for c in chunk], "candidates.post_id")
        ca[:n] = _ids([c["author_id"] for c in chunk], "candidates.author_id")
        cs = np.zeros((1, C), dtype=np.int64)
        impr = np.zeros((1, C), dtype=np.int64)
        created = np.zeros((1, C), dtype=np.int64)
        for j, c in enumerate(chunk):
            what = f"candidates[{a + j}]"
            cs[0, j] = _int(c.get("product_surface", 0), f"{what}.product_surface")
            impr[0, j] = _int(c.get("impression_ts", default_impr), f"{what}.impression_ts")
            created[0, j] = _int(c.get("creation_ts", 0), f"{what}.creation_ts")
        cph = hash_config.rows("post", cp)[None]
        cah = hash_config.rows("author", ca)[None]
        cph[0, n:] = 0
        cah[0, n:] = 0
        has_ts = bool(impr.any() or created.any())
        batch = RecsysBatch(
            torch.from_numpy(user),
            torch.from_numpy(hp),
            torch.from_numpy(ha),
            torch.from_numpy(actions),
            torch.from_numpy(surface),
            torch.from_numpy(cph),
            torch.from_numpy(cah),
            torch.from_numpy(cs),
            history_dwell=torch.from_numpy(dwell) if has_dwell else None,
            candidate_impression_ts=torch.from_numpy(impr) if has_ts else None,
            candidate_creation_ts=torch.from_numpy(created) if has_ts else None,
        )
        out.append((batch, n))
    return out
