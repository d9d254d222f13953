"""The training loop: one step by hand, warmup, cadence, exact resume, non-finite losses, stop at target."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_mlperf.parallel.data_parallel import apply_data_parallel
from sd_mlperf.parallel.optimizer import LRSchedule
from sd_mlperf.training.build import plan_from_config
from sd_mlperf.training.checkpoint_files import checksum_file
from sd_mlperf.training.checkpoints import Checkpointer, load_file
from sd_mlperf.training.metrics import Progress, read_metrics
from sd_mlperf.training.mlperf_log import MLPerfLogger
from sd_mlperf.training.step import build_train_step
from sd_mlperf.training.trainer import NonFiniteLossError, Trainer
from tests.unit.training._helpers import (
    FakeEvaluator,
    conditioner,
    cpu_dist,
    make_batches,
    make_cfg,
    make_trainer,
    record_losses,
)


class ScaleModel(torch.nn.Module):
    """v_pred = w * x_t: one parameter, so the step can be computed by hand."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x, t, context):
        return self.w * x


def _python_alphas_cumprod() -> list[float]:
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    out, acc = [], 1.0
    for i in range(1000):
        acc *= 1.0 - (lo + (hi - lo) * i / 999) ** 2
        out.append(acc)
    return out


def _scale_trainer(cfg, tmp_path, w=0.5, seed=7):
    dp = apply_data_parallel(ScaleModel(w), cfg, cpu_dist())
    generator, lr_schedule = torch.Generator().manual_seed(seed), LRSchedule(cfg.optim, 2)
    step = build_train_step(cfg, dp, conditioner=conditioner, lr_schedule=lr_schedule, generator=generator,
                            device=torch.device("cpu"))
    trainer = Trainer(plan=plan_from_config(cfg), dp=dp, optimizer_step=step, loader=[], lr_schedule=lr_schedule,
                      generator=generator, checkpointer=Checkpointer(cfg.checkpoint, tmp_path),
                      mlperf=MLPerfLogger(None), run_dir=tmp_path,
                      progress=Progress(cfg.logging, tmp_path, enabled=False, total_steps=1, global_batch_size=2))
    return trainer, dp


def _by_hand(micro_batches, w=0.5, seed=7):
    """Replay the draws in the documented order per micro-batch (latent noise, t, eps) in float64."""
    g = torch.Generator().manual_seed(seed)
    ac = _python_alphas_cumprod()
    losses, grads = [], []
    for batch in micro_batches:
        n = batch["z0"].shape[0]
        z = (batch["z0"] + 0.1 * torch.randn(batch["z0"].shape, generator=g)).double().numpy()
        t = torch.randint(0, 1000, (n,), generator=g).tolist()
        eps = torch.randn(batch["z0"].shape, generator=g).double().numpy()
        per_sample, per_grad = [], []
        for i in range(n):
            sa, s1a = math.sqrt(ac[t[i]]), math.sqrt(1 - ac[t[i]])
            x_t = sa * z[i] + s1a * eps[i]
            v = sa * eps[i] - s1a * z[i]
            per_sample.append(np.mean((w * x_t - v) ** 2))
            per_grad.append(np.mean(2 * (w * x_t - v) * x_t))
        losses.append(np.mean(per_sample))
        grads.append(np.mean(per_grad))
    return np.mean(losses), np.mean(grads)  # accumulation: the mean over micro-batches


