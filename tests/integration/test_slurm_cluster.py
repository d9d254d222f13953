"""slurm/ on a real Slurm cluster: Debian's slurm-wlm, one slurmctld and two slurmd on this machine form two nodes.

The node names n1, n2 do not resolve (nothing is added to /etc/hosts), so the job must take the rendezvous from
Slurm's NodeAddr. No container (pyxis is not here): the tasks run this checkout with the test's venv.
- A two-node job of two timed runs (--num-runs 2) completes: both ranks ran, per-rank labelled output, RESULT
  lines, each run in its own directory with its own drawn seed, cache_clear true, a per-run log, and the
  compliance checker passes (every rule but the quality target, on a closed-labelled copy).
- A cancelled job leaves its checkpoints and says how to go on; submitting again with its run name resumes it.
Skips only when slurm-wlm is not installed (.ci/run installs it with apt-get) or we are not root (the daemons
run as root); a daemon that does not start, a failed job or a timeout fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.unit.deploy.deploy_helpers import REPO, script_env

pytestmark = pytest.mark.slow

COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun")
JOB_TIMEOUT_S = 300
# The smoke config, tiny: 2 ranks x batch 4, a checkpoint and an inline evaluation every 2 steps.
SMOKE = ["--num-nodes", "2", "--gpus-per-node", "1", "--config", "conf/smoke.yaml", "--base-config", "none",
         "--container", "none", "--venv", sys.prefix, "--walltime", "15"]
TINY = ["run.device=cpu", "training.checkpoint_every_samples=16", "data.synthetic.num_train_samples=16",
        "data.synthetic.num_train_shards=2", "data.synthetic.num_val_prompts=4", "eval.num_prompts=4",
        "eval.ddim_steps=2", "eval.num_grid_images=2", "logging.interval_steps=1"]


def _find(command: str) -> str | None:
    return shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")


def _skip_reason() -> str | None:
    missing = [c for c in COMMANDS if _find(c) is None]
    if missing:
        return (f"slurm-wlm is not installed ({', '.join(missing)} not found): apt-get install --no-install-recommends "
                "slurm-wlm (.ci/run does)")
    if os.geteuid() != 0:
        return "the test cluster's slurmd runs jobs as root (SlurmdUser=root): run as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


SLURM_CONF = """\
ClusterName=sdmlperf
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd_%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd_%n.log
ReturnToService=2
KillWait=10
NodeName=n1 NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    """A running two-node cluster: its folder, the environment that points sbatch at it, its daemons."""

    root: Path
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def submit(self, *args: str) -> str:
        """slurm/sbatch.sh ARGS, as a user types it; returns the job id."""
        proc = self.run("bash", str(REPO / "slurm" / "sbatch.sh"), *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        job_id = re.search(r"^Submitted batch job (\d+)$", proc.stdout, flags=re.M)
        assert job_id, proc.stdout
        assert f"cancel: scancel {job_id.group(1)}" in proc.stderr
        self.jobs.append(job_id.group(1))
        return job_id.group(1)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (completed jobs stay there for MinJobAge, 300 s)."""
        out = self.run("scontrol", "show", "job", job_id, "-o").stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, out: Path, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        """Wait for the job to end; a timeout is a failure (with the job's output), never a skip."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
                return info
            time.sleep(1)
        text = out.read_text() if out.exists() else "(no output yet)"
        pytest.fail(f"job {job_id} did not end in {timeout} s: {self.job(job_id)}\n{text[-4000:]}")

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*.log")))


def _stop(cluster: Cluster) -> None:
    """Cancel what is left, let it end, then stop each daemon we started, by its pid."""
    if cluster.jobs:
        cluster.run("scancel", *cluster.jobs)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and cluster.run("squeue", "-h", "-o", "%i").stdout.strip():
            time.sleep(1)
    for proc in reversed(cluster.daemons):
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    with running_cluster() as c:
        yield c


@contextmanager
def running_cluster(plugstack: str | None = None) -> Iterator[Cluster]:
    """Start the two-node cluster (slurm.conf above; `plugstack`: the lines of a plugstack.conf, e.g. pyxis'),
    wait until both nodes are idle, and stop every daemon it started when done."""
    root = Path(tempfile.mkdtemp(prefix="sd_mlperf_slurm_"))
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    ctld_port, n1_port, n2_port = _free_ports(3)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=ctld_port, n1_port=n1_port, n2_port=n2_port))
    if plugstack is not None:
        (root / "plugstack.conf").write_text(plugstack)
        with conf.open("a") as f:
            f.write(f"PlugStackConfig={root}/plugstack.conf\n")
    env = script_env(SLURM_CONF=str(conf))
    env.pop("MASTER_ADDR", None)
    env["PATH"] = f"{env['PATH']}{os.pathsep}/usr/sbin{os.pathsep}/sbin"
    c = Cluster(root, env)
    started = time.monotonic()
    try:
        # -D: in the foreground, so the pid we hold is the daemon's; -c: no state from an earlier cluster.
        for cmd in (["slurmctld", "-D", "-c"], ["slurmd", "-D", "-N", "n1"], ["slurmd", "-D", "-N", "n2"]):
            out = open(root / "log" / f"{cmd[0]}_{cmd[-1]}.stdout", "w")  # noqa: SIM115 (closed with the daemon)
            c.daemons.append(subprocess.Popen([_find(cmd[0]), *cmd[1:]], env=env, stdout=out, stderr=subprocess.STDOUT))
            out.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = c.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
            if states.count("idle") == 2:
                break
            assert all(p.poll() is None for p in c.daemons), "a Slurm daemon exited:\n" + c.logs()
            time.sleep(0.5)
        else:
            pytest.fail("the two nodes did not come up idle in 60 s:\n" + c.logs())
        sys.stderr.write(f"slurm cluster up in {time.monotonic() - started:.1f} s\n")
        yield c
    finally:
        _stop(c)
        shutil.rmtree(root, ignore_errors=True)


