"""Offline evaluation of a run directory: score its collected checkpoints as the rules require, write its final log.

`sd-mlperf evaluate --run-dir RUN` drives it. The MLPerf Stable Diffusion rules ask for the FID and CLIP of
every collected checkpoint up to the first passing one in 1 of the 10 runs (`all`), and of the first passing
checkpoint and the one before it in the other 9 (`last_two`). `last_two` finds that pair by bisection over the
collected checkpoints, which assumes quality that improves with training (a checkpoint that passes is
followed by passing ones): it scores about log2(N) + 1 checkpoints instead of N, and the pair it reports is a
failing checkpoint followed by a passing one, which is what the rule asks to show. If the last checkpoint
fails, `last_two` reports the run as not converged; `all` settles any doubt. `watch` scores checkpoints as
they land (the trainer running on other GPUs or nodes) and writes RUN/STOP once one passes, so the trainer
stops at its next block.

Scores are kept in RUN/eval_offline/scores.jsonl (with the prompt count and noise seed they were computed
with), so an interrupted or repeated evaluation never scores a checkpoint twice. Every rank runs the same
calls: rank 0 reads the index and the score file and broadcasts what it read.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from sd_mlperf.eval.distributed import broadcast_object
from sd_mlperf.training.eval_checkpoints import EVAL_CHECKPOINT_DIR, read_index, request_stop
from sd_mlperf.training.final_log import Score, compose_final_log, first_passing
from sd_mlperf.training.mlperf_log import TRAINING_LOG_FILE
from sd_mlperf.utils.files import atomic_write_text
from sd_mlperf.utils.logging import logger

SCORES_FILE = "eval_offline/scores.jsonl"
Strategy = Literal["all", "last_two"]


class RunEvaluation:
    """Scores one run's collected checkpoints with an evaluator (the same on every rank)."""

    def __init__(self, run_dir: str | Path, *, evaluate: Callable[[dict[str, Any]], tuple[float, float]],
                 num_prompts: int, noise_seed: int, target_fid: float, target_clip: float, is_main: bool,
                 final_num_prompts: int) -> None:
        """`evaluate(payload)` scores a loaded eval checkpoint and returns (FID, CLIP) on every rank.

        Scores of `final_num_prompts` prompts (the run config's eval.num_prompts) are the only ones the final
        log takes; a quick look with fewer prompts is kept apart.
        """
        self.run_dir = Path(run_dir)
        self._evaluate = evaluate
        self.key = {"num_prompts": num_prompts, "noise_seed": noise_seed}
        self.target_fid, self.target_clip = target_fid, target_clip
        self.is_main = is_main
        self.final = num_prompts == final_num_prompts
        self.scores: dict[int, Score] = self._read_scores()

    # -- what is there ---------------------------------------------------------------------------
    def collected(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """(collected checkpoints in step order, training_end record or None), as rank 0 read them."""
        return broadcast_object(read_index(self.run_dir) if self.is_main else None)  # type: ignore[return-value]

    def _read_scores(self) -> dict[int, Score]:
        path = self.run_dir / SCORES_FILE
        found: dict[int, Score] = {}
        if self.is_main and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
                if not line.endswith("\n"):  # an evaluator killed while appending: that score is computed again
                    break
                record = json.loads(line)
                if {k: record.get(k) for k in self.key} == self.key:
                    found[record["step"]] = Score(record["step"], record["samples_count"], record["collected_ms"],
                                                  record["fid"], record["clip"])
        return broadcast_object(found)  # type: ignore[return-value]

    # -- scoring ---------------------------------------------------------------------------------
    def score(self, record: dict[str, Any]) -> Score:
        """The score of one collected checkpoint (evaluated once, then read from scores.jsonl)."""
        step = int(record["step"])
        if step in self.scores:
            return self.scores[step]
        path = self.run_dir / EVAL_CHECKPOINT_DIR / record["file"]
        payload = torch.load(path, map_location="cpu", weights_only=True)
        fid, clip = self._evaluate(payload)
        score = Score(step, int(record["samples_count"]), int(record["collected_ms"]), float(fid), float(clip))
        self.scores[step] = score
        if self.is_main:
            line = json.dumps({"step": step, "samples_count": score.samples_count, "collected_ms": score.collected_ms,
                               "fid": score.fid, "clip": score.clip, "file": str(path), **self.key})
            path_scores = self.run_dir / SCORES_FILE
            path_scores.parent.mkdir(parents=True, exist_ok=True)
            with open(path_scores, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        verdict = "passes" if self.passes(score) else "does not pass"
        logger.info("checkpoint step %d (%d samples): FID %.4f CLIP %.4f, %s the target", step, score.samples_count,
                    score.fid, score.clip, verdict)
        return score

    def passes(self, score: Score) -> bool:
        """Whether a score reaches the run's quality target."""
        return score.passes(self.target_fid, self.target_clip)

    def score_all(self, records: list[dict[str, Any]]) -> None:
        """Every checkpoint in order up to the first passing one."""
        for record in records:
            if self.passes(self.score(record)):
                return

    def score_last_two(self, records: list[dict[str, Any]]) -> None:
        """The first passing checkpoint and the one before it, by bisection (see the module docstring)."""
        if not records or not self.passes(self.score(records[-1])):
            return
        fail, ok = -1, len(records) - 1  # invariant: records[ok] passes; records[fail] fails (-1: before the first)
        while ok - fail > 1:
            mid = (fail + ok) // 2
            if self.passes(self.score(records[mid])):
                ok = mid
            else:
                fail = mid

    def watch(self, *, poll_s: float, timeout_s: float | None = None) -> None:
        """Score checkpoints as they land until one passes (then write RUN/STOP) or training ends."""
        start = time.monotonic()
        while True:
            records, end = self.collected()
            for record in records:
                if self.passes(self.score(record)):
                    if self.is_main:
                        request_stop(self.run_dir, f"checkpoint step {record['step']} reached the target")
                        logger.info("wrote %s: the trainer stops at its next block", self.run_dir / "STOP")
                    return
            if end is not None:
                return
            expired = timeout_s is not None and time.monotonic() - start > timeout_s
            if broadcast_object(expired if self.is_main else None):  # rank 0's clock decides for all
                raise TimeoutError(f"--watch: no passing checkpoint and no end of training in {self.run_dir} within "
                                   f"{timeout_s:.0f} s")
            time.sleep(poll_s)

    # -- the result --------------------------------------------------------------------------------
    def first_passing(self) -> Score | None:
        """The first passing checkpoint among those scored."""
        return first_passing(list(self.scores.values()), self.target_fid, self.target_clip)

    def write_final_log(self, path: str | Path) -> Path:
        """Write the run's final MLPerf log (rank 0 writes, atomically). Raises ValueError while it cannot be written.

        Every rank calls it (it reads the index collectively) and composes the same lines from the same scores, so
        every rank raises the same error or none.
        """
        if not self.final:
            raise ValueError(f"these scores use {self.key['num_prompts']} prompts, not the run's eval.num_prompts: a "
                             "quick look never writes the final log")
        records, end = self.collected()
        by_step = {int(r["step"]): r for r in records}
        stray = [s for s in self.scores if s not in by_step]
        if stray:
            raise ValueError(f"scores.jsonl holds steps {stray} that {self.run_dir / EVAL_CHECKPOINT_DIR} never "
                             "collected: it belongs to another run")
        training_end = (int(end["samples_count"]), int(end["time_ms"])) if end else None
        lines = compose_final_log(self.run_dir / TRAINING_LOG_FILE, list(self.scores.values()),
                                  target_fid=self.target_fid, target_clip=self.target_clip, training_end=training_end)
        path = Path(path)
        if self.is_main:
            atomic_write_text(path, "\n".join(lines) + "\n")
        return path
