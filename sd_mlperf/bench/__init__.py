"""Benchmarks behind `sd-mlperf bench`: training step speed, tables, diffusers comparison.

Each bench returns rows (one dict per measured variant) that `sd_mlperf.bench.table` formats.
Heavy imports stay inside the functions, so importing this package is cheap.
"""

from sd_mlperf.config.schema import Config


def bench_seed(cfg: Config) -> int:
    """The seed a bench draws weights and inputs from: run.seed, or 0 when null (benches time, they do not train)."""
    return 0 if cfg.run.seed is None else cfg.run.seed
