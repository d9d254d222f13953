"""`sd-mlperf bench data` pieces run and report rates with their ratio to one GPU's demand."""

from __future__ import annotations

import torch

from sd_mlperf.bench.data import GPU_DEMAND_IMG_S, bench_decode, bench_loader, write_bench_shards
from tests.unit.data.data_helpers import IMAGE_SIZE, data_config


def test_loader_rows_for_both_formats(tmp_path):
    write_bench_shards(str(tmp_path), num_shards=1, samples_per_shard=16)
    for fmt in ("moments", "moments_embeddings"):
        row = bench_loader(data_config(), str(tmp_path), fmt, 0, steps=2, warmup=1)
        assert row["bench"] == f"loader {fmt}" and row["batch"] == 8 and row["samples_s"] > 0
        assert abs(row["x_gpu_demand"] - row["samples_s"] / GPU_DEMAND_IMG_S) < 1e-9


def test_decode_row_and_unavailable_backend():
    row = bench_decode(data_config(image_size=IMAGE_SIZE), "pil", steps=1, warmup=0, batch=2)
    assert row["bench"] == "decode pil" and row["samples_s"] > 0
    if not torch.cuda.is_available():
        assert bench_decode(data_config(), "nvjpeg", steps=1, warmup=0) is None
