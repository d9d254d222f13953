"""Checkpoint files: atomic publish, keep-last-N, resume=auto, RNG capture, ldm export."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sd_mlperf.config.schema import CheckpointConfig
from sd_mlperf.training.checkpoints import (
    LATEST_FILE,
    Checkpointer,
    capture_rng_state,
    checkpoint_run_dir,
    load_file,
    read_checkpoint_weights,
    restore_rng_state,
    step_dir_name,
    step_of_dir_name,
)


def _save(ck: Checkpointer, step: int, **kwargs) -> None:
    ck.save(step, step * 4, unet_state={"w": torch.full((2,), float(step))}, optimizer_state={"opt": step},
            rank_state={"data": {"pos": step}}, **kwargs)


def test_save_layout_latest_and_keep_last(tmp_path):
    ck = Checkpointer(CheckpointConfig(keep_last=2, export_ldm_weights=False), tmp_path)
    for step in (10, 20, 30):
        _save(ck, step)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST_FILE, "step_0000020", "step_0000030"]
    assert (root / LATEST_FILE).read_text().strip() == "step_0000030"
    model = load_file(root / "step_0000030" / "model.pt")
    assert model["step"] == 30 and model["samples_count"] == 120
    assert torch.equal(model["unet"]["w"], torch.full((2,), 30.0))
    _, optimizer, rank = ck.load(root / "step_0000030")
    assert optimizer == {"opt": 30} and rank["data"] == {"pos": 30} and rank["rank"] == 0
    assert ck.resolve("auto") == root / "step_0000030"
    assert ck.resolve("never") is None
    assert ck.resolve(str(root / "step_0000020")) == root / "step_0000020"
    with pytest.raises(ValueError, match="training.resume"):
        ck.resolve(str(tmp_path / "nowhere"))


def test_failed_save_leaves_previous_checkpoint_and_pointer(tmp_path, monkeypatch):
    ck = Checkpointer(CheckpointConfig(export_ldm_weights=True), tmp_path)
    import sd_mlperf.models.checkpoint_io as cio

    _save(ck, 5)
    monkeypatch.setattr(cio, "export_unet_ldm", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(RuntimeError, match=r"writing checkpoint file .*unet_ldm.safetensors failed: OSError: disk"):
        _save(ck, 6)
    root = tmp_path / "checkpoints"
    assert (root / LATEST_FILE).read_text().strip() == "step_0000005"
    assert not (root / "step_0000006").exists() and not (root / ".step_0000006.tmp").exists()  # abandoned cleanly
    assert ck.resolve("auto") == root / "step_0000005"
    monkeypatch.undo()
    _save(ck, 6)  # the leftover temp dir of the crash is replaced
    assert ck.resolve("auto") == root / "step_0000006"
    assert not any(p.name.endswith(".tmp") for p in root.iterdir())


def test_auto_skips_an_incomplete_latest(tmp_path):
    ck = Checkpointer(CheckpointConfig(export_ldm_weights=False), tmp_path)
    _save(ck, 1)
    _save(ck, 2)
    root = tmp_path / "checkpoints"
    (root / "step_0000002" / "rank_00000.pt").unlink()  # e.g. a copy that lost a file
    assert ck.latest() == root / "step_0000001"
    (root / LATEST_FILE).unlink()
    assert ck.latest() == root / "step_0000001"
    assert Checkpointer(CheckpointConfig(), tmp_path / "empty").resolve("auto") is None


def test_saving_the_same_step_again_replaces_it(tmp_path):
    ck = Checkpointer(CheckpointConfig(export_ldm_weights=False), tmp_path)
    _save(ck, 3)
    ck.save(3, 12, unet_state={"w": torch.zeros(2)}, optimizer_state=None, rank_state={})
    root = tmp_path / "checkpoints" / step_dir_name(3)
    assert torch.equal(load_file(root / "model.pt")["unet"]["w"], torch.zeros(2))
    assert not (root / "optimizer.pt").exists()


def test_ldm_export_has_ldm_names(tmp_path):
    from safetensors.torch import load_file as load_safetensors

    ck = Checkpointer(CheckpointConfig(export_ldm_weights=True), tmp_path)
    _save(ck, 1)
    exported = load_safetensors(tmp_path / "checkpoints" / "step_0000001" / "unet_ldm.safetensors")
    assert list(exported) == ["model.diffusion_model.w"]


def test_rng_state_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = capture_rng_state(gen)
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen))
    restore_rng_state(load_file(tmp_path / "rng.pt"), gen)
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=gen))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and expected[2] == again[2]
    assert torch.equal(expected[3], again[3])


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="model.pt"):
        load_file(bad)


def _save_as_two_ranks(tmp_path, step: int) -> None:
    """What a 2-rank run publishes: the rank-0 files, plus rank 1's file (the barriers are no-ops here)."""
    cfg = CheckpointConfig(export_ldm_weights=False)
    _save(Checkpointer(cfg, tmp_path, rank=0, world_size=2), step)
    ckpt = tmp_path / "checkpoints" / step_dir_name(step)
    torch.save({"rank": 1, "world_size": 2}, ckpt / "rank_00001.pt")