def test_one_step_loss_and_update_match_hand_computation(tmp_path):
    cfg = make_cfg(tmp_path)
    trainer, dp = _scale_trainer(cfg, tmp_path)
    batch = make_batches(1)[0]
    out = trainer.train_step([batch])
    loss, grad = _by_hand([batch])
    assert out["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert bool(out["ok"]) and not bool(out["fatal"])
    assert out["grad_norm"].item() == pytest.approx(abs(grad), rel=1e-4)
    # First AdamW step: m_hat / sqrt(v_hat) = sign(g); decoupled decay first; lr = 1e-6 x peak.
    lr = 1e-6 * cfg.optim.base_lr_per_sample * 2
    expected_w = 0.5 * (1 - lr * 0.01) - lr * np.sign(grad)
    assert dp.unwrapped.w.item() == pytest.approx(expected_w, rel=1e-7)


def test_gradient_accumulation_averages_micro_batches(tmp_path):
    cfg = make_cfg(tmp_path, "training.grad_accumulation_steps=2", "training.micro_batch_size=1")
    trainer, _ = _scale_trainer(cfg, tmp_path)
    micro = [{k: v[:1] for k, v in b.items()} for b in make_batches(2)]
    out = trainer.train_step(micro)
    loss, grad = _by_hand(micro)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert out["grad_norm"].item() == pytest.approx(abs(grad), rel=1e-4)
    # In the loop, one step consumes grad_accumulation_steps batches and counts the global batch.
    trainer, loader = make_trainer(make_cfg(tmp_path / "loop", "training.grad_accumulation_steps=2",
                                            "training.micro_batch_size=1", "training.max_steps=3"), micro)
    state = trainer.fit()
    trainer.close()
    assert loader.pos == 6 and state.samples_count == 6


def test_lr_follows_the_warmup_curve(tmp_path):
    cfg = make_cfg(tmp_path, "optim.warmup_steps=4", "training.max_steps=6")
    trainer, _ = make_trainer(cfg, make_batches(3))
    seen: list[float] = []
    step = trainer.dp.step
    trainer.dp.step = lambda lr: (seen.append(lr), step(lr))[1]
    trainer.fit()
    trainer.close()
    peak = cfg.optim.base_lr_per_sample * 2
    expected = [peak * (1e-6 + (1 - 1e-6) * n / 4) for n in range(4)] + [peak, peak]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_blocks_checkpoints_and_evaluations(tmp_path):
    cfg = make_cfg(tmp_path, "training.max_samples=14", "training.max_steps=null", "checkpoint.keep_last=2")
    evaluator = FakeEvaluator([(300.0, 0.05)])
    trainer, _ = make_trainer(cfg, make_batches(3), evaluator)
    state = trainer.fit()
    trainer.close()
    # 14 samples at GBS 2 = 7 steps; blocks of CEIL(6 / 2) = 3 steps, plus the final partial block.
    assert state.step == 7 and state.samples_count == 14
    assert evaluator.calls == [(6, 3), (12, 6), (14, 7)]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_0000006", "step_0000007"]
    assert not state.reached_target
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 8))
    assert [r["samples"] for r in records if r["kind"] == "eval"] == [6, 12, 14]


