"""What the MLPerf closed division fixes: a table of dotted key -> (reference value, rule), and its check.

training_rules.adoc: the closed division "requires using the same preprocessing, model, training method, and
quality target as the reference implementation"; its hyperparameter table leaves three Stable Diffusion values
free: global_batch_size (training.micro_batch_size x ranks x training.grad_accumulation_steps),
opt_base_learning_rate (optim.base_lr_per_sample) and opt_learning_rate_warmup_steps (optim.warmup_steps).

Where the schema default IS the reference value, FIXED reads it from `Config()` rather than restating the
number (REFERENCE.md; tests/config/test_config.py checks those defaults). The rest is written out: the frozen
checkpoint and the evaluation networks must be real files (null means random weights), the checkpoint's
sha256 is the reference's, and no synthetic data. FREE names what stays tunable; every config key is in
exactly one of the two (tests/config/test_closed_division.py), so a new key has to be classified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from typing import Any, NamedTuple

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from sd_mlperf.config.errors import ConfigError
from sd_mlperf.config.rcp import rcp_mismatch
from sd_mlperf.config.schema import Config
from sd_mlperf.utils.logging import log_once

FROZEN_CHECKPOINT_SHA256 = "d635794c1fedfdfa261e065370bea59c651fc9bfa65dc6d67ad29e11869a1824"
"""sha256 of 512-base-ema.ckpt, as the MLCommons reference pins it (REFERENCE.md, "Frozen parts")."""

# The rules, named as the error message quotes them (training_rules.adoc sections; the Stable Diffusion
# entries of its hyperparameter table and benchmark-specific rules).
MODEL = "training_rules.adoc, closed division: model architecture"
FROZEN_WEIGHTS = ("training_rules.adoc, closed division: weight initialization (the VAE and text encoder are the "
                  "reference's pre-trained 512-base-ema.ckpt)")
TRAINING_METHOD = "training_rules.adoc, closed division: training method and loss (the reference's noise schedule)"
DATA_SET = "training_rules.adoc, closed division: data set (the LAION-400M subset is the training set)"
PREPROCESSING = ("training_rules.adoc, closed division: the reference's preprocessing (VAE input in [0, 1], the "
                 "reference's known bug that the quality target was set with)")
IMAGE_SIZE = "training_rules.adoc, closed division: data representation (images of the reference's size)"
HYPERPARAMETERS = ("hyperparameter table: only global_batch_size, opt_base_learning_rate and "
                   "opt_learning_rate_warmup_steps are free")
EVAL_CADENCE = "Stable Diffusion benchmark rules: evaluation every 512,000 images"
TARGET = "Stable Diffusion benchmark rules: a passing score is FID <= 90 and CLIP >= 0.15"
EVAL_SET = ("training_rules.adoc, closed division: quality measure, at least as thorough as the reference's "
            "(all 30,000 prompts)")
SAMPLER = "training_rules.adoc, closed division: quality measure (the reference's DDIM sampler)"
EVAL_NETWORKS = ("training_rules.adoc, closed division: quality measure (the reference's FID InceptionV3 and "
                 "CLIP ViT-H-14 weights)")
FID_METHOD = ("training_rules.adoc, closed division: quality measure (the reference's scipy sqrtm; eigh is our "
              "faster deviation)")
EVAL_SEED = ("training_rules.adoc, random numbers: seeds are logged through mllog (the evaluation noise derives "
             "from the logged run seed)")


class Fixed(NamedTuple):
    """What the closed division allows for one key and the rule that says so."""

    value: Any
    """The reference value; ANY_PATH or a OneOf for the rules that are not one value."""
    rule: str


class _AnyPath:
    """Any path (the rules fix the file, which a config cannot check), but not null (random weights)."""

    def __repr__(self) -> str:
        return "a path (not null)"


ANY_PATH = _AnyPath()


class OneOf(tuple):
    """Any of these values."""

    def __repr__(self) -> str:
        return " or ".join(_show(v) for v in self)


_REFERENCE = Config()  # schema defaults = the MLPerf reference values (paths stay MISSING)


def _schema_defaults(section: str, rule: str, names: Sequence[str] = (),
                     skip: Sequence[str] = ()) -> dict[str, Fixed]:
    """{section.name: Fixed(schema default, rule)} for `names` (default: every field but `skip`)."""
    node = _REFERENCE
    for part in section.split("."):
        node = getattr(node, part)
    names = names or [f.name for f in fields(node) if f.name not in skip]
    table: dict[str, Fixed] = {}
    for name in names:
        value = getattr(node, name)
        assert not is_dataclass(value) and value != MISSING, f"{section}.{name} is a section or has no default"
        table[f"{section}.{name}"] = Fixed(list(value) if isinstance(value, list) else value, rule)
    return table


# UNet keys that choose how the same math runs (training_rules.adoc, graph execution: mathematically
# equivalent transformations and recomputation are allowed).
UNET_EXECUTION_KEYS = ("attention_backend", "norm_backend", "channels_last", "compile", "activation_checkpointing")

FIXED: dict[str, Fixed] = {
    **_schema_defaults("model.unet", MODEL, skip=UNET_EXECUTION_KEYS),
    **_schema_defaults("model.vae", MODEL),
    **_schema_defaults("model.text_encoder", MODEL),
    "model.frozen_checkpoint": Fixed(ANY_PATH, FROZEN_WEIGHTS),
    "model.frozen_checkpoint_sha256": Fixed(OneOf((None, FROZEN_CHECKPOINT_SHA256)), FROZEN_WEIGHTS),
    **_schema_defaults("diffusion", TRAINING_METHOD),
    **_schema_defaults("data", DATA_SET, ["synthetic_dir", "num_train_samples"]),
    **_schema_defaults("data", PREPROCESSING, ["image_range"]),
    **_schema_defaults("data", IMAGE_SIZE, ["image_size"]),
    **_schema_defaults("optim", HYPERPARAMETERS,
                       ["name", "beta1", "beta2", "eps", "weight_decay", "warmup_start_factor", "grad_clip_norm"]),
    **_schema_defaults("training", EVAL_CADENCE, ["checkpoint_every_samples"]),
    **_schema_defaults("training", TARGET, ["target_fid", "target_clip", "target_toy"]),
    **_schema_defaults("eval", EVAL_SET, ["num_prompts"]),
    **_schema_defaults("eval", SAMPLER, ["ddim_steps", "guidance_scale", "eta"]),
    "eval.inception_weights": Fixed(ANY_PATH, EVAL_NETWORKS),
    "eval.clip_weights": Fixed(ANY_PATH, EVAL_NETWORKS),
    **_schema_defaults("eval", EVAL_NETWORKS, ["clip_tiny"]),
    **_schema_defaults("eval", FID_METHOD, ["fid_method"]),
    **_schema_defaults("eval", EVAL_SEED, ["seed"]),
}
"""Every value the closed division fixes: dotted key -> (reference value, rule)."""

FREE_SECTIONS = ("run", "parallel", "checkpoint", "logging", "data.synthetic")
"""Whole sections the rules leave alone (data.synthetic is only read with data.synthetic_dir, which is fixed)."""
FREE = (
    *(f"model.unet.{k}" for k in UNET_EXECUTION_KEYS),
    # Where and how the training data is read; precomputed frozen-encoder outputs (moments, text
    # embeddings) are allowed preprocessing, as NVIDIA's submissions cache both.
    "data.train_format", "data.train_shards", "data.shuffle_buffer_samples", "data.num_workers", "data.pin_memory",
    "data.prefetch_factor", "data.decode_backend", "data.max_bad_fraction", "data.precompute_batch_size",
    # The three free hyperparameters (global batch = micro batch x ranks x accumulation).
    "optim.base_lr_per_sample", "optim.warmup_steps", "training.micro_batch_size", "training.grad_accumulation_steps",
    # Numerical formats, stop conditions, resume and how the step runs.
    "training.precision", "training.initial_loss_scale", "training.min_loss_scale", "training.loss_scale_window",
    "training.max_steps", "training.max_samples", "training.stop_at_target", "training.resume", "training.cuda_graph",
    # Evaluation inline or offline (the rules allow both), the reference files' paths, batching and precision.
    "eval.inline", "eval.prompts_file", "eval.fid_stats", "eval.batch_size", "eval.precision", "eval.num_grid_images",
)
"""Keys outside FREE_SECTIONS that the closed division leaves free."""


def _show(value: Any) -> str:
    """A value as the user would type it in YAML (ANY_PATH and OneOf describe themselves)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def _same(given: Any, ref: Any) -> bool:
    """Equal, floats to a relative 1e-12, lists element by element."""
    if isinstance(given, (list, tuple)) or isinstance(ref, (list, tuple)):
        return (isinstance(given, (list, tuple)) and isinstance(ref, (list, tuple)) and len(given) == len(ref)
                and all(_same(g, r) for g, r in zip(given, ref)))
    if isinstance(given, bool) or isinstance(ref, bool):
        return given is ref
    if isinstance(given, float) or isinstance(ref, float):
        numbers = isinstance(given, (int, float)) and isinstance(ref, (int, float))
        return numbers and math.isclose(given, ref, rel_tol=1e-12)
    return given == ref


