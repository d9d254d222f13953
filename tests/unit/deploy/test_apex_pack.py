"""scripts/apex_pack.py: the apex extension is packed xz-compressed and unpacked outside the pack, once."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("apex_pack", REPO / "scripts" / "apex_pack.py")
apex_pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(apex_pack)


def test_round_trip_outside_the_pack_and_kept_when_current(tmp_path):
    so = tmp_path / "group_norm_cuda.so"
    so.write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    site, ext = tmp_path / "site", tmp_path / "ext"
    site.mkdir()
    apex_pack.compress(so, site / "group_norm_cuda.so.xz")
    assert (site / "group_norm_cuda.so.xz").stat().st_size < so.stat().st_size
    assert apex_pack.unpack(site, ext) == [ext / "group_norm_cuda.so"]
    assert (ext / "group_norm_cuda.so").read_bytes() == so.read_bytes()
    assert sorted(p.name for p in site.iterdir()) == ["group_norm_cuda.so.xz"]  # the pack is left as it came
    (ext / "group_norm_cuda.so").write_bytes(b"kept")  # newer than its .xz: a warm machine keeps it
    apex_pack.unpack(site, ext)
    assert (ext / "group_norm_cuda.so").read_bytes() == b"kept"
    os.utime(ext / "group_norm_cuda.so", (0, 0))  # older than the .xz (a new pack): unpacked again
    apex_pack.unpack(site, ext)
    assert (ext / "group_norm_cuda.so").read_bytes() == so.read_bytes()
    assert not list(ext.glob("*.part"))


def test_usage_errors_exit_2(capsys):
    assert apex_pack.main(["unpack", "only-one"]) == 2 and "usage:" in capsys.readouterr().err
