"""slurm/: the seed's example prints the expected commands; bad flags fail with a message; run_and_time times a run."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import REPO, run_script, script_env

from sd_mlperf.config import merge_config
from sd_mlperf.submission.checkers import RULESET

CKPT = "/data/mlcommons/sd-checkpoint-3.0/512-base-ema.ckpt"
SEED_EXAMPLE = ["--num-nodes", "2", "--gpus-per-node", "8", "--config", "conf/system/02x08x08.yaml",
                "--checkpoint", CKPT]


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def _plan(stdout: str) -> dict[str, list[str]]:
    """A dry run's lines by role: the sbatch command, then the first run's steps in the job's order."""
    lines = _commands(stdout)
    roles = ["sbatch", "drop", "srun", "train", "evaluate", "check"]
    if lines[1][0] == "export":
        roles.insert(1, "export")
    assert len(lines) == len(roles), stdout
    return dict(zip(roles, lines))


def test_seed_example_dry_run_prints_the_expected_commands(tmp_path):
    proc = run_script("slurm/sbatch.sh", *SEED_EXAMPLE, "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = _plan(proc.stdout)
    repo = str(REPO)
    assert plan["sbatch"] == [
        "sbatch", "--job-name=sd_mlperf_02x08x08", "--nodes=2", "--ntasks-per-node=8", "--time=04:00:00",
        "--exclusive", f"--output={tmp_path}/results/logs/%j_sd_mlperf_02x08x08.out", f"--chdir={repo}",
        f"--export=ALL,SD_MLPERF_REPO={repo}", f"{repo}/slurm/srun.sh", "--results-dir", f"{tmp_path}/results",
        "--log-dir", f"{tmp_path}/results/logs", *SEED_EXAMPLE]
    # Before the run: the page cache is dropped on each node, outside the container.
    assert plan["drop"] == ["srun", "--nodes=2", "--ntasks-per-node=1", "bash", f"{repo}/slurm/drop_caches.sh"]
    container = ["--container-image=sd_mlperf:latest", "--container-name=sd_mlperf",
                 f"--container-mounts={tmp_path}/results:/results,/data/mlcommons:/data/mlcommons,"
                 f"{repo}:/workspace/sd_mlperf",
                 "--container-workdir=/workspace/sd_mlperf", "--no-container-mount-home", "--container-env=MASTER_ADDR"]
    tasks = ["--label", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1"]
    assert plan["srun"] == [
        "srun", *tasks, *container,
        "bash", "slurm/run_and_time.sh", "--num-nodes", "2", "--gpus-per-node", "8", "--results-dir", "/results",
        "--run-name", "02x08x08_%j", "--config", "conf/sd2_mlperf.yaml", "--config", "conf/system/02x08x08.yaml",
        "--checkpoint", CKPT, "--launcher", "none"]
    assert plan["train"] == [
        "python", "-m", "sd_mlperf", "train", "--config", "conf/sd2_mlperf.yaml", "--config",
        "conf/system/02x08x08.yaml", "parallel.num_nodes=2", "parallel.gpus_per_node=8",
        f"model.frozen_checkpoint={CKPT}", "run.output_dir=/results", "run.name=02x08x08_%j"]
    # After it: offline scoring (for runs trained with eval.inline=false), then the compliance checker.
    assert plan["evaluate"] == ["srun", *tasks, *container, "python", "-m", "sd_mlperf", "evaluate", "--run-dir",
                                "/results/02x08x08_%j", "--all"]
    assert plan["check"] == [
        "srun", "--nodes=1", "--ntasks=1", *container, "python", "-m", "mlperf_logging.compliance_checker", "--usage",
        "training", "--ruleset", RULESET, "--log_output", "/results/02x08x08_%j/compliance_checker.log",
        "/results/02x08x08_%j/mlperf.log"]
    assert not (tmp_path / "results").exists(), "a dry run must not create anything"


def test_dry_run_train_command_is_a_valid_config():
    proc = run_script("slurm/sbatch.sh", *SEED_EXAMPLE, "--dry-run", "--", "training.max_steps=100")
    train = _plan(proc.stdout)["train"]
    configs = [REPO / train[i + 1] for i, w in enumerate(train) if w == "--config"]
    overrides = [w for w in train[4:] if "=" in w]
    cfg = merge_config(configs, overrides)  # raises ConfigError on an unknown key or a bad value
    assert (cfg.parallel.num_nodes, cfg.parallel.gpus_per_node, cfg.training.max_steps) == (2, 8, 100)
    assert cfg.model.frozen_checkpoint == CKPT


def test_job_options_reach_sbatch_and_run_options_reach_srun(tmp_path):
    proc = run_script("slurm/sbatch.sh", *SEED_EXAMPLE, "--account", "acct", "--partition", "batch",
                      "--walltime", "1-00:00:00", "--container", "img.sqsh", "--dataset-dir", "/lustre/mlc",
                      "--run-name", "try1", "--sbatch-arg", "--qos=high", "--srun-arg", "--cpu-bind=none",
                      "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = _plan(proc.stdout)
    assert {"--account=acct", "--partition=batch", "--time=1-00:00:00", "--qos=high"} <= set(plan["sbatch"])
    srun = plan["srun"]
    assert f"--container-image={tmp_path}/img.sqsh" in srun  # made absolute: the job starts elsewhere
    mounts = next(w for w in srun if w.startswith("--container-mounts="))
    # The checkpoint lies outside the dataset folder, so its own folder is mounted too.
    assert mounts.split(",")[1:3] == ["/lustre/mlc:/lustre/mlc",
                                      "/data/mlcommons/sd-checkpoint-3.0:/data/mlcommons/sd-checkpoint-3.0"]
    assert srun[srun.index("--run-name") + 1] == "try1"
    # --srun-arg reaches the steps that start the GPU tasks (training, evaluation), before the task command.
    for step in ("srun", "evaluate"):
        assert plan[step].index("--cpu-bind=none") < plan[step].index("bash" if step == "srun" else "python")
    assert "--cpu-bind=none" not in plan["drop"] + plan["check"]


def test_container_none_runs_the_checkout_with_the_venv(tmp_path):
    venv = tmp_path / "venv"
    proc = run_script("slurm/sbatch.sh", "--num-nodes", "2", "--gpus-per-node", "1", "--config", "conf/smoke.yaml",
                      "--base-config", "none", "--container", "none", "--venv", "venv", "--dry-run", "--",
                      "run.device=cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = _plan(proc.stdout)
    repo = str(REPO)
    sbatch = plan["sbatch"]
    assert sbatch[sbatch.index("--venv") + 1] == str(venv)  # made absolute: the job starts in the checkout
    # No container flags; the tasks start in the checkout, write to the host's results folder, use the venv.
    assert not [w for w in proc.stdout.split() if w.startswith("--container-")]
    assert plan["srun"] == [
        "srun", "--label", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--chdir={repo}",
        "bash", f"{repo}/slurm/run_and_time.sh", "--num-nodes", "2", "--gpus-per-node", "1",
        "--results-dir", f"{tmp_path}/results", "--run-name", "smoke_%j", "--config", "conf/smoke.yaml",
        "--venv", str(venv), "--launcher", "none", "--", "run.device=cpu"]
    assert plan["train"][:4] == [f"{venv}/bin/python", "-m", "sd_mlperf", "train"]
    assert plan["evaluate"][6:10] == [f"{venv}/bin/python", "-m", "sd_mlperf", "evaluate"]
    assert plan["check"][4] == f"{venv}/bin/python"
    assert plan["check"][-1] == f"{tmp_path}/results/smoke_%j/mlperf.log"


def test_num_runs_names_each_run_and_env_file_and_master_addr_reach_the_tasks(tmp_path):
    env_file = tmp_path / "sys.env"
    env_file.write_text("# a system\nNCCL_IB_HCA==mlx5_0,mlx5_3\n\nNCCL_DEBUG=WARN\n")
    proc = run_script("slurm/sbatch.sh", *SEED_EXAMPLE, "--num-runs", "10", "--run-name", "sub", "--env-file",
                      str(env_file), "--master-addr", "10.1.2.3", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = _plan(proc.stdout)
    assert plan["export"] == ["export", "MASTER_ADDR=10.1.2.3", "NCCL_IB_HCA==mlx5_0,mlx5_3", "NCCL_DEBUG=WARN"]
    # pyxis lets the image's values win unless named here.
    assert "--container-env=MASTER_ADDR,NCCL_IB_HCA,NCCL_DEBUG" in plan["srun"]
    assert plan["srun"][plan["srun"].index("--run-name") + 1] == "sub_01"  # run i of 10 is sub_01 ... sub_10
    assert "10 run(s) named sub_01 ... sub_10" in proc.stderr
    assert "<datestamp>_<i>.log" in proc.stderr


def test_env_file_line_of_another_form_is_refused(tmp_path):
    env_file = tmp_path / "sys.env"
    env_file.write_text("NCCL_DEBUG=WARN\nexport NCCL_IB_HCA=mlx5_0\n")
    proc = run_script("slurm/sbatch.sh", *SEED_EXAMPLE, "--env-file", str(env_file), "--dry-run")
    assert proc.returncode != 0 and proc.stdout == ""
    assert f"{env_file}:2: expected NAME=VALUE (no spaces, no 'export')" in proc.stderr


def test_shipped_system_env_files_parse():
    for env_file in sorted((REPO / "slurm" / "env").glob("*.env")):
        proc = run_script("slurm/srun.sh", *SEED_EXAMPLE, "--env-file", str(env_file), "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert "NCCL_IB_HCA==mlx5_0,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_9,mlx5_10,mlx5_11" in _plan(
            "sbatch\n" + proc.stdout)["export"]


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
    ([*SEED_EXAMPLE, "--num-runs", "0"], "--num-runs must be a positive integer"),
    ([*SEED_EXAMPLE, "--num-runs", "10", "--", "run.seed=42"], "every run the same seed"),
    ([*SEED_EXAMPLE, "--srun-arg", "cpu-bind"], "--srun-arg needs an srun option"),
    ([*SEED_EXAMPLE, "--venv", "/opt/venv"], "--venv applies to --container none"),
    ([*SEED_EXAMPLE, "--container", "none", "--code-in-image"], "--code-in-image needs a container"),
    ([*SEED_EXAMPLE, "--master-addr", "a b"], "--master-addr must be a host name"),
    ([*SEED_EXAMPLE, "--env-file", "/nonexistent.env"], "--env-file file '/nonexistent.env' does not exist"),
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


# --- the job itself (slurm/srun.sh without --dry-run), on stand-ins for srun, scontrol and the trainer ---------

FAKE_SRUN = """#!/usr/bin/env bash
# srun with one task: records its arguments, drops its own options, runs the rest as rank 0 (labelled with --label).
echo "$*" >> "$FAKE_DIR/srun_calls"
label=""
while [[ "${1-}" == -* ]]; do [ "$1" != --label ] || label="0: "; shift; done
if [[ "$*" == *drop_caches.sh* ]]; then echo "drop_caches.sh: (stand-in)"; exit "${FAKE_DROP_STATUS:-0}"; fi
SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 "$@" 2>&1 | sed "s/^/$label/"
exit "${PIPESTATUS[0]}"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# Node names n1, n2 that do not resolve; n1's NodeAddr is 10.9.8.7.
case "$1 $2" in
    "show hostnames") printf 'n1\\nn2\\n' ;;
    "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.9.8.7 NodeHostName=$3 State=IDLE" ;;
esac
"""
FAKE_VENV_PYTHON = """#!/usr/bin/env bash
# The venv's python: records -m calls with what the launcher told them; `train` writes a run dir with a log.
if [ "$1" = -m ]; then
    echo "$* MASTER_ADDR=${MASTER_ADDR:-unset} CLEARED=${SD_MLPERF_CACHE_CLEARED:-unset}" >> "$FAKE_DIR/calls"
    if [ "$3" = train ]; then
        for a in "$@"; do case "$a" in run.output_dir=*) out=${a#*=} ;; run.name=*) name=${a#*=} ;; esac; done
        mkdir -p "$out/$name" && echo ':::MLLOG {}' > "$out/$name/mlperf.log"
        exit "${FAKE_TRAIN_STATUS:-0}"
    fi
    [ "$2" != mlperf_logging.compliance_checker ] || exit "${FAKE_CHECK_STATUS:-0}"
    exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def _job(tmp_path: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    """slurm/srun.sh as the batch script of job 77 on n[1-2], --container none, with the stand-ins."""
    bin_dir, venv_bin = tmp_path / "bin", tmp_path / "venv" / "bin"
    for folder, name, text in ((bin_dir, "srun", FAKE_SRUN), (bin_dir, "scontrol", FAKE_SCONTROL),
                               (venv_bin, "python", FAKE_VENV_PYTHON)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    env = script_env(SLURM_JOB_ID="77", SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_NUM_NODES="2",
                     FAKE_DIR=str(tmp_path), REAL_PYTHON=sys.executable, **env_extra)
    env.pop("MASTER_ADDR", None)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return run_script("slurm/srun.sh", "--gpus-per-node", "1", "--config", "conf/smoke.yaml", "--base-config", "none",
                      "--container", "none", "--venv", str(tmp_path / "venv"), "--results-dir", str(tmp_path / "res"),
                      "--log-dir", str(tmp_path / "logs"), "--run-name", "r_%j", *args, env=env, cwd=tmp_path)


def _calls(tmp_path: Path, name: str = "calls") -> list[str]:
    path = tmp_path / name
    return path.read_text().splitlines() if path.exists() else []


def test_job_makes_num_runs_runs_each_after_a_cache_drop_then_checks_each(tmp_path):
    proc = _job(tmp_path, "--num-runs", "2", "--", "run.device=cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = _calls(tmp_path)
    trains = [c for c in calls if " train " in c]
    assert len(trains) == 2
    for i, call in zip(("1", "2"), trains):
        assert f"run.name=r_77_{i}" in call and "run.seed" not in call  # a fresh name each; the seed is drawn
        # n1 does not resolve here, so the rendezvous is its Slurm NodeAddr; the job dropped the cache first.
        assert call.endswith("MASTER_ADDR=10.9.8.7 CLEARED=1")
    checks = [c for c in calls if "compliance_checker" in c]
    assert [c.split()[-3] for c in checks] == [f"{tmp_path}/res/r_77_{i}/mlperf.log" for i in ("1", "2")]
    srun_calls = _calls(tmp_path, "srun_calls")
    assert [c.split()[-1] for c in srun_calls if "drop_caches" in c] == [f"{REPO}/slurm/drop_caches.sh"] * 2
    logs = sorted((tmp_path / "logs").iterdir())
    assert [re.sub(r"^\d{12}_", "<datestamp>_", p.name) for p in logs] == ["<datestamp>_1.log", "<datestamp>_2.log"]
    for i, log in zip(("1", "2"), logs):
        text = log.read_text()
        assert re.search(r"^0: RESULT,stable_diffusion,\d+,", text, flags=re.M), text
        assert f"run {i}: compliance checker PASSED" in text
    assert "rendezvous 10.9.8.7" in proc.stdout
    assert re.search(rf"run 2: {tmp_path}/res/r_77_2: RESULT \d+ s, compliance PASSED", proc.stdout)
    assert f"sd-mlperf package {tmp_path}/res/r_77_1 {tmp_path}/res/r_77_2 --out submission" in proc.stdout


def test_job_stops_at_a_failed_run_and_reports_a_failed_check(tmp_path):
    (tmp_path / "a").mkdir()
    proc = _job(tmp_path / "a", "--num-runs", "3", FAKE_TRAIN_STATUS="3")
    assert proc.returncode == 3  # the job fails as its training did, after the first run
    assert len([c for c in _calls(tmp_path / "a") if " train " in c]) == 1
    assert "run 1: " in proc.stdout and "training FAILED (exit status 3" in proc.stdout
    assert "0 of 3 run(s) done" in proc.stdout and "sd-mlperf package" not in proc.stdout

    (tmp_path / "b").mkdir()
    proc = _job(tmp_path / "b", FAKE_CHECK_STATUS="1", FAKE_DROP_STATUS="1")
    assert proc.returncode == 0, proc.stderr  # a failed check is a verdict, not a failed job
    assert re.search(r"run 1: \S+/res/r_77: RESULT \d+ s, compliance FAILED", proc.stdout)
    assert "the page cache was not dropped on every node: run 1 logs cache_clear false" in proc.stdout
