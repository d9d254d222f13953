"""Shared pieces of the training tests: the smoke config shrunk further, in-memory data, fake evaluators.

The trainer, UNet, data-parallel backend, optimizer, checkpoints and MLPerf log are the real ones;
only the data pipeline (an in-memory loader with a resumable position) and the evaluator (given
FID/CLIP values) are stand-ins, injected through `build_trainer`'s `data=` and `evaluator=`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from sd_mlperf.config import load_config
from sd_mlperf.config.schema import Config
from sd_mlperf.training.build import build_trainer
from sd_mlperf.training.trainer import Trainer
from sd_mlperf.utils.dist_info import DistInfo

REPO = Path(__file__).resolve().parents[3]
SMOKE = REPO / "conf" / "smoke.yaml"
LATENT = (4, 8, 8)
CONTEXT = (5, 16)  # tokens, width (= model.unet.context_dim below)

TINY_UNET = [
    "model.unet.model_channels=8", "model.unet.channel_mult=[1,2]", "model.unet.attention_levels=[1]",
    "model.unet.head_channels=8", "model.unet.context_dim=16", "model.unet.resblock_norm_groups=4",
    "model.unet.transformer_norm_groups=4",
]


def make_cfg(tmp_path: Path, *overrides: str) -> Config:
    """conf/smoke.yaml with a smaller UNet, the run directory under tmp_path, micro batch 2."""
    base = [f"run.output_dir={tmp_path}", "run.name=run", "run.seed=1234", "training.micro_batch_size=2",
            "training.checkpoint_every_samples=6", "training.max_steps=6", "logging.interval_steps=1",
            "checkpoint.export_ldm_weights=false", "optim.warmup_steps=2", "optim.base_lr_per_sample=5e-4"]
    return load_config([SMOKE], [*base, *TINY_UNET, *overrides])


class ListLoader:
    """Endless in-memory batches with a resumable position (the real loader's interface)."""

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches
        self.pos = 0
        self.fail_at: int | None = None  # raise when this many batches were consumed (a "kill")

    def __iter__(self):
        while True:
            if self.fail_at is not None and self.pos >= self.fail_at:
                raise KeyboardInterrupt("simulated kill")
            batch = self.batches[self.pos % len(self.batches)]
            self.pos += 1
            yield batch

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])

    def restart_at(self, batches: int) -> None:
        """A resharded resume: continue from the position alone (the real loader also reseeds its streams)."""
        self.pos = batches


def make_batches(n: int, batch_size: int = 2, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"z0": torch.randn(batch_size, *LATENT, generator=g), "context": torch.randn(batch_size, *CONTEXT,
                                                                                          generator=g)}
            for _ in range(n)]


def conditioner(batch: dict, generator: torch.Generator | None = None, device=None):
    """Like the real one, draws fresh noise per sample from the trainer's generator (latent sampling)."""
    where = generator.device if generator is not None else None
    z0 = batch["z0"] + 0.1 * torch.randn(batch["z0"].shape, generator=generator, device=where).to(batch["z0"].device)
    return z0.to(device), batch["context"].to(device)


@dataclass
class FakeEvaluator:
    """Returns the given (FID, CLIP) pairs in order; remembers what it was called with."""

    results: list[tuple[float, float]]

    def __post_init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def evaluate(self, unet: torch.nn.Module, *, samples_count: int, step: int) -> SimpleNamespace:
        assert isinstance(unet, torch.nn.Module)
        fid, clip = self.results[len(self.calls) % len(self.results)]
        self.calls.append((samples_count, step))
        unet.eval()
        return SimpleNamespace(fid=fid, clip=clip, num_images=4, seconds=0.0, grid_path=None, json_path=None)


def cpu_dist() -> DistInfo:
    return DistInfo(0, 1, 0, torch.device("cpu"), "none")


def make_trainer(cfg: Config, batches: list[dict], evaluator=None) -> tuple[Trainer, ListLoader]:
    loader = ListLoader(batches)
    return build_trainer(cfg, cpu_dist(), evaluator=evaluator, data=(loader, conditioner)), loader


def record_losses(trainer: Trainer) -> list[float]:
    """Wrap train_step to record every step's loss (the test may sync; the trainer does not)."""
    losses: list[float] = []
    step = trainer.train_step

    def recording(micro_batches):
        out = step(micro_batches)
        losses.append(out["loss"].item())
        return out

    trainer.train_step = recording
    return losses
