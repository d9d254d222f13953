"""Config loading: schema defaults < each --config YAML in order < dotted CLI overrides.

Errors name the dotted key the user would type, the bad value and what is allowed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from sd_mlperf.config.closed_division import check_closed_division
from sd_mlperf.config.errors import ConfigError
from sd_mlperf.config.schema import Config, OptimConfig, VAEConfig
from sd_mlperf.utils.files import atomic_write_text
from sd_mlperf.utils.seeds import derive_seed

_YAML11_BOOL_WORDS = {"on", "off", "yes", "no", "y", "n"}


def _describe(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).split("\n")[0].strip()
    if isinstance(exc, ConfigKeyError):
        return ConfigError(f"{source}: unknown config key '{key}' ({msg}). Run `sd-mlperf config` to list valid keys.")
    if isinstance(exc, MissingMandatoryValue):
        return ConfigError(f"{source}: config key '{key}' is required but not set. "
                           f"Set it in a YAML file or as {key}=VALUE.")
    return ConfigError(f"{source}: invalid value for '{key}': {msg}. "
                       f"Fix it in the YAML file or override it as {key}=VALUE.")


def merge_config(config_files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge schema defaults, YAML files in order, then dotted overrides; type-check every value."""
    cfg = OmegaConf.structured(Config)
    for path in config_files:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"--config '{path}' is a directory, not a YAML file: name the file, e.g. "
                              f"{path / 'config.yaml'} (a run directory's config) or conf/smoke.yaml.")
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist (given with --config).")
        try:
            layer = OmegaConf.load(path)
        except Exception as exc:  # yaml errors come in several types
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
        if not isinstance(layer, DictConfig):
            kind = "a list" if OmegaConf.is_list(layer) else f"a {type(layer).__name__}"
            raise ConfigError(f"config file '{path}' holds {kind}, not a mapping of config sections (run:, model:, "
                              "training:, ...): see conf/smoke.yaml for the layout.")
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise _describe(exc, f"config file '{path}'") from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value (e.g. training.max_steps=10).")
        key, value = item.split("=", 1)
        if value.lower() in _YAML11_BOOL_WORDS:
            # YAML 1.1 reads on/off/yes/no as booleans; keep them strings so `logging.progress_bar=on`
            # works. Boolean fields still accept these strings (omegaconf converts them).
            item = f"{key}='{value}'"
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _describe(exc, f"override '{item}'") from exc
    return cfg  # type: ignore[return-value]


