"""The optional TensorBoard writer (`logging.tensorboard=true`): the metrics records as scalars, plus the eval grids.

It receives every record that `metrics.jsonl` gets (sd_mlperf.training.metrics.Progress calls `write`), so the
scalars are the same: `train/loss`, `train/lr`, `train/img_per_s`, ..., `eval/fid`, `eval/clip` and any toy
metric, all against the samples count. An evaluation record also brings its sample grid
(`GRID_DIR/step_XXXXXXX.png`, as the evaluator names it) as the image `eval/samples`. The `tensorboard` package is
an extra, never a hard dependency: asking for the writer without it fails at build time with the install hint.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

from sd_mlperf.utils.errors import UserError

TENSORBOARD_DIR = "tensorboard"
"""Event files go to RUN/tensorboard/."""
_NOT_SCALARS = ("kind", "step", "samples", "time")


class SummaryWriterLike(Protocol):
    """The part of torch.utils.tensorboard.SummaryWriter used here (tests pass a stand-in)."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
        """Record one scalar."""
        ...

    def add_image(self, tag: str, img_tensor: Any, global_step: int | None = None, *,
                  dataformats: str = "CHW") -> None:
        """Record one image."""
        ...

    def close(self) -> None:
        """Flush and close."""
        ...


def summary_writer_class() -> type:
    """torch.utils.tensorboard.SummaryWriter, or a RuntimeError that names the fix when `tensorboard` is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UserError(
            f"logging.tensorboard=true needs the tensorboard package ({exc}). Install it with "
            "`pip install -c tests/constraints-cpu.txt -e '.[tensorboard]'` (or `pip install tensorboard`), or set "
            "logging.tensorboard=false.") from exc
    return SummaryWriter


class TensorBoardSink:
    """Writes metrics records (and the evaluation grids they refer to) through a SummaryWriter-like object."""

    def __init__(self, writer: SummaryWriterLike, grid_dir: str | os.PathLike) -> None:
        self.writer = writer
        self.grid_dir = Path(grid_dir)

    def write(self, record: dict[str, Any]) -> None:
        """Scalars `KIND/KEY` against the samples count; an evaluation's grid PNG as `eval/samples`."""
        kind, samples = record.get("kind"), int(record.get("samples", 0))
        if kind not in ("train", "eval"):
            return  # start/resume markers: nothing to plot
        for key, value in record.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{key}", float(value), samples)
        grid = self.grid_dir / f"step_{int(record.get('step', 0)):07d}.png"
        if kind == "eval" and grid.is_file():
            import numpy as np
            from PIL import Image

            with Image.open(grid) as im:
                self.writer.add_image("eval/samples", np.asarray(im.convert("RGB")), samples, dataformats="HWC")

    def close(self) -> None:
        """Flush and close the writer."""
        self.writer.close()


def build_tensorboard_sink(run_dir: str | os.PathLike, grid_dir: str | os.PathLike) -> TensorBoardSink:
    """The sink of `logging.tensorboard=true`: event files in RUN/tensorboard/, grids read from `grid_dir`."""
    writer_class = summary_writer_class()
    return TensorBoardSink(writer_class(log_dir=str(Path(run_dir) / TENSORBOARD_DIR)), grid_dir)
