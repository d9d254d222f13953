"""`make-synthetic-data` and `precompute-latents` through the CLI, one and two processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_mlperf.cli import main
from sd_mlperf.data.precompute import MANIFEST

REPO = Path(__file__).resolve().parents[3]
SMOKE = str(REPO / "conf" / "smoke.yaml")
SMALL = ["data.synthetic.num_train_samples=6", "data.synthetic.num_train_shards=2", "data.synthetic.num_val_prompts=2",
         "data.synthetic.image_size=32", "data.image_size=32"]


@pytest.mark.slow  # end to end through the CLI: builds the smoke frozen encoders
def test_cli_makes_then_precomputes(tmp_path, capsys):
    assert main(["make-synthetic-data", "--out", str(tmp_path / "syn"), "--config", SMOKE, *SMALL]) == 0
    assert (tmp_path / "syn" / "raw" / "00001.tar").exists() and (tmp_path / "syn" / "val2014_30k.tsv").exists()
    args = ["precompute-latents", "--input", str(tmp_path / "syn" / "raw" / "{00000..00001}.tar"),
            "--output", str(tmp_path / "lat"), "--config", SMOKE, *SMALL, "data.train_format=moments"]
    assert main(args) == 0
    assert "6 samples in 2 shards" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "lat" / MANIFEST).read_text())
    assert manifest["format"] == "moments" and manifest["samples"] == 6
    assert main([*args[:-1], "data.train_format=images"]) == 1  # not an output format: a clear error, exit 1
    assert "invalid value for 'data.train_format': 'images'" in capsys.readouterr().err


def test_precompute_needs_the_frozen_checkpoint_key(tmp_path, capsys):
    assert main(["precompute-latents", "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "config key 'model.frozen_checkpoint' is required: set it to 512-base-ema.ckpt" in err


@pytest.mark.slow  # two processes, each importing torch
def test_two_ranks_split_shards_like_torchrun(tmp_path):
    """RANK/WORLD_SIZE as torchrun sets them: each rank writes its shards, the manifest covers all of them."""
    import os
    import subprocess
    import sys

    assert main(["make-synthetic-data", "--out", str(tmp_path / "syn"), "--config", SMOKE, *SMALL]) == 0
    args = [sys.executable, "-m", "sd_mlperf", "precompute-latents", "--input", str(tmp_path / "syn" / "raw"),
            "--output", str(tmp_path / "lat"), "--config", SMOKE, *SMALL, "data.train_format=moments",
            "model.text_encoder.num_layers=2", "run.device=cpu"]
    procs = [subprocess.Popen(args, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    manifest = json.loads((tmp_path / "lat" / MANIFEST).read_text())
    assert manifest["num_shards"] == 2 and manifest["samples"] == 6
    assert sorted(r["shard"] for r in manifest["shards"]) == ["00000.tar", "00001.tar"]
