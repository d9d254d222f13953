"""COCO-2014 validation prompts (val2014_30k.tsv) and FID reference statistics (val2014_30k_stats.npz)."""

from __future__ import annotations

import csv
import os
import re
import zipfile
from dataclasses import dataclass

import numpy as np

from sd_mlperf.utils.files import atomic_path, atomic_write_text

PROMPT_COLUMNS = ("image_id", "id", "caption")
FID_FEATURE_DIM = 2048
# pandas.read_csv's default na_values (pandas._libs.parsers.STR_NA_VALUES; a test keeps this copy in sync).
# A caption equal to one of these becomes float NaN in the reference, whose CLIP tokenizer then fails on it.
PANDAS_NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                               "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
_FORMAT = ("a tab-separated file with columns image_id, id, caption, written as pandas' to_csv(sep='\\t', "
           "index=False) writes it (like MLCommons' val2014_30k.tsv)")


@dataclass(frozen=True)
class Prompt:
    """One validation prompt: the COCO image id, the caption id and the caption."""

    image_id: int
    id: int
    caption: str


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Read a prompts TSV exactly as the MLCommons reference does: pandas.read_csv(path, sep='\\t', header=0).

    Captions come back as pandas yields them (quotes undone, tabs and newlines kept). Where pandas yields no
    string (a caption such as "", "NA" or "null" becomes NaN; a column of only numbers becomes numbers) the
    reference's CLIP tokenizer fails, so this raises a ValueError naming the line and the text instead.
    """
    # pandas itself, not the csv module: csv cannot reproduce its tokenizer on whitespace-only lines, an
    # unclosed quote at EOF or blank lines in '\r'-terminated files. Imported here: only evaluation needs it.
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", header=0)
    except pd.errors.EmptyDataError as exc:
        raise ValueError(f"{path}: empty prompts file; expected {_FORMAT}.") from exc
    except pd.errors.ParserError as exc:
        raise ValueError(f"{path}: pandas cannot parse it ({exc}); a caption holding a tab, a newline or a "
                         f"leading '\"' must be quoted; expected {_FORMAT}.") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc}); expected {_FORMAT}.") from exc
    header = [str(c) for c in df.columns]
    missing = [c for c in PROMPT_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}: header {header} lacks column(s) {missing}; expected {_FORMAT}.")
    if not isinstance(df.index, pd.RangeIndex):
        # pandas takes the extra leading field(s) of a first row longer than the header as the index and
        # shifts every column right; almost always an unquoted tab in the first caption.
        raise ValueError(f"{_where(path, 0, len(df))}: the first row has more fields than the header "
                         f"({len(header)}), so pandas would shift every column; quote captions that hold a tab; "
                         f"expected {_FORMAT}.")
    if df.empty:
        raise ValueError(f"{path}: no prompts after the header.")
    ids = {}
    for col in ("image_id", "id"):
        if not pd.api.types.is_integer_dtype(df[col].dtype):
            raise _bad_id(path, col, df[col].dtype)
        ids[col] = df[col].tolist()
    captions = df["caption"].tolist()
    for row, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise _bad_caption(path, row, caption)
    return [Prompt(int(i), int(j), c) for i, j, c in zip(ids["image_id"], ids["id"], captions, strict=True)]


def _raw_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows as pandas tokenizes them, every value the text in the file (for error messages only)."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t", header=0, dtype=str, keep_default_na=False, na_filter=False)
    return df.to_dict("records")


def _where(path: str | os.PathLike, row: int, num_rows: int) -> str:
    """'path:line (data row n)' for data row `row`; the line comes from the csv module, so only if it agrees."""
    starts, line = [], 1
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            for fields in reader:
                all_spaces = len(fields) == 1 and fields[0] != "" and not fields[0].strip(" ")
                if fields and not all_spaces:  # pandas skips blank lines and lines of only spaces
                    starts.append(line)
                line = reader.line_num + 1
    except (OSError, UnicodeError, csv.Error):
        starts = []
    if len(starts) == num_rows + 1:  # header + rows: csv and pandas saw the same records
        return f"{path}:{starts[row + 1]} (data row {row + 1})"
    return f"{path}: data row {row + 1}"


def _bad_id(path: str | os.PathLike, col: str, dtype: object) -> ValueError:
    """The error for an image_id or id column that pandas does not read as integers."""
    raw = _raw_rows(path)
    for row, fields in enumerate(raw):
        if not re.fullmatch(r" *[+-]?[0-9]+ *", fields[col]):
            return ValueError(f"{_where(path, row, len(raw))}: {col} {fields[col]!r} is not an integer; image_id "
                              f"and id must be integers; expected {_FORMAT}.")
    return ValueError(f"{path}: pandas reads column {col} as {dtype}; image_id and id must be integers.")


def _bad_caption(path: str | os.PathLike, row: int, value: object) -> ValueError:
    """The error for a caption that pandas does not read as a string (NaN, a number, a bool)."""
    import pandas as pd

    raw = _raw_rows(path)
    what = "a missing value (NaN)" if pd.isna(value) else f"{type(value).__name__} {value!r}"
    return ValueError(f"{_where(path, row, len(raw))}: caption {raw[row]['caption']!r} is read by pandas as {what}, "
                      f"not text, and the MLCommons reference's CLIP tokenizer fails on it; write a real caption "
                      f"(pandas' default na_values: {sorted(PANDAS_NA_STRINGS)}) or drop the row.")


def write_prompts(path: str | os.PathLike, prompts: list[Prompt]) -> None:
    """Write prompts as pandas' to_csv(sep='\\t', index=False) does, atomically; read_prompts returns them as given.

    A caption that pandas would read back as NaN (see PANDAS_NA_STRINGS) is an error. A file whose captions are
    all numbers (or all true/false) is read by pandas as a numeric column, which read_prompts rejects.
    """
    lines = ["\t".join(PROMPT_COLUMNS)]
    for p in prompts:
        if p.caption in PANDAS_NA_STRINGS:
            raise ValueError(f"{path}: caption {p.caption!r} (image_id {p.image_id}, id {p.id}) would be read back "
                             f"by pandas.read_csv as NaN, which the reference cannot use; give it a real caption.")
        lines.append(f"{p.image_id}\t{p.id}\t{_quote(p.caption)}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _quote(field: str) -> str:
    """QUOTE_MINIMAL as pandas' to_csv applies it, plus quoting a lone carriage return."""
    # to_csv (Python's csv writer, lineterminator '\n') leaves '\r' unquoted and pandas then reads it as a line
    # break; quoting it too keeps such captions whole and changes nothing else.
    if any(c in field for c in '\t\n\r"'):
        return '"' + field.replace('"', '""') + '"'
    return field


