"""Fairness and quality metrics (torchmetrics, DDP-synchronised): discrepancy, accuracy, FID, CLIP score."""

from __future__ import annotations

from popalign.metrics.accuracy import SpecificAccuracy
from popalign.metrics.clip import CLIPScore, Scorer, optional_scorers
from popalign.metrics.discrepancy import UNKNOWN, Discrepancy, discrepancy_from_counts, joint_labels
from popalign.metrics.fid import FID, PixelStatsFeatures, frechet_distance

__all__ = [
    "CLIPScore",
    "Discrepancy",
    "FID",
    "PixelStatsFeatures",
    "Scorer",
    "SpecificAccuracy",
    "UNKNOWN",
    "discrepancy_from_counts",
    "frechet_distance",
    "joint_labels",
    "optional_scorers",
]
