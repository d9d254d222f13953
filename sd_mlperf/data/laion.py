"""Training loaders over LAION-style webdataset shards, in three formats.

- `moments` (the reference's): KEY.npy VAE moments (1, 8, h, w) + KEY.txt caption.
- `moments_embeddings` (ours): KEY.npy moments + KEY.emb.npy text embedding (77, D) fp16, so the
  text encoder never runs in training.
- `images`: KEY.jpg (or png/webp) + KEY.txt, decoded and VAE-encoded online.

Sampling follows the reference: shards drawn with replacement, a shuffle buffer of
`data.shuffle_buffer_samples`, no epochs. Each stream (one per rank and data worker, its "role")
is seeded from (seed, rank, role), so a run is reproducible and ranks draw different samples.

Position (resume) design: every stream is a deterministic sequence of sample references, and each
batch carries how many references its stream has used so far. The loader's state is those counts
plus the number of batches delivered. On resume each stream regenerates its reference sequence and
skips the used references by reading tar headers only (no sample data), and the worker roles are
rotated so the first batch comes from the stream that was next; the batches are then exactly those
an uninterrupted run would have seen, bad samples included. This holds for the same shards, seed,
rank, batch size and `data.num_workers`; otherwise the loader warns and starts fresh streams (which
later resumes continue exactly: their seed is part of the state). Skipping costs one tar header scan
per shard (about 8,000 samples/s per worker on a 2-core CPU), so resuming after 4M images on 8 GPUs
x 4 workers takes seconds, not a re-read of the data.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sd_mlperf.config.schema import DataConfig
from sd_mlperf.data.bad_samples import BadSampleCounter
from sd_mlperf.data.shards import SampleRef, ShardIndex, ShardReader, expand_shards, index_shard
from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.logging import log_once, logger
from sd_mlperf.utils.seeds import stream_seed

if TYPE_CHECKING:
    from sd_mlperf.data.decode import Decoder

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MOMENTS_EXT, EMBEDDING_EXT, CAPTION_EXT = "npy", "emb.npy", "txt"
STATE_VERSION = 1
_MAX_CACHED_INDEXES = 8


def find_image_ext(ref: SampleRef) -> str | None:
    """The sample's image member extension, if it has one."""
    return next((e for e in IMAGE_EXTS if e in ref.members), None)


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class SampleParser:
    """Turns a SampleRef into a sample dict for one format, or counts why it is bad and returns None."""

    def __init__(self, cfg: DataConfig, counter: BadSampleCounter, *, decode_images: bool, latent_size: int) -> None:
        self.format = cfg.train_format
        self.image_size = cfg.image_size
        self.latent_size = latent_size  # config.load.latent_size: moments of another size are bad samples
        self.counter = counter
        self.reader = ShardReader()
        self.decode_images = decode_images
        self._pil = None
        if cfg.train_format == "images" and decode_images:
            from sd_mlperf.data.decode import PilDecoder

            self._pil = PilDecoder(cfg.image_size, cfg.image_range)
        self.image_range = cfg.image_range
        self._embedding_shape: tuple[int, ...] | None = None

    def _caption(self, ref: SampleRef) -> str | None:
        if CAPTION_EXT not in ref.members:
            self.counter.bad("missing_caption", ref.shard, ref.key)
            return None
        try:
            return self.reader.read(ref, CAPTION_EXT).decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            self.counter.bad("bad_caption", ref.shard, ref.key, str(exc))
            return None

    def _moments(self, ref: SampleRef) -> np.ndarray | None:
        if MOMENTS_EXT not in ref.members:
            self.counter.bad("missing_moments", ref.shard, ref.key)
            return None
        try:
            arr = _load_npy(self.reader.read(ref, MOMENTS_EXT))
        except (ValueError, OSError) as exc:
            self.counter.bad("bad_npy", ref.shard, ref.key, str(exc))
            return None
        s = self.latent_size
        if arr.shape not in ((1, 8, s, s), (8, s, s)) or not np.issubdtype(arr.dtype, np.floating):
            self.counter.bad("bad_npy", ref.shard, ref.key,
                             f"moments of shape {arr.shape} {arr.dtype}, expected (1, 8, {s}, {s}) float "
                             f"(data.image_size={self.image_size})")
            return None
        return arr.reshape(8, s, s)

    def _embedding(self, ref: SampleRef) -> np.ndarray | None:
        if EMBEDDING_EXT not in ref.members:
            self.counter.bad("missing_embedding", ref.shard, ref.key)
            return None
        try:
            arr = _load_npy(self.reader.read(ref, EMBEDDING_EXT))
        except (ValueError, OSError) as exc:
            self.counter.bad("bad_embedding", ref.shard, ref.key, str(exc))
            return None
        expected = self._embedding_shape or arr.shape
        if arr.ndim != 2 or arr.shape != expected or not np.issubdtype(arr.dtype, np.floating):
            self.counter.bad("bad_embedding", ref.shard, ref.key,
                             f"embedding of shape {arr.shape} {arr.dtype}, expected (77, width) fp16 like {expected}")
            return None
        self._embedding_shape = arr.shape
        return arr

    def _image(self, ref: SampleRef) -> torch.Tensor | bytes | None:
        ext = find_image_ext(ref)
        if ext is None:
            self.counter.bad("missing_image", ref.shard, ref.key)
            return None
        data = self.reader.read(ref, ext)
        if self._pil is None:
            return data  # decoded in the main process by a GPU decoder
        try:
            from sd_mlperf.data.decode import to_range

            return to_range(self._pil.decode_one(data), self.image_range)
        except Exception as exc:  # PIL raises many types for bad files
            self.counter.bad("corrupt_image", ref.shard, ref.key, f"{type(exc).__name__}: {exc}")
            return None

    def parse(self, ref: SampleRef) -> dict[str, Any] | None:
        """The sample's fields for the format, or None if it is bad (counted)."""
        try:
            if self.format == "moments":
                moments = self._moments(ref)
                caption = self._caption(ref) if moments is not None else None
                return None if caption is None else {"moments": moments, "caption": caption, "key": ref.key}
            if self.format == "moments_embeddings":
                moments = self._moments(ref)
                context = self._embedding(ref) if moments is not None else None
                return None if context is None else {"moments": moments, "context": context, "key": ref.key}
            image = self._image(ref)
            caption = self._caption(ref) if image is not None else None
            return None if caption is None else {"image": image, "caption": caption, "key": ref.key}
        except EOFError as exc:
            self.counter.bad("truncated_tar", ref.shard, ref.key, str(exc))
            return None


