"""Training loaders: shapes/dtypes/keys per format, per-rank streams, exact resume, workers."""

from __future__ import annotations

import itertools

import pytest
import torch
from data_helpers import EMB_DIM, FACTOR, IMAGE_SIZE, LATENT, batch_ids, data_config, write_moment_shards

from sd_mlperf.backends import package_available
from sd_mlperf.data.laion import build_train_loader
from sd_mlperf.data.shards import write_shard
from sd_mlperf.data.synthetic import make_synthetic_dataset, make_train_sample


def _loader(shards, *, rank=0, seed=7, batch=4, **overrides):
    cfg = data_config(train_shards=str(shards), **overrides)
    return build_train_loader(cfg, micro_batch_size=batch, rank=rank, world_size=2, seed=seed,
                              latent_size=cfg.image_size // FACTOR)


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_moments_format(tmp_path):
    write_moment_shards(tmp_path, 3, 5)
    batch = _take(_loader(tmp_path), 1)[0]
    assert batch["moments"].shape == (4, 8, LATENT, LATENT) and batch["moments"].dtype == torch.float32
    assert batch["captions"] == [f"caption {i}" for i in batch_ids(batch)]
    assert "context" not in batch and "images" not in batch


def test_moments_embeddings_format_returns_float32_context(tmp_path):
    write_moment_shards(tmp_path, 2, 5, embeddings=True)
    batch = _take(_loader(tmp_path, train_format="moments_embeddings"), 1)[0]
    assert batch["moments"].shape == (4, 8, LATENT, LATENT)
    assert batch["context"].shape == (4, 77, EMB_DIM) and batch["context"].dtype == torch.float32
    assert [int(c) for c in batch["context"][:, 0, 0]] == [i % 1000 for i in batch_ids(batch)]


def test_images_format_decodes_in_range(tmp_path, synthetic_cfg):
    paths = make_synthetic_dataset(tmp_path, synthetic_cfg)
    for image_range, lo in (("zero_one", 0.0), ("minus1_1", -1.0)):
        batch = _take(_loader(paths.raw_shards[0].parent, train_format="images", image_range=image_range), 1)[0]
        images = batch["images"]
        assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
        assert images.min() >= lo and images.max() <= 1.0 and images.min() < lo + 0.2
        assert all(" on " in c and "background" in c for c in batch["captions"])


def test_reproducible_and_ranks_draw_differently(tmp_path):
    write_moment_shards(tmp_path, 4, 6)
    run = [batch_ids(b) for b in _take(_loader(tmp_path), 6)]
    again = [batch_ids(b) for b in _take(_loader(tmp_path), 6)]
    other_rank = [batch_ids(b) for b in _take(_loader(tmp_path, rank=1), 6)]
    assert run == again
    assert run != other_rank
    ids = [i for b in run for i in b]
    assert len(set(ids)) > 12  # shuffled across shards, not a fixed cycle
    assert ids != sorted(ids)


def _drop_some_captions(index, parts):
    if index in (5, 13):
        del parts["txt"]  # bad samples in the stream: resume must skip exactly the same
    return parts


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(tmp_path, num_workers):
    write_moment_shards(tmp_path, 4, 6, edit=_drop_some_captions)
    kw = dict(num_workers=num_workers, max_bad_fraction=0.5)
    reference = [batch_ids(b) for b in _take(_loader(tmp_path, **kw), 7)]
    assert not {5, 13} & {i for b in reference for i in b}
    first = _loader(tmp_path, **kw)
    head = [batch_ids(b) for b in _take(first, 3)]
    state = first.state_dict()
    assert state["batches"] == 3
    resumed = _loader(tmp_path, **kw)
    resumed.load_state_dict(state)
    tail = [batch_ids(b) for b in _take(resumed, 4)]
    assert head + tail == reference


def test_resume_with_other_workers_warns_and_does_not_replay(tmp_path, sd_log):
    write_moment_shards(tmp_path, 4, 6)
    first = _loader(tmp_path)
    head = [batch_ids(b) for b in _take(first, 3)]
    resumed = _loader(tmp_path, num_workers=1)
    resumed.load_state_dict(first.state_dict())
    tail = [batch_ids(b) for b in _take(resumed, 3)]
    assert tail != head and resumed.state_dict()["batches"] == 6
    assert "data order differs" in sd_log.text


def test_resume_after_a_settings_change_continues_exactly_on_the_next_resume(tmp_path):
    """The fresh streams a settings change starts are themselves resumed exactly (same settings next time)."""
    write_moment_shards(tmp_path, 4, 6)
    first = _loader(tmp_path, batch=4)
    _take(first, 2)
    changed_state = first.state_dict()
    uninterrupted = _loader(tmp_path, batch=3)
    uninterrupted.load_state_dict(changed_state)
    reference = [batch_ids(b) for b in _take(uninterrupted, 5)]
    second = _loader(tmp_path, batch=3)
    second.load_state_dict(changed_state)
    head = [batch_ids(b) for b in _take(second, 2)]
    third = _loader(tmp_path, batch=3)
    third.load_state_dict(second.state_dict())
    tail = [batch_ids(b) for b in _take(third, 3)]
    assert head + tail == reference


def test_restart_at_starts_fresh_streams_that_depend_on_the_position_and_resume_exactly(tmp_path):
    """A resharded resume's restart: other samples than a fresh run's, the same for the same position."""
    write_moment_shards(tmp_path, 4, 6)
    fresh = [batch_ids(b) for b in _take(_loader(tmp_path), 3)]
    restarted = _loader(tmp_path)
    restarted.restart_at(5)
    assert restarted.state_dict()["batches"] == 5
    head = [batch_ids(b) for b in _take(restarted, 3)]
    assert head != fresh
    again = _loader(tmp_path)
    again.restart_at(5)
    assert [batch_ids(b) for b in _take(again, 3)] == head
    other = _loader(tmp_path)
    other.restart_at(6)
    assert [batch_ids(b) for b in _take(other, 3)] != head
    resumed = _loader(tmp_path)
    resumed.load_state_dict(restarted.state_dict())  # the restarted streams are themselves resumable
    reference = _loader(tmp_path)
    reference.restart_at(5)
    assert [batch_ids(b) for b in _take(resumed, 2)] == [batch_ids(b) for b in _take(reference, 5)][3:]


@pytest.mark.skipif(not package_available("nvidia.dali"), reason="nvidia-dali-cuda120 is not installed")
def test_batch_decoder_path_replaces_bad_images(tmp_path, sd_log):
    """decode_backend=dali (CPU variant here) decodes whole batches in the main process, as on the GPU."""
    jpg = make_train_sample(0, 1, IMAGE_SIZE)[0]
    write_shard(tmp_path / "00000.tar", [("good0", {"jpg": jpg, "txt": b"a"}), ("bad", {"jpg": b"junk", "txt": b"b"}),
                                         ("good1", {"jpg": jpg, "txt": b"c"}), ("good2", {"jpg": jpg, "txt": b"d"})])
    loader = _loader(tmp_path, batch=4, train_format="images", decode_backend="dali", shuffle_buffer_samples=0,
                     max_bad_fraction=0.5)
    assert loader.decoder is not None and loader.decoder.name == "dali"
    batch = _take(loader, 1)[0]
    assert batch["images"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and "bad" not in batch["keys"]
    assert torch.equal(batch["images"][1], batch["images"][0])  # the bad slot holds a good image of the batch
    assert "corrupt_image" in sd_log.text