def test_stops_at_the_quality_target(tmp_path):
    cfg = make_cfg(tmp_path, "training.stop_at_target=true", "training.max_steps=30")
    evaluator = FakeEvaluator([(120.0, 0.2), (89.0, 0.16), (10.0, 0.9)])
    trainer, _ = make_trainer(cfg, make_batches(3), evaluator)
    state = trainer.fit()
    trainer.close()
    assert state.reached_target and state.step == 6 and len(evaluator.calls) == 2
    assert '"status": "success"' in (tmp_path / "run" / "mlperf.log").read_text()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, precision):
    batches = make_batches(5)
    common = [f"training.precision={precision}", "training.max_steps=7", "logging.interval_steps=1"]
    # Uninterrupted reference run.
    ref_trainer, _ = make_trainer(make_cfg(tmp_path / "ref", *common), batches)
    ref_losses = record_losses(ref_trainer)
    ref_trainer.fit()
    ref_trainer.close()
    ref_state = ref_trainer.dp.unwrapped.state_dict()

    # Killed after step 4 (last checkpoint at step 3), then resumed with training.resume=auto.
    cfg = make_cfg(tmp_path / "cut", *common)
    trainer, loader = make_trainer(cfg, batches)
    losses = record_losses(trainer)
    loader.fail_at = 4
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer.close()
    assert losses == ref_losses[:4]
    assert "run_stop" in (tmp_path / "cut" / "run" / "mlperf.log").read_text()

    resumed, _ = make_trainer(cfg, batches)
    assert resumed.state.step == 3 and resumed.state.samples_count == 6
    resumed_losses = record_losses(resumed)
    resumed.fit()
    resumed.close()
    assert resumed_losses == ref_losses[3:]  # bit-exact: same weights, AdamW state, RNGs, data position
    for name, value in resumed.dp.unwrapped.state_dict().items():
        assert torch.equal(value, ref_state[name]), name
    if precision == "fp16":
        assert float(resumed.dp.loss_scale) == float(ref_trainer.dp.loss_scale)

    def train_records(run: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]

    # The killed run logged step 4 before the resume from step 3 trained it again: read once, as the reference.
    raw = [json.loads(line) for line in (tmp_path / "cut" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw if r["kind"] == "train"] == [1, 2, 3, 4, 4, 5, 6, 7]
    assert train_records(tmp_path / "cut" / "run") == train_records(tmp_path / "ref" / "run")
    assert [step for step, _ in train_records(tmp_path / "ref" / "run")] == list(range(1, 8))


def _poison(batches: list[dict], index: int) -> list[dict]:
    out = [dict(b) for b in batches]
    out[index] = {"z0": torch.full_like(batches[index]["z0"], float("nan")), "context": batches[index]["context"]}
    return out


def test_nan_loss_in_bf16_stops_and_saves_nothing_corrupt(tmp_path):
    cfg = make_cfg(tmp_path, "training.precision=bf16", "logging.interval_steps=100")
    trainer, _ = make_trainer(cfg, _poison(make_batches(6), 4))  # step 5 sees NaN latents
    with pytest.raises(NonFiniteLossError, match="NaN/inf by step 6.*precision=bf16.*step_0000003"):
        trainer.fit()
    trainer.close()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step_0000003"]
    assert (ckpt_dir / "latest").read_text().strip() == "step_0000003"
    weights = load_file(ckpt_dir / "step_0000003" / "model.pt")["unet"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert '"status": "aborted"' in (tmp_path / "run" / "mlperf.log").read_text()


def test_fp16_overflow_is_a_counted_skip_not_a_stop(tmp_path):
    cfg = make_cfg(tmp_path, "training.precision=fp16", "logging.interval_steps=3")
    trainer, _ = make_trainer(cfg, _poison(make_batches(6), 4))
    before_scale = float(trainer.dp.loss_scale)
    state = trainer.fit()
    trainer.close()
    assert state.step == 6
    assert int(trainer.dp.num_skipped_steps) == 1
    assert float(trainer.dp.loss_scale) == before_scale / 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in train] == [0, 1]
    assert all(math.isfinite(r["loss"]) for r in train)
    weights = load_file(tmp_path / "run" / "checkpoints" / "step_0000006" / "model.pt")["unet"]
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_resume_with_another_world_size_is_refused(tmp_path):
    cfg = make_cfg(tmp_path, "training.max_steps=3")
    trainer, _ = make_trainer(cfg, make_batches(2))
    trainer.fit()
    trainer.close()
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000003"
    with pytest.raises(ValueError, match="written by 1 ranks and this run has 2"):
        Checkpointer(cfg.checkpoint, tmp_path / "run", world_size=2).load(ckpt)


def test_benchmark_plan_follows_the_mlperf_cadence():
    from sd_mlperf.config import load_config
    from tests.unit.training._helpers import REPO

    plans = {}
    for system, gbs in (("01x08x08", 64), ("32x08x02", 512), ("32x08x08", 2048)):
        cfg = load_config([REPO / "conf" / "sd2_mlperf.yaml", REPO / "conf" / "system" / f"{system}.yaml"])
        plans[system] = plan = plan_from_config(cfg)
        assert plan.global_batch_size == gbs
        assert plan.steps_per_block == math.ceil(512_000 / gbs)  # checkpoint + FID/CLIP every 512,000 images
        assert plan.max_steps == math.ceil(cfg.training.max_samples / gbs)
        assert plan.loss_scaling and plan.precision == "fp16" and plan.grad_accumulation_steps == 1
        assert (plan.target_fid, plan.target_clip) == (90.0, 0.15)
    assert plans["01x08x08"].steps_per_block == 8000 and plans["32x08x02"].steps_per_block == 1000


@pytest.mark.parametrize("saved_field", [True, False])  # False: a checkpoint from before the field existed
def test_resume_with_another_global_batch_is_refused(tmp_path, saved_field):
    cfg = make_cfg(tmp_path, "training.max_steps=3")
    trainer, _ = make_trainer(cfg, make_batches(2))
    trainer.fit()
    trainer.close()
    model_path = tmp_path / "run" / "checkpoints" / "step_0000003" / "model.pt"
    model = load_file(model_path)
    assert model["global_batch_size"] == 2
    if not saved_field:
        torch.save({k: v for k, v in model.items() if k != "global_batch_size"}, model_path)
        checksum_file(model_path).unlink()  # that old a checkpoint has no checksums either
    with pytest.raises(ValueError, match="global batch of 2 on 1 ranks; this run's is 4 on 1.*= 2"):
        make_trainer(make_cfg(tmp_path, "training.max_steps=4", "training.micro_batch_size=4"),
                     make_batches(2, batch_size=4))
