"""hashrec: hash-embedding recommenders in the style of X's For You ranking system (Phoenix).

The public names below are importable from ``hashrec`` directly; each is loaded from its layer's
module on first use, so ``import hashrec`` (and the ``hashrec`` command's start-up) stays cheap
and importing the package changes no process-wide setting.

>>> import hashrec
>>> hashrec.HashConfig.phoenix().num_rows > 0
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (one definition; ``__all__`` is derived from it)
_EXPORTS: dict[str, str] = {
    "EntityHash": "hashrec.hashing.config",
    "HashConfig": "hashrec.hashing.config",
    "RecsysBatch": "hashrec.nn.batch",
    "RecsysEmbeddings": "hashrec.nn.batch",
    "FusedEmbeddingTable": "hashrec.nn.table",
    "MemoryReport": "hashrec.nn.table",
    "MultiHashEmbedding": "hashrec.nn.table",
    "RowWiseAdagrad": "hashrec.nn.optim",
    "ActionEmbedding": "hashrec.nn.blocks",
    "BlockCandidateReduce": "hashrec.nn.blocks",
    "BlockHistoryReduce": "hashrec.nn.blocks",
    "BlockUserReduce": "hashrec.nn.blocks",
    "candidate_isolation_mask": "hashrec.nn.attention",
    "Transformer": "hashrec.nn.transformer",
    "TransformerConfig": "hashrec.nn.transformer",
    "ACTIONS": "hashrec.models.ranker",
    "PhoenixRanker": "hashrec.models.ranker",
    "RankerConfig": "hashrec.models.ranker",
    "RankerOutput": "hashrec.models.ranker",
    "RankerEnsemble": "hashrec.models.ensemble",
    "TwoTowerConfig": "hashrec.models.two_tower",
    "TwoTowerRetriever": "hashrec.models.two_tower",
    "PhoenixRetrieval": "hashrec.models.phoenix_retrieval",
    "ScoringConfig": "hashrec.models.scoring",
    "WeightedScorer": "hashrec.models.scoring",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hashrec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from hashrec.hashing.config import EntityHash, HashConfig  # noqa: F401
    from hashrec.models.ensemble import RankerEnsemble  # noqa: F401
    from hashrec.models.phoenix_retrieval import PhoenixRetrieval  # noqa: F401
    from hashrec.models.ranker import ACTIONS, PhoenixRanker, RankerConfig, RankerOutput  # noqa: F401
    from hashrec.models.scoring import ScoringConfig, WeightedScorer  # noqa: F401
    from hashrec.models.two_tower import TwoTowerConfig, TwoTowerRetriever  # noqa: F401
    from hashrec.nn.attention import candidate_isolation_mask  # noqa: F401
    from hashrec.nn.batch import RecsysBatch, RecsysEmbeddings  # noqa: F401
    from hashrec.nn.blocks import (  # noqa: F401
        ActionEmbedding,
        BlockCandidateReduce,
        BlockHistoryReduce,
        BlockUserReduce,
    )
    from hashrec.nn.optim import RowWiseAdagrad  # noqa: F401
    from hashrec.nn.table import FusedEmbeddingTable, MemoryReport, MultiHashEmbedding  # noqa: F401
    from hashrec.nn.transformer import Transformer, TransformerConfig  # noqa: F401
