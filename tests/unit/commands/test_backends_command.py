"""`sd-mlperf backends`: every role's resolution and why, versions from metadata, no heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

from sd_mlperf.backends import ROLES, backend_names, config_unsuitable, resolve_backend
from sd_mlperf.cli import main
from sd_mlperf.commands.backends import library_versions
from sd_mlperf.config import load_config
from tests.unit.deploy.deploy_helpers import REPO


def test_table_shows_every_role_as_resolve_backend_decides(capsys):
    assert main(["backends", "--config", str(REPO / "conf" / "smoke.yaml")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("device: ") and lines[-1].startswith("versions: torch ")
    cfg = load_config([REPO / "conf" / "smoke.yaml"])
    for role, (key, _) in ROLES.items():
        if role == "decode":  # smoke.yaml trains on cached latents: nothing is decoded, the role is not shown
            assert not any(line.startswith("decode ") for line in lines)
            continue
        line = next(line for line in lines if line.startswith(role + " "))
        requested = "torch" if key == "parallel.backend" else "auto"  # smoke.yaml names the torch backend
        expected = resolve_backend(role, requested, unsuitable=config_unsuitable(cfg)[role])
        assert key in line and f"-> {expected.name}" in line and expected.why in line


def test_fast_requests_the_first_backend_of_every_role(capsys):
    rc = main(["backends", "--fast", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert [r["requested"] for r in report["backends"]] == [backend_names(role)[0] for role in ROLES]
    failed = [r for r in report["backends"] if r["status"] == "error"]
    assert rc == (1 if failed else 0)
    for row in failed:  # the message names the key and the fix
        assert row["key"] in row["why"] and "set " in row["why"]


def test_an_unavailable_named_backend_exits_nonzero_and_others_still_print(capsys, monkeypatch):
    from sd_mlperf.backends import Probe

    # Make `te` unavailable whatever this machine has, so the test means the same on a GPU node.
    monkeypatch.setitem(ROLES["attention"][1], "te", lambda: Probe(False, "transformer_engine is not installed"))
    assert main(["backends", "model.unet.attention_backend=te", "parallel.backend=torch"]) == 1
    lines = capsys.readouterr().out.splitlines()
    attention = next(line for line in lines if line.startswith("attention "))
    assert "ERROR model.unet.attention_backend=te cannot run here: transformer_engine is not installed" in attention
    assert "set model.unet.attention_backend=auto" in attention
    assert next(line for line in lines if line.startswith("parallel ")).endswith("-> torch   requested")


def test_versions_come_from_package_metadata():
    from importlib import metadata

    versions = library_versions()
    assert versions["torch"] == metadata.version("torch")
    assert set(versions) == {"torch", "transformer_engine", "apex", "dali", "megatron-core"}


def test_no_heavy_library_is_imported():
    code = ("import sys; from sd_mlperf.cli import main; main(['backends', '--json']); "
            "heavy = [m for m in ('transformer_engine', 'apex', 'nvidia.dali', 'megatron', 'megatron.core') "
            "if m in sys.modules]; sys.stderr.write('HEAVY=' + ','.join(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "HEAVY=" in proc.stderr, proc.stderr
    assert proc.stderr.rsplit("HEAVY=", 1)[1].strip() == ""
