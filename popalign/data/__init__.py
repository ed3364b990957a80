"""Population data: shard schema, shard writer/reader, and the Lightning DataModule.

Importing this package stays light (numpy, torch); the DataModule and its collate function load
Lightning on first use.
"""

from __future__ import annotations

from typing import Any

from popalign.data.schema import PopulationGroup, ShardError
from popalign.data.shards import PopulationShardWriter, expand_shards, read_groups

__all__ = [
    "PopulationDataModule",
    "PopulationGroup",
    "PopulationShardWriter",
    "ShardError",
    "collate_groups",
    "expand_shards",
    "read_groups",
]

_LAZY = {"PopulationDataModule", "collate_groups"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from popalign.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'popalign.data' has no attribute {name!r}")
