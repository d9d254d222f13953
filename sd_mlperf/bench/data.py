"""`sd-mlperf bench data`: loader samples/s for the moments and moments_embeddings formats, image decode and
precompute images/s, each as a ratio to one GPU's demand.

Demand: 137 images/s per H100, the best published training rate (REFERENCE.md). The target is a
loader that delivers 4x that from the CPU cores one GPU gets on a DGX (about 14): the `x14_cores`
column extrapolates the single-process rate linearly to 14 cores (an upper bound: it assumes the
shard reads scale, which a local NVMe or page cache allows). Loader rows read synthetic shards of
the reference's sizes (moments (1, 8, 64, 64) fp32, embeddings (77, 1024) fp16) written to a
temporary folder at the reference's per-GPU batch of 8; decode rows use synthetic JPEGs, which are
flat-coloured and decode faster than LAION photographs.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from sd_mlperf.backends import BackendUnavailable
from sd_mlperf.config.load import vae_downsample_factor
from sd_mlperf.config.schema import Config, DataConfig, VAEConfig
from sd_mlperf.parallel.distributed import pick_device
from sd_mlperf.utils.logging import logger

GPU_DEMAND_IMG_S = 137.0  # H100, NVIDIA MLPerf v4.1/v5.0 (REFERENCE.md, "Best known results")
TARGET_MULTIPLE = 4.0
DGX_CORES_PER_GPU = 14
REFERENCE_MICRO_BATCH = 8  # 01x08x08
IMAGE_SIZE = 512  # the reference's training resolution
LATENT = IMAGE_SIZE // vae_downsample_factor(VAEConfig())  # SD2's VAE: 64
CONTEXT_LEN, CONTEXT_DIM = 77, 1024
SAMPLES_PER_SHARD = 128


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_bench_shards(folder: str, num_shards: int = 2, seed: int = 0,
                       samples_per_shard: int = SAMPLES_PER_SHARD) -> None:
    """Shards at the reference's sizes holding moments, captions and embeddings (both formats read them)."""
    from sd_mlperf.data.shards import write_shard

    rng = np.random.default_rng(seed)
    moments = rng.standard_normal((1, 8, LATENT, LATENT), dtype=np.float32)
    context = rng.standard_normal((CONTEXT_LEN, CONTEXT_DIM), dtype=np.float32).astype(np.float16)
    for s in range(num_shards):
        samples = [(f"{s:05d}{i:04d}", {"npy": _npy(moments + i), "txt": f"caption {i}".encode(),
                                        "emb.npy": _npy(context)}) for i in range(samples_per_shard)]
        write_shard(os.path.join(folder, f"{s:05d}.tar"), samples)


def _ratios(rate: float, cores: int) -> dict[str, Any]:
    per_core = rate / max(cores, 1)
    return {"x_gpu_demand": rate / GPU_DEMAND_IMG_S,
            "x14_cores": per_core * DGX_CORES_PER_GPU / GPU_DEMAND_IMG_S,
            "meets_4x": per_core * DGX_CORES_PER_GPU >= TARGET_MULTIPLE * GPU_DEMAND_IMG_S}


def bench_loader(cfg: DataConfig, folder: str, train_format: str, num_workers: int, *, steps: int,
                 warmup: int, seed: int = 0) -> dict[str, Any]:
    """One loader row: samples/s over `steps` batches after `warmup` batches."""
    from sd_mlperf.data.laion import build_train_loader

    data_cfg = dataclasses.replace(cfg, train_format=train_format, train_shards=folder, num_workers=num_workers,
                                   image_size=IMAGE_SIZE, pin_memory=cfg.pin_memory and torch.cuda.is_available())
    loader = build_train_loader(data_cfg, micro_batch_size=REFERENCE_MICRO_BATCH, rank=0, world_size=1, seed=seed,
                                latent_size=LATENT)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for batch in itertools.islice(it, steps):
        assert batch["moments"].shape[0] == REFERENCE_MICRO_BATCH
    elapsed = time.perf_counter() - start
    rate = steps * REFERENCE_MICRO_BATCH / elapsed
    cores = max(num_workers, 1)
    return {"bench": f"loader {train_format}", "workers": num_workers, "batch": REFERENCE_MICRO_BATCH,
            "samples_s": rate, **_ratios(rate, cores)}


