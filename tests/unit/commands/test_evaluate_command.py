"""`sd-mlperf evaluate` on a checkpoint of a smoke training run that also evaluated inline.

The same checkpoint, prompts and seed must give the same FID and CLIP offline as inline, and the
offline run appends eval_start / eval_accuracy (FID, CLIP) / eval_stop with the checkpoint's
samples_count to the run's MLPerf log. Every documented command line parses into the arguments it means.
"""

from __future__ import annotations

import json

import pytest
import torch

from sd_mlperf.cli import main
from sd_mlperf.models.checkpoint_io import TEXT_PREFIX, VAE_PREFIX
from sd_mlperf.models.text_encoder import build_text_encoder
from sd_mlperf.models.vae import build_vae
from tests.unit.eval.eval_helpers import SMOKE, TINY_EVAL, make_cfg

TRAIN = ["training.max_steps=2", "training.checkpoint_every_samples=8", "training.micro_batch_size=4",
         "checkpoint.export_ldm_weights=true", "logging.interval_steps=1"]


def _frozen_checkpoint(tmp_path):
    """A 512-base-ema.ckpt-format file (Lightning-style `state_dict`) with the smoke VAE and text tower."""
    cfg = make_cfg(tmp_path)
    torch.manual_seed(5)
    state = {VAE_PREFIX + k: v for k, v in build_vae(cfg.model.vae).state_dict().items()}
    state.update({TEXT_PREFIX + k: v for k, v in build_text_encoder(cfg.model.text_encoder).state_dict().items()})
    path = tmp_path / "frozen.ckpt"
    torch.save({"state_dict": state, "global_step": 0}, path)
    return path


def _mlperf_events(path):
    events = []
    for line in path.read_text().splitlines():
        if line.startswith(":::MLLOG "):
            events.append(json.loads(line[len(":::MLLOG "):]))
    return events


# Every command line README.md, examples/03_offline_eval.sh, slurm/srun.sh and the tests below document.
FORMS = [
    (["--run-dir", "R"], {"run_dir": "R", "strategy": "all", "config": [], "overrides": []}),
    (["--run-dir", "R", "--all"], {"strategy": "all"}),
    (["--run-dir", "R", "--last-two"], {"strategy": "last_two"}),
    (["--run-dir", "R", "--watch"], {"strategy": "watch", "poll_s": 30.0, "watch_timeout_s": None}),
    (["--run-dir", "R", "--last-two", "--config", "C", "a.b=1", "c.d=2"],
     {"strategy": "last_two", "config": ["C"], "overrides": ["a.b=1", "c.d=2"]}),
    (["--run-dir", "R", "--watch", "--poll-s", "0.01", "a.b=1", "c.d=2"],
     {"strategy": "watch", "poll_s": 0.01, "overrides": ["a.b=1", "c.d=2"]}),
    (["--run-dir", "R", "a.b=1"], {"overrides": ["a.b=1"]}),
    (["--config", "C", "--checkpoint", "A", "--checkpoint", "B", "a.b=1"],
     {"run_dir": None, "checkpoint": ["A", "B"], "config": ["C"], "overrides": ["a.b=1"]}),
    (["--config", "C", "--checkpoint", "A", "--mlperf-log", "F", "--num-prompts", "500"],
     {"checkpoint": ["A"], "mlperf_log": "F", "num_prompts": 500, "overrides": []}),
    (["--checkpoint", "A", "--config", "C", "--mlperf-log", "F", "a.b=1", "c.d=2"],
     {"checkpoint": ["A"], "config": ["C"], "mlperf_log": "F", "overrides": ["a.b=1", "c.d=2"]}),
    (["--num-prompts", "3", "--config", "C", "--checkpoint", "A", "a.b=1"],
     {"num_prompts": 3, "checkpoint": ["A"], "overrides": ["a.b=1"]}),
    (["--checkpoint", "A", "a.b=1", "--checkpoint", "B", "c.d=2", "--samples-count", "8"],
     {"checkpoint": ["A", "B"], "overrides": ["a.b=1", "c.d=2"], "samples_count": 8}),
]


@pytest.mark.parametrize(("argv", "expected"), FORMS, ids=[" ".join(a) for a, _ in FORMS])
def test_documented_command_lines_parse(argv, expected, monkeypatch):
    import sd_mlperf.commands.evaluate as evaluate

    seen = []
    monkeypatch.setattr(evaluate, "run", lambda args: seen.append(args) or 0)
    assert main(["evaluate", *argv]) == 0
    assert {k: getattr(seen[0], k) for k in expected} == expected


@pytest.mark.parametrize("argv", [["--run-dir", "R", "--checkpoint", "A"], ["--run-dir", "R", "--all", "--watch"],
                                  [], ["--run-dir", "R", "--poll-s"], ["--checkpoint", "A", "a.b=1", "--nope"]])
