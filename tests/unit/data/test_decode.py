"""Decode backends: pil (reference), the nvjpeg code on torchvision's CPU decoder, and DALI's CPU variant agree."""

from __future__ import annotations

import io

import pytest
import torch
from data_helpers import IMAGE_SIZE, data_config
from PIL import Image

from sd_mlperf.backends import package_available
from sd_mlperf.data.decode import DaliDecoder, PilDecoder, TorchvisionDecoder, build_decoder, resized_size
from sd_mlperf.data.shards import index_shard, write_shard
from sd_mlperf.data.synthetic import make_train_sample

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [make_train_sample(5, i, IMAGE_SIZE)[0] for i in range(6)]


def test_pil_matches_torchvision_semantics(jpegs):
    """Shorter side resized to S (long side truncated), centre crop, [0, 1] floats."""
    img = Image.open(io.BytesIO(jpegs[0])).convert("RGB")
    h, w = resized_size(img.height, img.width, IMAGE_SIZE)
    assert min(h, w) == IMAGE_SIZE and max(h, w) == int(IMAGE_SIZE * max(img.size) / min(img.size))
    out, errors = PilDecoder(IMAGE_SIZE, "zero_one")(jpegs)
    assert out.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == torch.float32 and errors == [None] * 6
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal((out * 255).round() / 255, out)  # 8-bit values, as ToTensor on a PIL image gives


def test_range_fix_maps_to_minus1_1(jpegs):
    a, _ = PilDecoder(IMAGE_SIZE, "zero_one")(jpegs[:2])
    b, _ = PilDecoder(IMAGE_SIZE, "minus1_1")(jpegs[:2])
    assert torch.allclose(b, a * 2 - 1)


def test_torchvision_path_agrees_with_pil(jpegs):
    ref, _ = PilDecoder(IMAGE_SIZE, "zero_one")(jpegs)
    out, errors = TorchvisionDecoder(IMAGE_SIZE, "zero_one", torch.device("cpu"))(jpegs)
    assert errors == [None] * 6
    assert (out - ref).abs().max() <= 2 / 255


@pytest.mark.skipif(not package_available("nvidia.dali"), reason="nvidia-dali-cuda120 is not installed")
def test_dali_cpu_variant_agrees_with_pil(jpegs):
    ref, _ = PilDecoder(IMAGE_SIZE, "zero_one")(jpegs)
    out, errors = DaliDecoder(IMAGE_SIZE, "zero_one", torch.device("cpu"), max_batch_size=4)(jpegs)
    assert errors == [None] * 6 and out.shape == ref.shape
    assert (out - ref).abs().mean() < 0.01 and (out - ref).abs().max() < 0.1


@pytest.mark.skipif(not package_available("nvidia.dali"), reason="nvidia-dali-cuda120 is not installed")
def test_dali_shard_reader_keys_follow_the_webdataset_rule(jpegs, tmp_path):
    """Keys from DALI's reader equal the index's, also when a folder in the key holds a dot."""
    samples = [(f"v1.2/{i:04d}", {"jpg": data, "txt": b"caption"}) for i, data in enumerate(jpegs[:3])]
    write_shard(tmp_path / "s.tar", samples)
    decoder = DaliDecoder(IMAGE_SIZE, "zero_one", torch.device("cpu"), max_batch_size=2)
    keys = [k for batch_keys, _ in decoder.read_shard(str(tmp_path / "s.tar"), ("jpg",)) for k in batch_keys]
    assert keys == [ref.key for ref in index_shard(str(tmp_path / "s.tar")).samples] == [k for k, _ in samples]


@pytest.mark.parametrize("name", ["pil", "torchvision", "dali"])
def test_bad_images_are_reported_not_raised(jpegs, name):
    if name == "dali" and not package_available("nvidia.dali"):
        pytest.skip("nvidia-dali-cuda120 is not installed")
    decoder = {"pil": lambda: PilDecoder(IMAGE_SIZE, "zero_one"),
               "torchvision": lambda: TorchvisionDecoder(IMAGE_SIZE, "zero_one", torch.device("cpu")),
               "dali": lambda: DaliDecoder(IMAGE_SIZE, "zero_one", torch.device("cpu"))}[name]()
    out, errors = decoder([jpegs[0], b"not an image", jpegs[1][:200], jpegs[2]])
    assert errors[0] is None and errors[3] is None and errors[1] and errors[2]
    ref, _ = PilDecoder(IMAGE_SIZE, "zero_one")([jpegs[0], jpegs[2]])
    assert (out[[0, 3]] - ref).abs().mean() < 0.01


def test_build_decoder_resolves_the_role():
    assert build_decoder(data_config(decode_backend="pil")).name == "pil"
    assert build_decoder(data_config(decode_backend="auto"), "cpu").name == "pil"
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, ValueError), match="nvjpeg"):
            build_decoder(data_config(decode_backend="nvjpeg"))
    if package_available("nvidia.dali"):
        decoder = build_decoder(data_config(decode_backend="dali"), "cpu")
        assert decoder.name == "dali" and decoder.device.type == "cpu"


def test_threaded_pil_equals_serial(jpegs):
    batch = [jpegs[0], b"junk", *jpegs[1:]]
    serial, serial_errors = PilDecoder(IMAGE_SIZE, "zero_one")(batch)
    threaded, threaded_errors = PilDecoder(IMAGE_SIZE, "zero_one", num_threads=2)(batch)
    assert torch.equal(serial, threaded) and [e is None for e in serial_errors] == [e is None for e in threaded_errors]
    assert serial_errors[1] is not None