def allows(fixed: Fixed, value: Any) -> bool:
    """Whether `value` is what the closed division allows for this entry."""
    if fixed.value is ANY_PATH:
        return value is not None
    if isinstance(fixed.value, OneOf):
        return any(_same(value, v) for v in fixed.value)
    return _same(value, fixed.value)


_UNSET = object()


def _lookup(cfg: Config | DictConfig, key: str) -> Any:
    """The value at a dotted key (lists as plain lists), or _UNSET where it is still MISSING."""
    *parents, leaf = key.split(".")
    node: Any = cfg
    for part in parents:
        node = getattr(node, part)
    if isinstance(node, DictConfig) and OmegaConf.is_missing(node, leaf):
        return _UNSET  # load_config reports unset keys; `sd-mlperf config` prints them
    value = getattr(node, leaf)
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return _UNSET if isinstance(value, str) and value == MISSING else value


def closed_division_violations(cfg: Config | DictConfig) -> list[str]:
    """One line per FIXED key whose value the closed division refuses (empty in the open division)."""
    if cfg.run.division != "closed":
        return []
    lines = []
    for key, fixed in FIXED.items():
        value = _lookup(cfg, key)
        if value is not _UNSET and not allows(fixed, value):
            lines.append(f"invalid value for '{key}': {_show(value)}; the MLPerf closed division fixes it to "
                         f"{_show(fixed.value)} ({fixed.rule}); "
                         "set run.division=open to change it")
    return lines