def test_conflicting_or_missing_arguments_are_refused(argv, monkeypatch):
    import sd_mlperf.commands.evaluate as evaluate

    monkeypatch.setattr(evaluate, "run", lambda args: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", *argv])
    assert exc.value.code == 2


@pytest.mark.slow
def test_evaluate_cli_on_a_smoke_checkpoint(tmp_path, capsys):
    # The frozen parts come from a file, as in the benchmark, so training and evaluation share them.
    overrides = [f"run.output_dir={tmp_path}", "run.name=smoke", *TINY_EVAL, *TRAIN,
                 f"model.frozen_checkpoint={_frozen_checkpoint(tmp_path)}"]
    assert main(["train", "--config", str(SMOKE), *overrides]) == 0
    run_dir = tmp_path / "smoke"
    ckpt = run_dir / "checkpoints" / "step_0000002"
    inline = json.loads((run_dir / "eval" / "step_0000002.json").read_text())
    log = run_dir / "mlperf.log"
    before = _mlperf_events(log)
    assert [e["key"] for e in before].count("eval_accuracy") == 2  # the inline evaluation

    capsys.readouterr()
    extra = tmp_path / "offline.log"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--config", str(SMOKE), "--mlperf-log", str(extra),
                 *overrides]) == 0
    line = capsys.readouterr().out
    assert "step 2 samples 8" in line and "FID" in line
    offline = json.loads((run_dir / "eval_offline" / "step_0000002.json").read_text())
    assert offline["fid"] == inline["fid"] and offline["clip"] == inline["clip"]
    assert _mlperf_events(log) == before  # the run's final log is never appended to after its run_stop
    added = _mlperf_events(extra)
    assert [e["key"] for e in added] == ["eval_start", "eval_accuracy", "eval_accuracy", "eval_stop"]
    assert [e["metadata"].get("metric") for e in added[1:3]] == ["FID", "CLIP"]
    assert all(e["metadata"]["samples_count"] == 8 for e in added)
    assert added[1]["value"] == pytest.approx(inline["fid"])

    # The ldm export of the same weights, a quick look at 3 prompts, without MLPerf lines.
    # Overrides may follow the checkpoint directly.
    assert main(["evaluate", "--num-prompts", "3", "--config", str(SMOKE),
                 "--checkpoint", str(ckpt / "unet_ldm.safetensors"), *overrides]) == 0
    assert "FID" in capsys.readouterr().out
    assert _mlperf_events(log) == before
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope"), "--config", str(SMOKE), *overrides]) == 1
    assert str(tmp_path / "nope") in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_run_dir_writes_the_final_log(tmp_path, capsys):
    """A run trained with eval.inline=false, scored with the run's own config: the CLI form of the submission path."""
    import subprocess
    import sys

    overrides = [f"run.output_dir={tmp_path}", "run.name=off", *TINY_EVAL, *TRAIN, "training.max_steps=4",
                 "eval.inline=false", "checkpoint.export_ldm_weights=false"]
    assert main(["train", "--config", str(SMOKE), *overrides]) == 0
    run_dir = tmp_path / "off"
    assert not (run_dir / "mlperf.log").exists() and (run_dir / "mlperf_train.log").exists()
    # A target nothing reaches: every checkpoint is scored, the run did not converge (exit 1), the log says aborted.
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(run_dir), "training.target_fid=-1"]) == 1
    assert "not converged" in capsys.readouterr().out
    events = _mlperf_events(run_dir / "mlperf.log")
    assert [e["metadata"]["samples_count"] for e in events if e["key"] == "eval_accuracy"] == [8, 8, 16, 16]
    assert events[-1]["key"] == "run_stop" and events[-1]["metadata"]["status"] == "aborted"
    cmd = [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training", "--ruleset", "5.0.0",
           str(run_dir / "mlperf.log")]
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=120).returncode == 0
    # --watch with a target the second checkpoint reaches: no scoring again, RUN/STOP written, exit 0.
    scores = (run_dir / "eval_offline" / "scores.jsonl").read_text()
    first, second = (json.loads(line)["fid"] for line in scores.splitlines())
    # Exit 0 only when the second checkpoint is the first to pass: a first checkpoint that passes leaves one
    # evaluation in the log, which the compliance checker refuses.
    expected = 0 if first > second else 1
    assert main(["evaluate", "--run-dir", str(run_dir), "--watch", "--poll-s", "0.01",
                 f"training.target_fid={second}", "training.target_clip=-1"]) == expected
    assert (run_dir / "eval_offline" / "scores.jsonl").read_text() == scores
    assert (run_dir / "STOP").is_file()
    # An inline run's log is final already.
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(run_dir), "eval.inline=true"]) == 1
    assert f"ValueError: {run_dir} trained with eval.inline=true" in capsys.readouterr().err
