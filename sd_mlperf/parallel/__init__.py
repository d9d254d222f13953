"""Distributed init, optimizer schedule, mixed precision and the data-parallel backends (mcore, torch).

Import the submodules directly (`from sd_mlperf.parallel.data_parallel import apply_data_parallel`);
megatron-core is imported only when the mcore backend is built.
"""