def bench_decode(cfg: DataConfig, backend: str, *, steps: int, warmup: int, batch: int = 8) -> dict[str, Any] | None:
    """One decode row (synthetic 512px-class JPEGs), or None if the backend cannot run here."""
    from sd_mlperf.data.decode import build_decoder
    from sd_mlperf.data.synthetic import make_train_sample

    data_cfg = dataclasses.replace(cfg, decode_backend=backend)
    try:
        decoder = build_decoder(data_cfg, max_batch_size=batch)
    except BackendUnavailable as exc:  # only a missing backend skips; any other error is raised
        logger.info("bench data: decode %s skipped (%s)", backend, exc)
        return None
    jpegs = [make_train_sample(0, i, cfg.image_size)[0] for i in range(batch)]
    for _ in range(warmup):
        decoder(jpegs)
    start = time.perf_counter()
    for _ in range(steps):
        images, _ = decoder(jpegs)
    if images.is_cuda:
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - start)
    row = {"bench": f"decode {decoder.name}", "device": str(decoder.device), "batch": batch,
           "image_size": cfg.image_size, "samples_s": rate}
    if decoder.device.type == "cpu":  # per-core rate over the cores its threads could use here
        cores = min(getattr(decoder, "num_threads", 1), os.cpu_count() or 1)
        row.update(workers=cores, **_ratios(rate, cores))
    else:  # GPU decode does not scale with host cores
        row["x_gpu_demand"] = rate / GPU_DEMAND_IMG_S
    return row


def bench_precompute(cfg: Config, *, steps: int, warmup: int) -> dict[str, Any]:
    """Precompute images/s: decode + fp32 VAE encode at `data.image_size` with the config's VAE (random weights)."""
    from sd_mlperf.data.decode import build_decoder
    from sd_mlperf.data.synthetic import make_train_sample
    from sd_mlperf.models.vae import build_vae

    device = pick_device(cfg.run.device)
    batch = min(cfg.data.precompute_batch_size, 8) if device.type == "cpu" else cfg.data.precompute_batch_size
    vae = build_vae(cfg.model.vae).to(device).eval()
    decoder = build_decoder(cfg.data, device, max_batch_size=batch)
    jpegs = [make_train_sample(0, i, cfg.data.image_size)[0] for i in range(batch)]

    def step() -> None:
        images, _ = decoder(jpegs)
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            vae.encode_moments(images.to(device, torch.float32)).cpu()

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    rate = steps * batch / (time.perf_counter() - start)
    return {"bench": "precompute", "device": str(device), "batch": batch, "image_size": cfg.data.image_size,
            "vae_channels": cfg.model.vae.base_channels, "samples_s": rate, "x_gpu_demand": rate / GPU_DEMAND_IMG_S}


def run_data_bench(cfg: Config, args: Any) -> list[dict[str, Any]]:
    """Rows for `sd-mlperf bench data`: loaders (formats a and b), decode backends, precompute."""
    steps, warmup = int(getattr(args, "steps", 20)), int(getattr(args, "warmup", 5))
    rows: list[dict[str, Any]] = []
    worker_counts = sorted({0, cfg.data.num_workers, min(2, os.cpu_count() or 1)})
    with tempfile.TemporaryDirectory(prefix="sd_mlperf_bench_data_") as folder:
        write_bench_shards(folder)
        for fmt in ("moments", "moments_embeddings"):
            for workers in worker_counts:
                rows.append(bench_loader(cfg.data, folder, fmt, workers, steps=steps * 4, warmup=warmup))
    for backend in ("pil", "nvjpeg", "dali"):
        row = bench_decode(cfg.data, backend, steps=steps, warmup=min(warmup, 2))
        if row is not None:
            rows.append(row)
    rows.append(bench_precompute(cfg, steps=max(1, steps // 4), warmup=1))
    for row in rows:
        row.setdefault("cpu_cores_here", os.cpu_count())
    return rows
