"""Reading synthetic pictures back: captions parse to their scenes, and drawn pictures read back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd_mlperf.data.scene_reader import COLOUR_NAMES, background_colours, parse_caption, scene_matches
from sd_mlperf.data.synthetic import VAL_STREAM, _caption, _scene, make_square_sample


def _pictures(count: int, size: int, seed: int = 3) -> tuple[torch.Tensor, list[str]]:
    samples = [make_square_sample(seed, VAL_STREAM, i, size) for i in range(count)]
    images = torch.from_numpy(np.stack([np.asarray(img) for img, _ in samples])).permute(0, 3, 1, 2).float() / 255
    return images, [caption for _, caption in samples]


def test_captions_parse_back_to_their_scenes():
    for i in range(300):
        background, items = _scene(np.random.default_rng([7, i]))
        assert parse_caption(_caption(background, items)) == (background, items)


@pytest.mark.parametrize("caption", ["a photo of a cat", "a white background with", "a white background with a red",
                                     "a white background with a red blob on the left", "a white wall with a red circle "
                                     "on the left", "a white background with a red circle on the moon",
                                     "a red circle on the left on a white background"])
def test_other_captions_are_refused(caption):
    with pytest.raises(ValueError, match="not a synthetic caption"):
        parse_caption(caption)


@pytest.mark.parametrize("size", [32, 64])
def test_drawn_pictures_read_back_exactly(size):
    images, captions = _pictures(40, size)
    rows = scene_matches(images, [parse_caption(c) for c in captions])
    assert rows[:, 0].tolist() == [1.0] * 40  # every background
    assert torch.equal(rows[:, 1], rows[:, 2])  # every object's colour at its position


def test_pictures_read_against_other_captions_score_near_chance():
    images, captions = _pictures(60, 64)
    scenes = [parse_caption(c) for c in captions]
    rows = scene_matches(images, scenes[1:] + scenes[:1])  # each picture against its neighbour's caption
    assert rows[:, 0].mean() < 0.3 and rows[:, 1].sum() / rows[:, 2].sum() < 0.3


def test_background_survives_pixel_noise():
    images, captions = _pictures(20, 64)
    noisy = (images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    expected = [COLOUR_NAMES.index(parse_caption(c)[0]) for c in captions]
    assert background_colours(noisy).tolist() == expected
