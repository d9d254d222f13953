"""tests/gpu/session.sh part1 and part2 --cpu-dry-run: the prepared GPU session's stages run on the CPU at tiny
size, and what comes back fits the device's return (at most 8 files per call).

The session is run once, on minutes of device time, by a later session: it must not rot here. On the CPU the
bench rows and the GroupNorm probe run without compile (inductor's C++ build takes minutes on 2 cores; the
compiled-GroupNorm path is tested in tests/unit/models/test_group_norm_op.py) or graph (graphs need CUDA), the
device checks are left to tests/integration/test_device_checks_dry_run.py; nothing else may be skipped.
"""

from __future__ import annotations

import json
import lzma
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(part: str, back: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(back), "WHEEL_DIR": str(tmp_path / "no_wheels"),
           "SITE_DIR": str(tmp_path / "site"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "PYTHONUNBUFFERED": "1", "APEX_PACK": str(tmp_path / "apex_pack"),
           "APEX_EXT_DIR": str(tmp_path / "apex_ext")}
    return subprocess.run(["bash", "tests/gpu/session.sh", part, "--cpu-dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_both_parts_run_on_the_cpu_and_return_few_files(tmp_path):
    back = tmp_path / "back"
    site = tmp_path / "apex_pack" / "site"  # the apex extension travels xz-compressed; the session unpacks it
    site.mkdir(parents=True)
    (site / "stand_in_ext.so.xz").write_bytes(lzma.compress(b"not a real extension"))
    part1 = _run("part1", back, tmp_path)
    assert part1.returncode == 0, part1.stdout[-3000:] + part1.stderr[-3000:]
    assert (tmp_path / "apex_ext" / "stand_in_ext.so").read_bytes() == b"not a real extension"
    assert sorted(p.name for p in site.iterdir()) == ["stand_in_ext.so.xz"]  # the pack stays as small as it came
    part2 = _run("part2", back, tmp_path)
    assert part2.returncode == 0, part2.stdout[-3000:] + part2.stderr[-3000:]
    returned = sorted(p.name for p in back.iterdir())
    assert len([n for n in returned if n.startswith("part1")]) <= 8 and len(returned) <= 16, returned
    assert {"part1.tar.gz", "part1_summary.txt", "part1_bench.json", "part1_profile.json", "part1_attention.json",
            "part1_groupnorm.json", "part2.tar.gz", "part2_summary.txt", "part2_bench.json"} <= set(returned)

    with tarfile.open(back / "part1.tar.gz") as tar:
        stages_tsv = tar.extractfile("./stages.tsv").read().decode()
    stages = dict(line.split("\t")[:2] for line in stages_tsv.splitlines()[1:])
    assert stages.pop("device_checks").startswith("skipped (cpu dry run")
    assert set(stages.values()) == {"passed"}, stages
    assert list(stages) == ["install", "bench_b64", "profile_b64", "attention_probe", "groupnorm_probe"]
    (bench,) = json.loads((back / "part1_bench.json").read_text())
    assert bench["status"] == "ok" and bench["batch"] == 2
    (profile,) = json.loads((back / "part1_profile.json").read_text())
    assert profile["sdpa_backends"] and profile["top_kernels"]
    attention = json.loads((back / "part1_attention.json").read_text())
    assert {r["kernel"] for r in attention if r["status"] == "ok"} >= {"math"}
    norms = json.loads((back / "part1_groupnorm.json").read_text())
    assert {r["kernel"]: r["status"][:7] for r in norms} == {"torch": "ok", "apex": "skipped"}
    summary = (back / "part1_summary.txt").read_text()
    assert "| compile graph b64 |" in summary and "SDPA backend" in summary

    variants = json.loads((back / "part2_bench.json").read_text())
    assert [r["variant"] for r in variants] == ["compile graph b32 torch norm"] and variants[0]["status"] == "ok"
    halves = {r["variant"]: r for r in json.loads((back / "part2_bench_variants.json").read_text())}
    assert halves["compile graph b32 half weights"]["status"] == "ok"
    assert part2.stdout.splitlines()[-1] == "device checks: 3 passed, 0 failed, 0 skipped, 0 timed out"
