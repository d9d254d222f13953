"""Score checkpoints: a UNet and the evaluator on this rank's device (`sd-mlperf evaluate`, both forms).

`CheckpointScorer` loads weights into the UNet and scores them; `RunEvaluation` (sd_mlperf.training.offline_eval)
uses its `collected_scorer` for a run's collected checkpoints, and `evaluate --checkpoint` its `score_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sd_mlperf.config.load import run_directory
from sd_mlperf.config.schema import Config
from sd_mlperf.training.checkpoints import CheckpointWeights
from sd_mlperf.training.final_log import append_eval_lines
from sd_mlperf.training.offline_eval import EvalScores, offline_eval_dir
from sd_mlperf.utils.dist_info import DistInfo
from sd_mlperf.utils.logging import logger

if TYPE_CHECKING:
    from sd_mlperf.eval.evaluator import EvalResult, Evaluator


class CheckpointScorer:
    """A UNet and the evaluator on this rank's device: loads weights into the UNet and scores them (all ranks)."""

    def __init__(self, unet: torch.nn.Module, evaluator: Evaluator) -> None:
        self.unet = unet
        self.evaluator = evaluator

    def score(self, state: dict[str, torch.Tensor], *, source: str, samples_count: int, step: int,
              out_dir: Path | None = None) -> EvalResult:
        """Load `state` (checked against the UNet; `source` names it in errors) and evaluate it."""
        from sd_mlperf.models.checkpoint_io import check_state_dict

        check_state_dict(self.unet, state, source=source)
        self.unet.load_state_dict(state, strict=True)
        return self.evaluator.evaluate(self.unet, samples_count=samples_count, step=step, out_dir=out_dir)

    def score_checkpoint(self, checkpoint: CheckpointWeights) -> EvalResult:
        """Score read weights; the outputs go to their run's eval_offline/ (else to the evaluator's directory)."""
        out_dir = offline_eval_dir(checkpoint.run_dir) if checkpoint.run_dir is not None else None
        return self.score(checkpoint.state, source=str(checkpoint.path), samples_count=checkpoint.samples_count or 0,
                          step=checkpoint.step, out_dir=out_dir)

    def collected_scorer(self, run_dir: str | os.PathLike) -> Callable[[dict[str, Any]], EvalScores]:
        """`RunEvaluation`'s `evaluate`: (FID, CLIP, toy metrics) of a collected checkpoint's payload."""
        def evaluate(payload: dict[str, Any]) -> EvalScores:
            result = self.score(payload["unet"], source=f"{run_dir} step {payload['step']}",
                                samples_count=int(payload["samples_count"]), step=int(payload["step"]))
            return result.fid, result.clip, dict(result.extra)

        return evaluate


def build_checkpoint_scorer(cfg: Config, dist: DistInfo, out_dir: str | os.PathLike | None = None, *,
                            num_prompts: int | None = None) -> CheckpointScorer:
    """The UNet and evaluator on this rank's device; `num_prompts` overrides eval.num_prompts.

    The evaluator writes under `out_dir`, by default the eval_offline/ of the config's run
    (run.output_dir/run.name). The frozen parts are the trainer's: the same file, or the same fixed seed for
    random (smoke) encoders.
    """
    from sd_mlperf.eval.evaluator import build_evaluator
    from sd_mlperf.models.checkpoint_io import build_frozen_encoders
    from sd_mlperf.models.unet import build_unet

    if num_prompts is not None:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, num_prompts=num_prompts))
    vae, text_encoder = build_frozen_encoders(cfg.model)
    vae.to(dist.device).eval()
    text_encoder.to(dist.device).eval()
    unet = build_unet(cfg.model.unet, compute_precisions={"eval.precision": cfg.eval.precision})
    unet.to(dist.device).eval()
    out_dir = Path(out_dir) if out_dir is not None else offline_eval_dir(run_directory(cfg))
    evaluator = build_evaluator(cfg, vae=vae, text_encoder=text_encoder, rank=dist.rank, world_size=dist.world_size,
                                device=dist.device, run_dir=out_dir.parent, out_subdir=out_dir.name)
    return CheckpointScorer(unet, evaluator)


def describe_checkpoint_score(checkpoint: CheckpointWeights, result: EvalResult) -> str:
    """One line: the checkpoint, its step and samples, FID, CLIP, images, seconds and the JSON written."""
    return (f"{checkpoint.path}: step {checkpoint.step} samples {checkpoint.samples_count} FID {result.fid:.4f} "
            f"CLIP {result.clip:.4f} ({result.num_images} images, {result.seconds:.1f} s) -> {result.json_path}")


def append_checkpoint_score(log_path: str | os.PathLike, checkpoint: CheckpointWeights, result: EvalResult) -> bool:
    """Append the score's eval_* lines to an MLPerf log; False (with a warning) when no samples_count is known."""
    count = checkpoint.samples_count
    if count is None:
        logger.warning("%s records no samples_count: no MLPerf lines written (pass --samples-count N)",
                       checkpoint.path)
        return False
    append_eval_lines(log_path, count, result.fid, result.clip)
    logger.info("appended eval_* lines (samples_count %d) to %s", count, log_path)
    return True
