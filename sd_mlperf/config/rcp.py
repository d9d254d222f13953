"""The reference convergence points (RCPs) of our ruleset: their hyperparameters per global batch.

mlperf-logging's `rcp_checker/training_5.0.0/rcps_stable_diffusion.json` holds, per global batch, the runs a
closed-division submission is compared with and the hyperparameters they used (5.0.0: 256 -> 2.8e-7,
384 and 512 -> 2.3e-7, 1024 and 2048 -> 1.25e-7 per sample, warmup 1000 steps everywhere). Its
`opt_base_learning_rate` is the per-sample base (our optim.base_lr_per_sample); the MLPerf log's
`opt_base_learning_rate` is the lr after warmup (base x global batch), as the reference and every v5.0
submission log it. A closed-division run whose (global batch, base lr, warmup) matches no RCP is compared with
RCPs of other hyperparameters: `rcp_mismatch` says which RCP is nearest.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MLPERF_USAGE = "training"
MLPERF_RULESET = "5.0.0"
MLPERF_BENCHMARK = "stable_diffusion"
RCP_FILE_LABEL = f"mlperf-logging {MLPERF_USAGE}_{MLPERF_RULESET}/rcps_{MLPERF_BENCHMARK}.json"


def rcp_path() -> Path:
    """The RCP file of our ruleset inside the installed mlperf-logging."""
    from mlperf_logging.rcp_checker import rcp_checker

    return Path(rcp_checker.__file__).parent / f"{MLPERF_USAGE}_{MLPERF_RULESET}" / f"rcps_{MLPERF_BENCHMARK}.json"


@dataclass(frozen=True)
class RcpHyperparameters:
    """One RCP's name, global batch and the free hyperparameters its runs used."""

    name: str
    global_batch_size: int
    base_lr_per_sample: float
    warmup_steps: int

    def matches(self, global_batch_size: int, base_lr_per_sample: float, warmup_steps: int) -> bool:
        """Same global batch, base lr (to a relative 1e-9) and warmup."""
        return (global_batch_size == self.global_batch_size and warmup_steps == self.warmup_steps
                and math.isclose(base_lr_per_sample, self.base_lr_per_sample, rel_tol=1e-9))

    def describe(self) -> str:
        """`sd_ref_256 (global batch 256, optim.base_lr_per_sample=2.8e-07, optim.warmup_steps=1000)`."""
        return (f"{self.name} (global batch {self.global_batch_size}, optim.base_lr_per_sample="
                f"{self.base_lr_per_sample:g}, optim.warmup_steps={self.warmup_steps})")


def rcp_records(path: str | os.PathLike | None = None) -> dict[int, tuple[str, dict[str, Any]]]:
    """Global batch -> (name, record) of the RCP file, by batch size: the first RCP of a batch, as the checker's
    lookup finds it."""
    raw = json.loads(Path(path or rcp_path()).read_text(encoding="utf-8"))
    by_batch: dict[int, tuple[str, dict[str, Any]]] = {}
    for name, record in raw.items():
        by_batch.setdefault(int(record["BS"]), (name, record))
    return dict(sorted(by_batch.items()))


def load_rcp_hyperparameters(path: str | os.PathLike | None = None) -> list[RcpHyperparameters]:
    """Every RCP of the file, by global batch (the first of a batch, as the checker's lookup finds it)."""
    return [RcpHyperparameters(name, bs, float(record["Hyperparams"]["opt_base_learning_rate"]),
                               int(record["Hyperparams"]["opt_learning_rate_warmup_steps"]))
            for bs, (name, record) in rcp_records(path).items()]


def matching_rcp(global_batch_size: int, base_lr_per_sample: float, warmup_steps: int,
                 rcps: list[RcpHyperparameters] | None = None) -> RcpHyperparameters | None:
    """The RCP whose global batch and hyperparameters are these, or None."""
    rcps = rcps if rcps is not None else load_rcp_hyperparameters()
    return next((r for r in rcps if r.matches(global_batch_size, base_lr_per_sample, warmup_steps)), None)


def nearest_rcp(global_batch_size: int, rcps: list[RcpHyperparameters] | None = None) -> RcpHyperparameters:
    """The RCP of the nearest global batch (ties: the smaller batch)."""
    rcps = rcps if rcps is not None else load_rcp_hyperparameters()
    return min(rcps, key=lambda r: (abs(r.global_batch_size - global_batch_size), r.global_batch_size))


def rcp_mismatch(global_batch_size: int, base_lr_per_sample: float, warmup_steps: int,
                 rcps: list[RcpHyperparameters] | None = None) -> str | None:
    """Why these hyperparameters match no RCP, naming the nearest one and what to set; None when one matches."""
    rcps = rcps if rcps is not None else load_rcp_hyperparameters()
    if matching_rcp(global_batch_size, base_lr_per_sample, warmup_steps, rcps) is not None:
        return None
    near = nearest_rcp(global_batch_size, rcps)
    here = (f"global batch {global_batch_size}, optim.base_lr_per_sample={base_lr_per_sample:g}, "
            f"optim.warmup_steps={warmup_steps}")
    if near.global_batch_size == global_batch_size:
        fix = (f"set optim.base_lr_per_sample={near.base_lr_per_sample:g} optim.warmup_steps={near.warmup_steps}, "
               "or expect the RCP review to ask for your own reference runs")
    else:
        fix = (f"no RCP has this global batch: the RCP checker compares the run with RCPs of other batches (the "
               f"submission committee may ask for new reference runs); use a batch with an RCP "
               f"({', '.join(str(r.global_batch_size) for r in rcps)}) and its hyperparameters")
    return f"closed division: ({here}) matches no RCP of {RCP_FILE_LABEL}; the nearest is {near.describe()}; {fix}"
