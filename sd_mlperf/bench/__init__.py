"""Benchmarks behind `sd-mlperf bench`: training step speed, FLOP counting, tables, diffusers comparison.

Each bench returns rows (one dict per measured variant) that `sd_mlperf.bench.table` formats.
Heavy imports stay inside the functions, so importing this package is cheap.
"""
