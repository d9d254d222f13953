"""Reading a synthetic picture back: its caption's scene, the background colour, the colour at a position.

The synthetic world (sd_mlperf.data.synthetic) draws one to three shapes of named colours at named
positions on a plain background and says so in the caption. These functions invert both: a caption
gives back its scene, and a picture (float [0, 1], B x 3 x H x W) gives back the named colour of its
border (the background: shapes never reach it) and of a small patch at a position's centre (every
shape covers its own centre). The toy quality metrics (sd_mlperf.eval.toy_metrics) and the toy VAE's
fit report (sd_mlperf.data.toy_vae) read pictures this way.
"""

from __future__ import annotations

import torch

from sd_mlperf.data.synthetic import COLOURS, POSITIONS, SHAPES

Scene = tuple[str, list[tuple[str, str, str]]]
"""(background colour, [(shape, colour, position), ...]) as synthetic._scene draws it."""

COLOUR_NAMES = tuple(COLOURS)
BORDER_FRACTION = 0.05
"""Width of the frame read for the background, as a fraction of the side: shapes span 0.11..0.89."""
PATCH_FRACTION = 0.03
"""Half-side of the square read at a position's centre: inside every shape of radius 0.14 (the cross's arms
are 0.09 wide; 0.03 above its centre the triangle is 0.11 wide) and out of a neighbour's reach (centres
are 0.25 apart)."""


def parse_caption(caption: str) -> Scene:
    """The scene a synthetic caption describes; ValueError if it is not one (synthetic._caption's inverse)."""
    def word(part: str, names: tuple[str, ...] | list[str], what: str) -> str:
        if part not in names:
            raise ValueError(f"not a synthetic caption: {what} {part!r} in {caption!r}")
        return part

    head, sep, body = caption.partition(" background with ")
    words = head.split()
    if not sep or len(words) != 2 or words[0] not in ("a", "an"):
        raise ValueError(f"not a synthetic caption (no 'a COLOUR background with ...'): {caption!r}")
    background = word(words[1], COLOUR_NAMES, "colour")
    items = []
    for part in body.split(" and "):
        article, colour, shape, *position = part.split() + [""] * 3
        position = " ".join(position).strip()
        if article not in ("a", "an") or not position:
            raise ValueError(f"not a synthetic caption: {part!r} in {caption!r}")
        items.append((word(shape, SHAPES, "shape"), word(colour, COLOUR_NAMES, "colour"),
                      word(position, list(POSITIONS), "position")))
    return background, items


def _palette(device: torch.device) -> torch.Tensor:
    return torch.tensor([COLOURS[n] for n in COLOUR_NAMES], dtype=torch.float32, device=device) / 255.0


def nearest_colours(rgb_N3: torch.Tensor) -> torch.Tensor:
    """Index into COLOUR_NAMES of the named colour nearest (RGB, Euclidean) to each [0, 1] colour."""
    return torch.cdist(rgb_N3.float(), _palette(rgb_N3.device)).argmin(dim=1)


def background_colours(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Index of each picture's background colour: the median of its border pixels, then the nearest name."""
    _, _, h, w = images_BCHW.shape
    b = max(1, round(BORDER_FRACTION * min(h, w)))
    frame = torch.ones(h, w, dtype=torch.bool, device=images_BCHW.device)
    frame[b:h - b, b:w - b] = False
    border = images_BCHW[:, :, frame]  # (B, 3, N)
    return nearest_colours(border.median(dim=2).values)


def colours_at(images_BCHW: torch.Tensor, position: str) -> torch.Tensor:
    """Index of the colour at a named position of each picture: median of a small patch at its centre."""
    _, _, h, w = images_BCHW.shape
    fx, fy = POSITIONS[position]
    r = max(1, round(PATCH_FRACTION * min(h, w)))
    cx, cy = round(fx * w), round(fy * h)
    patch = images_BCHW[:, :, cy - r: cy + r, cx - r: cx + r].flatten(2)
    return nearest_colours(patch.median(dim=2).values)


def scene_matches(images_BCHW: torch.Tensor, scenes: list[Scene]) -> torch.Tensor:
    """Per picture: [background right (0/1), objects whose colour is right at their position, objects] (B, 3)."""
    assert images_BCHW.shape[0] == len(scenes), (images_BCHW.shape, len(scenes))
    index = {name: i for i, name in enumerate(COLOUR_NAMES)}
    found_bg = background_colours(images_BCHW).tolist()
    at = {p: colours_at(images_BCHW, p).tolist() for p in POSITIONS}
    rows = []
    for k, (background, items) in enumerate(scenes):
        right = sum(at[position][k] == index[colour] for _, colour, position in items)
        rows.append([float(found_bg[k] == index[background]), float(right), float(len(items))])
    return torch.tensor(rows, dtype=torch.float64)
