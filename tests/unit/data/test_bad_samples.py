"""Bad input: each kind is skipped and counted with one warning naming shard and key; a threshold stops the run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from data_helpers import LATENT, data_config, npy, write_moment_shards

from sd_mlperf.data.bad_samples import BadDataError, BadSampleCounter
from sd_mlperf.data.laion import SampleParser, build_train_loader
from sd_mlperf.data.shards import index_shard, write_shard
from sd_mlperf.data.synthetic import make_train_sample

DAMAGE = {
    1: ("missing_caption", lambda p: p.pop("txt")),
    2: ("bad_npy", lambda p: p.update(npy=npy(np.zeros((1, 8, LATENT + 1, LATENT), np.float32)))),
    3: ("bad_npy", lambda p: p.update(npy=b"not an npy file")),
    4: ("missing_moments", lambda p: p.pop("npy")),
    5: ("bad_caption", lambda p: p.update(txt=b"\xff\xfe")),
    6: ("missing_embedding", lambda p: p.pop("emb.npy")),
    7: ("bad_embedding", lambda p: p.update({"emb.npy": npy(np.zeros((77,), np.float16))})),
}


def _damage(index, parts):
    if index in DAMAGE:
        DAMAGE[index][1](parts)
    return parts


def _parse_all(cfg, shards, counter):
    parser = SampleParser(cfg, counter, decode_images=True, latent_size=LATENT)
    good = []
    for shard in shards:
        for ref in index_shard(str(shard)).samples:
            sample = parser.parse(ref)
            if sample is not None:
                counter.good()
                good.append(sample["key"])
    return good


def test_each_moments_kind_is_skipped_counted_and_warned_once(tmp_path, sd_log):
    shards = write_moment_shards(tmp_path, 1, 12, embeddings=True, edit=_damage)
    shards += write_moment_shards(tmp_path / "more", 1, 12, embeddings=True, edit=_damage)  # each kind twice
    counter = BadSampleCounter(0.9)
    good = _parse_all(data_config(train_format="moments_embeddings"), shards, counter)
    # moments_embeddings does not read captions: those damages are harmless there.
    expected = {"bad_npy": 4, "missing_moments": 2, "missing_embedding": 2, "bad_embedding": 2}
    assert dict(counter.by_kind) == expected and len(good) == 24 - 10
    counter = BadSampleCounter(0.9)
    _parse_all(data_config(train_format="moments"), shards, counter)
    assert dict(counter.by_kind) == {"missing_caption": 2, "bad_npy": 4, "missing_moments": 2, "bad_caption": 2}
    warnings = [r.getMessage() for r in sd_log.records if "skipping" in r.getMessage()]
    assert len(warnings) == len(set(expected) | {"missing_caption", "bad_caption"})  # one per kind, across both runs
    assert any("00000.tar" in w and "'000000001'" in w and "missing_caption" in w for w in warnings)


def test_image_kinds_and_truncated_tar(tmp_path):
    jpg = make_train_sample(0, 0, 32)[0]
    samples = [("a", {"jpg": jpg, "txt": b"ok"}), ("b", {"jpg": b"garbage", "txt": b"x"}),
               ("c", {"jpg": jpg[: len(jpg) // 2], "txt": b"x"}), ("d", {"txt": b"no image"}),
               ("e", {"jpg": jpg, "txt": b"ok"}), ("f", {"jpg": jpg, "txt": b"cut"})]
    write_shard(tmp_path / "s.tar", samples)
    data = (tmp_path / "s.tar").read_bytes()
    cut = index_shard(str(tmp_path / "s.tar")).samples[-1].members["txt"][0] + 1
    (tmp_path / "s.tar").write_bytes(data[:cut])  # cut inside the last sample's caption
    cfg = data_config(train_format="images", train_shards=str(tmp_path), shuffle_buffer_samples=0,
                      max_bad_fraction=0.9)
    counter = BadSampleCounter(0.9)
    good = _parse_all(cfg, [tmp_path / "s.tar"], counter)
    assert good == ["a", "e"] and index_shard(str(tmp_path / "s.tar")).truncated
    assert dict(counter.by_kind) == {"corrupt_image": 2, "missing_image": 1}
    loader = build_train_loader(cfg, micro_batch_size=2, rank=0, world_size=1, seed=0, latent_size=LATENT)
    batch = next(iter(loader))  # the loader counts the truncated shard and still yields the good samples
    assert batch["keys"] == ["a", "e"]


def test_threshold_stops_with_worst_shards():
    counter = BadSampleCounter(0.01, min_samples=10)
    counter.good(5)
    counter.bad("corrupt_image", "/d/00007.tar", "k")  # below min_samples: no decision yet
    counter.good(4)
    with pytest.raises(BadDataError, match=r"00007.tar \(2\)") as info:
        counter.bad("corrupt_image", "/d/00007.tar", "k2")
    assert "data.max_bad_fraction=0.01" in str(info.value)
    ok = BadSampleCounter(0.5, min_samples=10)
    ok.good(3)
    ok.bad("bad_npy", "s", "k")
    ok.check()


def test_loader_stops_when_too_many_samples_are_bad(tmp_path):
    write_moment_shards(tmp_path, 4, 60, edit=lambda i, p: (p.pop("txt"), p)[1] if i % 3 == 0 else p)
    loader = build_train_loader(data_config(train_shards=str(tmp_path)), micro_batch_size=4, rank=0, world_size=1,
                                seed=0, latent_size=LATENT)
    with pytest.raises(BadDataError, match="worst shards"):
        list(itertools.islice(iter(loader), 200))
