"""sd_mlperf: Stable Diffusion v2 training as the MLPerf Training benchmark defines it."""

__version__ = "0.1.0"
