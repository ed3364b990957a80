"""Exact rule-based classifiers for the synthetic world.

Each attribute is read from its own fixed window (see :mod:`popalign.world.render`):

* occupation -- the two side strips of background (columns 0-4 and 27-31 on the 32 grid);
* first axis (shirt) -- a 6x6 window in the middle of the torso (rows 23-28, columns 13-18);
* second axis (tone) -- a 4x5 window in the middle of the head (rows 9-12, columns 14-18).

The window's per-channel *median* colour ``m`` (robust to stripes, noise and a few blurred edge
pixels) is compared with the class prototypes ``mu_c`` by Euclidean RGB distance
``d_c = ||m - mu_c||_2`` (0-255 units). The label is ``argmin_c d_c``, or -1 (unknown) when
``min_c d_c > max_distance`` (default 60: less than half the closest prototype pair of any palette,
>= 120 apart, so at most one prototype can ever be within reach; a blank grey, black or white image is
unknown everywhere). Probabilities are a soft-min, ``p_c = exp(-d_c / T) / sum_j exp(-d_j / T)``.
"""

from __future__ import annotations

import numpy as np

from popalign.world import WorldSpec
from popalign.world.render import (
    BACKGROUND_COLS,
    BACKGROUNDS,
    FACE_WINDOW,
    SHIRT_WINDOW,
    SHIRTS,
    TONES,
    scaled,
)


class WorldClassifier:
    """Reads occupation and both bias axes back from world images (pure numpy, vectorised).

    Args:
        spec: the world; the default :class:`WorldSpec` when ``None``.
        max_distance: RGB distance beyond which a window is "unknown" (-1).
        temperature: ``T`` of the soft-min in :meth:`probabilities`, in RGB units.
    """

    def __init__(self, spec: WorldSpec | None = None, max_distance: float = 60.0, temperature: float = 10.0):
        self.spec = spec or WorldSpec()
        self.max_distance = float(max_distance)
        self.temperature = float(temperature)
        a, b = self.spec.axis_names
        # axis name -> (prototypes [C, 3], window)
        self._axes = {a: (SHIRTS, SHIRT_WINDOW), b: (TONES, FACE_WINDOW)}
        self._backgrounds = BACKGROUNDS[: len(self.spec.occupations)]

    def _check(self, images: np.ndarray) -> np.ndarray:
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise TypeError(f"world classifier expects uint8 images in [0, 255], got {got}")
        s = self.spec.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"world classifier expects images of shape [N, {s}, {s}, 3], got {images.shape}")
        return images

    def _median(self, images: np.ndarray, window: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
        s = self.spec.image_size
        patch = images[:, scaled(window[0], s), scaled(window[1], s), :]
        return np.median(patch.reshape(len(images), -1, 3).astype(np.float32), axis=1)

    def _background(self, images: np.ndarray) -> np.ndarray:
        s = self.spec.image_size
        strips = [images[:, :, scaled(cols, s), :].reshape(len(images), -1, 3) for cols in BACKGROUND_COLS]
        return np.median(np.concatenate(strips, axis=1).astype(np.float32), axis=1)

    @staticmethod
    def _distances(colours: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
        return np.linalg.norm(colours[:, None, :] - prototypes[None, :, :], axis=-1)  # [N, C]

    def _label(self, d: np.ndarray) -> np.ndarray:
        label = d.argmin(axis=1)
        return np.where(d.min(axis=1) > self.max_distance, -1, label).astype(np.int64)

    def _softmin(self, d: np.ndarray) -> np.ndarray:
        z = -(d - d.min(axis=1, keepdims=True)) / self.temperature  # shift for stability
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def distances(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Axis name -> RGB distance of the read-out colour to each class prototype, ``[N, C]``."""
        images = self._check(images)
        return {
            name: self._distances(self._median(images, win), protos)
            for name, (protos, win) in self._axes.items()
        }

    def classify(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Axis name -> class index per image ``[N]`` (int64, -1 = unknown)."""
        return {name: self._label(d) for name, d in self.distances(images).items()}

    def probabilities(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Axis name -> soft-min class probabilities ``[N, C]`` (rows sum to 1)."""
        return {name: self._softmin(d) for name, d in self.distances(images).items()}

    def occupation_distances(self, images: np.ndarray) -> np.ndarray:
        """RGB distance of the background colour to each occupation's prototype, ``[N, O]``."""
        return self._distances(self._background(self._check(images)), self._backgrounds)

    def occupation(self, images: np.ndarray) -> np.ndarray:
        """Occupation index per image ``[N]`` (int64, -1 = unreadable background)."""
        return self._label(self.occupation_distances(images))

    def occupation_probabilities(self, images: np.ndarray) -> np.ndarray:
        """Soft-min occupation probabilities ``[N, O]``."""
        return self._softmin(self.occupation_distances(images))