def missing_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys whose value is still MISSING ('???')."""
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for key in node:
            dotted = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                found.append(dotted)
            elif isinstance(node[key], DictConfig):
                walk(node[key], dotted + ".")

    walk(cfg, "")
    return found


def load_config(config_files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()) -> Config:
    """Load a complete, validated config; every MISSING key must have been set."""
    merged = merge_config(config_files, overrides)
    missing = missing_keys(merged)
    if missing:
        raise ConfigError(
            "these config keys are required but not set: "
            + ", ".join(missing)
            + ". Set them in a YAML file or as KEY=VALUE overrides (null is allowed where the schema says so)."
        )
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _describe(exc, "config") from exc
    validate(cfg)
    return cfg


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"invalid value for '{key}': {value!r}; {allowed}.")


def validate(cfg: Config | DictConfig) -> None:
    """Cross-field checks that single types cannot express. Works on a Config or a merged DictConfig."""
    check_closed_division(cfg)  # first: a closed-division user learns that a key is fixed, not how to fix its value
    threads = cfg.run.num_threads
    _check(threads is None or threads > 0, "run.num_threads", threads, "must be positive or null")
    u = cfg.model.unet
    _check(u.model_channels > 0, "model.unet.model_channels", u.model_channels, "must be positive")
    _check(len(u.channel_mult) > 0, "model.unet.channel_mult", list(u.channel_mult), "needs at least one level")
    for lvl in u.attention_levels:
        _check(0 <= lvl < len(u.channel_mult), "model.unet.attention_levels", list(u.attention_levels),
               f"each level must be in 0..{len(u.channel_mult) - 1}")
    for mult in u.channel_mult:
        ch = u.model_channels * mult
        _check(ch % u.resblock_norm_groups == 0, "model.unet.resblock_norm_groups", u.resblock_norm_groups,
               f"must divide every level's channels ({ch})")
        _check(ch % u.transformer_norm_groups == 0, "model.unet.transformer_norm_groups", u.transformer_norm_groups,
               f"must divide every level's channels ({ch})")
        _check(ch % u.head_channels == 0, "model.unet.head_channels", u.head_channels,
               f"must divide every level's channels ({ch})")
    v = cfg.model.vae
    # The data formats store VAE moments as (8, image_size/8, image_size/8): the SD VAE's f=8 and 4 latent
    # channels (data/laion.py), which the UNet's input and output match.
    _check(len(v.channel_mult) == 4, "model.vae.channel_mult", list(v.channel_mult),
           "needs 4 levels (3 downsamplings, f=8), the latent shape the data formats and UNet are built for")
    _check(v.embed_dim == 4, "model.vae.embed_dim", v.embed_dim, "must be 4 (moments of 8 channels in the data)")
    for key in ("in_channels", "out_channels"):
        _check(getattr(u, key) == v.embed_dim, f"model.unet.{key}", getattr(u, key),
               f"must equal model.vae.embed_dim={v.embed_dim} (the UNet denoises VAE latents)")
    for mult in v.channel_mult:
        _check((v.base_channels * mult) % v.norm_groups == 0, "model.vae.norm_groups", v.norm_groups,
               f"must divide every level's channels ({v.base_channels * mult})")
    t = cfg.model.text_encoder
    _check(t.width % t.num_heads == 0, "model.text_encoder.num_heads", t.num_heads, f"must divide width {t.width}")
    _check(0 <= t.skip_last_layers < t.num_layers, "model.text_encoder.skip_last_layers", t.skip_last_layers,
           f"must be in 0..{t.num_layers - 1}")

    tr = cfg.training
    for key in ("micro_batch_size", "grad_accumulation_steps", "checkpoint_every_samples", "loss_scale_window"):
        _check(getattr(tr, key) > 0, f"training.{key}", getattr(tr, key), "must be positive")
    _check(tr.initial_loss_scale >= tr.min_loss_scale > 0, "training.initial_loss_scale", tr.initial_loss_scale,
           "must be >= training.min_loss_scale > 0")
    for key in ("max_steps", "max_samples"):
        val = getattr(tr, key)
        _check(val is None or val > 0, f"training.{key}", val, "must be positive or null")
    p = cfg.parallel
    _check(p.num_nodes > 0, "parallel.num_nodes", p.num_nodes, "must be positive")
    _check(p.gpus_per_node > 0, "parallel.gpus_per_node", p.gpus_per_node, "must be positive")

    o = cfg.optim
    _check(o.base_lr_per_sample > 0, "optim.base_lr_per_sample", o.base_lr_per_sample, "must be a positive float")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(0 < o.warmup_start_factor <= 1, "optim.warmup_start_factor", o.warmup_start_factor, "must be in (0, 1]")
    _check(o.grad_clip_norm is None or o.grad_clip_norm > 0, "optim.grad_clip_norm", o.grad_clip_norm,
           "must be positive or null")

    d = cfg.data
    _check(0 <= d.max_bad_fraction < 1, "data.max_bad_fraction", d.max_bad_fraction, "must be in [0, 1)")
    _check(d.synthetic.fit_vae_steps >= 0, "data.synthetic.fit_vae_steps", d.synthetic.fit_vae_steps, "must be >= 0")
    if d.synthetic.fit_vae_steps > 0:
        _check_toy_vae_path(cfg)
    _check(d.image_size % 8 == 0, "data.image_size", d.image_size, "must be a multiple of 8 (VAE factor)")
    e = cfg.eval
    _check(e.num_prompts > 0, "eval.num_prompts", e.num_prompts, "must be positive")
    # The reference's uniform DDIM spacing yields another number of steps unless ddim_steps divides T, and
    # indexes past alphas_cumprod for ddim_steps = T (its last timestep is T).
    _check(0 < e.ddim_steps < cfg.diffusion.num_timesteps and cfg.diffusion.num_timesteps % e.ddim_steps == 0,
           "eval.ddim_steps", e.ddim_steps, f"must divide diffusion.num_timesteps={cfg.diffusion.num_timesteps} "
           "and be smaller (the reference uses 50)")
    _check(e.batch_size > 0, "eval.batch_size", e.batch_size, "must be positive")
    _check(cfg.checkpoint.keep_last > 0, "checkpoint.keep_last", cfg.checkpoint.keep_last, "must be positive")


def _check_toy_vae_path(cfg: Config | DictConfig) -> None:
    """data.synthetic.fit_vae_steps writes model.frozen_checkpoint: only a .safetensors file in data.synthetic_dir."""
    try:
        root, path = cfg.data.synthetic_dir, cfg.model.frozen_checkpoint
    except MissingMandatoryValue:
        return  # reported as an unset key by load_config
    ok = (root is not None and path is not None and Path(path).suffix == ".safetensors"
          and Path(root).resolve() in Path(path).resolve().parents)
    _check(ok, "model.frozen_checkpoint", path, "with data.synthetic.fit_vae_steps > 0 the fitted toy VAE is written "
           f"there, so it must be a .safetensors path inside data.synthetic_dir ({root}), e.g. "
           "${data.synthetic_dir}/toy_frozen.safetensors")


def world_size(cfg: Config) -> int:
    """Configured number of data-parallel processes."""
    return cfg.parallel.num_nodes * cfg.parallel.gpus_per_node


def global_batch_size(cfg: Config) -> int:
    """Images per optimizer step over all ranks."""
    return cfg.training.micro_batch_size * world_size(cfg) * cfg.training.grad_accumulation_steps


def peak_learning_rate(optim: OptimConfig, global_batch: int) -> float:
    """Peak learning rate: base per-sample lr x global batch (REFERENCE.md; 6.4e-5 at GBS 512)."""
    return optim.base_lr_per_sample * global_batch


def learning_rate(cfg: Config) -> float:
    """The run's peak learning rate (`peak_learning_rate` at its global batch)."""
    return peak_learning_rate(cfg.optim, global_batch_size(cfg))


