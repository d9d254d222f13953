"""Shard patterns, the header-only index, truncation detection and deterministic writes."""

from __future__ import annotations

import pytest
from data_helpers import write_moment_shards

from sd_mlperf.data.shards import ShardReader, expand_shards, index_shard, split_key, write_shard


def test_expand_folder_glob_and_braces(tmp_path):
    paths = [str(p) for p in write_moment_shards(tmp_path, 3, 2)]
    assert expand_shards(str(tmp_path)) == paths
    assert expand_shards(str(tmp_path / "*.tar")) == paths
    assert expand_shards(str(tmp_path / "{00000..00002}.tar")) == paths
    assert expand_shards(str(tmp_path / "{00000,00002}.tar")) == [paths[0], paths[2]]
    with pytest.raises(FileNotFoundError, match="1 of 4 shards"):
        expand_shards(str(tmp_path / "{00000..00003}.tar"))
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        expand_shards(str(tmp_path / "nothing*.tar"))


def test_split_key_follows_webdataset():
    assert split_key("a/b.c/0001.emb.npy") == ("a/b.c/0001", "emb.npy")
    assert split_key("0001.JPG") == ("0001", "jpg")


def test_index_groups_members_and_reads_bytes(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [("k1", {"txt": b"one", "npy": b"xx"}), ("k2", {"txt": b"two"})])
    index = index_shard(str(path))
    assert not index.truncated and [s.key for s in index.samples] == ["k1", "k2"]
    reader = ShardReader()
    assert reader.read(index.samples[0], "txt") == b"one" and reader.read(index.samples[1], "txt") == b"two"
    reader.close()


def test_truncated_tar_keeps_whole_samples(tmp_path):
    path = tmp_path / "s.tar"
    write_shard(path, [(f"k{i}", {"txt": b"x" * 2000}) for i in range(4)])
    data = path.read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: 512 * 17])  # 5 blocks per member: three whole, then part of the fourth
    index = index_shard(str(tmp_path / "t.tar"))
    assert index.truncated and [s.key for s in index.samples] == ["k0", "k1", "k2"]
    assert not index_shard(str(path)).truncated


def test_write_is_deterministic(tmp_path):
    samples = [("k", {"txt": b"hello"})]
    write_shard(tmp_path / "a.tar", samples)
    write_shard(tmp_path / "b.tar", samples)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
