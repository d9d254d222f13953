"""GPU checks of the training loop: the trainer's step has no host sync (torch backend), a
kill-and-resume on the GPU continues the uninterrupted run (both data-parallel backends, fp16), and
training.cuda_graph=true (the whole step replayed from one CUDA graph) trains like the eager step.

Run on a device machine with `pytest tests/gpu/test_train_gpu.py -m gpu -q -rs`. Each test is skipped
with a reason when CUDA (or megatron-core, for the mcore case) is missing.
"""

from __future__ import annotations

import pytest
import torch

from sd_mlperf.backends import package_available
from sd_mlperf.training.build import build_trainer
from sd_mlperf.utils.dist_info import DistInfo
from tests.unit.training._helpers import LATENT, ListLoader, conditioner, make_batches, make_cfg, record_losses

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch sees no CUDA)")


def _backend_available(backend: str) -> bool:
    return backend == "torch" or package_available("megatron.core")


def _gpu_batches(n: int) -> list[dict]:
    return [{k: v.cuda() for k, v in b.items()} for b in make_batches(n)]


def _trainer(cfg, batches, fail_at=None):
    loader = ListLoader(batches)
    loader.fail_at = fail_at
    dist = DistInfo(0, 1, 0, torch.device("cuda", 0), "none")
    return build_trainer(cfg, dist, evaluator=None, data=(loader, conditioner))


@needs_cuda
def test_train_step_never_waits_for_the_gpu(tmp_path):
    cfg = make_cfg(tmp_path, "run.device=cuda", "training.precision=fp16", "parallel.backend=torch")
    trainer = _trainer(cfg, _gpu_batches(3))
    trainer.train_step(trainer.loader.batches[:1])  # warm-up: allocations, cuDNN autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in trainer.loader.batches[1:]:
            out = trainer.train_step([batch])
            trainer.meter.add(**out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not trainer.meter.any_fatal()
    trainer.close()


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "mcore"])
def test_kill_and_resume_on_gpu(tmp_path, backend):
    if not _backend_available(backend):
        pytest.skip("megatron-core is not installed (pip install 'sd_mlperf[gpu]')")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    batches = _gpu_batches(5)
    common = ["run.device=cuda", "training.precision=fp16", f"parallel.backend={backend}", "training.max_steps=7"]
    ref = _trainer(make_cfg(tmp_path / "ref", *common), batches)
    ref_losses = record_losses(ref)
    ref.fit()
    ref.close()

    cfg = make_cfg(tmp_path / "cut", *common)
    killed = _trainer(cfg, batches, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    killed.close()
    resumed = _trainer(cfg, batches)
    assert resumed.state.step == 3
    losses = record_losses(resumed)
    resumed.fit()
    resumed.close()
    assert all(torch.isfinite(torch.tensor(ref_losses)))
    # Deterministic cuDNN: the resumed losses match closely (atomics in some kernels may differ in the last bits).
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses[3:]), rtol=1e-4, atol=1e-6)


# conf/smoke.yaml's UNet (make_cfg shrinks it further; these put it back).
SMOKE_UNET = ["model.unet.model_channels=32", "model.unet.channel_mult=[1,2]", "model.unet.attention_levels=[0,1]",
              "model.unet.head_channels=16", "model.unet.context_dim=64", "model.unet.resblock_norm_groups=4",
              "model.unet.transformer_norm_groups=8"]


@needs_cuda
@pytest.mark.parametrize(("precision", "rtol"), [("fp32", 1e-5), ("fp16", 2e-3)])
def test_cuda_graph_step_matches_eager_without_host_sync(tmp_path, precision, rtol):
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    g = torch.Generator().manual_seed(3)
    batches = [{"z0": torch.randn(2, *LATENT, generator=g).cuda(),
                "context": torch.randn(2, 77, 64, generator=g).cuda()} for _ in range(5)]
    common = ["run.device=cuda", f"training.precision={precision}", "parallel.backend=torch", *SMOKE_UNET]
    eager = _trainer(make_cfg(tmp_path / "eager", *common), batches)
    graphed = _trainer(make_cfg(tmp_path / "graph", *common, "training.cuda_graph=true"), batches)
    assert graphed.optimizer_step.graphed  # captured in build_trainer, before run_start
    start = {name: value.clone() for name, value in eager.dp.unwrapped.state_dict().items()}
    for name, value in graphed.dp.unwrapped.state_dict().items():  # warmup + capture changed no weight
        assert torch.equal(value, start[name]), name

    def run(trainer, no_sync):
        outs = []
        torch.cuda.synchronize()
        if no_sync:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for batch in batches:
                outs.append(trainer.train_step([batch]))
                trainer.state.step += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return torch.stack([o["loss"] for o in outs]), torch.stack([o["grad_norm"] for o in outs])

    eager_loss, eager_norm = run(eager, no_sync=False)
    graph_loss, graph_norm = run(graphed, no_sync=True)
    assert torch.isfinite(eager_loss).all()
    torch.testing.assert_close(graph_loss, eager_loss, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(graph_norm, eager_norm, rtol=max(rtol, 1e-4), atol=1e-6)
    # The weight updates agree to 2% of the tensor's largest update. Adam divides by sqrt(v) + eps, so where a
    # gradient is near zero a rounding difference (the capturable kernel computes its bias correction on the device)
    # moves a weight by a visible fraction of one step: on an H200, 1 of 9216 elements by 2.2e-6 in fp32. A stale
    # gradient, a skipped or doubled step, or a wrong scale moves updates by about 100%.
    eager_weights = eager.dp.unwrapped.state_dict()
    for name, value in graphed.dp.unwrapped.state_dict().items():
        if not value.is_floating_point():
            assert torch.equal(value, eager_weights[name]), name
            continue
        update, eager_update = value - start[name], eager_weights[name] - start[name]
        torch.testing.assert_close(update, eager_update, rtol=0, atol=max(0.02 * eager_update.abs().max().item(), 1e-7),
                                   msg=lambda m, name=name: f"{name}: {m}")
    eager.close()
    graphed.close()
