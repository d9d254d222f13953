"""training.target_toy: the run reaches its target only when the toy metrics meet theirs too; they are logged."""

from __future__ import annotations

from types import SimpleNamespace

from sd_mlperf.training.metrics import read_metrics
from tests.unit.training._helpers import make_batches, make_cfg, make_trainer


class ToyEvaluator:
    """Any FID/CLIP passes; the background accuracy rises 0.2, 0.5, 0.8."""

    def __init__(self) -> None:
        self.calls = 0

    def evaluate(self, unet, *, samples_count: int, step: int) -> SimpleNamespace:
        self.calls += 1
        extra = {"toy_background_acc": 0.3 * self.calls - 0.1, "toy_latent_fd": 5.0}
        return SimpleNamespace(fid=1.0, clip=0.5, extra=extra)


def test_stops_when_the_toy_target_is_met_and_logs_the_toy_metrics(tmp_path):
    cfg = make_cfg(tmp_path, "training.stop_at_target=true", "training.max_steps=30",
                   "training.target_toy.toy_background_acc=0.45")
    evaluator = ToyEvaluator()
    trainer, _ = make_trainer(cfg, make_batches(3), evaluator)
    state = trainer.fit()
    trainer.close()
    assert state.reached_target and state.step == 6 and evaluator.calls == 2  # 0.2 fails, 0.5 passes
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [round(r["toy_background_acc"], 6) for r in evals] == [0.2, 0.5]
    assert all(r["toy_latent_fd"] == 5.0 for r in evals)
    log = (tmp_path / "run" / "mlperf.log").read_text()
    assert '"status": "success"' in log and "toy" not in log  # only FID and CLIP go to the MLPerf log
    assert round(state.evals[1]["toy_background_acc"], 6) == 0.5  # in the trainer's state too
