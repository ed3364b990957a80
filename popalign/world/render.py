"""The synthetic biased world: a procedural renderer of 32x32 "people" with occupations.

An image shows a figure (head, neck, shirt) in front of a background. Three independent features,
each drawn in its own region so a rule can read it back:

* occupation -- the background hue (one per occupation, with random stripes and colour jitter);
* the first axis (``shirt``: red / blue) -- the shirt colour;
* the second axis (``tone``: light / medium / dark) -- the face colour, mostly its brightness.

Position, head size, shoulder width, hair colour and every colour are jittered per image, and
pixel noise is added, so each attribute combination is a distribution, not a single picture.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from popalign.world import WorldSpec

# Prototype colours (RGB, 0-255). Within each palette the closest pair is >= 120 apart
# (pilot/teacher backgrounds: 120.5), so a nearest-prototype rule has a wide margin.
BACKGROUNDS = np.array(
    [
        (50, 170, 190),  # teal
        (240, 220, 60),  # yellow
        (140, 70, 190),  # purple
        (80, 170, 70),  # green
        (230, 150, 195),  # pink
        (220, 95, 35),  # orange
    ],
    dtype=np.float32,
)
SHIRTS = np.array([(205, 35, 45), (35, 65, 205)], dtype=np.float32)  # red, blue
TONES = np.array([(240, 205, 175), (185, 120, 70), (85, 52, 32)], dtype=np.float32)
HAIR = np.array([(30, 25, 25), (95, 60, 30), (215, 185, 95)], dtype=np.float32)

# Read-out windows on the 32-pixel grid (rows, cols; half-open). The layout jitter below keeps each
# window inside its part for every draw: strips beyond the widest shirt, the face window within the
# smallest head, the shirt window below the rounded shoulders.
BACKGROUND_COLS = ((0, 5), (27, 32))
FACE_WINDOW = ((9, 13), (14, 19))
SHIRT_WINDOW = ((23, 29), (13, 19))


def scaled(span: tuple[int, int], size: int) -> slice:
    """A read-out span on the 32 grid mapped to an image of ``size`` pixels (rounded inwards)."""
    start = math.ceil(span[0] * size / 32)
    return slice(start, max(math.floor(span[1] * size / 32), start + 1))


def _uniform(rng: np.random.Generator, lo: float, hi: float, shape: int | tuple[int, ...]) -> np.ndarray:
    return rng.uniform(lo, hi, shape).astype(np.float32)  # float32 halves the rendering time


def _col(v: np.ndarray) -> np.ndarray:
    return v[:, None, None]  # [n] -> [n, 1, 1], to broadcast over pixels


def _draw(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-image random layout and jitter, in units of the 32 grid (shape [n] each)."""
    spans = {
        "cx": (14.5, 17.5),
        "cy": (9.5, 11.0),
        "r": (5.2, 6.2),
        "hair_line": (0.3, 0.55),  # hair above cy - hair_line * r: never reaches the face window
        "shoulder": (1.0, 2.0),
        "half_w": (6.0, 8.0),
        "stripe_amp": (0.0, 12.0),
        "stripe_period": (4.0, 10.0),
        "stripe_angle": (0.0, np.pi),
        "stripe_phase": (0.0, 2 * np.pi),
        "shade": (0.0, 0.12),
        "face_gain": (0.94, 1.06),
    }
    d = {k: _uniform(rng, lo, hi, n) for k, (lo, hi) in spans.items()}
    d["hair"] = rng.integers(0, len(HAIR), n)
    return d