def _stack_float32(arrays: list[np.ndarray]) -> torch.Tensor:
    # One converting copy per sample into one buffer: torch.stack's thread pool crawls on busy cores.
    out = np.empty((len(arrays), *arrays[0].shape), np.float32)
    for i, arr in enumerate(arrays):
        out[i] = arr
    return torch.from_numpy(out)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of parsed samples into the batch dict the trainer's conditioner takes."""
    batch: dict[str, Any] = {"keys": [s["key"] for s in samples]}
    first = samples[0]
    if "moments" in first:
        batch["moments"] = _stack_float32([s["moments"] for s in samples])
    if "context" in first:
        # Stored fp16 (half the bytes); the trainer gets float32 as the contract says.
        batch["context"] = _stack_float32([s["context"] for s in samples])
    if "caption" in first:
        batch["captions"] = [s["caption"] for s in samples]
    if "image" in first:
        if isinstance(first["image"], bytes):
            batch["encoded"] = [s["image"] for s in samples]
        else:
            batch["images"] = torch.stack([s["image"] for s in samples])
    return batch


class ShardStream(IterableDataset):
    """Endless batches of one stream per data worker; yields (role, references used, batch)."""

    def __init__(self, cfg: DataConfig, shards: list[str], *, batch_size: int, seed: int, rank: int, num_roles: int,
                 refs_used: list[int], role_offset: int, decode_images: bool, latent_size: int) -> None:
        super().__init__()
        self.cfg, self.shards, self.batch_size, self.latent_size = cfg, shards, batch_size, latent_size
        self.seed, self.rank, self.num_roles = seed, rank, num_roles
        self.refs_used, self.role_offset, self.decode_images = refs_used, role_offset, decode_images

    def references(self, role: int, counter: BadSampleCounter | None = None) -> Iterator[SampleRef]:
        """The stream's endless, deterministic sequence: shards with replacement, then the shuffle buffer."""
        shard_seq, buffer_seq = np.random.SeedSequence([self.seed, self.rank, role]).spawn(2)
        shard_rng, buffer_rng = np.random.default_rng(shard_seq), np.random.default_rng(buffer_seq)
        cache: collections.OrderedDict[str, ShardIndex] = collections.OrderedDict()
        reported: set[str] = set()

        def raw() -> Iterator[SampleRef]:
            empty_in_a_row = 0
            while True:
                shard = self.shards[int(shard_rng.integers(len(self.shards)))]
                index = cache.pop(shard, None) or index_shard(shard)
                cache[shard] = index
                if len(cache) > _MAX_CACHED_INDEXES:
                    cache.popitem(last=False)
                if counter is not None and (index.truncated or index.error) and shard not in reported:
                    reported.add(shard)
                    kind = "unreadable_shard" if not index.samples and not index.truncated else "truncated_tar"
                    counter.bad(kind, shard, "(shard)", index.error or "tar ends early")
                empty_in_a_row = 0 if index.samples else empty_in_a_row + 1
                if empty_in_a_row > 4 * len(self.shards) + 10:
                    raise UserError(f"no readable samples in the shards of data.train_shards (last tried: {shard}).")
                yield from index.samples

        bufsize = self.cfg.shuffle_buffer_samples
        if bufsize <= 1:
            yield from raw()
            return
        buffer: list[SampleRef] = []
        for ref in raw():
            if len(buffer) < bufsize:
                buffer.append(ref)
                continue
            i = int(buffer_rng.integers(bufsize))
            out, buffer[i] = buffer[i], ref
            yield out

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        role = (worker + self.role_offset) % self.num_roles
        counter = BadSampleCounter(self.cfg.max_bad_fraction, where=f"training data (rank {self.rank}, role {role})")
        parser = SampleParser(self.cfg, counter, decode_images=self.decode_images, latent_size=self.latent_size)
        refs = self.references(role, counter)
        used = self.refs_used[role]
        for _ in range(used):  # resume: skip what was used, reading headers only
            next(refs)
        samples: list[dict[str, Any]] = []
        for ref in refs:
            used += 1
            sample = parser.parse(ref)
            if sample is None:
                continue
            counter.good()
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield role, used, collate(samples)
                samples = []


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers parse and decode; one thread each avoids oversubscribing the cores


