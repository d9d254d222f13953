"""The caption grid: layout, truncating uint8 conversion, atomic PNG."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sd_mlperf.eval.grid import make_grid_image, save_grid, to_uint8_images


def test_uint8_conversion_truncates_like_to_pil_image():
    x = torch.tensor([0.0, 0.5, 0.999, 1.0, 1.2]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8_images(x)[0, 0, 0].tolist() == [0, 127, 254, 255, 255]


def test_grid_layout_and_file(tmp_path):
    images = torch.rand(5, 3, 32, 40)
    captions = ["a cat", "a very long caption " * 5, "caf\u00e9 au lait", "x", "y"]
    sheet = make_grid_image(images, captions, columns=4, min_cell_px=0)
    assert sheet.size == (4 * 40, 2 * (32 + 3 * 12 + 4))
    top_left = torch.from_numpy(np.array(sheet))[:32, :40].permute(2, 0, 1)
    assert torch.equal(top_left, to_uint8_images(images)[0])
    path = save_grid(tmp_path / "eval" / "grid.png", images, captions, min_cell_px=0)
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    with Image.open(path) as img:
        assert img.size == sheet.size


def test_small_images_are_enlarged_by_an_integer_factor():
    images = torch.rand(2, 3, 16, 16)
    sheet = make_grid_image(images, ["a", "b"], columns=2, min_cell_px=64)
    assert sheet.size == (2 * 64, 64 + 3 * 12 + 4)
    tile = torch.from_numpy(np.array(sheet))[:64, :64].permute(2, 0, 1)
    expected = to_uint8_images(images)[0].repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    assert torch.equal(tile, expected)
