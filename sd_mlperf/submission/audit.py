"""What a results reviewer checks beyond the official checkers: that each run's log is its config's and its
evaluations' own, and that the runs of one submission trained the same way.

Each check returns problems phrased to follow '<run_dir>: ' (per run) or whole sentences (across runs):
- the log's hyperparameters against the run's config.yaml (global batch, lr after warmup, warmup, every opt_*);
- a log labelled closed against its config: run.division closed and no closed-division rule broken (the config
  is validated again, so an edited config.yaml cannot pass as closed);
- each eval_accuracy line against RUN/eval_offline/scores.jsonl (offline-evaluated runs);
- run_stop's time and samples_count against the collection record of the first passing checkpoint
  (RUN/eval_checkpoints/index.jsonl);
- across runs: the same training config (global batch, optim, model, diffusion, data) and distinct seeds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sd_mlperf.config.closed_division import UNET_EXECUTION_KEYS, closed_division_violations
from sd_mlperf.training.eval_checkpoints import read_index
from sd_mlperf.training.final_log import Score, score_of_record
from sd_mlperf.training.mlperf_log import logged_hyperparameters
from sd_mlperf.training.offline_eval import SCORES_FILE, read_score_records

# The config that makes two runs the same training (paths, run names and execution choices may differ).
COMPARED_SECTIONS = ("optim", "diffusion", "model.unet", "model.vae", "model.text_encoder", "data.synthetic")
COMPARED_KEYS = ("model.frozen_checkpoint_sha256", "data.train_format", "data.num_train_samples", "data.image_size",
                 "data.image_range", "training.target_fid", "training.target_clip", "training.target_toy")
_REL_TOL = 1e-9


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def training_fingerprint(cfg: DictConfig, global_batch_size: int | None) -> dict[str, Any]:
    """Dotted key -> value of everything that must agree between the runs of one submission."""
    out: dict[str, Any] = {"global batch size": global_batch_size}
    for section in COMPARED_SECTIONS:
        for name, value in (_select(cfg, section) or {}).items():
            if section == "model.unet" and name in UNET_EXECUTION_KEYS:
                continue
            out[f"{section}.{name}"] = value
    out.update({key: _select(cfg, key) for key in COMPARED_KEYS})
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=_REL_TOL)
    return a == b


HYPERPARAMETERS_CHECKED = ("gradient_accumulation_steps", "opt_name", "opt_adamw_beta_1", "opt_adamw_beta_2",
                           "opt_adamw_epsilon", "opt_adamw_weight_decay", "opt_base_learning_rate",
                           "opt_learning_rate_warmup_steps")
"""The logged hyperparameters compared here with config.yaml."""


def log_vs_config(first: dict[str, Any], cfg: DictConfig, global_batch_size: int | None) -> list[str]:
    """The hyperparameters the log states against the config.yaml beside it."""
    logged = logged_hyperparameters(cfg, global_batch_size)  # what the trainer logs from such a config
    expected = {key: value for key, value in logged.items() if key in HYPERPARAMETERS_CHECKED}
    return [f"mlperf.log's {key} is {first.get(key)!r} but config.yaml gives {value!r}: the log and the config are "
            "not of the same run (an edited log or config)"
            for key, value in expected.items() if key in first and not _same(first[key], value)]


def closed_label_vs_config(cfg: DictConfig) -> list[str]:
    """A log labelled closed needs a config.yaml that is closed and breaks no closed-division rule."""
    if cfg.run.division != "closed":
        return [f"mlperf.log says submission_division closed but config.yaml has run.division={cfg.run.division}: "
                "an open-division run relabelled"]
    return [f"config.yaml breaks the closed division: {line}" for line in closed_division_violations(cfg)]


def recorded_scores(run_dir: Path) -> dict[int, list[Score]] | None:
    """samples_count -> every score the evaluator recorded for that checkpoint (any prompt count); None without a
    scores.jsonl (a run evaluated inline)."""
    if not (run_dir / SCORES_FILE).is_file():
        return None
    out: dict[int, list[Score]] = defaultdict(list)
    for score in map(score_of_record, read_score_records(run_dir)):
        out[score.samples_count].append(score)
    return dict(out)


def logged_score(metrics: dict[str, float], recorded: list[Score]) -> Score | None:
    """The recorded score whose FID and CLIP the log's evaluation shows, or None."""
    return next((s for s in recorded if _same(metrics.get("FID"), s.fid) and _same(metrics.get("CLIP"), s.clip)),
                None)


def evals_vs_scores(evals: dict[int, dict[str, float]], scores: dict[int, list[Score]]) -> list[str]:
    """Each eval_accuracy of the log against the scores the evaluator recorded for that checkpoint."""
    problems = []
    for count, metrics in sorted(evals.items()):
        recorded = scores.get(count)
        if not recorded:
            problems.append(f"mlperf.log has an evaluation at samples_count {count} that {SCORES_FILE} never "
                            "recorded: an edited log")
        elif logged_score(metrics, recorded) is None:
            shown = ", ".join(f"FID {s.fid!r} CLIP {s.clip!r}" for s in recorded)
            logged = ", ".join(f"{m} {v!r}" for m, v in sorted(metrics.items()))
            problems.append(f"mlperf.log's evaluation at samples_count {count} ({logged}) is none that "
                            f"{SCORES_FILE} recorded ({shown}): an edited log")
    return problems


def run_stop_vs_collection(run_dir: Path, stop_ms: float | None, stop_samples: int | None,
                           first: int | None) -> list[str]:
    """run_stop must be the collection (time, samples_count) of the first passing checkpoint."""
    records, _ = read_index(run_dir)
    if not records or first is None:
        return []
    collected = {int(r["samples_count"]): int(r["collected_ms"]) for r in records}
    if first not in collected:
        return [f"the first passing evaluation (samples_count {first}) is of no checkpoint in "
                "eval_checkpoints/index.jsonl: an edited log"]
    problems = []
    if stop_samples is not None and stop_samples != first:
        problems.append(f"run_stop's samples_count is {stop_samples}, not {first}, the first passing checkpoint's")
    if stop_ms is not None and int(stop_ms) != collected[first]:
        problems.append(f"run_stop is at {int(stop_ms)} ms but the first passing checkpoint (samples_count {first}) "
                        f"was collected at {collected[first]} ms (eval_checkpoints/index.jsonl): an edited log")
    return problems


def cross_run_problems(runs: list[tuple[Path, DictConfig | None, int | None, int | None]]) -> list[str]:
    """(run_dir, config, global batch, seed) of each run -> config differences and repeated seeds."""
    problems = []
    prints = [(d, training_fingerprint(c, g)) for d, c, g, _ in runs if c is not None]
    if prints:
        ref_dir, ref = prints[0]
        for run_dir, fp in prints[1:]:
            differ = [k for k in sorted(set(ref) | set(fp)) if not _same(ref.get(k), fp.get(k))]
            if differ:
                shown = "; ".join(f"{k}: {ref.get(k)!r} in {ref_dir}, {fp.get(k)!r} in {run_dir}" for k in differ[:5])
                problems.append(f"{run_dir}: trained with another config than {ref_dir} ({len(differ)} key(s) differ: "
                                f"{shown}): one submission's runs share their hyperparameters, model and data")
    by_seed: dict[int, list[str]] = defaultdict(list)
    for run_dir, _, _, seed in runs:
        if seed is not None:
            by_seed[seed].append(str(run_dir))
    problems += [f"seed {seed} is logged by {' and '.join(dirs)}: each run draws its own seed"
                 for seed, dirs in by_seed.items() if len(dirs) > 1]
    return problems
