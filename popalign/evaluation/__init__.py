"""Evaluation: ``popalign evaluate`` (:func:`evaluate_model`) and fairness validation during training
(:class:`FairnessValidation`, a Lightning callback; imported on first use)."""

from __future__ import annotations

from typing import Any

from popalign.evaluation.adherence import Adherence, WorldOccupationAdherence, get_adherence
from popalign.evaluation.config import EvalConfig
from popalign.evaluation.evaluate import evaluate, evaluate_model
from popalign.evaluation.inputs import EvalPrompt, split_prompts

__all__ = [
    "Adherence",
    "EvalConfig",
    "EvalPrompt",
    "FairnessValidation",
    "WorldOccupationAdherence",
    "evaluate",
    "evaluate_model",
    "get_adherence",
    "split_prompts",
]


def __getattr__(name: str) -> Any:
    if name == "FairnessValidation":  # keeps Lightning out of `import popalign.evaluation`
        from popalign.evaluation.validation import FairnessValidation

        return FairnessValidation
    raise AttributeError(f"module 'popalign.evaluation' has no attribute {name!r}")
