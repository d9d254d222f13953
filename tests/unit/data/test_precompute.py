"""Precompute: output equals online encoding, resume after a kill gives the same files, bad input is counted."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import pytest
import torch
from data_helpers import EMB_DIM, IMAGE_SIZE, LATENT, data_config

from sd_mlperf.backends import package_available
from sd_mlperf.data.bad_samples import BadDataError
from sd_mlperf.data.decode import PilDecoder
from sd_mlperf.data.laion import SampleParser, build_train_loader
from sd_mlperf.data.precompute import MANIFEST, ShardEncoder, precompute_is_complete, precompute_shards
from sd_mlperf.data.shards import ShardReader, index_shard, write_shard
from sd_mlperf.data.synthetic import make_synthetic_dataset, make_train_sample


def _outputs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def _read_all(folder, cfg):
    from sd_mlperf.data.bad_samples import BadSampleCounter

    parser = SampleParser(cfg, BadSampleCounter(0.0), decode_images=True, latent_size=LATENT)
    samples = {ref.key: parser.parse(ref) for p in sorted(folder.glob("*.tar")) for ref in index_shard(str(p)).samples}
    return {key: {k: torch.as_tensor(v, dtype=torch.float32) if isinstance(v, np.ndarray) else v
                  for k, v in sample.items()} for key, sample in samples.items()}


def test_output_equals_online_encoding(tmp_path, synthetic_cfg, tiny_vae, tiny_text_encoder):
    paths = make_synthetic_dataset(tmp_path / "syn", synthetic_cfg)
    cfg = data_config(train_format="moments_embeddings")
    # Batch 1 on both sides: CPU conv kernels may round differently for other batch sizes.
    manifest = precompute_shards(str(paths.raw_shards[0].parent), tmp_path / "out", data_cfg=cfg, vae=tiny_vae,
                                 text_encoder=tiny_text_encoder, batch_size=1)
    assert manifest["complete"] and manifest["samples"] == synthetic_cfg.num_train_samples and not manifest["skipped"]
    assert precompute_is_complete(tmp_path / "out", "moments_embeddings")
    assert not precompute_is_complete(tmp_path / "out", "moments")
    stored = _read_all(tmp_path / "out", cfg)
    reader, pil = ShardReader(), PilDecoder(IMAGE_SIZE, "zero_one")
    refs = [ref for shard in paths.raw_shards for ref in index_shard(str(shard)).samples]
    with torch.no_grad():
        contexts = tiny_text_encoder.encode([reader.read(r, "txt").decode() for r in refs]).to(torch.float16).float()
        for ref, context in zip(refs, contexts):
            online = tiny_vae.encode_moments(pil.decode_one(reader.read(ref, "jpg"))[None])
            got = stored[ref.key]
            assert got["moments"].shape == (8, LATENT, LATENT) and got["context"].shape == (77, EMB_DIM)
            assert torch.equal(got["moments"], online[0])  # fp32 VAE math: cached == online, bit for bit
            torch.testing.assert_close(got["context"], context, rtol=0, atol=2e-3)  # fp16 storage


def test_reference_format_layout(tmp_path, synthetic_cfg, tiny_vae):
    paths = make_synthetic_dataset(tmp_path / "syn", synthetic_cfg)
    precompute_shards(str(paths.raw_shards[0].parent), tmp_path / "out", data_cfg=data_config(), vae=tiny_vae,
                      text_encoder=None)
    ref = index_shard(str(tmp_path / "out" / "00000.tar")).samples[0]
    assert set(ref.members) == {"npy", "txt", "json"}
    raw = np.load(io.BytesIO(ShardReader().read(ref, "npy")))
    assert raw.shape == (1, 8, LATENT, LATENT) and raw.dtype == np.float32  # the reference's (1, 8, 64, 64) layout
    loader = build_train_loader(data_config(train_shards=str(tmp_path / "out")), micro_batch_size=3, rank=0,
                                world_size=1, seed=0, latent_size=LATENT)
    assert next(iter(loader))["moments"].shape == (3, 8, LATENT, LATENT)


def test_resume_after_kill_gives_the_same_files(tmp_path, synthetic_cfg, tiny_vae, monkeypatch):
    paths = make_synthetic_dataset(tmp_path / "syn", dataclasses.replace(synthetic_cfg, num_train_samples=6))
    src, cfg = str(paths.raw_shards[0].parent), data_config()
    precompute_shards(src, tmp_path / "clean", data_cfg=cfg, vae=tiny_vae, text_encoder=None)

    calls = {"n": 0}
    original = ShardEncoder.encode_shard

    def dies_on_second_shard(self, shard, on_samples):
        calls["n"] += 1
        if calls["n"] == 2:
            (tmp_path / "killed" / f".{os.path.basename(shard)}.abc.tmp").write_bytes(b"half a tar")
            raise KeyboardInterrupt  # as if the job were killed mid-shard
        return original(self, shard, on_samples)

    monkeypatch.setattr(ShardEncoder, "encode_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        precompute_shards(src, tmp_path / "killed", data_cfg=cfg, vae=tiny_vae, text_encoder=None)
    assert list(_outputs(tmp_path / "killed")) == ["00000.tar"] and not (tmp_path / "killed" / MANIFEST).exists()
    monkeypatch.setattr(ShardEncoder, "encode_shard", original)
    done = []
    monkeypatch.setattr(ShardEncoder, "encode_shard", lambda self, s, cb: done.append(s) or original(self, s, cb))
    precompute_shards(src, tmp_path / "killed", data_cfg=cfg, vae=tiny_vae, text_encoder=None)
    assert [os.path.basename(s) for s in done] == ["00001.tar"]  # the finished shard was skipped
    assert _outputs(tmp_path / "killed") == _outputs(tmp_path / "clean")
    assert not list((tmp_path / "killed").glob(".*.tmp"))
    clean = json.loads((tmp_path / "clean" / MANIFEST).read_text())
    assert json.loads((tmp_path / "killed" / MANIFEST).read_text()) == clean
    assert all(len(r["sha256"]) == 64 for r in clean["shards"])


def test_resume_after_kill_between_shard_and_record(tmp_path, synthetic_cfg, tiny_vae, monkeypatch):
    """A shard renamed into place whose record was never written is redone, so the manifest still completes."""
    import sd_mlperf.data.precompute as precompute

    paths = make_synthetic_dataset(tmp_path / "syn", dataclasses.replace(synthetic_cfg, num_train_samples=6))
    src, cfg = str(paths.raw_shards[0].parent), data_config()
    clean = precompute_shards(src, tmp_path / "clean", data_cfg=cfg, vae=tiny_vae, text_encoder=None)
    original = precompute.atomic_write_text

    def killed_before_the_record(path, text):
        raise KeyboardInterrupt  # as if the job were killed after write_shard's rename

    monkeypatch.setattr(precompute, "atomic_write_text", killed_before_the_record)
    with pytest.raises(KeyboardInterrupt):
        precompute_shards(src, tmp_path / "killed", data_cfg=cfg, vae=tiny_vae, text_encoder=None)
    assert list(_outputs(tmp_path / "killed")) == ["00000.tar"]
    monkeypatch.setattr(precompute, "atomic_write_text", original)
    manifest = precompute_shards(src, tmp_path / "killed", data_cfg=cfg, vae=tiny_vae, text_encoder=None)
    assert manifest == clean
    assert _outputs(tmp_path / "killed") == _outputs(tmp_path / "clean")


def test_progress_bar_scans_each_shard_once(tmp_path, synthetic_cfg, tiny_vae, monkeypatch):
    """The bar's total is estimated as shards finish: no header pass over every shard before the work starts."""
    import sd_mlperf.data.precompute as precompute

    paths = make_synthetic_dataset(tmp_path / "syn", synthetic_cfg)
    scanned = []
    original = precompute.index_shard
    monkeypatch.setattr(precompute, "index_shard", lambda shard: scanned.append(shard) or original(shard))
    manifest = precompute_shards(str(paths.raw_shards[0].parent), tmp_path / "out", data_cfg=data_config(),
                                 vae=tiny_vae, text_encoder=None, progress=True)
    assert manifest["samples"] == synthetic_cfg.num_train_samples
    assert sorted(scanned) == sorted(str(p) for p in paths.raw_shards)


