"""COCO prompts (val2014_30k.tsv) and FID statistics (npz): valid files load, bad ones name the problem."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pandas._libs.parsers import STR_NA_VALUES

from sd_mlperf.data.coco import (
    PANDAS_NA_STRINGS,
    Prompt,
    read_fid_stats,
    read_prompts,
    write_fid_stats,
    write_prompts,
)

# Captions that need quoting or care: quotes at start, middle and end, doubled, alone; tabs and newlines
# (to_csv quotes them); unicode; leading and trailing spaces; text pandas must not mistake for a number or NaN.
TRICKY_CAPTIONS = [
    'A sign that says "STOP" on a pole',
    '"Quoted" at the start',
    'quoted at the "end"',
    'doubled ""quotes"" inside',
    '"',
    '""',
    '"""',
    "it's a 12\" pizza",
    "a cat\tsits on a mat",
    "two\nlines",
    "crlf\r\ninside",
    "\ttab first",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e",
    "\u4e00\u53ea\u732b\u5728\u684c\u5b50\u4e0a",
    "a dog \U0001f436 with a party hat \U0001f389",
    "  leading and trailing spaces  ",
    " ",
    "nan and NA inside are text",
    "1.5",
    "#N/A but more",
    "back\\slash",
    "last, plain",
]


def _pandas_prompts(path) -> list[Prompt]:
    """What the MLCommons reference reads: pd.read_csv(path, sep='\\t', header=0), columns image_id, id, caption."""
    df = pd.read_csv(path, sep="\t", header=0)
    return [Prompt(int(a), int(b), c) for a, b, c in zip(df["image_id"], df["id"], df["caption"], strict=True)]


def test_prompts_round_trip_and_column_order(tmp_path):
    path = tmp_path / "p.tsv"
    write_prompts(path, [Prompt(9, 1, "a cat\tsits"), Prompt(7, 2, "a dog")])
    assert read_prompts(path) == [Prompt(9, 1, "a cat\tsits"), Prompt(7, 2, "a dog")]
    other = tmp_path / "o.tsv"
    other.write_text("caption\tid\timage_id\nhello\t3\t5\n")
    assert read_prompts(other) == [Prompt(5, 3, "hello")]


def test_file_written_by_pandas_reads_like_pandas(tmp_path):
    """A file from DataFrame.to_csv (as MLCommons' coco-split-resize.py writes it): same captions as pandas."""
    path = tmp_path / "val.tsv"
    df = pd.DataFrame({"image_id": range(100, 100 + len(TRICKY_CAPTIONS)), "id": range(len(TRICKY_CAPTIONS)),
                       "caption": TRICKY_CAPTIONS, "file_name": "x.jpg"})
    df.to_csv(path, sep="\t", index=False)
    got = read_prompts(path)
    assert got == _pandas_prompts(path)
    assert [p.caption for p in got] == TRICKY_CAPTIONS


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_hand_written_file_reads_like_pandas(tmp_path, newline):
    """Unquoted captions as in val2014_30k.tsv, stray quotes inside, plus the tokenizer's odd corners."""
    lines = [
        "\ufeffimage_id\tid\tcaption",  # a UTF-8 BOM: pandas drops it
        '203564\t37\tA bicycle replica with a clock as the front wheel.',
        '322141\t49\tA room with blue walls and a white sink and door".',
        '16977\t89\tA car that seems to be parked illegally behind a "legally parked car',
        '106140\t98\t"Old" sign and a bus',  # a leading quote closes mid-field: pandas keeps 'Old sign and a bus'
        '571635\t106\tA 12" sub  with  spaces ',
        "",  # blank and whitespace-only lines: pandas skips both
        "   ",
        '9\t7\t"multi-line' + newline + 'caption with ""quotes"""',
        "\t\t",  # not blank for pandas: a row of empty fields, caught below as non-integer ids
    ]
    path = tmp_path / "val2014_30k.tsv"
    path.write_bytes(newline.join(lines[:-1]).encode() + newline.encode())
    got = read_prompts(path)
    assert got == _pandas_prompts(path)
    assert got[3].caption == "Old sign and a bus"
    assert got[-1].caption == f'multi-line{newline}caption with "quotes"'  # quoted: the line break stays as written
    path.write_bytes(newline.join(lines).encode())
    with pytest.raises(ValueError, match=r"val2014_30k\.tsv:11 \(data row 7\): image_id '' is not an integer"):
        read_prompts(path)


def test_write_prompts_writes_like_to_csv_and_round_trips(tmp_path):
    prompts = [Prompt(100 + i, i, c) for i, c in enumerate(TRICKY_CAPTIONS)]
    ours = tmp_path / "ours.tsv"
    write_prompts(ours, prompts)
    df = pd.DataFrame({"image_id": [p.image_id for p in prompts], "id": [p.id for p in prompts],
                       "caption": [p.caption for p in prompts]})
    assert ours.read_bytes() == df.to_csv(sep="\t", index=False).encode()  # byte for byte
    assert _pandas_prompts(ours) == prompts == read_prompts(ours)
    lone_cr = [Prompt(1, 1, "carriage\rreturn"), Prompt(2, 2, "ok")]  # to_csv leaves '\r' unquoted; we quote it
    write_prompts(ours, lone_cr)
    assert _pandas_prompts(ours) == lone_cr == read_prompts(ours)


