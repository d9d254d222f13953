"""Fake run directories for the packaging tests: a resolved config.yaml and a realistic MLPerf log, no training.

The log is written by the real `MLPerfLogger` (so the keys, cadence and the seed's source line are the
trainer's); only the clock is fake: `mllog` reads `_current_time_ms`, which `fake_clock` replaces with a
counter the helper advances, so a run's run_start..run_stop time is chosen, not slept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import yaml

from sd_mlperf.config import global_batch_size, load_config, save_resolved_config
from sd_mlperf.config.schema import Config
from sd_mlperf.training.mlperf_log import MLPerfLogger

REPO = Path(__file__).resolve().parents[3]
SMOKE = REPO / "conf" / "smoke.yaml"
EXAMPLE_SYSTEM = REPO / "conf" / "submission" / "dgx_h100_example.yaml"
ORG = "testorg"
SYSTEM = "cpu_box"
T0_MS = 1_700_000_000_000
# FID, CLIP per evaluation: the first misses the target (FID <= 90, CLIP >= 0.15), the second reaches it.
EVALS = [(250.0, 0.08), (85.0, 0.16)]


class FakeClock:
    """Milliseconds that move only when told to."""

    def __init__(self, start_ms: int = T0_MS) -> None:
        self.now_ms = start_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: float) -> None:
        self.now_ms += int(ms)


@contextmanager
def fake_clock(start_ms: int = T0_MS) -> Iterator[FakeClock]:
    """Make mllog stamp lines with a FakeClock's time."""
    from mlperf_logging.mllog import mllog

    clock, real = FakeClock(start_ms), mllog._current_time_ms
    mllog._current_time_ms = clock
    try:
        yield clock
    finally:
        mllog._current_time_ms = real


def make_cfg(seed: int, *overrides: str) -> Config:
    """conf/smoke.yaml as an open-division run of org ORG on system SYSTEM with the given seed."""
    return load_config([SMOKE], [f"run.seed={seed}", "run.division=open", f"run.submission_org={ORG}",
                                 f"run.submission_platform={SYSTEM}", *overrides])


def write_run(run_dir: Path, seed: int, minutes: float, *overrides: str, evals: Sequence[tuple[float, float]] = EVALS,
              finish: bool = True, success: bool = True, start_samples: int = 0, resumed_marker: bool = False,
              start_ms: int = T0_MS) -> Path:
    """A run directory whose log times run_start..run_stop at `minutes` (blocks evenly spaced)."""
    cfg = make_cfg(seed, *overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, run_dir)
    gbs = global_batch_size(cfg)
    per_block = cfg.training.checkpoint_every_samples
    with fake_clock(start_ms) as clock:
        log = MLPerfLogger(run_dir / "mlperf.log")
        log.init_start(cache_cleared=True)
        log.submission(cfg)
        log.hyperparameters(cfg, global_batch_size=gbs)
        clock.advance(60_000)  # one minute of untimed initialisation
        if resumed_marker:
            log.resumed("checkpoints/step_0000010", start_samples)
        log.run_start(start_samples)
        samples = start_samples
        step_ms = minutes * 60_000 / len(evals)
        for fid, clip in evals:
            log.block_start(samples)
            clock.advance(step_ms)
            samples += per_block
            log.block_stop(samples)
            # Offline evaluation appends these later in the real flow; their times do not count.
            log.eval_start(samples)
            log.eval_result(samples, fid, clip)
            log.eval_stop(samples)
        if finish:
            log.run_stop(samples, success=success)
        log.close()
    return run_dir


def write_runs(root: Path, num_runs: int = 10, *overrides: str) -> list[Path]:
    """`num_runs` converged runs with distinct seeds and run times 10, 11, ... minutes (shuffled)."""
    minutes = [10.0 + ((3 * i) % num_runs) for i in range(num_runs)]
    return [write_run(root / f"run{i}", 1000 + i, m, *overrides) for i, m in enumerate(minutes)]


def write_system_config(path: Path, **changes) -> Path:
    """The shipped DGX H100 example with every placeholder filled, for a 1-node, 1-accelerator, 2-socket CPU box."""
    fields = yaml.safe_load(EXAMPLE_SYSTEM.read_text())
    for key, value in fields.items():
        if isinstance(value, str) and "<EDIT" in value:
            fields[key] = f"test value for {key}"
    fields.update(number_of_nodes=1, accelerators_per_node=1, host_processors_per_node=2,
                  status="Available on-premise")  # the runs log submission_status onprem (the default)
    for key, value in changes.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    path.write_text(json.dumps(fields) if path.suffix == ".json" else yaml.safe_dump(fields))
    return path
