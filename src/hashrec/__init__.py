"""hashrec: hash-embedding recommenders in the style of X's For You ranking system (Phoenix)."""

import os as _os

# Large CPU tensors (embedding gathers, their gradients) on transparent huge pages: measured ~3x
# faster allocation of a fresh 256 MB lookup output here. Read by torch at its first allocation,
# so it only applies when hashrec is imported before torch; set THP_MEM_ALLOC_ENABLE=0 to opt out.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from hashrec.hashing.config import EntityHash, HashConfig
from hashrec.models.ranker import ACTIONS, PhoenixRanker, RankerConfig, RankerOutput
from hashrec.models.scoring import ScoringConfig, WeightedScorer
from hashrec.nn.batch import RecsysBatch, RecsysEmbeddings
from hashrec.nn.blocks import (
    ActionEmbedding,
    BlockCandidateReduce,
    BlockHistoryReduce,
    BlockUserReduce,
)
from hashrec.nn.table import FusedEmbeddingTable, MemoryReport, MultiHashEmbedding, RowWiseAdagrad
from hashrec.nn.transformer import Transformer, TransformerConfig, candidate_isolation_mask

__version__ = "0.1.0"

__all__ = [
    "ACTIONS",
    "ActionEmbedding",
    "BlockCandidateReduce",
    "BlockHistoryReduce",
    "BlockUserReduce",
    "EntityHash",
    "FusedEmbeddingTable",
    "HashConfig",
    "MemoryReport",
    "MultiHashEmbedding",
    "PhoenixRanker",
    "RankerConfig",
    "RankerOutput",
    "RecsysBatch",
    "RecsysEmbeddings",
    "RowWiseAdagrad",
    "ScoringConfig",
    "Transformer",
    "TransformerConfig",
    "WeightedScorer",
    "__version__",
    "candidate_isolation_mask",
]
