"""Offline evaluation: score saved checkpoints; for a run directory, as the rules require, then write its final log.

`sd-mlperf evaluate --run-dir RUN` drives `RunEvaluation`. The MLPerf Stable Diffusion rules ask for the FID and
CLIP of every collected checkpoint up to the first passing one in 1 of the 10 runs (`all`), and of the first passing
checkpoint and the one before it in the other 9 (`last_two`). `last_two` finds that pair by bisection over the
collected checkpoints, which assumes quality that improves with training (a checkpoint that passes is
followed by passing ones): it scores about log2(N) + 1 checkpoints instead of N, and the pair it reports is a
failing checkpoint followed by a passing one, which is what the rule asks to show. If the last checkpoint
fails, `last_two` reports the run as not converged; `all` settles any doubt. `watch` scores checkpoints as
they land (the trainer running on other GPUs or nodes) and writes RUN/STOP once one passes, so the trainer
stops at its next block.

Scores are kept in RUN/eval_offline/scores.jsonl, each with what decided it: the checkpoint's sha256 (recorded
in the index when it was written) and the evaluation settings (`evaluation_settings`: prompts and their count,
noise seed, DDIM steps, guidance, precision, FID statistics, Inception/CLIP weights, ...). An interrupted or
repeated evaluation never scores a checkpoint twice; a changed setting or checkpoint is scored again. Every rank
runs the same calls: rank 0 reads the index and the score file and broadcasts what it read. One evaluator at a
time holds RUN/eval_offline/evaluate.lock.

`sd-mlperf evaluate --checkpoint PATH` scores any checkpoint (sd_mlperf.training.checkpoints.read_checkpoint_weights)
with a `CheckpointScorer` (sd_mlperf.training.checkpoint_scorer). Both forms load their config in
sd_mlperf.training.eval_config (`load_run_config`, `load_checkpoint_config`), build the scorer
(`build_checkpoint_scorer`) and write grids and JSON under RUN/eval_offline/.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sd_mlperf.config.load import evaluation_seed
from sd_mlperf.config.schema import Config
from sd_mlperf.eval.distributed import broadcast_object, main_rank_result
from sd_mlperf.training.eval_checkpoints import (
    EVAL_CHECKPOINT_DIR,
    load_eval_checkpoint,
    read_index,
    request_stop,
    trainer_gone,
)
from sd_mlperf.training.final_log import Score, compose_final_log, first_passing, score_of_record
from sd_mlperf.training.mlperf_log import TRAINING_LOG_FILE
from sd_mlperf.training.score_key import checkpoint_identity, evaluation_settings, settings_digest
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.files import atomic_write_text
from sd_mlperf.utils.jsonl import append_jsonl, read_jsonl
from sd_mlperf.utils.lock import RunLock
from sd_mlperf.utils.logging import logger

if TYPE_CHECKING:
    from sd_mlperf.training.checkpoint_scorer import CheckpointScorer

OFFLINE_EVAL_DIR = "eval_offline"
SCORES_FILE = f"{OFFLINE_EVAL_DIR}/scores.jsonl"
Strategy = Literal["all", "last_two", "watch"]
EvalScores = tuple[float, float] | tuple[float, float, dict[str, float]]
"""What an evaluation of a checkpoint gives: FID, CLIP and, for synthetic runs, the toy metrics."""


def offline_eval_dir(run_dir: str | os.PathLike) -> Path:
    """RUN/eval_offline: where offline evaluation writes grids, JSON and scores.jsonl."""
    return Path(run_dir) / OFFLINE_EVAL_DIR


def read_score_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete records of a run's scores.jsonl, in order ([] without one).

    A last line without its newline is an evaluator killed while appending: left out (that score is computed
    again, and the next append cuts it); any other line that is not JSON is an error naming the file and line.
    """
    return read_jsonl(Path(run_dir) / SCORES_FILE)


@dataclass(frozen=True)
class RunOutcome:
    """Where scoring a run ended: the final log written (or why not) and the first passing checkpoint."""

    log_path: Path
    scores: list[tuple[Score, bool]]
    """Every score in step order, with whether it passes."""
    first: Score | None
    error: str | None
    """Why the final log could not be written; None when it was."""
    lonely: bool
    """The first collected checkpoint passes already: the log holds one evaluation, which the checker refuses."""

    @property
    def exit_code(self) -> int:
        """0 for a valid converged run (final log written, two evaluations at least), else 1."""
        return 0 if self.error is None and self.first is not None and not self.lonely else 1

    def summary(self) -> str:
        """What to print: one line per score, then the verdict."""
        lines = [f"step {s.step} samples {s.samples_count}: FID {s.fid:.4f} CLIP {s.clip:.4f} "
                 f"{'PASS' if ok else 'fail'}" for s, ok in self.scores]
        if self.error is not None:
            lines.append(f"no final log written: {self.error}")
        elif self.first is None:
            lines.append(f"not converged: {self.log_path} ends with run_stop (aborted)")
        else:
            lines.append(f"converged at {self.first.samples_count} samples (step {self.first.step}): {self.log_path} "
                         "ends with run_stop (success) at that checkpoint's collection time")
        if self.lonely:
            lines.append("error: the first collected checkpoint already passes, so the log holds one evaluation "
                         "and the compliance checker (which wants two) refuses it")
        return "".join(line + "\n" for line in lines)


