"""build_trainer hands the UNet builder the precisions the module computes in (training, and the inline eval)."""

from __future__ import annotations

import pytest
import yaml

from tests.unit.stand_ins import install_fake_transformer_engine
from tests.unit.training._helpers import FakeEvaluator, make_batches, make_cfg, make_trainer


@pytest.mark.parametrize("overrides,chosen", [
    (["training.precision=fp32", "eval.inline=false"], "sdpa"),
    (["training.precision=bf16", "eval.inline=true", "eval.precision=fp32"], "sdpa"),
    (["training.precision=bf16", "eval.inline=false", "eval.precision=fp32"], "te"),  # no inline eval: only bf16
])
def test_auto_attention_follows_the_compute_precisions(tmp_path, monkeypatch, overrides, chosen):
    install_fake_transformer_engine(monkeypatch)
    monkeypatch.setattr("sd_mlperf.backends.cuda_available", lambda: True)
    cfg = make_cfg(tmp_path, "model.unet.attention_backend=auto", *overrides)
    make_trainer(cfg, make_batches(1), evaluator=FakeEvaluator([(100.0, 0.1)]))
    resolved = yaml.safe_load((tmp_path / "run" / "resolved_backends.yaml").read_text())["attention"]
    assert resolved["chosen"] == chosen, resolved
    assert ("fp32 compute" in resolved["why"]) == (chosen == "sdpa")