def test_another_world_sizes_checkpoint_is_found_then_refused_with_the_fix(tmp_path):
    _save_as_two_ranks(tmp_path, 4)
    ckpt = tmp_path / "checkpoints" / step_dir_name(4)
    one_rank = Checkpointer(CheckpointConfig(), tmp_path, world_size=1)
    assert one_rank.resolve("auto") == ckpt  # complete as its 2 writers left it: not skipped (no silent restart)
    with pytest.raises(ValueError, match="written by 2 ranks and this run has 1.*checkpoint.allow_reshard=true"):
        one_rank.load(ckpt)


def test_allow_reshard_loads_weights_optimizer_and_rank_zeros_payload(tmp_path):
    _save_as_two_ranks(tmp_path, 4)
    ckpt = tmp_path / "checkpoints" / step_dir_name(4)
    for world in (1, 3):
        ck = Checkpointer(CheckpointConfig(allow_reshard=True), tmp_path, rank=world - 1, world_size=world)
        model, optimizer, rank = ck.load(ckpt)
        assert model["step"] == 4 and model["world_size"] == 2 and optimizer == {"opt": 4}
        # Rank 0's file on every rank: its run-wide entries apply; its RNG and data position are the trainer's to skip.
        assert rank["rank"] == 0 and rank["world_size"] == 2


@pytest.mark.parametrize("damage", ["gap", "last rank missing"])
def test_missing_rank_files_make_a_checkpoint_incomplete(tmp_path, damage):
    _save_as_two_ranks(tmp_path, 2)
    _save_as_two_ranks(tmp_path, 4)
    ckpt = tmp_path / "checkpoints" / step_dir_name(4)
    if damage == "gap":
        (ckpt / "rank_00001.pt").rename(ckpt / "rank_00002.pt")
    else:
        (ckpt / "rank_00001.pt").unlink()  # the writers' count comes from rank 0's file, not from what is there
    ck = Checkpointer(CheckpointConfig(), tmp_path, world_size=2)
    assert not ck.is_complete(ckpt)
    assert ck.resolve("auto") == tmp_path / "checkpoints" / step_dir_name(2)


def test_a_corrupt_rank_file_falls_back_to_the_older_checkpoint(tmp_path, caplog):
    ck = Checkpointer(CheckpointConfig(export_ldm_weights=False), tmp_path)
    _save(ck, 1)
    _save(ck, 2)
    (tmp_path / "checkpoints" / step_dir_name(2) / "rank_00000.pt").write_bytes(b"truncated")
    with caplog.at_level("WARNING"):
        assert ck.resolve("auto") == tmp_path / "checkpoints" / step_dir_name(1)
    assert "step_0000002 is not usable" in caplog.text


def test_step_directory_names_round_trip_and_nothing_else_is_one():
    assert step_of_dir_name(step_dir_name(10)) == 10 and step_of_dir_name(step_dir_name(0)) == 0
    assert step_of_dir_name("step_12345678") == 12345678
    for name in ("step_10", ".step_0000010.tmp", ".step_0000010.old", "step_0000010.pt", "latest", "step_"):
        assert step_of_dir_name(name) is None, name


def test_read_checkpoint_weights_of_a_step_directory_its_model_file_and_its_ldm_export(tmp_path):
    ck = Checkpointer(CheckpointConfig(export_ldm_weights=True), tmp_path / "run")
    _save(ck, 10)
    step_dir = tmp_path / "run" / "checkpoints" / "step_0000010"
    for path in (step_dir, step_dir / "model.pt"):
        weights = read_checkpoint_weights(path, samples_count=7)
        assert weights.path == step_dir / "model.pt" and weights.run_dir == tmp_path / "run"
        assert (weights.step, weights.samples_count) == (10, 40)  # recorded: the default is not taken
        assert torch.equal(weights.state["w"], torch.full((2,), 10.0))
    export = read_checkpoint_weights(step_dir / "unet_ldm.safetensors")
    assert (export.step, export.samples_count, export.run_dir) == (10, None, tmp_path / "run")  # step: the dir name
    assert list(export.state) == ["w"]
    assert read_checkpoint_weights(step_dir / "unet_ldm.safetensors", samples_count=40).samples_count == 40
    # Outside the layout: no run directory, step 0.
    loose = tmp_path / "loose" / "unet.safetensors"
    loose.parent.mkdir()
    (step_dir / "unet_ldm.safetensors").rename(loose)
    weights = read_checkpoint_weights(loose)
    assert (weights.step, weights.run_dir) == (0, None) and checkpoint_run_dir(loose) is None


