"""popalign: population-level preference alignment of text-to-image diffusion models.

``PopAlignModule`` (the LightningModule), ``PopulationDataModule`` (population shards) and the
objectives in ``popalign.objectives`` are the training API; the ``popalign`` console script runs the
pipeline stages (``popalign --help``). Heavy imports are deferred so the CLI starts quickly.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "PopAlignModule": "popalign.module",
    "PopulationDataModule": "popalign.data.datamodule",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'popalign' has no attribute {name!r}")


__all__ = ["PopAlignModule", "PopulationDataModule", "__version__"]
