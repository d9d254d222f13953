"""Learning you can see on a CPU: a short conf/learn.yaml run must lift the toy metrics well above their
initial values, and the same run must NOT when the captions are shuffled against their latents or when the
v-target's sign is flipped (the negative controls run every time, as cases of the same test).

The three cases share the synthetic data and the fitted toy VAE (a module fixture, made once) and the
untrained UNet's evaluation (same seed, same initial weights).

The learning case runs the MLPerf submission path for real, with no stand-in: it trains with eval.inline=false
(two collected checkpoints), `sd-mlperf evaluate --run-dir RUN --all` scores them with the real toy metrics
against training.target_toy, and the final log it writes must be one `sd-mlperf package` accepts (the official
compliance checker and the reviewer's checks: sd_mlperf.submission.runs.read_run).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sd_mlperf.config import load_config
from sd_mlperf.training.build import build_trainer
from sd_mlperf.training.smoke_assets import prepare_smoke_assets
from tests.unit.training._helpers import cpu_dist

REPO = Path(__file__).resolve().parents[2]
STEPS = 300
SHORT = [  # conf/learn.yaml, shorter: a smaller dataset and toy-VAE fit, one evaluation after STEPS steps
    "data.synthetic.num_train_samples=512", "data.synthetic.num_train_shards=2", "data.synthetic.num_val_prompts=32",
    "data.synthetic.fit_vae_steps=400", "eval.num_prompts=32", "eval.ddim_steps=10", "eval.num_grid_images=4",
    f"training.max_steps={STEPS}", f"training.checkpoint_every_samples={16 * STEPS}", "training.stop_at_target=false",
    "checkpoint.export_ldm_weights=false", "logging.interval_steps=100", "logging.progress_bar=off",
]
GAIN = 0.4
"""The background-colour accuracy must rise by this much (chance is 0.10); the controls stay near chance."""


OFFLINE = [  # the learning case, evaluated offline: checkpoints at STEPS / 2 and STEPS, a target between them
    "eval.inline=false", f"training.checkpoint_every_samples={16 * STEPS // 2}",
    "training.target_toy.toy_background_acc=0.5"]  # measured: about 0.1 at step 150, 0.8 at step 300


def _cfg(data_dir: Path, out_dir: Path, name: str, *more: str):
    return load_config([REPO / "conf" / "learn.yaml"], [f"run.output_dir={out_dir}", f"run.name={name}",
                                                       f"data.synthetic_dir={data_dir}", *SHORT, *more])


def _evaluate_offline(run_dir: Path) -> dict:
    """`sd-mlperf evaluate --run-dir RUN --all`, then the final log checked as the packager checks it; the toy
    metrics of the last checkpoint."""
    from sd_mlperf.cli import main
    from sd_mlperf.submission.runs import read_run
    from sd_mlperf.training.offline_eval import read_score_records

    assert main(["evaluate", "--run-dir", str(run_dir), "--all"]) == 0  # converged, two evaluations
    scores = read_score_records(run_dir)
    assert [r["step"] for r in scores] == [STEPS // 2, STEPS]  # the first fails the toy target, the second passes
    record, problems = read_run(run_dir)
    assert problems == [] and record.status == "success", problems
    assert record.samples_to_target == 16 * STEPS and record.scored_every_checkpoint
    return scores[-1]["extra"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[dict]:
    """The data dir (pictures, toy VAE, latents) and the untrained UNet's toy metrics."""
    root = tmp_path_factory.mktemp("learning")
    cfg = _cfg(root / "data", root, "untrained")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.run.num_threads)  # as `sd-mlperf train` does (1: tiny ops on a shared CPU)
    try:
        prepare_smoke_assets(cfg, cpu_dist())  # pictures, toy VAE, latents, FID statistics
        trainer = build_trainer(cfg, cpu_dist())
        try:
            before = trainer.evaluator.evaluate(trainer.dp.unwrapped, samples_count=0, step=0).extra
        finally:
            trainer.close()
        yield {"data": root / "data", "before": before}
    finally:
        torch.set_num_threads(threads)


def _shuffle_captions(monkeypatch: pytest.MonkeyPatch) -> None:
    from sd_mlperf.data.conditioning import BatchConditioner

    conditioned = BatchConditioner.__call__

    def shuffled(self, batch, generator=None, device=None):
        z0, context = conditioned(self, batch, generator, device)
        return z0, context.roll(1, dims=0)  # each latent gets another (random) sample's caption

    monkeypatch.setattr(BatchConditioner, "__call__", shuffled)


def _flip_v_target(monkeypatch: pytest.MonkeyPatch) -> None:
    import sd_mlperf.training.step
    from sd_mlperf.diffusion.schedule import v_target

    monkeypatch.setattr(sd_mlperf.training.step, "v_target", lambda *args: -v_target(*args))


SABOTAGE = {"none": lambda monkeypatch: None, "shuffled_captions": _shuffle_captions,
            "flipped_v_target": _flip_v_target}


@pytest.mark.slow
@pytest.mark.parametrize(("sabotage", "learns"), [("none", True), ("shuffled_captions", False),
                                                  ("flipped_v_target", False)])
def test_training_lifts_the_toy_metrics(shared, tmp_path, monkeypatch, sabotage, learns):
    SABOTAGE[sabotage](monkeypatch)
    cfg = _cfg(shared["data"], tmp_path, sabotage, *(OFFLINE if learns else []))
    prepare_smoke_assets(cfg, cpu_dist())  # made by the fixture: reused
    trainer = build_trainer(cfg, cpu_dist())
    start = time.perf_counter()
    try:
        state = trainer.fit()
    finally:
        trainer.close()
    before, after = shared["before"], _evaluate_offline(tmp_path / sabotage) if learns else state.evals[-1]
    report = (f"{sabotage}: {STEPS} steps in {time.perf_counter() - start:.0f} s; background-colour accuracy "
              f"{before['toy_background_acc']:.2f} -> {after['toy_background_acc']:.2f}, object colours "
              f"{before['toy_object_acc']:.2f} -> {after['toy_object_acc']:.2f}, latent FD "
              f"{before['toy_latent_fd']:.1f} -> {after['toy_latent_fd']:.1f}")
    print(report)
    gained = after["toy_background_acc"] - before["toy_background_acc"] >= GAIN
    closer = after["toy_latent_fd"] < before["toy_latent_fd"]
    assert (gained and closer) == learns, report
