"""The end-of-run summary: timed run, samples, evaluations, best and target metrics, throughput, files, and a
time-to-train projection for a benchmark run. `sd-mlperf train` logs it at the end (rank 0); `sd-mlperf report`
prints it. Everything comes from the run directory (sd_mlperf.report.run_data), so both say the same.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from sd_mlperf.config.closed_division import UNET_EXECUTION_KEYS
from sd_mlperf.config.load import RUN_CONFIG_FILE
from sd_mlperf.config.schema import Config, DataConfig, UNetConfig
from sd_mlperf.report.projection import project_time_to_train
from sd_mlperf.report.run_data import RunData, read_run
from sd_mlperf.training.mlperf_log import TRAINING_LOG_FILE
from sd_mlperf.utils.logging import logger

_WIDTH = 14  # label column


def _row(label: str, text: str) -> str:
    return f"  {label:<{_WIDTH}}{text}"


def _more(text: str) -> str:
    return " " * (_WIDTH + 2) + text


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _metrics(e: dict[str, Any], names: list[str]) -> str:
    return " ".join(f"{n.upper() if n in ('fid', 'clip') else n} {e[n]:.4g}" for n in names if n in e)


def is_benchmark_model(data: RunData) -> bool:
    """Whether the run trains the benchmark's UNet at the benchmark's image size (its img/s projects a run)."""
    u, ref = data.cfg.model.unet, UNetConfig()
    same = all(getattr(u, f.name) == getattr(ref, f.name) for f in dataclasses.fields(UNetConfig)
               if f.name not in UNET_EXECUTION_KEYS)
    return same and data.cfg.data.image_size == DataConfig().image_size


def _timed_run(data: RunData) -> list[str]:
    ev = data.mlperf
    if "run_start" not in ev:
        return [_row("timed run", f"no run_start in {data.mlperf_log or 'any MLPerf log'}")]
    start = ev["run_start"]["time_ms"]
    init = ""
    if "init_start" in ev:
        init = f"; initialization before it {_seconds((start - ev['init_start']['time_ms']) / 1e3)}"
    if "run_stop" not in ev:
        return [_row("timed run", f"started, no run_stop yet in {data.mlperf_log.name}: with eval.inline=false "
                     f"`sd-mlperf evaluate --run-dir {data.run_dir}` writes it{init}")]
    stop, meta = ev["run_stop"], ev["run_stop"].get("metadata", {})
    at = f" at {meta['samples_count']:,} samples" if "samples_count" in meta else ""
    return [_row("timed run", f"run_start..run_stop {_seconds((stop['time_ms'] - start) / 1e3)}{at}, status "
                 f"{meta.get('status', '?')} ({data.mlperf_log.name}){init}")]


def _samples(data: RunData) -> list[str]:
    tr = data.cfg.training
    if data.trained is not None:  # the authoritative record (training end, run_stop or last block_stop)
        samples, source = data.trained
        last = {"samples": samples, "step": samples // data.global_batch_size}
        origin = f"; from {source}"
    else:
        train = data.train
        last = max(train, key=lambda r: r["step"]) if train else {"samples": 0, "step": 0}
        origin = "; from the progress records (no training end or block_stop recorded)"
    return [_row("samples", f"{last['samples']:,} trained in {last['step']} steps of global batch "
                 f"{data.global_batch_size} ({data.world_size} rank(s) x micro batch {tr.micro_batch_size} x "
                 f"{tr.grad_accumulation_steps} accumulation){origin}")]


def _evaluations(data: RunData) -> list[str]:
    tr = data.cfg.training
    target = f"FID <= {tr.target_fid:g} and CLIP >= {tr.target_clip:g}" + "".join(
        f" and {k} >= {v:g}" for k, v in tr.target_toy.items())
    if not data.evals:
        return [_row("evaluations", "none"), _row("target", f"{target}: not evaluated")]
    names = data.metric_names()
    sources = sorted({e["source"] for e in data.evals})
    last = data.evals[-1]
    lines = [_row("evaluations", f"{len(data.evals)} ({', '.join(sources)}); last at {last['samples']:,} samples: "
                  f"{_metrics(last, names)}")]
    scored = [e for e in data.evals if "fid" in e and "clip" in e]
    if scored:
        best_fid = min(scored, key=lambda e: e["fid"])
        best_clip = max(scored, key=lambda e: e["clip"])
        lines.append(_row("best", f"FID {best_fid['fid']:.4g} at {best_fid['samples']:,} samples, CLIP "
                          f"{best_clip['clip']:.4g} at {best_clip['samples']:,} samples"))

    def passes(e: dict[str, Any]) -> bool:
        return (e.get("fid", math.inf) <= tr.target_fid and e.get("clip", -math.inf) >= tr.target_clip
                and all(e.get(k, -math.inf) >= v for k, v in tr.target_toy.items()))

    first = next((e for e in data.evals if passes(e)), None)
    reached = f"first reached at {first['samples']:,} samples (step {first['step']})" if first else "not reached"
    lines.append(_row("target", f"{target}: {reached}"))
    return lines


def _throughput(data: RunData) -> list[str]:
    t = data.throughput()
    if t is None:
        return [_row("throughput", "no train records in metrics.jsonl")]
    unit = "GPU" if data.on_gpu else "rank"
    mfu = "n/a" if t.mfu is None else f"{100 * t.mfu:.1f}%"
    mem = "n/a" if t.peak_mem_gib is None else f"{t.peak_mem_gib:.1f} GiB"
    return [_row("throughput", f"{t.img_per_s:.1f} img/s = {t.img_per_s_per_gpu:.1f} per {unit} x {data.world_size} "
                 f"{unit}(s) (median of {t.num_intervals} log intervals, the first after each start left out); "
                 f"MFU {mfu}; peak memory {mem}")]


def _written(data: RunData, extra: list[Path]) -> list[str]:
    run = data.run_dir
    names = [n for n in (RUN_CONFIG_FILE, "resolved_backends.yaml", "metrics.jsonl", data.cfg.logging.mlperf_log_file,
                         TRAINING_LOG_FILE) if (run / n).is_file()]
    for sub, pattern, what in (("eval", "step_*.png", "grids"), ("eval_offline", "step_*.png", "grids"),
                               ("checkpoints", "step_*", "checkpoints"), ("eval_checkpoints", "*.pt", "checkpoints"),
                               ("tensorboard", "events.*", "event files")):
        if (run / sub).is_dir():
            names.append(f"{sub}/ ({len(list((run / sub).glob(pattern)))} {what})")
    names += [str(p.relative_to(run)) if p.is_relative_to(run) else str(p) for p in extra]
    return [_row("written", f"{run}: {', '.join(names)}")]


def _projection(data: RunData, num_gpus: int | None, img_per_s_per_gpu: float | None,
                global_batch_size: int | None) -> list[str]:
    gbs = global_batch_size or data.global_batch_size
    gpus = num_gpus or data.world_size
    source, note = "given", ""
    if img_per_s_per_gpu is None:
        t = data.throughput()
        if t is None:
            return [_row("time to train", "no measured throughput: pass --img-per-s-per-gpu to `sd-mlperf report`")]
        where = "GPUs" if data.on_gpu else "the CPU"
        img_per_s_per_gpu, source = t.img_per_s_per_gpu, f"measured in this run on {where}"
        if not is_benchmark_model(data):
            note = ("this run's UNet or image size is not the benchmark's, so its img/s does not project a "
                    "benchmark run: `sd-mlperf report RUN --img-per-s-per-gpu X --gpus N` takes given numbers")
    p = project_time_to_train(gbs, img_per_s_per_gpu, gpus, throughput_source=source,
                              base_lr_per_sample=data.cfg.optim.base_lr_per_sample,
                              warmup_steps=data.cfg.optim.warmup_steps)
    lines = [_row("time to train", p.lines()[0]), *(_more(x) for x in p.lines()[1:])]
    stop = data.mlperf.get("run_stop")
    if stop and stop.get("metadata", {}).get("status") == "success" and "run_start" in data.mlperf:
        minutes = (stop["time_ms"] - data.mlperf["run_start"]["time_ms"]) / 6e4
        lines.append(_more(f"measured: this run converged in {minutes:.1f} min at "
                           f"{stop['metadata'].get('samples_count', 0):,} samples"))
    if note:
        lines.append(_more(f"note: {note}"))
    return lines


def run_summary(data: RunData, *, num_gpus: int | None = None, img_per_s_per_gpu: float | None = None,
                global_batch_size: int | None = None, written: list[Path] | None = None) -> str:
    """The summary text. The projection takes the run's own global batch, GPU count and measured img/s per GPU
    unless given (`sd-mlperf report --global-batch-size/--gpus/--img-per-s-per-gpu`)."""
    lines = [f"run summary: {data.run_dir}", *_timed_run(data), *_samples(data), *_evaluations(data),
             *_throughput(data), *_written(data, written or []),
             *_projection(data, num_gpus, img_per_s_per_gpu, global_batch_size)]
    return "\n".join(lines)


def log_run_summary(run_dir: Path, cfg: Config) -> None:
    """Log the summary at the end of `sd-mlperf train` (rank 0), with the command that draws the plots."""
    text = run_summary(read_run(run_dir, cfg))
    logger.info("%s\n%s", text, _row("plots", f"sd-mlperf report {run_dir}"))
