"""`sd-mlperf bench eval` rows on the smoke models (tiny sizes, one timed batch)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import sd_mlperf.eval.inception as inception_module
from sd_mlperf.bench.eval import run_eval_bench
from tests.unit.eval.eval_helpers import make_cfg


def test_bench_rows_and_projection(tmp_path, monkeypatch):
    # The bench's FID linear algebra runs at the feature size; 64 instead of 2048 keeps the test short.
    monkeypatch.setattr(inception_module, "FEATURE_DIM", 64)
    cfg = make_cfg(tmp_path, "eval.batch_size=2")
    rows = run_eval_bench(cfg, SimpleNamespace(steps=1, warmup=0))
    parts = {row["part"]: row for row in rows}
    assert list(parts) == ["generation", "inception", "clip", "fid_linalg", "projection"]
    for name in ("generation", "inception", "clip"):
        assert parts[name]["images_per_s"] > 0 and parts[name]["batch"] == 2
    assert parts["generation"]["ddim_steps"] == 2 and parts["clip"]["model"] == "tiny"
    assert parts["fid_linalg"]["method"] == "eigh"
    rates = [parts[n]["images_per_s"] for n in ("generation", "inception", "clip")]
    per_device = 1 / sum(1 / r for r in rates)
    assert parts["projection"]["images_per_s"] == pytest.approx(per_device)
    expected = cfg.eval.num_prompts / (8 * per_device) + parts["fid_linalg"]["ms_per_batch"] / 1e3
    assert parts["projection"]["projected_s"] == pytest.approx(expected)
