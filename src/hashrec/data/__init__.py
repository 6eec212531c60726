"""Layer 5: interaction logs -> time-ordered requests -> hashed batches."""

from hashrec.data.log import (
    KUAIRAND_SCHEMA,
    ExampleConfig,
    InteractionLog,
    LogSchema,
    Requests,
    RowHashes,
    batches,
    build_requests,
    collision_free_config,
    load_kuairand,
    load_log,
    read_columns,
    sorted_lookup,
)

__all__ = [
    "KUAIRAND_SCHEMA",
    "ExampleConfig",
    "InteractionLog",
    "LogSchema",
    "Requests",
    "RowHashes",
    "batches",
    "build_requests",
    "collision_free_config",
    "load_kuairand",
    "load_log",
    "read_columns",
    "sorted_lookup",
]
