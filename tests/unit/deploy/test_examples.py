"""examples/: every walk-through has a --dry-run that prints real commands; the CPU ones run here."""

from __future__ import annotations

import re
import shlex

import pytest
from deploy_helpers import REPO, run_script

from sd_mlperf.cli import build_parser


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def _subcommands() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices)


def _assert_cli_calls_exist(commands: list[list[str]]) -> None:
    """Each `python -m sd_mlperf X` (or `sd-mlperf X`) names a subcommand the CLI has."""
    known = _subcommands()
    for words in commands:
        if words[:3] == ["python", "-m", "sd_mlperf"]:
            assert words[3] in known, f"{words[3]} is not a subcommand of sd-mlperf"


def test_smoke_run_dry_run():
    proc = run_script("examples/01_smoke_run.sh", "--dry-run", "--", "training.max_steps=2")
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc.stdout) == [["python", "-m", "sd_mlperf", "train", "--config", "conf/smoke.yaml",
                                       "run.output_dir=results", "training.max_steps=2"]]
    _assert_cli_calls_exist(_commands(proc.stdout))


def test_precompute_dry_run_synthetic_and_real():
    proc = run_script("examples/02_precompute_latents.sh", "--dry-run", "--workdir", "/tmp/w")
    assert proc.returncode == 0, proc.stderr
    make, precompute = _commands(proc.stdout)
    assert make == ["python", "-m", "sd_mlperf", "make-synthetic-data", "--out", "/tmp/w", "--config",
                    "conf/smoke.yaml"]
    assert precompute == ["python", "-m", "sd_mlperf", "precompute-latents", "--input", "/tmp/w/raw", "--output",
                          "/tmp/w/latents", "--config", "conf/smoke.yaml"]
    _assert_cli_calls_exist([make, precompute])
    real = run_script("examples/02_precompute_latents.sh", "--dry-run", "--input", "/data/raw/{00000..00831}.tar",
                      "--output", "/data/moments", "--gpus", "8")
    assert _commands(real.stdout) == [["torchrun", "--standalone", "--nproc-per-node=8", "-m", "sd_mlperf",
                                       "precompute-latents", "--input", "/data/raw/{00000..00831}.tar", "--output",
                                       "/data/moments", "--config", "conf/sd2_mlperf.yaml"]]
    bad = run_script("examples/02_precompute_latents.sh", "--dry-run", "--input", "/data/raw")
    assert bad.returncode != 0 and "--output is required" in bad.stderr


def test_offline_eval_dry_run_lists_the_runs_checkpoints_in_order(tmp_path):
    run_dir = tmp_path / "run"
    for step in ("step_0000020", "step_0000010"):
        (run_dir / "checkpoints" / step).mkdir(parents=True)
        (run_dir / "checkpoints" / step / "model.pt").write_bytes(b"")
    (run_dir / "checkpoints" / ".step_0000030.tmp").mkdir()  # unpublished: must be ignored
    (run_dir / "config.yaml").write_text("run:\n  name: x\n")
    proc = run_script("examples/03_offline_eval.sh", "--dry-run", "--run-dir", str(run_dir), "--",
                      "eval.num_prompts=8")
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc.stdout) == [[
        "python", "-m", "sd_mlperf", "evaluate", "--config", f"{run_dir}/config.yaml",
        "--checkpoint", f"{run_dir}/checkpoints/step_0000010/model.pt",
        "--checkpoint", f"{run_dir}/checkpoints/step_0000020/model.pt", "eval.num_prompts=8"]]
    _assert_cli_calls_exist(_commands(proc.stdout))
    # A run that collected checkpoints for offline evaluation is scored as the rules require.
    (run_dir / "eval_checkpoints").mkdir()
    (run_dir / "eval_checkpoints" / "index.jsonl").write_text("")
    proc = run_script("examples/03_offline_eval.sh", "--dry-run", "--run-dir", str(run_dir), "--last-two")
    assert _commands(proc.stdout) == [["python", "-m", "sd_mlperf", "evaluate", "--run-dir", str(run_dir),
                                       "--last-two"]]
    _assert_cli_calls_exist(_commands(proc.stdout))
    empty = run_script("examples/03_offline_eval.sh", "--run-dir", str(tmp_path / "none"))
    assert empty.returncode != 0 and "no checkpoints" in empty.stderr


