"""FairnessValidation's arguments are checked when the callback is made (one-line UserErrors), and its
logged sample grid shows one row per prompt."""

from __future__ import annotations

import numpy as np
import pytest

from popalign.errors import UserError
from popalign.evaluation.validation import FairnessValidation

PROMPTS = ["a photo of a doctor", "a photo of a nurse"]


def _callback(**kw):
    args = dict(prompts=PROMPTS, axes=["gender"], classifier="world", images_per_prompt=2, steps=2,
                height=16, width=16, every_n_steps=2)  # fmt: skip
    return FairnessValidation(**(args | kw))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"height": 0}, "height must be an integer >= 1, got 0"),
        ({"width": 0}, "width must be an integer >= 1, got 0"),
        ({"height": -32}, "height must be an integer >= 1, got -32"),
        ({"images_per_prompt": 2.5}, "images_per_prompt must be an integer >= 1, got 2.5"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"guidance_scale": -3}, "guidance_scale must be a number >= 0"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a number >= 0"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_arguments_are_user_errors(kw, message):
    with pytest.raises(UserError, match=f"^FairnessValidation: {message}"):
        _callback(**kw)


def test_guidance_zero_and_one_mean_no_guidance_and_are_accepted():
    assert _callback(guidance_scale=0).guidance_scale == 0
    assert _callback(guidance_scale=1.0).guidance_scale == 1.0


def test_a_single_axis_string_is_one_axis():
    from popalign.demo import WORLD_AXES

    callback = _callback(axes=WORLD_AXES[0])
    assert [a.name for a in callback.axes] == ["shirt"]
    assert [a.name for a in _callback(axes="gender").axes] == ["gender"]


def test_sample_grid_has_one_row_per_prompt():
    callback = _callback(images_per_prompt=10)
    # 12 prompts x 10 images of 8x8 px, each image filled with its prompt's index
    images = np.repeat(np.arange(12, dtype=np.uint8), 10)[:, None, None, None] * np.ones(
        (1, 8, 8, 3), np.uint8
    )
    grid = callback.sample_grid(images)
    pad, cell = 2, 8 + 2
    assert grid.shape == (8 * cell + pad, 8 * cell + pad, 3)  # the first 8 prompts, 8 images each
    for row in range(8):
        for col in range(8):
            y, x = pad + row * cell, pad + col * cell
            assert (grid[y : y + 8, x : x + 8] == row).all()
    few = _callback(images_per_prompt=3).sample_grid(images[:6])  # 2 prompts of 3
    assert few.shape == (2 * cell + pad, 3 * cell + pad, 3)