def _render_chunk(occ: np.ndarray, a: np.ndarray, b: np.ndarray, size: int, rng: np.random.Generator):
    n = len(occ)
    d = _draw(n, rng)
    col = _col
    grid = (np.arange(size, dtype=np.float32) + 0.5) * (32.0 / size)  # pixel centres, 32-grid units
    yy, xx = grid[None, :, None], grid[None, None, :]
    dx, dy = xx - col(d["cx"]), yy - col(d["cy"])

    head = dx**2 + dy**2 <= col(d["r"]) ** 2
    hair = head & (dy < -col(d["hair_line"] * d["r"]))
    top = col(d["cy"] + d["r"] + d["shoulder"])  # where the shoulders start
    neck = (np.abs(dx) <= 1.6) & (yy >= col(d["cy"])) & (yy < top + 1.0)
    # Shoulders: the top 3 rows of the shirt are an ellipse, the rest a rectangle.
    ell = (dx / col(d["half_w"])) ** 2 + ((yy - top - 3.0) / 3.0) ** 2 <= 1.0
    shirt = (yy >= top) & (np.abs(dx) <= col(d["half_w"])) & ((yy >= top + 3.0) | ell)

    theta = col(d["stripe_angle"])
    along = (xx * np.cos(theta) + yy * np.sin(theta)) / col(d["stripe_period"])
    wave = col(d["stripe_amp"]) * np.sin(np.float32(2 * np.pi) * along + col(d["stripe_phase"]))
    bg_rgb = BACKGROUNDS[occ] + _uniform(rng, -12, 12, (n, 3))
    img = bg_rgb[:, None, None, :] + wave[..., None]

    skin = TONES[b] * d["face_gain"][:, None] + _uniform(rng, -6, 6, (n, 3))
    img = np.where(((head & ~hair) | neck)[..., None], skin[:, None, None, :], img)
    img = np.where(hair[..., None], HAIR[d["hair"]][:, None, None, :], img)
    # Shirt darkens slightly towards the bottom, as if lit from above.
    shirt_rgb = SHIRTS[a] + _uniform(rng, -12, 12, (n, 3))
    shading = 1.0 - col(d["shade"]) * np.clip((yy - top) / 12.0, 0.0, 1.0)
    img = np.where(shirt[..., None], shirt_rgb[:, None, None, :] * shading[..., None], img)

    img += 4.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_batch(
    occupations: np.ndarray,
    attrs: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    spec: WorldSpec | None = None,
) -> np.ndarray:
    """Render ``N`` images: uint8 ``[N, S, S, 3]``, ``S = spec.image_size``.

    Args:
        occupations: occupation indices ``[N]`` into ``spec.occupations``.
        attrs: axis name -> class indices ``[N]`` for both axes of ``spec``.
        rng: the only source of randomness (same seed, same images).
        spec: the world; the default :class:`WorldSpec` when ``None``.
    """
    spec = spec or WorldSpec()
    occ = np.asarray(occupations, dtype=np.int64)
    a_name, b_name = spec.axis_names
    a, b = np.asarray(attrs[a_name], dtype=np.int64), np.asarray(attrs[b_name], dtype=np.int64)
    if not (len(occ) == len(a) == len(b)):
        raise ValueError(f"occupations and attrs differ in length: {len(occ)}, {len(a)}, {len(b)}")
    for what, idx, k in (("occupation", occ, len(spec.occupations)), (a_name, a, 2), (b_name, b, 3)):
        if len(idx) and (idx.min() < 0 or idx.max() >= k):
            raise ValueError(f"{what} index out of range [0, {k})")
    s = spec.image_size
    out = np.empty((len(occ), s, s, 3), dtype=np.uint8)
    for i in range(0, len(occ), 2048):  # bounded memory for large batches
        j = slice(i, i + 2048)
        out[j] = _render_chunk(occ[j], a[j], b[j], s, rng)
    return out


def render(
    occupation: int | str,
    attrs: Mapping[str, int | str],
    rng: np.random.Generator,
    spec: WorldSpec | None = None,
) -> np.ndarray:
    """Render one image, uint8 ``[S, S, 3]``; occupation and classes by index or by name."""
    spec = spec or WorldSpec()
    occ = spec.occupation_index(occupation)
    idx = {ax.name: ax.class_index(attrs[ax.name]) for ax in spec.axes}
    return render_batch(np.array([occ]), {k: np.array([v]) for k, v in idx.items()}, rng, spec)[0]


def sample_dataset(
    spec: WorldSpec,
    n_per_prompt: int,
    rng: np.random.Generator,
    biased: bool = True,
    n_augmented: int | None = None,
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray], np.ndarray]:
    """Images and captions for every prompt of the world.

    Per occupation: ``n_per_prompt`` samples of the neutral prompt, classes drawn from
    :meth:`WorldSpec.class_probs` (biased, or uniform when ``biased=False``), then ``n_augmented``
    (default ``n_per_prompt``) samples of each augmented prompt (every class combination), which
    always show the named classes.

    Returns:
        ``(images uint8 [N,S,S,3], prompts, attrs axis -> int [N], occupations int [N])``.
    """
    names = spec.axis_names
    n_aug = n_per_prompt if n_augmented is None else n_augmented
    occs: list[np.ndarray] = []
    cls: dict[str, list[np.ndarray]] = {k: [] for k in names}
    prompts: list[str] = []
    for o, occ in enumerate(spec.occupations):
        occs.append(np.full(n_per_prompt, o))
        for ax in spec.axes:
            p = spec.class_probs(occ, ax.name, biased=biased)
            cls[ax.name].append(rng.choice(len(p), size=n_per_prompt, p=p))
        prompts += [spec.neutral_prompt(occ)] * n_per_prompt
        for combo in itertools.product(*(range(len(ax.classes)) for ax in spec.axes)):
            occs.append(np.full(n_aug, o))
            for name, c in zip(names, combo):
                cls[name].append(np.full(n_aug, c))
            prompts += [spec.augmented_prompt(occ, combo)] * n_aug
    occupations = np.concatenate(occs).astype(np.int64)
    attrs = {k: np.concatenate(v).astype(np.int64) for k, v in cls.items()}
    return render_batch(occupations, attrs, rng, spec), prompts, attrs, occupations


def save_world_grid(path: str | Path, spec: WorldSpec | None = None, seed: int = 0) -> Path:
    """Save a PNG grid: one row per occupation, one column per class combination of the two axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = spec or WorldSpec()
    combos = list(itertools.product(*(range(len(ax.classes)) for ax in spec.axes)))
    n_occ = len(spec.occupations)
    occ = np.repeat(np.arange(n_occ), len(combos))
    attrs = {ax.name: np.tile([c[i] for c in combos], n_occ) for i, ax in enumerate(spec.axes)}
    images = render_batch(occ, attrs, np.random.default_rng(seed), spec)
    fig, axs = plt.subplots(n_occ, len(combos), figsize=(1.3 * len(combos), 1.35 * n_occ))
    for k, ax in enumerate(axs.flat):
        ax.imshow(images[k], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        r, c = divmod(k, len(combos))
        if r == 0:
            ax.set_title(" ".join(a.classes[i] for a, i in zip(spec.axes, combos[c])), fontsize=9)
        if c == 0:
            ax.set_ylabel(spec.occupations[r], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
