"""`sd-mlperf report RUN_DIR`: the PNG plots (valid files of a sensible size) and the printed summary."""

from __future__ import annotations

import sys

from PIL import Image

from sd_mlperf.cli import main
from sd_mlperf.report.plots import _spread
from tests.unit.report.run_dir import make_run


def _check_png(path, min_size=(600, 200)):
    assert path.is_file(), path
    assert path.stat().st_size > 10_000, f"{path}: {path.stat().st_size} bytes, suspiciously small"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_size[0] and im.height >= min_size[1], im.size
        assert im.width <= 4000 and im.height <= 4000, im.size
        assert len(im.convert("L").getcolors(256)) > 10  # something was drawn


def test_report_writes_the_plots_and_prints_the_summary(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["report", str(run)]) == 0
    for name in ("train.png", "eval.png", "grids.png"):
        _check_png(run / "report" / name)
    out = capsys.readouterr().out
    assert out.startswith(f"run summary: {run}")
    assert "report/train.png, report/eval.png, report/grids.png" in out


def test_report_to_another_folder_with_projection_numbers(tmp_path, capsys):
    run = make_run(tmp_path, grid_size=(2048, 2300))  # a benchmark-sized grid is shrunk, not pasted at full size
    out_dir = tmp_path / "plots"
    assert main(["report", str(run), "--out", str(out_dir), "--gpus", "8", "--img-per-s-per-gpu", "140",
                 "--global-batch-size", "64", "--max-grids", "1"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["eval.png", "grids.png", "train.png"]
    _check_png(out_dir / "grids.png", min_size=(200, 200))
    out = capsys.readouterr().out
    assert "global batch 64 on 8 GPU(s)" in out and "140.0 img/s per GPU (given) x 8" in out


def test_spread_keeps_first_and_last():
    assert _spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert _spread([1, 2], 8) == [1, 2]
    assert _spread([1, 2, 3], 1) == [3]


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert main(["report", str(run)]) == 1
    err = capsys.readouterr().err
    assert "UserError: sd-mlperf report draws with matplotlib, which is not installed" in err
    assert "pip install -c tests/constraints-cpu.txt -e '.[report]'" in err
    assert not (run / "report").exists()


def test_report_of_a_directory_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "config.yaml does not exist" in capsys.readouterr().err
