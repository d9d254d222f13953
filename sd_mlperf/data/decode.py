"""Image decode role (`data.decode_backend`): DALI (GPU, or its CPU variant), nvjpeg (torchvision), PIL.

Every backend does the reference's preprocessing: decode to RGB, resize the shorter side to
`data.image_size` (bicubic, antialiased, rounded to 8 bits as PIL does), centre crop to a square,
output float CHW in [0, 1], then map to `data.image_range` (`zero_one` is the reference's, a known
bug the quality target was set with; `minus1_1` is the fix). `pil` is the reference twin; the
others agree with it within resize tolerance (tests/unit/data/test_decode.py).

A decoder never raises on a bad image: it returns an error message for it (and zeros in its slot),
and the caller decides whether to drop or replace the sample and counts it.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from sd_mlperf.backends import resolve_backend
from sd_mlperf.config.schema import DataConfig
from sd_mlperf.data.shards import split_key
from sd_mlperf.utils.logging import log_once

DecodeResult = tuple[torch.Tensor, list[str | None]]


class Decoder(Protocol):
    """Decodes encoded images to a (B, 3, S, S) float32 batch on `device`, with a per-image error or None."""

    name: str
    device: torch.device

    def __call__(self, encoded: Sequence[bytes]) -> DecodeResult: ...


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to `size`, truncating the longer as torchvision's Resize does."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def crop_origin(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def to_range(images_01: torch.Tensor, image_range: str) -> torch.Tensor:
    """Map [0, 1] pixels to the configured range."""
    if image_range == "zero_one":
        return images_01
    assert image_range == "minus1_1", image_range
    return images_01 * 2.0 - 1.0


class PilDecoder:
    """CPU reference: PIL decode, PIL bicubic resize of the shorter side, centre crop, ToTensor."""

    name = "pil"

    def __init__(self, size: int, image_range: str, num_threads: int = 1) -> None:
        self.size, self.image_range, self.num_threads = size, image_range, num_threads
        self.device = torch.device("cpu")
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def decode_one(self, data: bytes) -> torch.Tensor:
        """One image as (3, S, S) float32 in [0, 1]; raises on a bad image."""
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")  # forces the full decode, so truncation raises here
        h, w = resized_size(img.height, img.width, self.size)
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), Image.BICUBIC)
        top, left = crop_origin(h, w, self.size)
        img = img.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)

    def _try_decode(self, data: bytes) -> torch.Tensor | str:
        try:
            return self.decode_one(data)
        except Exception as exc:  # PIL raises many types for bad files
            return f"{type(exc).__name__}: {exc}"

    def __call__(self, encoded: Sequence[bytes]) -> DecodeResult:
        out = torch.zeros(len(encoded), 3, self.size, self.size)
        if self.num_threads > 1 and len(encoded) > 1:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, thread_name_prefix="pil-decode")
            results = list(self._pool.map(self._try_decode, encoded))  # PIL releases the GIL in decode/resize
        else:
            results = [self._try_decode(data) for data in encoded]
        errors: list[str | None] = []
        for i, result in enumerate(results):
            if isinstance(result, str):
                errors.append(result)
            else:
                out[i] = result
                errors.append(None)
        return to_range(out, self.image_range), errors


class TorchvisionDecoder:
    """`nvjpeg`: torchvision.io.decode_jpeg on the GPU (batched), then resize and crop as tensors.

    On a CPU device the same code runs with torchvision's CPU decoder: the twin the CPU tests use.
    """

    name = "nvjpeg"

    def __init__(self, size: int, image_range: str, device: torch.device) -> None:
        self.size, self.image_range, self.device = size, image_range, device

    def _decode_raw(self, encoded: Sequence[bytes]) -> list[torch.Tensor | str]:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in encoded]
        if self.device.type == "cuda":
            try:  # one batched nvjpeg call is the fast path
                return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device))
            except Exception:  # a bad or non-JPEG image in the batch: go one by one below
                pass
        out: list[torch.Tensor | str] = []
        for data in datas:
            try:
                if self.device.type == "cuda":
                    try:
                        out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                        continue
                    except Exception:  # PNG/WebP: nvjpeg decodes JPEG only
                        pass
                out.append(decode_image(data, mode=ImageReadMode.RGB).to(self.device))
            except Exception as exc:  # torchvision raises RuntimeError for bad data
                out.append(f"{type(exc).__name__}: {exc}")
        return out

    def transform(self, img_u8: torch.Tensor) -> torch.Tensor:
        """(3, h, w) uint8 -> (3, S, S) float32 in [0, 1], rounded to 8 bits like the PIL reference."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        h, w = resized_size(img_u8.shape[-2], img_u8.shape[-1], self.size)
        x = img_u8.float()
        if (h, w) != tuple(img_u8.shape[-2:]):
            x = F.resize(x, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True)
        top, left = crop_origin(h, w, self.size)
        x = x[:, top:top + self.size, left:left + self.size]
        return x.round_().clamp_(0, 255).div_(255.0)

    def __call__(self, encoded: Sequence[bytes]) -> DecodeResult:
        out = torch.zeros(len(encoded), 3, self.size, self.size, device=self.device)
        errors: list[str | None] = []
        for i, img in enumerate(self._decode_raw(encoded)):
            if isinstance(img, str):
                errors.append(img)
                continue
            out[i] = self.transform(img)
            errors.append(None)
        return to_range(out, self.image_range), errors


