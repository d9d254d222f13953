"""The training loop and what it writes: the Trainer, its build, one optimizer step (eager or one CUDA graph),
run checkpoints, the MLPerf log, the metrics file, and offline evaluation of collected checkpoints."""
