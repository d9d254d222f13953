"""A run directory as `sd-mlperf train` leaves it (config, metrics.jsonl, MLPerf log, grids), written directly."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from sd_mlperf.config import load_config
from sd_mlperf.config.load import save_resolved_config

REPO = Path(__file__).resolve().parents[3]
T0_MS = 1_700_000_000_000


def _mllog(key: str, time_ms: int, value=None, **metadata) -> str:
    event = {"namespace": "", "time_ms": time_ms, "event_type": "POINT_IN_TIME", "key": key, "value": value,
             "metadata": metadata}
    return ":::MLLOG " + json.dumps(event)


def make_run(tmp_path: Path, *, fids=(120.0, 80.0), clips=(0.10, 0.16), overrides=(), grid_size=(768, 232),
             status: str = "aborted") -> Path:
    """The smoke config's run (GBS 4) with 4 train records, 2 inline evaluations with a toy metric, 2 grids."""
    cfg = load_config([REPO / "conf" / "smoke.yaml"], [f"run.output_dir={tmp_path}", *overrides])
    run = tmp_path / cfg.run.name
    run.mkdir(parents=True)
    save_resolved_config(cfg, run)
    records = [{"kind": "start", "step": 0, "samples": 0, "time": 0.0}]
    for i, step in enumerate((5, 10, 15, 20)):
        img_per_s = 50.0 if i == 0 else 80.0 + i  # the first interval holds the warm-up
        records.append({"kind": "train", "step": step, "samples": 4 * step, "loss": 0.5 - 0.05 * i,
                        "skipped_steps": 0, "grad_norm": 1.0, "lr": 5e-7, "loss_scale": 1.0, "img_per_s": img_per_s,
                        "img_per_s_per_gpu": img_per_s, "mfu": None, "peak_mem_gib": None, "step_time_s": 0.05,
                        "s_to_checkpoint": 0.25, "time": float(step)})
        if step % 10 == 0:
            k = step // 10 - 1
            records.append({"kind": "eval", "step": step, "samples": 4 * step, "fid": fids[k], "clip": clips[k],
                            "toy_background_acc": 0.2 + 0.1 * k, "seconds": 1.0, "time": float(step)})
            grid = run / "eval" / f"step_{step:07d}.png"
            grid.parent.mkdir(exist_ok=True)
            Image.new("RGB", grid_size, (40 * k, 120, 200)).save(grid)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    log = [_mllog("init_start", T0_MS - 3000), _mllog("global_batch_size", T0_MS - 2000, 4),
           _mllog("run_start", T0_MS, samples_count=0),
           _mllog("run_stop", T0_MS + 5000, samples_count=80, status=status)]
    (run / "mlperf.log").write_text("\n".join(log) + "\n")
    return run
