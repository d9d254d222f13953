"""Typed configuration: schema dataclasses and the loader."""

from sd_mlperf.config.load import (
    ConfigError,
    config_to_yaml,
    global_batch_size,
    learning_rate,
    load_config,
    merge_config,
    save_resolved_config,
    steps_between_checkpoints,
    validate,
    world_size,
)
from sd_mlperf.config.schema import Config

__all__ = [
    "Config",
    "ConfigError",
    "config_to_yaml",
    "global_batch_size",
    "learning_rate",
    "load_config",
    "merge_config",
    "save_resolved_config",
    "steps_between_checkpoints",
    "validate",
    "world_size",
]