def test_na_strings_match_pandas():
    assert PANDAS_NA_STRINGS == STR_NA_VALUES


@pytest.mark.parametrize("caption", ["", "NA", "null", "nan", "None", "N/A"])
def test_caption_pandas_reads_as_nan_is_an_error(tmp_path, caption):
    """pandas (and so the reference) turns these into NaN, which the reference's tokenizer cannot take."""
    path = tmp_path / "p.tsv"
    path.write_text(f'image_id\tid\tcaption\n1\t1\t"two\nlines"\n2\t2\t{caption}\n3\t3\tok\n')
    assert pd.isna(pd.read_csv(path, sep="\t", header=0)["caption"][1])
    with pytest.raises(ValueError, match=rf"p\.tsv:4 \(data row 2\): caption {caption!r} is read by pandas as a "
                                         r"missing value \(NaN\)"):
        read_prompts(path)
    with pytest.raises(ValueError, match="read back by pandas.read_csv as NaN"):
        write_prompts(tmp_path / "w.tsv", [Prompt(1, 1, "a"), Prompt(2, 2, caption)])


def test_numeric_caption_column_is_an_error(tmp_path):
    """Every caption a number: pandas yields ints, not text; one text caption keeps them all strings."""
    path = tmp_path / "p.tsv"
    path.write_text("image_id\tid\tcaption\n1\t1\t123\n2\t2\t45\n")
    with pytest.raises(ValueError, match=r"p\.tsv:2 \(data row 1\): caption '123' is read by pandas as int 123"):
        read_prompts(path)
    path.write_text("image_id\tid\tcaption\n1\t1\t123\n2\t2\tTrue\n")
    assert read_prompts(path) == _pandas_prompts(path) == [Prompt(1, 1, "123"), Prompt(2, 2, "True")]


@pytest.mark.parametrize("text, match", [
    ("image_id\tcaption\n1\tx\n", "lacks column"),
    ("image_id\tid\tcaption\n1\tx\thello\n", r"bad\.tsv:2 \(data row 1\): id 'x' is not an integer"),
    # the first row longer than the header: pandas would take its first field as the index and shift the rest
    ("image_id\tid\tcaption\n1\t2\thello\tworld\n", r"bad\.tsv:2 \(data row 1\): the first row has more fields"),
    ("image_id\tid\tcaption\n1\t2\thello\n3\t4\ta\tb\n", "Expected 3 fields in line 3, saw 4"),
    ("image_id\tid\tcaption\n1\t2\t\"unclosed\n", "EOF inside string"),
    ("image_id\tid\tcaption\n1\t\thello\n", r"bad\.tsv:2 \(data row 1\): id '' is not an integer"),
    ("image_id\tid\tcaption\n1.5\t2\thello\n", r"image_id '1\.5' is not an integer"),
    ("image_id\tid\tcaption\n", "no prompts"),
    ("", "empty"),
    ("\n\n", "empty"),
])
def test_bad_prompt_files(tmp_path, text, match):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_prompts(path)


def test_fid_stats_validation(tmp_path):
    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=8), rng.normal(size=(8, 8))
    good = tmp_path / "s.npz"
    write_fid_stats(good, mu.astype(np.float32), a @ a.T)
    got_mu, got_sigma = read_fid_stats(good, feature_dim=8)
    assert got_mu.dtype == np.float64 and np.allclose(got_mu, mu.astype(np.float32)) and got_sigma.shape == (8, 8)
    with pytest.raises(ValueError, match=r"expected \(2048,\)"):
        read_fid_stats(good)  # default: Inception's 2048
    np.savez(tmp_path / "k.npz", mean=mu, sigma=a)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        read_fid_stats(tmp_path / "k.npz", feature_dim=8)
    np.savez(tmp_path / "n.npz", mu=np.full(8, np.nan), sigma=a)
    with pytest.raises(ValueError, match="NaN"):
        read_fid_stats(tmp_path / "n.npz", feature_dim=8)
    with pytest.raises(FileNotFoundError):
        read_fid_stats(tmp_path / "absent.npz")


@pytest.mark.parametrize("kind", ["npy", "pickle", "garbage"])
def test_unreadable_fid_stats_name_the_file(tmp_path, kind):
    """A single array, a pickled npz or junk bytes: a ValueError naming the file, not a numpy error."""
    path = tmp_path / "stats.npz"
    if kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(8))
    elif kind == "pickle":
        np.savez(path, mu=np.array([{"a": 1}], dtype=object), sigma=np.zeros((1, 1)))
    else:
        path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"stats\.npz"):
        read_fid_stats(path, feature_dim=8)