def vae_downsample_factor(vae: VAEConfig) -> int:
    """Pixels per latent along a side: 2 per downsampling level of the VAE (8 for SD2's four levels)."""
    return 2 ** (len(vae.channel_mult) - 1)


def latent_size(cfg: Config) -> int:
    """Side of the latents: data.image_size over the VAE factor (64 for SD2's 512 px)."""
    return cfg.data.image_size // vae_downsample_factor(cfg.model.vae)


def uses_loss_scaling(precision: str) -> bool:
    """fp16 trains with dynamic loss scaling; fp32 and bf16 do not (their range holds the gradients)."""
    return precision == "fp16"


def evaluation_seed(cfg: Config) -> int:
    """Seed of the evaluation noise: eval.seed, or one derived from the run's (logged) seed."""
    if cfg.eval.seed is not None:
        return cfg.eval.seed
    if cfg.run.seed is None:
        raise ValueError("run.seed is null and the run's drawn seed is not known here: evaluate a run directory "
                         "(its config.yaml records the seed), or set run.seed or eval.seed")
    # A stream of its own: [seed, rank] keys (parallel.distributed.rank_seed) never reach 2**32.
    return derive_seed(cfg.run.seed, 2**32 + 1)


def steps_between_checkpoints(cfg: Config) -> int:
    """CEIL(checkpoint_every_samples / global batch): the MLPerf evaluation cadence."""
    return math.ceil(cfg.training.checkpoint_every_samples / global_batch_size(cfg))


def config_to_yaml(cfg: Config | DictConfig) -> str:
    """The config as YAML (MISSING values print as ???)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(node, resolve=not missing_keys(node))


RUN_CONFIG_FILE = "config.yaml"
"""The resolved config every run saves in its run directory (and evaluation, reports and packaging read back)."""


def run_directory(cfg: Config) -> Path:
    """The run directory: run.output_dir / run.name."""
    return Path(cfg.run.output_dir) / cfg.run.name


def save_resolved_config(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config into the run directory (atomically) and return its path."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    atomic_write_text(path, config_to_yaml(cfg))
    return path
