"""The ``SideStore`` a checkpoint's ranker is served with, built from the log it was trained on.

A ranker trained with side features needs, per request, the numbers training computed: the
side tables by ID from the log (``load_log(...).side.store``), standardised with the checkpoint's
statistics (``extra["side_stats"]``, the training days'), and for a ``--rate-features`` ranker
every user's, post's and author's smoothed rates over the checkpoint's training days
(``RateTables``). ``checkpoint_side_store`` puts these together; ``hashrec serve`` and
``hashrec recommend`` call it, and so should a library user building a ``RequestRanker`` or a
``RecommendPipeline`` for a side-feature ranker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from hashrec.data import InteractionLog, SideColumns
from hashrec.data.side_store import SideStore
from hashrec.evaluation.experiment import Split, checkpoint_log, data_fingerprint
from hashrec.models.ensemble import RankerEnsemble
from hashrec.models.ranker import PhoenixRanker

__all__ = ["checkpoint_side_store"]


def checkpoint_side_store(
    model: PhoenixRanker | RankerEnsemble,
    info: Any,
    log: InteractionLog,
    *,
    source: str = "the ranker",
    data: str = "the log",
    notice: Callable[[str], None] | None = None,
) -> SideStore | None:
    """The store to serve ``model`` (loaded with ``info``, ``load_checkpoint``'s) from ``log``:
    None for a ranker without side features; a ValueError (naming ``source`` and ``data``)
    when ``log`` has no side tables for a ranker that needs them, or lacks a number the
    checkpoint standardised. The numbers are standardised as in training (the checkpoint's
    ``side_stats``; a checkpoint from before they were recorded: the log's own). ``notice``
    (e.g. ``print``) is told when ``log``'s training rows are not the checkpoint's: its side
    tables and rates are used as they are."""
    if not model.config.side.any:
        return None
    extra = info.extra
    rates = bool(extra.get("rate_features"))
    store = getattr(log.side, "store", None) if extra.get("side_features", True) else None
    if store is None and not rates:
        raise ValueError(f"{source} was trained with side features, but {data} holds none: "
                         f"give {data} the log it was trained on, with its side tables "
                         "(a KuaiRand folder, or --authors / --users for a log file)")  # fmt: skip
    split, trained = extra.get("split"), extra.get("data")
    train = bad = None  # the checkpoint's training rows of ``log``, once, where needed
    if split and (rates or (trained and notice is not None)):
        try:
            train = Split(**split).masks(log)[0]
        except (TypeError, ValueError) as e:
            bad = e
    if split and trained and notice is not None:
        if train is None or data_fingerprint(log, train) != trained:
            notice(f"{data} is not the log {source} was trained on (its training rows "
                   f"differ): side features are looked up in {data}")  # fmt: skip
    if rates and not split:
        raise ValueError(f"{source} was trained with --rate-features but records no "
                         "training split to compute the rates from")  # fmt: skip
    if rates and train is None:
        raise ValueError(f"{source}: its recorded training split {split!r} is not a "
                         f"split ({bad})")  # fmt: skip
    if store is None:  # rates alone
        log = replace(log, side=SideColumns.empty(len(log)))
    try:
        return checkpoint_log(log, extra, train).side.store
    except ValueError as e:
        raise ValueError(f"{source}: {e}: give {data} the log it was trained on") from None
