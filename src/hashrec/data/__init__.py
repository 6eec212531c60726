"""Layer 5: interaction logs -> time-ordered requests -> hashed batches."""

from hashrec.data.collate import LabelledBatch, RowHashes, batches, collision_free_config
from hashrec.data.features import SideColumns
from hashrec.data.io import load_kuairand, load_log, read_columns, sorted_lookup
from hashrec.data.requests import ExampleConfig, Requests, build_requests
from hashrec.data.schema import KUAIRAND_SCHEMA, InteractionLog, LogSchema
from hashrec.data.side_store import SideStore, side_batch

__all__ = [
    "KUAIRAND_SCHEMA",
    "ExampleConfig",
    "InteractionLog",
    "LabelledBatch",
    "LogSchema",
    "Requests",
    "RowHashes",
    "SideColumns",
    "SideStore",
    "batches",
    "build_requests",
    "collision_free_config",
    "load_kuairand",
    "load_log",
    "read_columns",
    "side_batch",
    "sorted_lookup",
]
