"""tests/gpu/run_device_checks.sh --cpu-dry-run: every stage but torch.compile runs, and the summary comes last.

The script is what a GPU session runs once, with minutes of device time, so it must not rot here:
this runs its own stages (fast-path checks, GPU tests, bench table, summary, archive) on the CPU at
tiny size, without the torch.compile stage (SKIP_COMPILE=1: minutes of compiling on 2 cores). What a
CPU lacks (TE, apex, CUDA graphs) is skipped with its reason; nothing else may be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _write_wheel(folder: Path, name: str, version: str = "0.1") -> Path:
    """A minimal pure-Python wheel, as --prepare-wheels would have fetched one."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for member, text in files.items():
            whl.writestr(member, text)
        whl.writestr(f"{dist}/RECORD", "".join(f"{m},,\n" for m in [*files, f"{dist}/RECORD"]))
    return path


@pytest.mark.slow
def test_cpu_dry_run_passes_and_summarizes(tmp_path):
    out, archive, site = tmp_path / "out", tmp_path / "device_checks.tar.gz", tmp_path / "site"
    wheels = tmp_path / "wheels"
    _write_wheel(wheels, "sdmlperf_probe")
    (wheels / "broken-0.1-py3-none-any.whl").write_bytes(b"not a zip")  # must not stop the good one
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "ARCHIVE": str(archive), "SKIP_COMPILE": "1",
           "WHEEL_DIR": str(wheels), "SITE_DIR": str(site), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["bash", "tests/gpu/run_device_checks.sh", "--cpu-dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert (site / "sdmlperf_probe" / "__init__.py").is_file()  # installed beside, not into, this Python
    assert "these wheels did not install" in proc.stderr and "broken-0.1-py3-none-any.whl" in proc.stderr
    stages = dict(line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines()[1:])
    assert stages == {"install": "passed", "device_checks": "passed", "gpu_tests_core": "passed",
                      "bench_train": "passed", "gpu_tests_slow": "passed", "bench_compile": "skipped (SKIP_COMPILE=1)"}
    checks = {c["check"]: c for c in json.loads((out / "device_checks.json").read_text())}
    assert not [name for name, c in checks.items() if c["status"] == "FAIL"]
    assert checks["unet[fp32 sdpa nchw]"]["status"] == "ok" and checks["cuda_graph_matches_eager"]["status"] == "ok"
    skipped = {name: c["detail"] for name, c in checks.items() if c["status"] == "skipped"}
    assert set(skipped) == {"unet[bf16 te nhwc]", "unet[bf16 apex nhwc]", "step_no_host_sync",
                            "step_no_host_sync[half weights]"}
    assert checks["compile_one_graph"]["status"] == "ok"
    assert "cannot run here" in skipped["unet[bf16 te nhwc]"] and "cannot run here" in skipped["unet[bf16 apex nhwc]"]
    rows = {r["variant"]: r for r in json.loads((out / "bench_train.json").read_text())}
    assert rows["eager nchw"]["status"] == "ok" and rows["eager nchw"]["images_per_s"] > 0
    assert rows["graph nhwc"]["status"].startswith("skipped: training.cuda_graph=true needs a CUDA device")

    summary = proc.stdout[proc.stdout.index("==== sd_mlperf device check summary ===="):]
    assert "fast-path checks: 6 ok, 0 FAIL, 4 skipped" in summary and "| eager nchw |" in summary
    assert summary.splitlines()[-1] == "device checks: 5 passed, 0 failed, 1 skipped, 0 timed out"
    with tarfile.open(archive) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"stages.tsv", "summary.txt", "device_checks.json", "bench_train.json", "environment.txt"} <= names