class RunEvaluation:
    """Scores one run's collected checkpoints with an evaluator (the same on every rank)."""

    def __init__(self, run_dir: str | Path, *, evaluate: Callable[[dict[str, Any]], EvalScores],
                 num_prompts: int, noise_seed: int, target_fid: float, target_clip: float, is_main: bool,
                 final_num_prompts: int, settings: str = "",
                 target_toy: dict[str, float] | None = None) -> None:
        """`evaluate(payload)` scores a loaded eval checkpoint and returns (FID, CLIP[, toy metrics]) on every rank;
        `target_toy` is training.target_toy (the toy metrics the target also needs).

        Scores of `final_num_prompts` prompts (the run config's eval.num_prompts) are the only ones the final
        log takes; a quick look with fewer prompts is kept apart. `settings` (settings_digest of
        evaluation_settings) joins the score key with the prompt count, the noise seed and the checkpoint's sha256.
        """
        self.run_dir = Path(run_dir)
        self._evaluate = evaluate
        self.key = {"num_prompts": num_prompts, "noise_seed": noise_seed, "settings": settings}
        self.target_fid, self.target_clip = target_fid, target_clip
        self.target_toy = dict(target_toy or {})
        self.is_main = is_main
        self.final = num_prompts == final_num_prompts
        self.scores: dict[int, Score] = self._read_scores()

    # -- what is there ---------------------------------------------------------------------------
    def collected(self) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """(collected checkpoints in step order, training_end record or None), as rank 0 read them."""
        return main_rank_result(lambda: read_index(self.run_dir), is_main=self.is_main)

    def _read_scores(self) -> dict[int, Score]:
        """This evaluation's cached scores (same settings, and the checkpoint the index names now), by step."""
        def read() -> dict[int, Score]:
            records, _ = read_index(self.run_dir)
            identity = {int(r["step"]): r.get("sha256") for r in records}
            found: dict[int, Score] = {}
            for r in read_score_records(self.run_dir):
                step = int(r["step"])
                if {k: r.get(k, "") for k in self.key} != self.key:
                    continue
                if step not in identity:
                    continue  # superseded by a resume from an earlier step, and not collected again (yet)
                if identity[step] is not None and r.get("checkpoint_sha256") != identity[step]:
                    continue  # another checkpoint of that step (collected again after a resume): score it again
                found[step] = score_of_record(r)
            return found

        return main_rank_result(read, is_main=self.is_main)

    # -- scoring ---------------------------------------------------------------------------------
    def score(self, record: dict[str, Any]) -> Score:
        """The score of one collected checkpoint (evaluated once, then read from scores.jsonl)."""
        step = int(record["step"])
        if step in self.scores:
            return self.scores[step]
        path = self.run_dir / EVAL_CHECKPOINT_DIR / record["file"]
        payload = load_eval_checkpoint(self.run_dir, record)  # every rank: verified against its checksum and step
        start_ms = int(time.time() * 1e3)  # the final log stamps the evaluation with its real times
        fid, clip, *extra = self._evaluate(payload)
        score = Score(step, int(record["samples_count"]), int(record["collected_ms"]), float(fid), float(clip),
                      {k: float(v) for k, v in (extra[0] if extra else {}).items()}, start_ms,
                      int(time.time() * 1e3))
        self.scores[step] = score
        if self.is_main:
            identity = checkpoint_identity(self.run_dir, record)  # the index's sha256 (older indexes: the file's)
            append_jsonl(self.run_dir / SCORES_FILE, {
                "step": step, "samples_count": score.samples_count, "collected_ms": score.collected_ms,
                "fid": score.fid, "clip": score.clip, "extra": score.extra,
                "eval_start_ms": score.eval_start_ms, "eval_stop_ms": score.eval_stop_ms,
                "file": str(path), "checkpoint_sha256": identity, **self.key})
        verdict = "passes" if self.passes(score) else "does not pass"
        logger.info("checkpoint step %d (%d samples): FID %.4f CLIP %.4f, %s the target", step, score.samples_count,
                    score.fid, score.clip, verdict)
        return score

    def passes(self, score: Score) -> bool:
        """Whether a score reaches the run's quality target."""
        return score.passes(self.target_fid, self.target_clip, self.target_toy)

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
            gone = broadcast_object(self._trainer_gone() if self.is_main and end is None else None)  # rank 0 looks
            if gone:  # before scoring: a dead trainer is reported at once, not after hours of scoring
                raise UserError(f"--watch: {gone} without recording the end of training in {self.run_dir} "
                                f"({len(records)} checkpoint(s) collected): resume the training run, or score what "
                                f"it collected with `sd-mlperf evaluate --run-dir {self.run_dir} --all`")
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
                raise UserError(f"--watch: no passing checkpoint and no end of training in {self.run_dir} within "
                                f"{timeout_s:.0f} s (--watch-timeout-s); {len(records)} checkpoint(s) scored so far")
            time.sleep(poll_s)

    def _trainer_gone(self) -> str | None:
        """Why the trainer is dead (its heartbeat, sd_mlperf.training.eval_checkpoints), if it died before its end."""
        gone = trainer_gone(self.run_dir)
        if gone is None or read_index(self.run_dir)[1] is not None:  # it may have ended just after our last look
            return None
        return gone

    def run(self, strategy: Strategy, *, poll_s: float = 30.0, timeout_s: float | None = None) -> None:
        """Score as `strategy` asks (see the module docstring); `all` and `last_two` need a collected checkpoint."""
        if strategy == "watch":
            self.watch(poll_s=poll_s, timeout_s=timeout_s)
            return
        records, _ = self.collected()
        if not records:
            raise ValueError(f"{self.run_dir}/{EVAL_CHECKPOINT_DIR} holds no collected checkpoint yet (the trainer "
                             "collects one at every checkpoint_every_samples)")
        (self.score_all if strategy == "all" else self.score_last_two)(records)

    # -- the result --------------------------------------------------------------------------------
    def first_passing(self) -> Score | None:
        """The first passing checkpoint among those scored."""
        return first_passing(list(self.scores.values()), self.target_fid, self.target_clip, self.target_toy)

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
                                  target_fid=self.target_fid, target_clip=self.target_clip, training_end=training_end,
                                  target_toy=self.target_toy)
        path = Path(path)
        if self.is_main:
            atomic_write_text(path, "\n".join(lines) + "\n")
        return path

    def conclude(self, log_path: str | Path) -> RunOutcome:
        """Write the final log if it can be written (every rank calls this: it is collective) and say how it ended."""
        first = self.first_passing()
        try:
            self.write_final_log(log_path)  # collective: every rank, before any rank returns
            error = None
        except ValueError as exc:
            error = str(exc)
        lonely = first is not None and not any(s.samples_count < first.samples_count for s in self.scores.values())
        scores = [(s, self.passes(s)) for s in sorted(self.scores.values(), key=lambda s: s.step)]
        return RunOutcome(log_path=Path(log_path), scores=scores, first=first, error=error, lonely=lonely)


