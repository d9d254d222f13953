"""The README's two opening commands are what CI runs: they must not drift apart."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_readme_opens_with_run_and_test_commands():
    run_cmd, test_cmd = _readme_commands()
    assert "sd-mlperf train --config conf/smoke.yaml" in run_cmd
    assert "pytest" in test_cmd
    assert "-c tests/constraints-cpu.txt" in run_cmd and "-c tests/constraints-cpu.txt" in test_cmd


def test_ci_installs_and_tests_as_the_readme_says():
    _, test_cmd = _readme_commands()
    ci = (REPO / ".ci" / "run").read_text()
    steps = [s.strip() for s in test_cmd.split("&&")]
    install = next(s for s in steps if s.startswith("pip install"))
    pytest_cmd = next(s for s in steps if "pytest" in s)
    assert install.replace("pip install", "pip install -q") in ci
    assert pytest_cmd in ci


def test_constraints_pin_torch_exactly_and_pyproject_does_not():
    pins = (REPO / "tests" / "constraints-cpu.txt").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", pins, flags=re.M)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert not re.search(r'"torch==', pyproject)
