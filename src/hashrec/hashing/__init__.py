"""Layer 1: hash functions (Phoenix, splitmix64, strings via xxh64) and the table layout.

Nothing here knows about models: ``HashConfig`` turns raw IDs into rows of the fused table.
"""

from hashrec.hashing.config import EntityHash, HashConfig
from hashrec.hashing.functions import (
    default_hash,
    default_hash_torch,
    ids_to_int64,
    phoenix_hash,
    phoenix_hash_reference,
    phoenix_hash_torch,
)

__all__ = [
    "EntityHash",
    "HashConfig",
    "default_hash",
    "default_hash_torch",
    "ids_to_int64",
    "phoenix_hash",
    "phoenix_hash_reference",
    "phoenix_hash_torch",
]
