"""COCO prompts (val2014_30k.tsv) and FID statistics (npz): valid files load, bad ones name the problem."""

from __future__ import annotations

import numpy as np
import pytest

from sd_mlperf.data.coco import Prompt, read_fid_stats, read_prompts, write_fid_stats, write_prompts


def test_prompts_round_trip_and_column_order(tmp_path):
    path = tmp_path / "p.tsv"
    write_prompts(path, [Prompt(9, 1, "a cat\tsits"), Prompt(7, 2, "a dog")])
    assert read_prompts(path) == [Prompt(9, 1, "a cat sits"), Prompt(7, 2, "a dog")]
    other = tmp_path / "o.tsv"
    other.write_text("caption\tid\timage_id\nhello\t3\t5\n")
    assert read_prompts(other) == [Prompt(5, 3, "hello")]


@pytest.mark.parametrize("text, match", [
    ("image_id\tcaption\n1\tx\n", "lacks column"),
    ("image_id\tid\tcaption\n1\tx\thello\n", "must be integers"),
    ("image_id\tid\tcaption\n1\t2\thello\tworld\n", "fields"),
    ("image_id\tid\tcaption\n", "no prompts"),
    ("", "empty"),
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

