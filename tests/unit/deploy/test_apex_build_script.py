"""scripts/build_apex_group_norm.sh refuses what cannot build before any download or compile, naming the fix.

The build itself (nvcc 13.0, torch 2.11.0's wheel, minutes per kernel file) is not run in CI; README says what
one kernel file took here.
"""

from __future__ import annotations

import subprocess

from deploy_helpers import REPO, run_script, script_env

SCRIPT = "scripts/build_apex_group_norm.sh"


def test_script_parses_and_documents_itself():
    assert subprocess.run(["bash", "-n", str(REPO / SCRIPT)], capture_output=True).returncode == 0
    proc = run_script(SCRIPT, "--help")
    assert proc.returncode == 0 and "--apex-src" in proc.stdout and "sm_90" in proc.stdout


def test_apex_source_is_required_and_checked(tmp_path):
    proc = run_script(SCRIPT)
    assert proc.returncode == 2 and "PyPI has no apex" in proc.stderr
    proc = run_script(SCRIPT, "--apex-src", str(tmp_path))
    assert proc.returncode == 2 and "must be an apex checkout" in proc.stderr


def test_a_toolkit_other_than_cuda_13_is_refused(tmp_path):
    src = tmp_path / "apex" / "apex" / "contrib" / "csrc" / "group_norm"
    src.mkdir(parents=True)
    (src / "group_norm_nhwc_op.cpp").write_text("")
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/usr/bin/env bash\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    proc = run_script(SCRIPT, "--apex-src", str(tmp_path / "apex"), env=script_env(NVCC=str(nvcc)))
    assert proc.returncode == 2 and "not CUDA 13.0" in proc.stderr
