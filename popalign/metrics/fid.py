"""Fréchet distance between image sets: torchmetrics Inception FID or any feature extractor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from popalign.errors import UserError


def as_float_images(images: Tensor) -> Tensor:
    """uint8 ``[N,3,H,W]`` in [0, 255] or float in [0, 1] -> float32 in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [N, 3, H, W], got {tuple(images.shape)}")
    return images.float() / 255.0 if not images.dtype.is_floating_point else images.float()


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})`` between two Gaussians (float64).

    ``tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2})`` and the inner matrix is symmetric PSD, so
    two ``eigh`` calls replace a general ``sqrtm`` of the non-symmetric product (which can turn
    complex from rounding); clamping rounding negatives to 0 keeps singular covariances (fewer
    images than features) real and finite.
    """
    w, v = torch.linalg.eigh(cov1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = root1 @ cov2 @ root1
    tr_root = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_root
    return fd.clamp(min=0)  # mathematically >= 0; rounding can dip just below


class PixelStatsFeatures(nn.Module):
    """Weight-free image features for small synthetic images (not a stand-in for Inception on photos).

    Per image: a ``grid x grid`` average-pooled thumbnail per channel (layout and colour), per-channel
    mean and std (brightness, contrast) and a ``bins``-bin histogram per channel (colour
    distribution): ``3*grid^2 + 6 + 3*bins`` features. For the 32x32 synthetic world these are the
    differences a viewer sees. Input: uint8 ``[N,3,H,W]`` or float in [0, 1].
    """

    def __init__(self, grid: int = 4, bins: int = 8) -> None:
        super().__init__()
        self.grid, self.bins = grid, bins
        self.num_features = 3 * grid * grid + 6 + 3 * bins

    def forward(self, images: Tensor) -> Tensor:
        x = as_float_images(images)
        flat = x.flatten(2)
        idx = (flat.clamp(0, 1) * self.bins).long().clamp(max=self.bins - 1)
        hist = torch.zeros(*flat.shape[:2], self.bins, device=x.device).scatter_add_(
            2, idx, torch.ones_like(flat)
        )
        thumb = F.adaptive_avg_pool2d(x, self.grid).flatten(1)
        stats = [flat.mean(-1), flat.std(-1, correction=0), (hist / flat.shape[-1]).flatten(1)]
        return torch.cat([thumb, *stats], dim=1)


class FID(Metric):
    """Fréchet distance between real and generated feature Gaussians (lower is better).

    ``FID = ||mu_r - mu_g||^2 + tr(S_r) + tr(S_g) - 2 tr((S_r S_g)^{1/2})`` (see
    :func:`frechet_distance`). With no ``feature_extractor`` this is torchmetrics'
    ``FrechetInceptionDistance(feature=2048)`` (needs ``torch-fidelity`` and its Inception weights).
    With one (any module mapping images ``[N,3,H,W]`` to ``[N,F]``), feature sums and outer-product
    sums are kept in float64 and sum-reduced across processes; mean and covariance come from them.

    Args:
        feature_extractor: the feature network; ``None`` for Inception features.
        num_features: ``F``; read from ``feature_extractor.num_features`` when ``None``.
        reset_real_features: whether :meth:`reset` also forgets the real images.
        normalize: Inception path only: float images in [0, 1] instead of uint8.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        feature_extractor: nn.Module | None = None,
        num_features: int | None = None,
        reset_real_features: bool = True,
        normalize: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.reset_real_features = reset_real_features
        self.inception: Metric | None = None
        self.extractor = feature_extractor
        if feature_extractor is None:
            try:
                from torchmetrics.image.fid import FrechetInceptionDistance

                self.inception = FrechetInceptionDistance(
                    feature=2048, reset_real_features=reset_real_features, normalize=normalize
                )
            except (ImportError, OSError, RuntimeError) as e:  # package missing or weights unreachable
                raise UserError(
                    "FID with Inception features needs the torch-fidelity package and its Inception "
                    "weights (pip install torch-fidelity); or pass feature_extractor=... "
                    f"(e.g. popalign.metrics.PixelStatsFeatures()): {e}"
                ) from e
            return
        self.num_features = int(num_features or getattr(feature_extractor, "num_features", 0))
        if self.num_features < 1:
            raise ValueError("FID needs num_features when the extractor has no num_features attribute")
        feature_extractor.eval().requires_grad_(False)
        f = self.num_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(f, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(f, f, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def train(self, mode: bool = True) -> FID:
        super().train(mode)
        if self.extractor is not None:
            self.extractor.eval()  # features must not change with the surrounding module's mode
        return self

    def update(self, images: Tensor, real: bool) -> None:
        """Add a batch of real (``real=True``) or generated images."""
        if self.inception is not None:
            self.inception.update(images, real=real)
            return
        with torch.no_grad():
            feats = self.extractor(images)
        feats = feats.reshape(feats.shape[0], -1).to(torch.float64)
        if feats.shape[1] != self.num_features:
            raise ValueError(f"extractor gave {feats.shape[1]} features, expected {self.num_features}")
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + feats.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + feats.T @ feats)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + feats.shape[0])

    def _gaussian(self, side: str) -> tuple[Tensor, Tensor]:
        n = int(getattr(self, f"{side}_n"))
        mu = getattr(self, f"{side}_sum") / n
        cov = (getattr(self, f"{side}_outer") - n * torch.outer(mu, mu)) / (n - 1)
        return mu, cov

    def compute(self) -> Tensor:
        """The scalar FID (needs at least 2 real and 2 generated images)."""
        if self.inception is not None:
            return self.inception.compute()
        if int(self.real_n) < 2 or int(self.fake_n) < 2:
            raise ValueError(
                f"FID needs >= 2 real and >= 2 generated images, got {int(self.real_n)}, {int(self.fake_n)}"
            )
        return frechet_distance(*self._gaussian("real"), *self._gaussian("fake")).float()

    def reset(self) -> None:
        if self.inception is not None:
            self.inception.reset()
        keep = {}
        if self.extractor is not None and not self.reset_real_features:
            keep = {k: getattr(self, k).clone() for k in ("real_sum", "real_outer", "real_n")}
        super().reset()
        for k, v in keep.items():
            setattr(self, k, v)
