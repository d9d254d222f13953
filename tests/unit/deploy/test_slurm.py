"""slurm/: the seed's example prints the expected commands; bad flags fail with a message; run_and_time times a run."""

from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from pathlib import Path

import pytest
from deploy_helpers import REPO, run_script, script_env

from sd_mlperf.config import merge_config

CKPT = "/data/mlcommons/sd-checkpoint-3.0/512-base-ema.ckpt"
SEED_EXAMPLE = ["--num-nodes", "2", "--gpus-per-node", "8", "--config", "conf/system/02x08x08.yaml",
                "--checkpoint", CKPT]


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def test_seed_example_dry_run_prints_the_expected_commands(tmp_path):
    proc = run_script("slurm/sbatch.sh", *SEED_EXAMPLE, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    sbatch, srun, train = _commands(proc.stdout)
    repo = str(REPO)
    assert sbatch == [
        "sbatch", "--job-name=sd_mlperf_02x08x08", "--nodes=2", "--ntasks-per-node=8", "--time=04:00:00",
        "--exclusive", f"--output={tmp_path}/results/logs/%j_sd_mlperf_02x08x08.out", f"--chdir={repo}",
        f"--export=ALL,SD_MLPERF_REPO={repo}", f"{repo}/slurm/srun.sh", "--results-dir", f"{tmp_path}/results",
        *SEED_EXAMPLE]
    assert srun == [
        "srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1", "--container-image=sd_mlperf:latest",
        f"--container-mounts={tmp_path}/results:/results,/data/mlcommons:/data/mlcommons,{repo}:/workspace/sd_mlperf",
        "--container-workdir=/workspace/sd_mlperf", "--no-container-mount-home",
        "bash", "slurm/run_and_time.sh", "--num-nodes", "2", "--gpus-per-node", "8", "--results-dir", "/results",
        "--run-name", "02x08x08_%j", "--config", "conf/sd2_mlperf.yaml", "--config", "conf/system/02x08x08.yaml",
        "--checkpoint", CKPT, "--launcher", "none"]
    assert train == [
        "python", "-m", "sd_mlperf", "train", "--config", "conf/sd2_mlperf.yaml", "--config",
        "conf/system/02x08x08.yaml", "parallel.num_nodes=2", "parallel.gpus_per_node=8",
        f"model.frozen_checkpoint={CKPT}", "run.output_dir=/results", "run.name=02x08x08_%j"]
    assert not (tmp_path / "results").exists(), "a dry run must not create anything"


def test_dry_run_train_command_is_a_valid_config():
    proc = run_script("slurm/sbatch.sh", *SEED_EXAMPLE, "--dry-run", "--", "training.max_steps=100")
    train = _commands(proc.stdout)[-1]
    configs = [REPO / train[i + 1] for i, w in enumerate(train) if w == "--config"]
    overrides = [w for w in train[4:] if "=" in w]
    cfg = merge_config(configs, overrides)  # raises ConfigError on an unknown key or a bad value
    assert (cfg.parallel.num_nodes, cfg.parallel.gpus_per_node, cfg.training.max_steps) == (2, 8, 100)
    assert cfg.model.frozen_checkpoint == CKPT


def test_job_options_reach_sbatch_and_run_options_reach_srun(tmp_path):
    proc = run_script("slurm/sbatch.sh", *SEED_EXAMPLE, "--account", "acct", "--partition", "batch",
                      "--walltime", "1-00:00:00", "--container", "img.sqsh", "--dataset-dir", "/lustre/mlc",
                      "--run-name", "try1", "--sbatch-arg", "--qos=high", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    sbatch, srun, *_ = _commands(proc.stdout)
    assert {"--account=acct", "--partition=batch", "--time=1-00:00:00", "--qos=high"} <= set(sbatch)
    assert f"--container-image={tmp_path}/img.sqsh" in srun  # made absolute: the job starts elsewhere
    mounts = next(w for w in srun if w.startswith("--container-mounts="))
    # The checkpoint lies outside the dataset folder, so its own folder is mounted too.
    assert mounts.split(",")[1:3] == ["/lustre/mlc:/lustre/mlc",
                                      "/data/mlcommons/sd-checkpoint-3.0:/data/mlcommons/sd-checkpoint-3.0"]
    assert srun[srun.index("--run-name") + 1] == "try1"


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-node", "8", "--config", "conf/system/02x08x08.yaml"], "--num-nodes is required"),
    (["--num-nodes", "2", "--config", "conf/system/02x08x08.yaml"], "--gpus-per-node is required"),
    (["--num-nodes", "2", "--gpus-per-node", "8"], "--config is required"),
    (["--num-nodes", "two", "--gpus-per-node", "8", "--config", "conf/system/02x08x08.yaml"],
     "--num-nodes must be a positive integer, got 'two'"),
    (["--num-nodes", "0", "--gpus-per-node", "8", "--config", "conf/system/02x08x08.yaml"], "positive integer"),
    (["--num-nodes", "2", "--gpus-per-node", "64", "--config", "conf/system/02x08x08.yaml"], "at most 16"),
    (["--num-nodes", "4", "--gpus-per-node", "8", "--config", "conf/system/02x08x08.yaml"],
     "--num-nodes 4 disagrees with parallel.num_nodes: 2"),
    (["--num-nodes", "2", "--gpus-per-node", "8", "--config", "conf/system/nope.yaml"], "does not exist"),
    ([*SEED_EXAMPLE[:6], "--checkpoint", "512-base-ema.ckpt"], "--checkpoint must be an absolute path"),
    ([*SEED_EXAMPLE[:6], "--checkpoint", "/data/model.bin"], "must be a .ckpt or .safetensors"),
    ([*SEED_EXAMPLE, "--walltime", "4h"], "--walltime must be a Slurm time limit"),
    ([*SEED_EXAMPLE, "--dataset-dir", "data"], "--dataset-dir must be an absolute path"),
    ([*SEED_EXAMPLE, "--run-name", "a b"], "--run-name may hold only"),
    ([*SEED_EXAMPLE, "--account"], "--account needs a value"),
    ([*SEED_EXAMPLE, "--frobnicate"], "unknown argument '--frobnicate'"),
    ([*SEED_EXAMPLE, "--", "training.max_steps"], "not of the form dotted.key=value"),
])
def test_bad_or_missing_flag_exits_nonzero_with_message(args, message):
    proc = run_script("slurm/sbatch.sh", *args, "--dry-run")
    assert proc.returncode != 0
    assert message in proc.stderr
    assert proc.stdout == ""