def _events(log: Path) -> list[dict]:
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in log.read_text().splitlines() if ":::MLLOG" in line]


def _checker_problems(log: Path, tmp: Path) -> tuple[str, list[str]]:
    """The compliance checker on a closed-labelled copy of the log: its output and every WARNING/ERROR line."""
    text = log.read_text()
    assert text.count('"value": "open"') == 1  # the smoke config is open division (tiny models)
    closed = tmp / f"{log.parent.name}_closed.log"
    closed.write_text(text.replace('"value": "open"', '"value": "closed"'))
    cmd = [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training", "--ruleset", "5.0.0",
           str(closed)]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    return out, [x for x in out.splitlines() if x.startswith(("WARNING", "ERROR")) and x.strip() != "ERROR - FAILED"]


def test_two_node_job_of_two_timed_runs(cluster, tmp_path):
    results, logs = tmp_path / "results", tmp_path / "logs"
    started = time.monotonic()
    job = cluster.submit(*SMOKE, "--results-dir", str(results), "--log-dir", str(logs), "--run-name", "smk",
                         "--num-runs", "2", "--", *TINY, "training.max_steps=4")
    out = logs / f"{job}_sd_mlperf_smoke.out"
    info = cluster.wait(job, out)
    text = out.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    sys.stderr.write(f"two-run job took {time.monotonic() - started:.1f} s\n")

    # The rendezvous came from n1's NodeAddr: the name n1 does not resolve here.
    assert "rendezvous 127.0.0.1" in text
    # Both ranks ran, on both nodes, with labelled output; rank 0 reports the results.
    assert re.search(r"^0: .*distributed: slurm, 2 processes \(2 nodes x 1\), gloo", text, flags=re.M), text[-4000:]
    assert re.search(r"^1: \[", text, flags=re.M)
    assert len(re.findall(r"^0: RESULT,stable_diffusion,\d+,", text, flags=re.M)) == 2
    assert not re.search(r"^1: RESULT", text, flags=re.M)

    seeds = []
    for i in ("1", "2"):
        run = results / f"smk_{i}"
        per_run = list(logs.glob(f"*_{i}.log"))
        assert len(per_run) == 1 and re.fullmatch(r"\d{12}_" + i + r"\.log", per_run[0].name), per_run
        assert re.search(r"^0: RESULT,stable_diffusion,\d+,", per_run[0].read_text(), flags=re.M)
        assert f"run {i}: compliance checker PASSED" in per_run[0].read_text()
        assert (run / "compliance_checker.log").is_file()
        events = _events(run / "mlperf.log")
        value = {e["key"]: e["value"] for e in events}
        # srun.sh dropped the page cache on both nodes (root here) and told the trainer so.
        assert value["cache_clear"] is True
        assert events[-1]["key"] == "run_stop"
        seeds.append(value["seed"])
        assert yaml.safe_load((run / "config.yaml").read_text())["run"]["seed"] == value["seed"]
        out_text, problems = _checker_problems(run / "mlperf.log", tmp_path)
        assert "closed_stable_diffusion.yaml" in out_text, out_text
        assert all("aggregated_eval_accuracy" in x and "<= 90.0" in x for x in problems), out_text
    assert seeds[0] != seeds[1], "each run draws its own seed"
    assert re.search(rf"sd-mlperf package {results}/smk_1 {results}/smk_2 ", text)


def test_cancelled_job_leaves_checkpoints_and_resumes(cluster, tmp_path):
    results, logs = tmp_path / "results", tmp_path / "logs"
    args = [*SMOKE, "--results-dir", str(results), "--log-dir", str(logs), "--run-name", "cxl"]
    job = cluster.submit(*args, "--", *TINY, "training.max_steps=1000")
    out = logs / f"{job}_sd_mlperf_smoke.out"
    run = results / "cxl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (run / "checkpoints" / "latest").exists():
        assert cluster.job(job).get("JobState") in {"PENDING", "RUNNING"}, out.read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint in time:\n" + (out.read_text() if out.exists() else "")
        time.sleep(0.5)
    assert cluster.run("scancel", job).returncode == 0
    info = cluster.wait(job, out)
    text = out.read_text()
    assert info["JobState"] == "CANCELLED", text[-4000:]

    # What the user sees: Slurm's own line, then ours saying what is left and how to go on.
    assert re.search(rf"\*\*\* JOB {job} ON n1 CANCELLED AT", text), text[-4000:]
    assert f"job {job} was stopped (scancel, or its time limit) during run 1 of 1: {run}" in text, text[-4000:]
    assert "submit the same command with --run-name cxl --num-runs 1" in text
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert "left behind: checkpoints up to step_" in text
    assert "run_stop" not in (run / "mlperf.log").read_text()

    # Resume: the same command with the run's name; training.resume=auto continues from the latest checkpoint.
    job2 = cluster.submit(*args, "--", *TINY, f"training.max_steps={step + 2}")
    out2 = logs / f"{job2}_sd_mlperf_smoke.out"
    info = cluster.wait(job2, out2)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out2.read_text()[-4000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in records if r["kind"] == "resume"]
    assert resumed == [step], resumed
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == step + 2
    assert '"key": "run_stop"' in (run / "mlperf.log").read_text()
