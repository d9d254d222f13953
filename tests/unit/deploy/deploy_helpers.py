"""Helpers for the deployment tests: run a repo script in a clean environment and read what it printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def script_env(**extra: str) -> dict[str, str]:
    """The test process's environment without Slurm/launcher variables, with the venv's python first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in {"RANK", "LOCAL_RANK", "SD_MLPERF_CONTAINER", "SD_MLPERF_REPO"}}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_script(rel_path: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `bash REPO/rel_path args...` and capture its output as text."""
    return subprocess.run(["bash", str(REPO / rel_path), *args], cwd=cwd or REPO, env=env or script_env(),
                          capture_output=True, text=True, timeout=timeout)
