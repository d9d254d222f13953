"""CheckpointScorer: loads weights into the UNet, scores them, and writes into each checkpoint's own run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sd_mlperf.training.final_log import parse_mllog_line


def _events(path):
    return [r for line in Path(path).read_text().splitlines() if (r := parse_mllog_line(line))]


def test_checkpoint_scorer_loads_checks_and_writes_into_each_checkpoints_run(tmp_path):
    from sd_mlperf.training.checkpoint_scorer import (
        CheckpointScorer,
        append_checkpoint_score,
        describe_checkpoint_score,
    )
    from sd_mlperf.training.checkpoints import CheckpointWeights

    class Evaluator:  # a stand-in: records what it was asked
        def __init__(self):
            self.calls = []

        def evaluate(self, unet, *, samples_count, step, out_dir=None):
            self.calls.append((float(unet.weight.detach().sum()), samples_count, step, out_dir))
            return SimpleNamespace(fid=80.0, clip=0.2, num_images=2, seconds=1.0, json_path=Path("x.json"), extra={})

    unet, evaluator = torch.nn.Linear(2, 2, bias=False), Evaluator()
    scorer = CheckpointScorer(unet, evaluator)
    ones = {"weight": torch.ones(2, 2)}
    run = CheckpointWeights(path=tmp_path / "r" / "model.pt", state=ones, step=4, samples_count=None,
                            run_dir=tmp_path / "r")
    loose = CheckpointWeights(path=tmp_path / "u.safetensors", state=ones, step=0, samples_count=8, run_dir=None)
    result = scorer.score_checkpoint(run)
    scorer.score_checkpoint(loose)
    assert evaluator.calls == [(4.0, 0, 4, tmp_path / "r" / "eval_offline"), (4.0, 8, 0, None)]
    assert scorer.collected_scorer(tmp_path)({"unet": ones, "step": 6, "samples_count": 12}) == (80.0, 0.2, {})
    with pytest.raises(ValueError, match="step 6: does not match Linear"):
        scorer.collected_scorer(tmp_path)({"unet": {"w": torch.ones(1)}, "step": 6, "samples_count": 12})
    assert describe_checkpoint_score(run, result) == (f"{run.path}: step 4 samples None FID 80.0000 CLIP 0.2000 "
                                                      "(2 images, 1.0 s) -> x.json")
    log = tmp_path / "extra.log"
    assert not append_checkpoint_score(log, run, result) and not log.exists()  # no samples_count: nothing written
    assert append_checkpoint_score(log, loose, result)
    events = _events(log)
    assert [e["key"] for e in events] == ["eval_start", "eval_accuracy", "eval_accuracy", "eval_stop"]
    assert {e["metadata"]["samples_count"] for e in events} == {8}
    assert [e["value"] for e in events[1:3]] == [80.0, 0.2]
