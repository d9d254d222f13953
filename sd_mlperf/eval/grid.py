"""A PNG contact sheet of generated images with their captions, written atomically."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from sd_mlperf.utils.files import atomic_path


def to_uint8_images(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] images -> uint8 (B, 3, H, W) on the CPU (truncating, as the reference saves them)."""
    return images_BCHW.detach().float().clamp(0, 1).mul(255).to(torch.uint8).cpu()


def make_grid_image(images_BCHW: torch.Tensor, captions: Sequence[str], *, columns: int = 4,
                    caption_lines: int = 3, min_cell_px: int = 192) -> Image.Image:
    """Images (uint8, B x 3 x H x W) in rows of `columns`, each with up to `caption_lines` of its caption.

    Small images (smoke runs) are enlarged by an integer factor (nearest) to at least `min_cell_px`, so the
    captions under them stay readable.
    """
    if images_BCHW.dtype != torch.uint8:
        images_BCHW = to_uint8_images(images_BCHW)
    n, _, h, w = images_BCHW.shape
    scale = max(1, -(-min_cell_px // w))
    if scale > 1:
        images_BCHW = images_BCHW.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    if n == 0:
        raise ValueError("no images for the grid (eval.num_grid_images must be > 0)")
    font = ImageFont.load_default()
    line_h = 12
    chars = max(8, w // 6)  # the default bitmap font is about 6 px wide
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    cell_h = h + caption_lines * line_h + 4
    sheet = Image.new("RGB", (cols * w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % cols) * w, (i // cols) * cell_h
        sheet.paste(Image.fromarray(images_BCHW[i].permute(1, 2, 0).numpy()), (x, y))
        # ASCII only: the default font has no glyphs for most other characters.
        text = captions[i].encode("ascii", "replace").decode("ascii")
        for j, line in enumerate(textwrap.wrap(text, chars)[:caption_lines]):
            draw.text((x + 2, y + h + 2 + j * line_h), line, fill="black", font=font)
    return sheet


def save_grid(path: str | os.PathLike, images_BCHW: torch.Tensor, captions: Sequence[str], **kwargs) -> Path:
    """Write the caption grid as PNG atomically and return its path."""
    path = Path(path)
    image = make_grid_image(images_BCHW, captions, **kwargs)
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG")
    return path