class DaliDecoder:
    """`dali`: decoders.image (`mixed` on GPU, `cpu` otherwise), resize shorter side bicubic (antialiased),
    centre crop, CHW float in [0, 1]: one DALI graph fed either with encoded bytes (external_source, the
    loader's path) or by DALI's own webdataset reader over a whole shard (`read_shard`, precompute's path).

    The GPU and CPU variants differ only in device placement (`device_id`, decoder device).
    Pipelines are built on first use, so a decoder can be made before worker processes fork.
    """

    name = "dali"

    def __init__(self, size: int, image_range: str, device: torch.device, max_batch_size: int = 64,
                 num_threads: int = 2) -> None:
        self.size, self.image_range, self.device = size, image_range, device
        self.max_batch_size, self.num_threads = max_batch_size, num_threads
        self._pipe = None

    def _process(self, encoded):
        """The decode graph shared by both sources (call inside a pipeline definition)."""
        from nvidia.dali import fn, types

        images = fn.decoders.image(encoded, device="mixed" if self.device.type == "cuda" else "cpu",
                                   output_type=types.RGB)
        images = fn.resize(images, resize_shorter=self.size, interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(images, crop=(self.size, self.size), mean=0.0, std=255.0,
                                        output_layout="CHW", dtype=types.FLOAT)

    def _pipeline(self, define):
        from nvidia.dali import pipeline_def

        gpu = self.device.type == "cuda"
        p = pipeline_def(define, batch_size=self.max_batch_size, num_threads=self.num_threads,
                         device_id=(self.device.index or 0) if gpu else None, prefetch_queue_depth=1,
                         exec_dynamic=True)()
        p.build()
        return p

    def _build(self):
        from nvidia.dali import fn, types

        return self._pipeline(lambda: self._process(fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)))

    def _to_torch(self, out) -> torch.Tensor:
        tensor = out.as_tensor()
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            result = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(self.device))
            return result
        return torch.from_numpy(np.array(tensor))

    def _run(self, encoded: Sequence[bytes]) -> torch.Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._pipe.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in encoded])
            (out,) = self._pipe.run()
        except RuntimeError:
            self._pipe = None  # a failed run can leave the pipeline invalid: rebuild it next time
            raise
        return self._to_torch(out)

    def read_shard(self, shard: str, image_exts: Sequence[str]) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(keys, images in the configured range) batches of every sample of `shard` that has an image,
        read by fn.readers.webdataset in file order; raises RuntimeError on any bad image or tar
        (the caller then decodes that shard through the byte path, which isolates bad samples)."""
        from nvidia.dali import fn

        def define():
            encoded = fn.readers.webdataset(paths=[shard], ext=[";".join(image_exts)], random_shuffle=False,
                                            missing_component_behavior="skip", pad_last_batch=True, name="reader")
            return self._process(encoded), encoded

        pipe = self._pipeline(define)
        remaining = pipe.epoch_size("reader")
        while remaining > 0:
            images, encoded = pipe.run()
            n = min(remaining, len(images))
            # source_info is "path:offset:KEY.ext"; the key is split off by the loaders' own webdataset rule.
            keys = [split_key(encoded[i].source_info().rsplit(":", 1)[-1])[0] for i in range(n)]
            yield keys, to_range(self._to_torch(images)[:n], self.image_range)
            remaining -= n

    def __call__(self, encoded: Sequence[bytes]) -> DecodeResult:
        out = torch.zeros(len(encoded), 3, self.size, self.size, device=self.device)
        errors: list[str | None] = [None] * len(encoded)
        for start in range(0, len(encoded), self.max_batch_size):
            chunk = encoded[start:start + self.max_batch_size]
            try:
                out[start:start + len(chunk)] = self._run(chunk)
                continue
            except RuntimeError:  # DALI fails the whole batch for one bad image: find it one by one
                pass
            for j, data in enumerate(chunk):
                try:
                    out[start + j] = self._run([data])[0]
                except RuntimeError as exc:
                    lines = [ln for ln in str(exc).splitlines() if ln.strip() and "Critical error" not in ln]
                    errors[start + j] = f"DALI: {(lines[:1] or ['decode failed'])[0][:200]}"
        return to_range(out, self.image_range), errors


def build_decoder(cfg: DataConfig, device: torch.device | str | None = None, *, max_batch_size: int = 64) -> Decoder:
    """The decoder for `data.decode_backend`; `device` cpu forces a CPU backend, None picks CUDA when used."""
    want_cpu = device is not None and torch.device(device).type == "cpu"
    requested = "pil" if (want_cpu and cfg.decode_backend == "auto") else cfg.decode_backend
    resolution = resolve_backend("decode", requested, allow_cpu_variant=True)
    name = resolution.name
    if name == "pil":
        # Batched calls (precompute) decode on a few threads; the loader decodes per sample in its workers.
        decoder: Decoder = PilDecoder(cfg.image_size, cfg.image_range, num_threads=min(8, os.cpu_count() or 1))
    else:
        cuda_ok = torch.cuda.is_available() and not want_cpu
        if name == "nvjpeg" and not cuda_ok:
            raise ValueError(f"invalid value for 'data.decode_backend': 'nvjpeg' needs a CUDA device but the decoder "
                             f"device is {device}; set data.decode_backend=pil or dali (which has a CPU variant).")
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device()) \
            if cuda_ok else torch.device("cpu")
        if name == "nvjpeg":
            decoder = TorchvisionDecoder(cfg.image_size, cfg.image_range, dev)
        else:
            decoder = DaliDecoder(cfg.image_size, cfg.image_range, dev if cuda_ok else torch.device("cpu"),
                                  max_batch_size=max_batch_size)
    log_once(f"decode-backend-{name}-{decoder.device}",
             f"image decode: {name} on {decoder.device} ({resolution.why})", level=20)
    return decoder
