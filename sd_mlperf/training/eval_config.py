"""The config an offline evaluation scores with: a run directory's own config.yaml (`load_run_config`, waited for by
`--watch` with `wait_for_run_config`), or given files for loose checkpoints (`load_checkpoint_config`, taking the
evaluation noise seed from the checkpoints' run where one is recorded)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

from sd_mlperf.config import load_config
from sd_mlperf.config.load import RUN_CONFIG_FILE
from sd_mlperf.config.schema import Config
from sd_mlperf.training.checkpoints import checkpoint_run_dir, checkpoint_weights_file
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.logging import logger


def check_num_prompts(num_prompts: int | None) -> None:
    """A quick look's prompt count (--num-prompts): None (all of eval.num_prompts) or at least 2."""
    if num_prompts is not None and num_prompts < 2:
        raise ValueError(f"--num-prompts must be at least 2 (FID needs 2 images), got {num_prompts}")


def run_config_seed(run_dir: str | os.PathLike | None) -> int | None:
    """The run.seed a run directory's config.yaml records; None without a run, a config.yaml or a seed."""
    from omegaconf import OmegaConf

    config = Path(run_dir) / RUN_CONFIG_FILE if run_dir is not None else None
    if config is None or not config.is_file():
        return None
    seed = OmegaConf.load(config).run.get("seed")
    return None if seed is None else int(seed)


WAIT_REMINDER_S = 300.0
"""--watch without a timeout, waiting for a run's config.yaml: how often it says it still waits (a mistyped
--run-dir shows)."""


def wait_for_run_config(run_dir: str | os.PathLike, *, poll_s: float, timeout_s: float | None) -> None:
    """--watch started before the trainer: wait until the run directory holds its config.yaml (or time out)."""
    config = Path(run_dir) / RUN_CONFIG_FILE
    start = reminded = time.monotonic()
    if not config.is_file():
        logger.info("waiting for %s (the trainer writes it when it starts)", config)
    while not config.is_file():
        now = time.monotonic()
        if timeout_s is not None and now - start > timeout_s:
            raise UserError(f"--watch: {config} did not appear within {timeout_s:.0f} s (--watch-timeout-s): is the "
                            "trainer running with this run.output_dir/run.name?")
        if timeout_s is None and now - reminded >= WAIT_REMINDER_S:
            reminded = now
            logger.warning("--watch: still waiting for %s after %.0f s: is the trainer running with this "
                           "run.output_dir/run.name? (--watch-timeout-s S gives up after S seconds)", config,
                           now - start)
        time.sleep(min(poll_s, 5.0))


def load_run_config(run_dir: str | os.PathLike, config_files: Sequence[str | os.PathLike] = (),
                    overrides: Sequence[str] = (), *, num_prompts: int | None = None) -> Config:
    """The config to score a run's collected checkpoints with: its own config.yaml, then files, then overrides.

    The run's config gives the seed, targets and evaluation settings; the processes are this launch's, not
    training's. Refuses a run that evaluated inline (its log is final already) and a `num_prompts` below 2.
    """
    from sd_mlperf.parallel.launch import read_launch_env

    run_dir = Path(run_dir)
    config = run_dir / RUN_CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: --run-dir takes a run directory of `sd-mlperf train`")
    world = read_launch_env().world_size
    cfg = load_config([config, *config_files], ["parallel.num_nodes=1", f"parallel.gpus_per_node={world}",
                                                *overrides])
    if cfg.eval.inline:
        raise ValueError(f"{run_dir} trained with eval.inline=true: its {cfg.logging.mlperf_log_file} is final "
                         "already. Use --checkpoint to score its checkpoints again.")
    check_num_prompts(num_prompts)
    return cfg


def load_checkpoint_config(paths: Sequence[str | os.PathLike], config_files: Sequence[str | os.PathLike] = (),
                           overrides: Sequence[str] = (), *,
                           num_prompts: int | None = None) -> tuple[Config, list[Path]]:
    """The config and the weights files to score checkpoints with (`sd-mlperf evaluate --checkpoint`).

    `num_prompts` becomes eval.num_prompts. With run.seed and eval.seed null, the seed comes from the config.yaml
    of the first checkpoint's run that records one, so the evaluation noise is that run's. Every path is checked
    here, before any model is built; the weights are read one checkpoint at a time (read_checkpoint_weights) while
    scoring, so only one checkpoint's weights are in memory at once.
    """
    check_num_prompts(num_prompts)
    overrides = [*overrides, *([f"eval.num_prompts={num_prompts}"] if num_prompts else [])]
    cfg = load_config(config_files, overrides)
    files = [checkpoint_weights_file(path) for path in paths]
    if cfg.run.seed is None and cfg.eval.seed is None:
        seed = next((s for f in files if (s := run_config_seed(checkpoint_run_dir(f))) is not None), None)
        if seed is not None:
            cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))
    return cfg, files