def test_ranks_split_shards_and_the_last_writes_the_manifest(tmp_path, synthetic_cfg, tiny_vae):
    paths = make_synthetic_dataset(tmp_path / "syn", synthetic_cfg)
    src, cfg = str(paths.raw_shards[0].parent), data_config()
    assert precompute_shards(src, tmp_path / "o", data_cfg=cfg, vae=tiny_vae, text_encoder=None,
                             rank=1, world_size=2) is None
    assert list(_outputs(tmp_path / "o")) == ["00001.tar"]
    manifest = precompute_shards(src, tmp_path / "o", data_cfg=cfg, vae=tiny_vae, text_encoder=None, rank=0,
                                 world_size=2)
    assert manifest["num_shards"] == 2 and manifest["samples"] == synthetic_cfg.num_train_samples


def _raw_shard_with_bad_samples(path, num_good, bad):
    jpg = make_train_sample(0, 0, IMAGE_SIZE)[0]
    samples = [(f"g{i}", {"jpg": jpg, "txt": b"fine"}) for i in range(num_good)]
    samples += [(f"b{i}", parts) for i, parts in enumerate(bad)]
    write_shard(path, samples)


def test_bad_inputs_are_counted_in_the_manifest(tmp_path, tiny_vae):
    jpg = make_train_sample(0, 0, IMAGE_SIZE)[0]
    _raw_shard_with_bad_samples(tmp_path / "in" / "00000.tar", 6, [{"jpg": b"junk", "txt": b"x"},
                                                                   {"jpg": jpg}, {"txt": b"no image"}])
    manifest = precompute_shards(str(tmp_path / "in"), tmp_path / "out", data_cfg=data_config(max_bad_fraction=0.5),
                                 vae=tiny_vae, text_encoder=None, batch_size=4)
    assert manifest["samples"] == 6
    assert manifest["skipped"] == {"corrupt_image": 1, "missing_caption": 1, "missing_image": 1}


