"""Reports users read: plots of a run directory (`sd-mlperf report`), the end-of-run summary and the time-to-train
projection from the RCPs. Everything is read back from the run directory (run_data.py)."""
