"""`sd-mlperf inspect unet|vae|text-encoder` at full size (meta device) writes the fixtures' manifests."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_mlperf.cli import main
from sd_mlperf.utils.manifest import read_manifest

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("model,prefix,count", [
    ("unet", "model.diffusion_model.", "865,910,724"),
    ("vae", "first_stage_model.", "83,653,863"),
    ("text-encoder", "cond_stage_model.model.", "354,032,641"),
])
def test_inspect_writes_fixture_manifest(model, prefix, count, tmp_path, fixtures_dir, capsys):
    keys = tmp_path / f"{model}.tsv"
    # Overrides right after the positional: argparse binds all positionals in one go.
    rc = main(["inspect", model, "model.unet.attention_backend=math", "model.unet.norm_backend=torch",
               "--config", str(REPO_ROOT / "conf" / "sd2_mlperf.yaml"), "--keys", str(keys)])
    assert rc == 0
    assert f"{model}: {count} parameters" in capsys.readouterr().out
    expected = read_manifest(fixtures_dir / "sd2_512_base_ema_keys.tsv", prefix=prefix)
    assert read_manifest(keys) == expected


def test_inspect_smoke_unet_is_tiny(tmp_path, capsys):
    rc = main(["inspect", "unet", "--config", str(REPO_ROOT / "conf" / "smoke.yaml")])
    assert rc == 0
    n = int(capsys.readouterr().out.split(":")[1].split("parameters")[0].replace(",", ""))
    assert 0 < n < 5_000_000