def check_closed_division(cfg: Config | DictConfig) -> None:
    """Raise ConfigError listing every value that differs from what the closed division fixes; warn (once) when
    the free hyperparameters match no RCP (`closed_division_rcp_mismatch`)."""
    lines = closed_division_violations(cfg)
    if lines:
        raise ConfigError(f"run.division=closed refuses {len(lines)} value(s) that the MLPerf rules fix:\n"
                          + "\n".join(f"  {line}." for line in lines))
    mismatch = closed_division_rcp_mismatch(cfg)
    if mismatch is not None:
        log_once(f"rcp-mismatch:{mismatch}", mismatch)


def closed_division_rcp_mismatch(cfg: Config | DictConfig) -> str | None:
    """In the closed division, why (global batch, optim.base_lr_per_sample, optim.warmup_steps) matches no RCP
    (sd_mlperf.config.rcp), naming the nearest; None when one matches, in the open division, or while unset."""
    if cfg.run.division != "closed":
        return None
    try:
        from sd_mlperf.config.load import global_batch_size  # load imports this module

        o = cfg.optim
        return rcp_mismatch(int(global_batch_size(cfg)), float(o.base_lr_per_sample), int(o.warmup_steps))
    except MissingMandatoryValue:
        return None  # load_config reports unset keys