class TrainLoader:
    """Iterable of training batches with a resumable position (`state_dict` / `load_state_dict`)."""

    def __init__(self, cfg: DataConfig, shards: list[str], *, micro_batch_size: int, rank: int, world_size: int,
                 seed: int, latent_size: int, decoder: Decoder | None = None) -> None:
        self.cfg, self.shards, self.batch_size, self.latent_size = cfg, shards, micro_batch_size, latent_size
        self.rank, self.world_size = rank, world_size
        self.base_seed = seed  # the configured seed, compared on resume
        self.seed = seed  # the streams' seed: moved on by a resume whose settings changed, then kept in the state
        self.num_roles = max(1, cfg.num_workers)
        self.decoder = decoder  # set only for a GPU decode backend in the images format
        self.batches = 0
        self.refs_used = [0] * self.num_roles
        self._decode_counter = BadSampleCounter(cfg.max_bad_fraction, where=f"training images (rank {rank})")

    def dataset(self) -> ShardStream:
        """The stream dataset starting at the current position."""
        return ShardStream(self.cfg, self.shards, batch_size=self.batch_size, seed=self.seed, rank=self.rank,
                           num_roles=self.num_roles, refs_used=list(self.refs_used),
                           role_offset=self.batches % self.num_roles, decode_images=self.decoder is None,
                           latent_size=self.latent_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = self.dataset()
        if self.cfg.num_workers == 0:
            source: Any = iter(dataset)
        else:
            source = iter(DataLoader(
                dataset, batch_size=None, num_workers=self.cfg.num_workers, worker_init_fn=_worker_init,
                pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False))
        for role, used, batch in source:
            self.refs_used[role] = used
            self.batches += 1
            if "encoded" in batch:
                batch = self._decode(batch)
            yield batch

    def _decode(self, batch: dict[str, Any]) -> dict[str, Any]:
        encoded = batch.pop("encoded")
        images, errors = self.decoder(encoded)
        good = [i for i, e in enumerate(errors) if e is None]
        for i, err in enumerate(errors):
            if err is not None:
                self._decode_counter.bad("corrupt_image", "(decoded batch)", batch["keys"][i], err)
        self._decode_counter.good(len(good))
        if not good:
            raise UserError(f"every image of a training batch failed to decode (keys {batch['keys']}).")
        # A bad image is replaced by a good one of the same batch: the batch keeps its static shape.
        for i, err in enumerate(errors):
            if err is not None:
                j = good[i % len(good)]
                images[i], batch["captions"][i], batch["keys"][i] = images[j], batch["captions"][j], batch["keys"][j]
        batch["images"] = images
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The data position: batches delivered and references used per stream, plus what they depend on."""
        return {"version": STATE_VERSION, "batches": self.batches, "refs_used": list(self.refs_used),
                "num_workers": self.cfg.num_workers, "seed": self.base_seed, "stream_seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "num_shards": len(self.shards),
                "batch_size": self.batch_size}

    def restart_at(self, batches: int) -> None:
        """Fresh streams after `batches` batches (a resume that cannot continue the saved ones).

        The streams' seed moves on with the position, so the samples seen before are not replayed in order.
        """
        self.batches = batches
        self.seed = stream_seed(self.base_seed, batches)
        self.refs_used = [0] * self.num_roles

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; if the settings it depends on changed, warn and start fresh streams."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}; "
                             f"the checkpoint was written by another sd_mlperf version.")
        same = {k: (state.get(k), v) for k, v in (("num_workers", self.cfg.num_workers), ("seed", self.base_seed),
                ("rank", self.rank), ("num_shards", len(self.shards)), ("batch_size", self.batch_size))}
        changed = {k: v for k, v in same.items() if v[0] != v[1]}
        if changed:
            log_once("data-resume-changed", f"data position saved with other settings {changed} (saved, now): "
                     f"continuing with fresh streams, so the data order differs from an uninterrupted run.")
            self.restart_at(int(state["batches"]))
            return
        self.batches = int(state["batches"])
        self.seed = int(state.get("stream_seed", self.base_seed))
        self.refs_used = [int(n) for n in state["refs_used"]]


def build_train_loader(cfg: DataConfig, *, micro_batch_size: int, rank: int, world_size: int, seed: int,
                       latent_size: int) -> TrainLoader:
    """The training loader for `data.train_format` over `data.train_shards` (shards resampled, shuffled).

    `latent_size` (config.load.latent_size) is the side of the moments every sample must have.
    """
    shards = expand_shards(cfg.train_shards)
    decoder = None
    if cfg.train_format == "images":
        from sd_mlperf.data.decode import build_decoder

        built = build_decoder(cfg, max_batch_size=micro_batch_size)
        if built.name != "pil":
            decoder = built  # GPU (or DALI CPU) decoding runs in the main process on whole batches
    logger.info("training data: %s format, %d shards, batch %d, shuffle buffer %d, %d workers", cfg.train_format,
                len(shards), micro_batch_size, cfg.shuffle_buffer_samples, cfg.num_workers)
    return TrainLoader(cfg, shards, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=seed,
                       latent_size=latent_size, decoder=decoder)
