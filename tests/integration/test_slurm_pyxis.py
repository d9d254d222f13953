"""The pyxis form: `slurm/sbatch.sh --container FILE.sqsh` on the local two-node Slurm cluster, through pyxis + enroot.

enroot and pyxis are not Debian packages and their sources live on GitHub, which CI cannot reach, so CI does not run
this; built from source (docs/cluster-and-container.md, "The pyxis form on this machine") they ran here. Opt-in:
SD_MLPERF_TEST_SQSH names a .sqsh made by `docker/build.sh --sqsh` (about 6 GB from the stand-in base), with enroot
on PATH and pyxis' spank_pyxis.so in /usr/local/lib/slurm (or SD_MLPERF_PYXIS_SO). It skips, naming what is missing,
without those or slurm-wlm/root (as test_slurm_cluster.py); a job that fails or times out fails the test.

Both slurmd run on this one machine, so each "node" needs its own enroot data folder (a real node has its own disk):
the test adds an enroot drop-in config that puts it under ${SLURMD_NODENAME} and removes it afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_slurm_cluster import SMOKE, TINY, _skip_reason, running_cluster

pytestmark = pytest.mark.slow


def _pyxis_skip_reason() -> str | None:
    if not os.environ.get("SD_MLPERF_TEST_SQSH"):
        return ("opt-in: set SD_MLPERF_TEST_SQSH to a .sqsh from docker/build.sh --sqsh (enroot and pyxis are built "
                "from GitHub sources, which CI cannot reach)")
    if not Path(os.environ["SD_MLPERF_TEST_SQSH"]).is_file():
        return f"SD_MLPERF_TEST_SQSH={os.environ['SD_MLPERF_TEST_SQSH']} is not a file"
    if shutil.which("enroot") is None:
        return "enroot is not installed (build it from source: docs/cluster-and-container.md)"
    if not Path(os.environ.get("SD_MLPERF_PYXIS_SO", "/usr/local/lib/slurm/spank_pyxis.so")).is_file():
        return "pyxis' spank_pyxis.so is not in /usr/local/lib/slurm (set SD_MLPERF_PYXIS_SO)"
    return _skip_reason()


def test_two_node_smoke_job_in_the_container(tmp_path):
    reason = _pyxis_skip_reason()
    if reason:
        pytest.skip(reason)
    sqsh = os.environ["SD_MLPERF_TEST_SQSH"]
    pyxis = os.environ.get("SD_MLPERF_PYXIS_SO", "/usr/local/lib/slurm/spank_pyxis.so")
    info = subprocess.run(["enroot", "info"], capture_output=True, text=True).stdout
    conf_dir = Path(re.search(r"^Config file: (\S+)$", info, flags=re.M).group(1) + ".d")
    dropin = conf_dir / "99-sd-mlperf-test-per-node.conf"
    dropin.write_text(f"ENROOT_DATA_PATH {tmp_path}/enroot/${{SLURMD_NODENAME}}\n")
    try:
        with running_cluster(plugstack=f"required {pyxis} runtime_path={tmp_path}/pyxis\n") as cluster:
            assert "--container-image" in cluster.run("srun", "--help").stdout, "pyxis did not load into srun"
            results, logs, data = tmp_path / "results", tmp_path / "logs", tmp_path / "data"
            data.mkdir()
            args = list(SMOKE)
            at = args.index("--container")
            args[at + 1:at + 4] = [sqsh]  # the image instead of `none --venv PYTHON`
            job = cluster.submit(*args, "--dataset-dir", str(data), "--results-dir", str(results), "--log-dir",
                                 str(logs), "--run-name", "pyx", "--", *TINY, "training.max_steps=4")
            out = logs / f"{job}_sd_mlperf_smoke.out"
            state = cluster.wait(job, out, timeout=900)
            text = out.read_text()
            assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), text[-5000:] + cluster.logs()
    finally:
        dropin.unlink()
    assert f"container {sqsh}" in text
    # Both ranks ran in the container: the results folder is its mount, /results.
    assert re.search(r"^0: .*distributed: slurm, 2 processes \(2 nodes x 1\), gloo", text, flags=re.M), text[-4000:]
    assert re.search(r"^0: .*saved checkpoint /results/pyx/checkpoints/", text, flags=re.M)
    assert re.search(r"^0: RESULT,stable_diffusion,\d+,", text, flags=re.M)
    assert "run 1: compliance checker PASSED" in text
    assert (results / "pyx" / "mlperf.log").is_file()