def open_run_evaluation(run_dir: str | os.PathLike, cfg: Config, scorer: CheckpointScorer, *, is_main: bool,
                        num_prompts: int | None = None) -> RunEvaluation:
    """The evaluation of a run's collected checkpoints with the run's config (noise seed, targets) and a scorer."""
    return RunEvaluation(run_dir, evaluate=scorer.collected_scorer(run_dir),
                         num_prompts=num_prompts or cfg.eval.num_prompts, noise_seed=evaluation_seed(cfg),
                         target_fid=cfg.training.target_fid, target_clip=cfg.training.target_clip, is_main=is_main,
                         final_num_prompts=cfg.eval.num_prompts, target_toy=dict(cfg.training.target_toy),
                         # only rank 0 reads and writes scores.jsonl: the others need not hash the input files
                         settings=settings_digest(evaluation_settings(cfg, num_prompts or cfg.eval.num_prompts))
                         if is_main else "")


LOCK_FILE = f"{OFFLINE_EVAL_DIR}/evaluate.lock"


def prepare_run_evaluation(run_dir: str | os.PathLike, log_file: str, *, is_main: bool) -> RunLock | None:
    """Before any model is built: the run directory is writable (eval_offline/ and the final log's folder) and this
    evaluator holds its lock (rank 0 checks and takes it; every rank raises its error). Release the lock at the end.
    """
    from sd_mlperf.utils.files import check_writable, remove_stale_temporaries

    run_dir = Path(run_dir)
    lock = RunLock(run_dir / LOCK_FILE, "`sd-mlperf evaluate --run-dir`")

    def take() -> bool:
        purpose = "`sd-mlperf evaluate --run-dir` (scores, grids and the final log)"
        check_writable(offline_eval_dir(run_dir), purpose)
        check_writable((run_dir / log_file).parent, purpose)
        lock.acquire()
        for path in remove_stale_temporaries(offline_eval_dir(run_dir)):  # left by a killed evaluator
            logger.info("removed %s, left by an evaluation that was killed", path)
        return True

    main_rank_result(take, is_main=is_main)
    return lock if is_main else None
