"""Bad input accounting: skip and count each bad sample by kind, warn once per kind, stop past a threshold.

A corrupt image, a missing caption, a wrong npy shape or a truncated tar must not kill a
multi-day run, but a dataset that is mostly broken must not train silently either: past
`data.max_bad_fraction` of the samples seen, the run stops with an error naming the worst shards.
"""

from __future__ import annotations

import collections
import os

from sd_mlperf.utils.errors import UserError
from sd_mlperf.utils.logging import log_once

# The kinds counted; each gets one warning per process.
KINDS = ("corrupt_image", "missing_image", "missing_caption", "bad_caption", "bad_npy", "bad_embedding",
         "missing_moments", "missing_embedding", "truncated_tar", "unreadable_shard")

# Below this many samples the fraction is too noisy to act on (one bad of the first ten is not 10%).
MIN_SAMPLES_FOR_THRESHOLD = 200


class BadDataError(UserError):
    """Too many bad samples: the data (not the code) needs fixing."""


class BadSampleCounter:
    """Counts good and bad samples per kind and per shard; raises BadDataError past the threshold."""

    def __init__(self, max_bad_fraction: float, *, where: str = "data",
                 min_samples: int = MIN_SAMPLES_FOR_THRESHOLD) -> None:
        self.max_bad_fraction = max_bad_fraction
        self.where = where
        self.min_samples = min_samples
        self.num_good = 0
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.by_shard: collections.Counter[str] = collections.Counter()

    @property
    def num_bad(self) -> int:
        """Samples skipped so far (a truncated tar counts once, for the sample it cut)."""
        return sum(self.by_kind.values())

    def good(self, n: int = 1) -> None:
        """Record `n` samples that were read fine."""
        self.num_good += n

    def bad(self, kind: str, shard: str, key: str, detail: str = "") -> None:
        """Record one skipped sample; the first of each kind is logged with its shard and key."""
        assert kind in KINDS, kind
        self.by_kind[kind] += 1
        self.by_shard[shard] += 1
        # One warning per kind per process (a data worker is a process), however many counters it has.
        log_once(f"bad-sample-{kind}", f"{self.where}: skipping {kind} sample {key!r} in shard {shard}"
                 f"{': ' + detail if detail else ''} (further {kind} samples are counted, not logged)")
        self.check(final=False)

    def fraction(self) -> float:
        """Bad samples over all samples seen."""
        total = self.num_good + self.num_bad
        return self.num_bad / total if total else 0.0

    def check(self, *, final: bool = True) -> None:
        """Raise BadDataError if too many samples failed (mid-stream only after `min_samples`)."""
        total = self.num_good + self.num_bad
        if total == 0 or (not final and total < self.min_samples):
            return
        if self.fraction() > self.max_bad_fraction:
            worst = ", ".join(f"{os.path.basename(s)} ({n})" for s, n in self.by_shard.most_common(5))
            raise BadDataError(
                f"{self.where}: {self.num_bad} of {total} samples are bad ({self.fraction():.1%} > "
                f"data.max_bad_fraction={self.max_bad_fraction}); by kind: {dict(self.by_kind)}; worst shards: "
                f"{worst}. Fix or remove those shards, or raise data.max_bad_fraction.")

    def summary(self) -> dict:
        """Counts for manifests and logs."""
        return {"good": self.num_good, "bad": self.num_bad, "by_kind": dict(self.by_kind)}