def test_read_checkpoint_weights_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint_weights(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="without model.pt"):
        read_checkpoint_weights(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not a trainer checkpoint"):
        read_checkpoint_weights(tmp_path / "model.pt")


def _flip_a_tensor_byte(path) -> None:
    """Damage that still parses: one byte of tensor data (torch's zip records are stored, not compressed)."""
    data = bytearray(path.read_bytes())
    marker = torch.full((2,), 2.0).numpy().tobytes()  # the saved weights of step 2
    at = data.index(marker)
    data[at + 1] ^= 0x40
    path.write_bytes(bytes(data))


def test_damage_that_still_parses_is_refused_by_the_checksum(tmp_path, caplog):
    ck = Checkpointer(CheckpointConfig(export_ldm_weights=False), tmp_path)
    _save(ck, 1)
    _save(ck, 2)
    step2 = tmp_path / "checkpoints" / step_dir_name(2)
    assert sorted(p.name for p in step2.iterdir()) == ["model.pt", "model.pt.sha256", "optimizer.pt",
                                                      "optimizer.pt.sha256", "rank_00000.pt", "rank_00000.pt.sha256"]
    import hashlib

    digest, name = (step2 / "model.pt.sha256").read_text().split()
    assert name == "model.pt" and digest == hashlib.sha256((step2 / "model.pt").read_bytes()).hexdigest()
    _flip_a_tensor_byte(step2 / "model.pt")
    assert torch.load(step2 / "model.pt", weights_only=True)["step"] == 2  # torch itself reads it without a word
    with pytest.raises(RuntimeError, match=rf"checkpoint file {step2 / 'model.pt'} does not match its sha256 in "
                                           r"model\.pt\.sha256: it was damaged after it was written\. Delete .*; if "
                                           r"you changed the file on purpose, delete model\.pt\.sha256"):
        ck.load(step2)  # an explicit path: refused, naming the file
    with caplog.at_level("WARNING"):  # resume=auto: the newest intact checkpoint
        assert ck.resolve("auto") == tmp_path / "checkpoints" / step_dir_name(1)
    assert "step_0000002 is not usable" in caplog.text and "does not match its sha256" in caplog.text
    assert ck.latest() == step2  # without verify (a message's "last checkpoint"): nothing is hashed


@pytest.mark.parametrize("damaged", ["optimizer.pt", "rank_00000.pt"])
def test_resume_auto_skips_a_step_with_any_damaged_file(tmp_path, damaged):
    ck = Checkpointer(CheckpointConfig(export_ldm_weights=False), tmp_path)
    _save(ck, 1)
    _save(ck, 2)
    path = tmp_path / "checkpoints" / step_dir_name(2) / damaged
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert ck.resolve("auto") == tmp_path / "checkpoints" / step_dir_name(1)


def test_an_unreadable_file_sends_resume_auto_to_the_older_checkpoint(tmp_path, monkeypatch):
    import sd_mlperf.training.checkpoint_files as files

    ck = Checkpointer(CheckpointConfig(export_ldm_weights=False), tmp_path)
    _save(ck, 1)
    _save(ck, 2)
    real = files.file_sha256
    step2 = tmp_path / "checkpoints" / step_dir_name(2)

    def eio(path, *args, **kwargs):
        if str(path).startswith(str(step2)):
            raise OSError(5, "Input/output error")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files, "file_sha256", eio)
    assert ck.resolve("auto") == tmp_path / "checkpoints" / step_dir_name(1)
    with pytest.raises(RuntimeError, match=r"cannot check checkpoint file .*model\.pt against model\.pt\.sha256: "
                                           r"\[Errno 5\] Input/output error\. Delete that checkpoint directory"):
        ck.load(step2)


def test_resume_auto_hashes_each_file_once(tmp_path, monkeypatch):
    import sd_mlperf.training.checkpoint_files as files

    ck = Checkpointer(CheckpointConfig(export_ldm_weights=False), tmp_path)
    _save(ck, 1)
    hashed = []
    real = files.file_sha256
    monkeypatch.setattr(files, "file_sha256", lambda path, *a, **k: hashed.append(path.name) or real(path, *a, **k))
    ck.load(ck.resolve("auto"))
    assert sorted(hashed) == ["model.pt", "optimizer.pt", "rank_00000.pt"]


def test_checkpoints_written_before_checksums_still_load(tmp_path):
    ck = Checkpointer(CheckpointConfig(export_ldm_weights=False), tmp_path)
    _save(ck, 3)
    step3 = tmp_path / "checkpoints" / step_dir_name(3)
    for sidecar in step3.glob("*.sha256"):
        sidecar.unlink()
    model, optimizer, rank = ck.load(step3)
    assert model["step"] == 3 and optimizer == {"opt": 3} and rank["data"] == {"pos": 3}
