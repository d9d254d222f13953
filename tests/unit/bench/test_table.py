"""The bench table: aligned columns, n/a for gaps, ratios, and a parse round trip."""

from __future__ import annotations

import json

import pytest

from sd_mlperf.bench.table import add_ratios, columns_of, format_table, format_value, parse_text_table, write_rows


def _rows():
    return [{"variant": "a", "images_per_s": 10.0, "status": "ok"},
            {"variant": "b two", "images_per_s": 25.0, "extra": 3, "status": "ok"},
            {"variant": "c", "status": "skipped: no  CUDA"}]


def test_text_table_has_one_line_per_row_and_equal_columns():
    text = format_table(_rows())
    header, cells = parse_text_table(text)
    assert header == ["variant", "images_per_s", "status", "extra"]
    assert len(cells) == 3 and all(len(line) == len(header) for line in cells)
    assert cells[1][0] == "b two"  # single spaces inside a cell survive
    assert cells[2][1] == "n/a" and cells[2][2] == "skipped: no CUDA"  # runs of spaces are collapsed
    assert cells[0][3] == "n/a"


def test_columns_pick_and_order():
    text = format_table(_rows(), columns=["status", "variant"])
    header, cells = parse_text_table(text)
    assert header == ["status", "variant"]
    assert cells[0] == ["ok", "a"]


def test_markdown_and_json():
    md = format_table(_rows(), fmt="markdown").splitlines()
    assert md[0].startswith("| variant |") and md[1].count("---") == 4 and len(md) == 5
    data = json.loads(format_table(_rows(), fmt="json"))
    assert [r["variant"] for r in data] == ["a", "b two", "c"] and data[2]["images_per_s"] is None
    with pytest.raises(ValueError, match="unknown table format"):
        format_table(_rows(), fmt="html")  # type: ignore[arg-type]


def test_ratios_relative_to_first_row():
    rows = add_ratios(_rows(), "images_per_s", name="speedup")
    assert [r["speedup"] for r in rows] == [1.0, 2.5, None]
    rows = add_ratios(_rows(), "images_per_s", name="slowdown", higher_is_better=False)
    assert rows[1]["slowdown"] == pytest.approx(0.4)


def test_format_value():
    assert format_value(None) == "n/a" and format_value(float("nan")) == "n/a"
    assert format_value(True) == "yes" and format_value(False) == "no"
    assert format_value(0.12345) == "0.123" and format_value(12.345) == "12.35" and format_value(1234.5) == "1234.5"
    assert format_value(2.5e-4) == "2.500e-04" and format_value(3) == "3"
    assert columns_of([{"b": 1}, {"a": 2, "b": 3}]) == ["b", "a"]


def test_parse_rejects_non_tables():
    with pytest.raises(ValueError, match="not a bench table"):
        parse_text_table("hello\nworld\n")


def test_write_rows_is_json(tmp_path):
    path = tmp_path / "rows.json"
    write_rows(path, _rows())
    assert json.loads(path.read_text())[1]["extra"] == 3