def read_fid_stats(path: str | os.PathLike, feature_dim: int = FID_FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) as float64 from an npz with keys mu and sigma; D defaults to Inception's 2048."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"FID statistics file {path} does not exist (eval.fid_stats).")
    fix = "expected an .npz with float arrays mu and sigma, like MLCommons' val2014_30k_stats.npz"
    try:  # numpy reports bad files with many types (BadZipFile is neither an OSError nor a ValueError)
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                keys = sorted(data.files)
                arrays = {k: data[k] for k in ("mu", "sigma") if k in keys}  # reads (and checks) the arrays
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc}); {fix}.") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array, not an .npz; {fix}.")
    if len(arrays) != 2:
        raise ValueError(f"{path}: FID statistics need keys 'mu' and 'sigma', found {keys}.")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.shape != (feature_dim,) or sigma.shape != (feature_dim, feature_dim):
        raise ValueError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected ({feature_dim},) and "
                         f"({feature_dim}, {feature_dim}) for {feature_dim}-d features.")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu or sigma holds NaN or inf values.")
    return mu.astype(np.float64), sigma.astype(np.float64)


def write_fid_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write (mu, sigma) as float64 npz, atomically."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    assert sigma.shape == (mu.shape[0], mu.shape[0]), (mu.shape, sigma.shape)
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
