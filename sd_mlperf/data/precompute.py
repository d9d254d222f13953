"""Raw image shards -> training shards of VAE moments (and cached text embeddings).

Output shards keep the input's names and sample keys: `moments` writes KEY.npy (1, 8, h, w)
float32 + KEY.txt (+ KEY.json passed through), the reference's format; `moments_embeddings` adds
KEY.emb.npy, the (77, D) fp16 text embedding. The VAE runs in fp32 with autocast off, so cached
latents equal online ones.

Resumable: each output shard is written under a temporary name and renamed when complete, and a
finished shard is skipped on the next run. Each shard gets a small JSON record (sample count,
skips by kind, sha256); when every input shard has one, `manifest.json` gathers them. With W
ranks, rank r takes input shards r, r + W, r + 2W, ... (the caller passes its rank and world size).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from sd_mlperf.config.schema import DataConfig
from sd_mlperf.data.bad_samples import BadSampleCounter
from sd_mlperf.data.laion import CAPTION_EXT, EMBEDDING_EXT, IMAGE_EXTS, MOMENTS_EXT, find_image_ext
from sd_mlperf.data.shards import SampleRef, ShardIndex, ShardReader, expand_shards, index_shard, write_shard
from sd_mlperf.models.checkpoint_io import file_sha256
from sd_mlperf.utils.files import atomic_write_text
from sd_mlperf.utils.logging import log_once, logger
from sd_mlperf.utils.manifest import module_device

MANIFEST = "manifest.json"
RECORDS_DIR = ".precompute"
OUTPUT_FORMATS = ("moments", "moments_embeddings")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def precompute_is_complete(output_dir: str | os.PathLike, output_format: str) -> bool:
    """True if `output_dir` holds a finished precompute in `output_format`."""
    try:
        manifest = json.loads((Path(output_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return bool(manifest.get("complete")) and manifest.get("format") == output_format


class _Bad(NamedTuple):
    kind: str
    detail: str = ""


class ShardEncoder:
    """Encodes the samples of one input shard into output samples (fp32 VAE, fp16 text embeddings)."""

    def __init__(self, data_cfg: DataConfig, output_format: str, vae: torch.nn.Module,
                 text_encoder: torch.nn.Module | None, counter: BadSampleCounter, batch_size: int) -> None:
        from sd_mlperf.data.decode import build_decoder

        self.format, self.vae, self.text_encoder = output_format, vae, text_encoder
        self.counter, self.batch_size = counter, batch_size
        self.device = module_device(vae)
        self.decoder = build_decoder(data_cfg, self.device, max_batch_size=batch_size)
        self.reader = ShardReader()

    def _read(self, ref: SampleRef, with_image: bool = True) -> tuple[bytes | None, str, bytes | None] | _Bad:
        """(image bytes, caption, json bytes) of a sample, or why it is bad."""
        ext = find_image_ext(ref)
        if ext is None:
            return _Bad("missing_image")
        if CAPTION_EXT not in ref.members:
            return _Bad("missing_caption")
        try:
            image = self.reader.read(ref, ext) if with_image else None
            caption = self.reader.read(ref, CAPTION_EXT).decode("utf-8").strip()
            meta = self.reader.read(ref, "json") if "json" in ref.members else None
        except EOFError as exc:
            return _Bad("truncated_tar", str(exc))
        except UnicodeDecodeError as exc:
            return _Bad("bad_caption", str(exc))
        return image, caption, meta

    def _count(self, ref: SampleRef, bad: _Bad, counts: dict[str, int]) -> None:
        counts[bad.kind] = counts.get(bad.kind, 0) + 1
        self.counter.bad(bad.kind, ref.shard, ref.key, bad.detail)

    @torch.no_grad()
    def encode_decoded(self, items: list[tuple[SampleRef, str, bytes | None]],
                       images: torch.Tensor) -> list[tuple[str, dict[str, bytes]]]:
        """VAE-encode decoded images (fp32) and, for moments_embeddings, text-encode the captions (stored fp16)."""
        with torch.autocast(device_type=self.device.type, enabled=False):  # fp32: cached == online latents
            moments = self.vae.encode_moments(images.to(self.device, torch.float32)).float().cpu().numpy()
        contexts = None
        if self.format == "moments_embeddings":
            contexts = self.text_encoder.encode([it[1] for it in items]).to(torch.float16).cpu().numpy()
        out = []
        for i, (ref, caption, meta) in enumerate(items):
            parts = {MOMENTS_EXT: _npy_bytes(moments[i:i + 1]), CAPTION_EXT: caption.encode("utf-8")}
            if contexts is not None:
                parts[EMBEDDING_EXT] = _npy_bytes(contexts[i])
            if meta is not None:
                parts["json"] = meta
            out.append((ref.key, parts))
        return out

    def encode_batch(self, items: list[tuple[SampleRef, bytes, str, bytes | None]],
                     shard_counts: dict[str, int]) -> list[tuple[str, dict[str, bytes]]]:
        """Decode then encode one batch; bad images are dropped and counted."""
        images, errors = self.decoder([it[1] for it in items])
        keep = [i for i, e in enumerate(errors) if e is None]
        for i, err in enumerate(errors):
            if err is not None:
                self._count(items[i][0], _Bad("corrupt_image", err), shard_counts)
        if not keep:
            return []
        return self.encode_decoded([(items[i][0], items[i][2], items[i][3]) for i in keep], images[keep])

    def _encode_with_reader(self, index: ShardIndex, on_samples: Callable[[int], None]):
        """DALI's own webdataset reader over the whole shard (the fast GPU path); None if it cannot be used
        or DALI reports a bad image, in which case nothing has been counted and the byte path redoes the shard."""
        from sd_mlperf.data.decode import DaliDecoder

        by_key = {ref.key: ref for ref in index.samples}
        if not isinstance(self.decoder, DaliDecoder) or index.truncated or index.error or \
                len(by_key) != len(index.samples):
            return None
        bad: list[tuple[SampleRef, _Bad]] = [(r, _Bad("missing_image")) for r in index.samples
                                              if find_image_ext(r) is None]  # DALI skips those samples
        samples: list[tuple[str, dict[str, bytes]]] = []
        try:
            for keys, images in self.decoder.read_shard(index.shard, IMAGE_EXTS):
                items, keep = [], []
                for i, key in enumerate(keys):
                    ref = by_key[key]
                    item = self._read(ref, with_image=False)
                    if isinstance(item, _Bad):
                        bad.append((ref, item))
                    else:
                        items.append((ref, item[1], item[2]))
                        keep.append(i)
                if items:
                    samples += self.encode_decoded(items, images[keep])
                on_samples(len(keys))
        except RuntimeError as exc:
            log_once("precompute-dali-reader", f"precompute: DALI's webdataset reader failed on {index.shard} "
                     f"({str(exc).splitlines()[0][:120]}); such shards are decoded sample by sample instead")
            return None
        counts: dict[str, int] = {}
        for ref, b in bad:
            self._count(ref, b, counts)
        self.counter.good(len(samples))
        return samples, counts

    def encode_shard(self, shard: str, on_samples: Callable[[int], None]) -> tuple[list, dict[str, Any]]:
        """All output samples of `shard` and its record (counts, skips by kind)."""
        index = index_shard(shard)
        fast = self._encode_with_reader(index, on_samples)
        if fast is not None:
            samples, counts = fast
            return samples, {"input": shard, "samples": len(samples), "skipped": counts}
        counts = {}
        if index.truncated or (index.error and not index.samples):
            kind = "truncated_tar" if index.truncated else "unreadable_shard"
            counts[kind] = 1
            self.counter.bad(kind, shard, "(shard)", index.error or "tar ends early")
        samples = []
        pending: list[tuple[SampleRef, bytes, str, bytes | None]] = []
        for n, ref in enumerate(index.samples, start=1):
            item = self._read(ref)
            if isinstance(item, _Bad):
                self._count(ref, item, counts)
            else:
                pending.append((ref, *item))
            if len(pending) == self.batch_size or (n == len(index.samples) and pending):
                encoded = self.encode_batch(pending, counts)
                self.counter.good(len(encoded))
                samples += encoded
                on_samples(len(pending))
                pending = []
        return samples, {"input": shard, "samples": len(samples), "skipped": counts}


def _progress_bar(enabled: bool):
    from tqdm import tqdm

    return tqdm(unit="img", dynamic_ncols=True, disable=not enabled, desc="precompute")


def precompute_shards(input_pattern: str, output_dir: str | os.PathLike, *, data_cfg: DataConfig,
                      vae: torch.nn.Module, text_encoder: torch.nn.Module | None, output_format: str | None = None,
                      rank: int = 0, world_size: int = 1, batch_size: int | None = None,
                      progress: bool = False) -> dict[str, Any] | None:
    """Encode this rank's share of the input shards; return the manifest once every shard is done, else None."""
    output_format = output_format or data_cfg.train_format
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"invalid value for 'data.train_format': {output_format!r}; precompute writes "
                         f"{' or '.join(OUTPUT_FORMATS)}.")
    if output_format == "moments_embeddings" and text_encoder is None:
        raise ValueError("data.train_format=moments_embeddings caches text embeddings and needs the text encoder.")
    shards = expand_shards(input_pattern)
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"input shards of '{input_pattern}' share file names; outputs keep the input names, "
                         f"so each must be unique.")
    out, records_dir = Path(output_dir), Path(output_dir) / RECORDS_DIR
    records_dir.mkdir(parents=True, exist_ok=True)
    mine = [s for i, s in enumerate(shards) if i % world_size == rank]
    # Done = the shard and its record: a run killed between the shard's rename and the record redoes the shard.
    todo = [s for s in mine if not ((out / os.path.basename(s)).exists()
                                    and (records_dir / f"{os.path.basename(s)}.json").exists())]
    if len(todo) < len(mine):
        logger.info("precompute: %d of %d shards of rank %d already done, skipped", len(mine) - len(todo), len(mine),
                    rank)
    counter = BadSampleCounter(data_cfg.max_bad_fraction, where=f"precompute (rank {rank})")
    encoder = ShardEncoder(data_cfg, output_format, vae, text_encoder, counter,
                           batch_size or data_cfg.precompute_batch_size)
    with _progress_bar(progress) as bar:
        for num_done, shard in enumerate(todo, start=1):
            name = os.path.basename(shard)
            for stale in out.glob(f".{name}.*.tmp"):  # left by a killed run of this shard
                stale.unlink()
            samples, record = encoder.encode_shard(shard, bar.update)
            write_shard(out / name, samples)
            record.update(shard=name, sha256=file_sha256(out / name), bytes=(out / name).stat().st_size)
            atomic_write_text(records_dir / f"{name}.json", json.dumps(record, sort_keys=True))
            # The total is estimated from the shards done so far: an exact one would scan every shard's headers
            # once more before any work (minutes on a network file system).
            bar.total = round(bar.n / num_done * len(todo))
            bar.refresh()
            logger.debug("precompute: wrote %s (%d samples, skipped %s)", name, record["samples"], record["skipped"])
    counter.check(final=True)
    return write_manifest_if_complete(out, shards, output_format, data_cfg, input_pattern)


def write_manifest_if_complete(out: Path, shards: list[str], output_format: str, data_cfg: DataConfig,
                               input_pattern: str) -> dict[str, Any] | None:
    """Gather the per-shard records into manifest.json once all exist (any rank may do it: same content)."""
    records = []
    for shard in shards:
        path = out / RECORDS_DIR / f"{os.path.basename(shard)}.json"
        if not path.exists() or not (out / os.path.basename(shard)).exists():
            return None
        records.append(json.loads(path.read_text()))
    skipped: dict[str, int] = {}
    for r in records:
        for kind, n in r["skipped"].items():
            skipped[kind] = skipped.get(kind, 0) + n
    manifest = {"complete": True, "format": output_format, "input": input_pattern, "num_shards": len(records),
                "samples": sum(r["samples"] for r in records), "skipped": skipped,
                "image_size": data_cfg.image_size, "image_range": data_cfg.image_range, "shards": records}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    logger.info("precompute: %d samples in %d shards written to %s (skipped: %s)", manifest["samples"], len(records),
                out, skipped or "none")
    return manifest