def test_threshold_stops_and_keeps_finished_shards(tmp_path, tiny_vae):
    _raw_shard_with_bad_samples(tmp_path / "in" / "00000.tar", 4, [])
    _raw_shard_with_bad_samples(tmp_path / "in" / "00001.tar", 2, [{"jpg": b"junk", "txt": b"x"}] * 3)
    with pytest.raises(BadDataError, match=r"00001.tar \(3\)"):
        precompute_shards(str(tmp_path / "in"), tmp_path / "out", data_cfg=data_config(max_bad_fraction=0.2),
                          vae=tiny_vae, text_encoder=None)
    assert (tmp_path / "out" / "00000.tar").exists()  # nothing already written is lost


@pytest.mark.skipif(not package_available("nvidia.dali"), reason="nvidia-dali-cuda120 is not installed")
def test_dali_webdataset_reader_path_equals_byte_path(tmp_path, synthetic_cfg, tiny_vae, monkeypatch):
    """decode_backend=dali reads whole shards with fn.readers.webdataset; a bad image falls back to the byte path."""
    from sd_mlperf.data.decode import DaliDecoder

    jpg = make_train_sample(0, 0, IMAGE_SIZE)[0]
    _raw_shard_with_bad_samples(tmp_path / "in" / "00000.tar", 5, [{"txt": b"no image"}, {"jpg": jpg}])
    _raw_shard_with_bad_samples(tmp_path / "in" / "00001.tar", 3, [{"jpg": b"junk", "txt": b"x"}])
    cfg = data_config(decode_backend="dali", max_bad_fraction=0.5)
    reads = []
    original = DaliDecoder.read_shard
    monkeypatch.setattr(DaliDecoder, "read_shard", lambda self, s, e: reads.append(s) or original(self, s, e))
    fast = precompute_shards(str(tmp_path / "in"), tmp_path / "fast", data_cfg=cfg, vae=tiny_vae, text_encoder=None,
                             batch_size=4)
    assert [os.path.basename(s) for s in reads] == ["00000.tar", "00001.tar"]  # both tried with the reader
    assert fast["skipped"] == {"missing_image": 1, "missing_caption": 1, "corrupt_image": 1} and fast["samples"] == 8
    monkeypatch.setattr(ShardEncoder, "_encode_with_reader", lambda self, index, cb: None)
    slow = precompute_shards(str(tmp_path / "in"), tmp_path / "slow", data_cfg=cfg, vae=tiny_vae, text_encoder=None,
                             batch_size=4)
    assert _outputs(tmp_path / "fast") == _outputs(tmp_path / "slow") and slow["skipped"] == fast["skipped"]