def test_real_submission_checks_paths_before_submitting(tmp_path):
    # No --dry-run: the dataset folder is checked on this host before sbatch is ever called.
    proc = run_script("slurm/sbatch.sh", *SEED_EXAMPLE[:6], "--dataset-dir", str(tmp_path / "missing"),
                      cwd=tmp_path)
    assert proc.returncode != 0 and "--dataset-dir directory" in proc.stderr
    (tmp_path / "data").mkdir()
    proc = run_script("slurm/sbatch.sh", *SEED_EXAMPLE[:6], "--dataset-dir", str(tmp_path / "data"),
                      "--checkpoint", str(tmp_path / "data" / "none.ckpt"), cwd=tmp_path)
    assert proc.returncode != 0 and "--checkpoint file" in proc.stderr


def _fake_python(tmp_path: Path, status: int) -> dict[str, str]:
    """A `python` that records `-m` calls (the trainer) and what SD_MLPERF_CACHE_CLEARED said to it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python"
    shim.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -m ]; then echo "$*" >> "{tmp_path}/calls"; '
                    f'echo "${{SD_MLPERF_CACHE_CLEARED:-unset}}" > "{tmp_path}/cleared"; exit {status}; fi\n'
                    f'exec "{sys.executable}" "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = script_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


RUN_ARGS = ["--config", "conf/smoke.yaml", "--launcher", "none", "--results-dir", "/tmp/r", "--run-name", "x",
            "--", "training.max_steps=1"]


def test_run_and_time_tells_the_trainer_about_the_cache_trains_and_prints_result(tmp_path):
    env = _fake_python(tmp_path, 0)
    env.pop("SD_MLPERF_CACHE_CLEARED", None)
    proc = run_script("slurm/run_and_time.sh", *RUN_ARGS, env=env)
    assert proc.returncode == 0, proc.stderr
    if os.access("/proc/sys/vm/drop_caches", os.W_OK):  # root on a host: it drops the cache and says so
        assert (tmp_path / "cleared").read_text().strip() == "1"
    else:
        assert (tmp_path / "cleared").read_text().strip() == "unset"
        assert "cache_clear false" in proc.stderr
    assert "cache_clear" not in proc.stdout  # the trainer logs it, as it was told
    assert (tmp_path / "calls").read_text().split() == [
        "-m", "sd_mlperf", "train", "--config", "conf/smoke.yaml", "parallel.num_nodes=1",
        "parallel.gpus_per_node=1", "run.output_dir=/tmp/r", "run.name=x", "training.max_steps=1"]
    result = re.search(r"^RESULT,stable_diffusion,(\d+),[^,]+,\d{4}-\d\d-\d\d ", proc.stdout, flags=re.M)
    assert result and int(result.group(1)) >= 0


def test_run_and_time_passes_on_a_cache_drop_its_caller_made(tmp_path):
    env = _fake_python(tmp_path, 0)
    env["SD_MLPERF_CACHE_CLEARED"] = "1"  # e.g. the job dropped it on every node outside the container
    proc = run_script("slurm/run_and_time.sh", *RUN_ARGS, env=env)
    assert proc.returncode == 0 and (tmp_path / "cleared").read_text().strip() == "1"
    assert "cache_clear false" not in proc.stderr


def test_run_and_time_failed_training_propagates_status_and_prints_no_result(tmp_path):
    proc = run_script("slurm/run_and_time.sh", *RUN_ARGS, env=_fake_python(tmp_path, 3))
    assert proc.returncode == 3
    assert "RESULT," not in proc.stdout and "training exited with status 3" in proc.stderr


def test_run_and_time_only_rank_zero_logs_and_reports(tmp_path):
    env = _fake_python(tmp_path, 0)
    env.update(SLURM_PROCID="3", SLURM_LOCALID="3")
    proc = run_script("slurm/run_and_time.sh", *RUN_ARGS, env=env)
    assert proc.returncode == 0 and (tmp_path / "calls").exists()
    assert "RESULT," not in proc.stdout


def test_run_and_time_starts_torchrun_on_one_multi_gpu_node():
    proc = run_script("slurm/run_and_time.sh", "--dry-run", "--gpus-per-node", "8", "--config", "conf/sd2_mlperf.yaml",
                      "--config", "conf/system/01x08x08.yaml")
    assert proc.returncode == 0, proc.stderr
    train = _commands(proc.stdout)[-1]
    assert train[:5] == ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=8", "-m"]
    multi = run_script("slurm/run_and_time.sh", "--dry-run", "--num-nodes", "2", "--gpus-per-node", "8",
                       "--config", "conf/sd2_mlperf.yaml")
    assert multi.returncode != 0 and "submit with slurm/sbatch.sh" in multi.stderr
