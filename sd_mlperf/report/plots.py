"""PNG plots of a run against samples: training (loss, lr, images/s, ...), evaluation (FID, CLIP and every further
numeric metric, e.g. the toy metrics) and the sample grids of the evaluations side by side.

matplotlib is an extra (`pip install -e '.[report]'`); it is imported here only, and drawn through the Agg
canvas of a `Figure` (no pyplot state, no display needed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd_mlperf.report.run_data import RunData
from sd_mlperf.utils.errors import UserError

DPI = 100
TRAIN_PANELS = (("loss", "loss (mean over the log interval)"), ("lr", "learning rate"),
                ("img_per_s", "images/s (all ranks)"), ("img_per_s_per_gpu", "images/s per GPU"),
                ("grad_norm", "gradient norm (last step)"), ("mfu", "MFU"), ("peak_mem_gib", "peak GPU memory (GiB)"),
                ("loss_scale", "loss scale"))
"""Train record keys drawn when present (images/s per GPU only with more than one rank, loss scale only if it
changes)."""


def _figure_class() -> type:
    """matplotlib's Figure, or a RuntimeError with the install hint."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise UserError(f"sd-mlperf report draws with matplotlib, which is not installed ({exc}). Install it with "
                           "`pip install -c tests/constraints-cpu.txt -e '.[report]'` (or `pip install matplotlib`).") \
            from exc
    return Figure


def _panels(n: int, *, columns: int = 3, panel_in: tuple[float, float] = (4.4, 3.0)) -> tuple[Any, list[Any]]:
    cols = min(n, columns)
    rows = math.ceil(n / cols)
    fig = _figure_class()(figsize=(panel_in[0] * cols, panel_in[1] * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _finite(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["samples"])
            ys.append(v)
    return xs, ys


def _style(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("samples")
    ax.grid(alpha=0.3)
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)  # small changes read as values, not as "1e-6+3.27e-1"


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_training(data: RunData, path: Path) -> Path | None:
    """Loss, lr, images/s, grad norm (and MFU, GPU memory, loss scale when they say something) against samples."""
    train = data.train
    keys = []
    for key, title in TRAIN_PANELS:
        _, ys = _finite(train, key)
        if not ys or (key == "img_per_s_per_gpu" and data.world_size == 1) or (key == "loss_scale" and
                                                                               len(set(ys)) == 1):
            continue
        keys.append((key, title))
    if not keys:
        return None
    fig, axes = _panels(len(keys))
    restarts = [r["samples"] for r in data.records if r.get("kind") == "resume"]
    for ax, (key, title) in zip(axes, keys):
        xs, ys = _finite(train, key)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, linewidth=1.2)
        for x in restarts:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        if key == "loss_scale" or (key == "lr" and min(ys) > 0 and max(ys) / min(ys) > 100):
            ax.set_yscale("log")
        _style(ax, title)
    fig.suptitle(f"{data.run_dir.name}: training (global batch {data.global_batch_size}"
                 + (", dotted: resumed" if restarts else "") + ")")
    return _save(fig, path)


def _target(data: RunData, name: str) -> tuple[float, str] | None:
    tr = data.cfg.training
    if name == "fid":
        return tr.target_fid, "<="
    if name == "clip":
        return tr.target_clip, ">="
    return (tr.target_toy[name], ">=") if name in tr.target_toy else None


def plot_evaluations(data: RunData, path: Path) -> Path | None:
    """One panel per evaluation metric (FID, CLIP, then the rest), inline and offline scores, target lines."""
    names = data.metric_names()
    if not names:
        return None
    fig, axes = _panels(len(names))
    for ax, name in zip(axes, names):
        for source, marker in (("inline", "o"), ("offline", "s")):
            xs, ys = _finite([e for e in data.evals if e["source"] == source], name)
            if xs:
                ax.plot(xs, ys, marker=marker, linewidth=1.2, label=source)
        target = _target(data, name)
        if target is not None:
            ax.axhline(target[0], color="tab:red", linestyle="--", linewidth=1, label=f"target {target[1]} "
                       f"{target[0]:g}")
        _style(ax, name.upper() if name in ("fid", "clip") else name)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data.run_dir.name}: evaluations")
    return _save(fig, path)


def _spread(items: list[Any], limit: int) -> list[Any]:
    """At most `limit` items, evenly spaced, first and last kept."""
    if len(items) <= limit:
        return items
    if limit == 1:
        return items[-1:]
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


def plot_grids(data: RunData, path: Path, *, max_grids: int = 8, max_width_px: int = 900) -> Path | None:
    """The sample grids of the evaluations side by side (at most `max_grids`, evenly spaced), each titled with
    its step, samples and scores."""
    from PIL import Image

    grids = _spread(data.grids(), max_grids)
    if not grids:
        return None
    images = []
    for _, _, grid in grids:
        with Image.open(grid) as im:
            im = im.convert("RGB")
            im.thumbnail((max_width_px, max_width_px))  # keeps the aspect; benchmark grids are large
            images.append(im)
    aspect = max(im.width / im.height for im in images)
    cols = min(len(images), 2 if aspect > 1.5 else 4)
    panel_w = 6.0 if aspect > 1.5 else 4.0
    fig, axes = _panels(len(images), columns=cols, panel_in=(panel_w, panel_w / aspect + 0.6))
    evals = {(e["source"], e["step"]): e for e in data.evals}
    names = [n for n in data.metric_names() if n in ("fid", "clip")]
    for ax, (source, step, _), im in zip(axes, grids, images):
        e = evals.get((source, step), {})
        scores = " ".join(f"{n.upper()} {e[n]:.4g}" for n in names if n in e)
        samples = f", {e['samples']:,} samples" if "samples" in e else ""
        ax.imshow(im)
        ax.set_title(f"{source} step {step}{samples}\n{scores}", fontsize=9)
        ax.axis("off")
    shown = "" if len(grids) == len(data.grids()) else f" ({len(grids)} of {len(data.grids())})"
    fig.suptitle(f"{data.run_dir.name}: sample grids{shown}")
    return _save(fig, path)


def write_plots(data: RunData, out_dir: str | os.PathLike, *, max_grids: int = 8) -> list[Path]:
    """train.png, eval.png and grids.png in `out_dir`, each when the run has something to draw."""
    _figure_class()  # fail with the install hint before reading anything else
    out = Path(out_dir)
    written = [plot_training(data, out / "train.png"), plot_evaluations(data, out / "eval.png"),
               plot_grids(data, out / "grids.png", max_grids=max_grids)]
    return [p for p in written if p is not None]
