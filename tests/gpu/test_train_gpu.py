"""GPU checks of the training loop: the trainer's step has no host sync (torch backend), and a
kill-and-resume on the GPU continues the uninterrupted run (both data-parallel backends, fp16).

Run on a device machine with `pytest tests/gpu/test_train_gpu.py -m gpu -q -rs`. Each test is skipped
with a reason when CUDA (or megatron-core, for the mcore case) is missing.
"""

from __future__ import annotations

import pytest
import torch

from sd_mlperf.backends import package_available
from sd_mlperf.parallel.distributed import DistInfo
from sd_mlperf.trainer import build_trainer
from tests.unit.training._helpers import ListLoader, conditioner, make_batches, make_cfg, record_losses

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
    assert trainer.meter.num_fatal() == 0
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
