"""Time to train of a benchmark run: the RCP samples to converge over images/s per GPU x GPUs.

The samples to converge are the reference convergence points (RCPs) that mlperf-logging's RCP checker holds for
our ruleset (`mlperf_logging/rcp_checker/training_5.0.0/rcps_stable_diffusion.json`, whose "Epochs to converge"
are samples for Stable Diffusion), taken as the checker takes them: the olympic mean of an RCP's runs (fastest
and slowest dropped); the RCP of the run's global batch, else a linear interpolation between the nearest smaller
and larger RCP batch sizes. Outside the RCP range (256..2048) the nearest RCP is used and the projection says so:
the checker compares a smaller batch with the smallest RCP and wants a new RCP for a larger one.

This uses every RCP (the checker's `full_rcps`). The package checker's default pass first prunes RCPs that
converge slower than their neighbours' interpolation (for 5.0.0 it keeps only 256 and 2048), which moves the
numbers by about 1% here (BS 512: 2,084,201 instead of 2,104,889).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sd_mlperf.config.rcp import RCP_FILE_LABEL, matching_rcp, nearest_rcp, rcp_records
from sd_mlperf.submission.runs import olympic_mean


def load_rcps(path: str | os.PathLike | None = None) -> dict[int, list[int]]:
    """Global batch size -> samples to converge of each reference run (the first RCP of a batch size, as the
    checker's lookup finds it)."""
    return {bs: [int(x) for x in record["Epochs to converge"]] for bs, (_, record) in rcp_records(path).items()}


@dataclass(frozen=True)
class SamplesToConverge:
    """RCP samples to converge at one global batch, and where the number comes from."""

    samples: float
    global_batch_size: int
    source: str
    in_range: bool


def rcp_samples_to_converge(global_batch_size: int, rcps: dict[int, list[int]] | None = None) -> SamplesToConverge:
    """Olympic-mean samples to converge at `global_batch_size`: the RCP, an interpolation, or the nearest RCP."""
    rcps = rcps if rcps is not None else load_rcps()
    means = {bs: olympic_mean(runs) for bs, runs in rcps.items()}
    where = RCP_FILE_LABEL
    low, high = min(means), max(means)
    bs = global_batch_size
    if bs in means:
        return SamplesToConverge(means[bs], bs, f"olympic mean of the {len(rcps[bs])} RCP runs at BS {bs} ({where})",
                                 True)
    if bs < low or bs > high:
        near = low if bs < low else high
        why = ("the RCP checker compares a smaller batch with the smallest RCP" if bs < low else
               "a submission at this batch would need a new RCP")
        return SamplesToConverge(means[near], bs, f"global batch {bs} is outside the RCP range {low}..{high}: "
                                 f"{why}; used: olympic mean at BS {near} ({where})", False)
    below = max(b for b in means if b < bs)
    above = min(b for b in means if b > bs)
    # np.interp over the two neighbours, as the RCP checker's _create_interp_rcp does
    samples = means[below] + (means[above] - means[below]) * (bs - below) / (above - below)
    return SamplesToConverge(samples, bs, f"interpolated between the olympic means at BS {below} "
                             f"({means[below]:,.0f}) and BS {above} ({means[above]:,.0f}) ({where})", True)


@dataclass(frozen=True)
class Projection:
    """Projected time to train: samples to converge / (img/s per GPU x GPUs)."""

    samples: SamplesToConverge
    img_per_s_per_gpu: float
    num_gpus: int
    throughput_source: str
    hyperparameters_note: str = ""
    """Whether the run's (global batch, base lr, warmup) are the RCP's it is projected with."""

    @property
    def img_per_s(self) -> float:
        """Images per second over all GPUs."""
        return self.img_per_s_per_gpu * self.num_gpus

    @property
    def minutes(self) -> float:
        """Training time (run_start..run_stop), in minutes."""
        return self.samples.samples / self.img_per_s / 60

    def lines(self) -> list[str]:
        """The projection as the summary prints it."""
        s = self.samples
        return [f"benchmark run at global batch {s.global_batch_size} on {self.num_gpus} GPU(s)",
                f"samples to converge {s.samples:,.0f}: {s.source}",
                f"throughput {self.img_per_s_per_gpu:.1f} img/s per GPU ({self.throughput_source}) x "
                f"{self.num_gpus} = {self.img_per_s:.1f} img/s",
                f"=> {self.minutes:.1f} min of training (run_start..run_stop; initialization and offline "
                "evaluation not counted, checkpoint collection not modelled)",
                *([self.hyperparameters_note] if self.hyperparameters_note else [])]


def project_time_to_train(global_batch_size: int, img_per_s_per_gpu: float, num_gpus: int, *,
                          throughput_source: str, rcps: dict[int, list[int]] | None = None,
                          base_lr_per_sample: float | None = None, warmup_steps: int | None = None) -> Projection:
    """The projection for a benchmark run of this global batch, speed and GPU count.

    With the run's `base_lr_per_sample` and `warmup_steps`, the projection says whether they are the
    hyperparameters of the RCP it uses (sd_mlperf.config.rcp): RCP samples only predict a run that trains as
    the RCP's runs did.
    """
    if img_per_s_per_gpu <= 0 or num_gpus < 1:
        raise ValueError(f"a projection needs img/s per GPU > 0 and GPUs >= 1, got {img_per_s_per_gpu} and "
                         f"{num_gpus}")
    note = ""
    if base_lr_per_sample is not None and warmup_steps is not None:
        match = matching_rcp(global_batch_size, base_lr_per_sample, warmup_steps)
        if match is not None:
            note = f"hyperparameters: the run's are those of {match.describe()}"
        else:
            near = nearest_rcp(global_batch_size)
            note = (f"hyperparameters: the run's (optim.base_lr_per_sample={base_lr_per_sample:g}, "
                    f"optim.warmup_steps={warmup_steps}) match no RCP; the nearest is {near.describe()}, "
                    "so the samples above assume a run that trains as the RCP's did")
    return Projection(rcp_samples_to_converge(global_batch_size, rcps), img_per_s_per_gpu, num_gpus,
                      throughput_source, note)