def test_single_node_dry_run_checks_fast_paths_then_runs_and_times():
    proc = run_script("examples/04_single_node_8gpu.sh", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    check, run = _commands(proc.stdout)
    assert check[:2] == ["docker", "run"] and check[-3:] == ["sd-mlperf", "backends", "--fast"]
    assert run[run.index("sd_mlperf:latest") + 1:] == [
        "bash", "slurm/run_and_time.sh", "--num-nodes", "1", "--gpus-per-node", "8", "--config", "conf/sd2_mlperf.yaml",
        "--config", "conf/system/01x08x08.yaml", "--results-dir", "/results"]
    inside = run_script("examples/04_single_node_8gpu.sh", "--dry-run", "--in-container", "--config",
                        "conf/system/01x08x32.yaml")
    assert _commands(inside.stdout)[0][:2] == ["bash", "slurm/run_and_time.sh"]


def test_multi_node_example_is_the_seed_example():
    example = run_script("examples/05_multi_node_slurm.sh", "--dry-run")
    direct = run_script("slurm/sbatch.sh", "--num-nodes", "2", "--gpus-per-node", "8", "--config",
                        "conf/system/02x08x08.yaml", "--checkpoint",
                        "/data/mlcommons/sd-checkpoint-3.0/512-base-ema.ckpt", "--dry-run")
    assert example.returncode == 0, example.stderr
    # sbatch, then the job's first run: cache drop, srun, each task's training, offline scoring, compliance check.
    assert example.stdout == direct.stdout and len(_commands(example.stdout)) == 6
    _assert_cli_calls_exist(_commands(example.stdout))
    submission = run_script("examples/05_multi_node_slurm.sh", "--dry-run", "--num-runs", "10", "--env-file",
                            "slurm/env/dgx_h100.env")
    assert submission.returncode == 0, submission.stderr
    assert "10 run(s) named 02x08x08_%j_01 ... 02x08x08_%j_10" in submission.stderr


def test_download_dry_run_fetches_every_checkpoint_with_the_pinned_hash():
    proc = run_script("examples/06_download_data.sh", "--dry-run", "--data-dir", "/data/mlcommons")
    assert proc.returncode == 0, proc.stderr
    # The URLs and hashes of the shared fixtures README (copied from the MLCommons download scripts).
    table = (REPO / "tests" / "fixtures" / "README.md").read_text()
    rows = re.findall(r"\| (https://\S+?) .*?\| (sha256|sha1) `([0-9a-f]+)` \|", table)
    assert len(rows) == 3
    for url, algo, digest in rows:
        assert f"-o /data/mlcommons/sd-checkpoint-3.0/{url.rsplit('/', 1)[1]} {url}" in proc.stdout
        assert f"echo '{digest}  /data/mlcommons/sd-checkpoint-3.0/{url.rsplit('/', 1)[1]}' | {algo}sum" in proc.stdout
    for uri in ("coco2014-validation-prompts", "coco2014-validation-stats", "laion-400m-filtered-moments"):
        assert re.search(rf"mlc-r2-downloader\.sh -d /data/mlcommons/\S+ https://\S+{uri}-dataset\.uri", proc.stdout)
    bad = run_script("examples/06_download_data.sh", "--dry-run", "--what", "imagenet")
    assert bad.returncode != 0 and "--what takes" in bad.stderr


def test_download_paths_match_the_benchmark_config():
    from sd_mlperf.config import load_config

    cfg = load_config([REPO / "conf" / "sd2_mlperf.yaml"])
    out = run_script("examples/06_download_data.sh", "--dry-run").stdout
    for path in (cfg.model.frozen_checkpoint, cfg.eval.inception_weights, cfg.eval.clip_weights):
        assert f"-o {path} " in out
    for folder in (cfg.eval.prompts_file.rsplit("/", 1)[0], cfg.data.train_shards.rsplit("/", 1)[0]):
        assert f"-d {folder} " in out


@pytest.mark.slow
def test_precompute_example_runs_on_synthetic_data(tmp_path):
    assert "precompute-latents" in _subcommands()
    proc = run_script("examples/02_precompute_latents.sh", "--workdir", str(tmp_path), "--",
                      "data.synthetic.num_train_samples=4", "data.synthetic.num_train_shards=2",
                      "data.synthetic.num_val_prompts=2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "latents").glob("*.tar")) == ["00000.tar", "00001.tar"]


def test_submission_rehearsal_dry_run_trains_evaluates_and_packages():
    proc = run_script("examples/07_submission_rehearsal_cpu.sh", "--dry-run", "--runs", "3", "--out", "/tmp/r", "--",
                      "training.max_samples=8000")
    assert proc.returncode == 0, proc.stderr
    commands = _commands(proc.stdout)
    _assert_cli_calls_exist(commands)
    assert [c[3] for c in commands] == ["train", "evaluate"] * 3 + ["package"]
    train = commands[0]
    assert train[4:6] == ["--config", "conf/learn.yaml"] and "eval.inline=false" in train and "run.seed=null" in train
    assert train[-1] == "training.max_samples=8000" and "data.synthetic_dir=/tmp/r/data" in train
    assert [c[-1] for c in commands[1:6:2]] == ["--all", "--last-two", "--last-two"]
    assert commands[-1][4:] == ["/tmp/r/run_0", "/tmp/r/run_1", "/tmp/r/run_2", "--out", "/tmp/r/submission",
                                "--system-config", "conf/submission/cpu_rehearsal.yaml", "--force",
                                "--allow-run-count-mismatch"]
    ten = _commands(run_script("examples/07_submission_rehearsal_cpu.sh", "--dry-run", "--runs", "10").stdout)
    assert "--allow-run-count-mismatch" not in ten[-1]
    assert run_script("examples/07_submission_rehearsal_cpu.sh", "--dry-run", "--runs", "2").returncode != 0
