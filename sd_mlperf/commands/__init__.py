"""Subcommands of `sd-mlperf`: one module each (see sd_mlperf/cli.py)."""
