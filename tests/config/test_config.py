"""Config loading: defaults equal the reference, merge order, validation messages, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_mlperf.config import (
    Config,
    ConfigError,
    global_batch_size,
    learning_rate,
    load_config,
    merge_config,
    save_resolved_config,
    steps_between_checkpoints,
)
from sd_mlperf.config.load import missing_keys

REPO = Path(__file__).resolve().parents[2]
CONF_FILES = sorted((REPO / "conf").glob("*.yaml"))
SYSTEM_FILES = sorted((REPO / "conf" / "system").glob("*.yaml"))


def test_defaults_are_reference_values():
    cfg = Config()  # the schema's own defaults (paths stay MISSING)
    u = cfg.model.unet
    assert (u.model_channels, u.channel_mult, u.num_res_blocks, u.head_channels) == (320, [1, 2, 4, 4], 2, 64)
    assert (u.resblock_norm_groups, u.resblock_norm_eps) == (16, 1e-5)
    assert (u.transformer_norm_groups, u.transformer_norm_eps, u.context_dim) == (32, 1e-6, 1024)
    o = cfg.optim
    assert (o.beta1, o.beta2, o.eps, o.weight_decay) == (0.9, 0.999, 1e-8, 0.01)
    assert (o.base_lr_per_sample, o.warmup_steps, o.warmup_start_factor) == (1.25e-7, 1000, 1e-6)
    assert o.grad_clip_norm is None
    d = cfg.diffusion
    assert (d.num_timesteps, d.beta_start, d.beta_end) == (1000, 0.00085, 0.012)
    e = cfg.eval
    assert (e.num_prompts, e.ddim_steps, e.guidance_scale, e.eta) == (30000, 50, 8.0, 0.0)
    assert cfg.training.precision == "fp16" and cfg.training.checkpoint_every_samples == 512000
    # Lightning's precision=16 builds torch.cuda.amp.GradScaler() with its defaults.
    assert (cfg.training.initial_loss_scale, cfg.training.loss_scale_window) == (65536.0, 2000)
    assert (cfg.training.target_fid, cfg.training.target_clip) == (90.0, 0.15)
    assert cfg.model.vae.scale_factor == 0.18215 and cfg.data.shuffle_buffer_samples == 1000
    assert cfg.data.image_range == "zero_one"  # the reference's known bug, kept by default


@pytest.mark.parametrize("path", CONF_FILES, ids=lambda p: p.name)
def test_every_conf_file_loads_and_validates(path):
    cfg = load_config([path])
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("system", SYSTEM_FILES, ids=lambda p: p.name)
def test_benchmark_with_each_system_overlay(system):
    cfg = load_config([REPO / "conf" / "sd2_mlperf.yaml", system])
    assert global_batch_size(cfg) > 0


def test_merge_order_defaults_then_files_then_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("training:\n  max_steps: 5\n  micro_batch_size: 2\n")
    b.write_text("training:\n  max_steps: 7\n")
    cfg = merge_config([a, b], ["training.micro_batch_size=3"])
    assert cfg.training.max_steps == 7  # later file wins
    assert cfg.training.micro_batch_size == 3  # override wins over files
    assert cfg.training.precision == "fp16"  # untouched default


def test_bad_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"optim\.base_lr_per_sample.*Float"):
        merge_config([], ["optim.base_lr_per_sample=oops"])


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"model\.unet\.attention_backend.*'te', 'sdpa', 'math'"):
        merge_config([], ["model.unet.attention_backend=flash"])


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'training\.max_stpes'"):
        merge_config([], ["training.max_stpes=3"])


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        merge_config([], ["training.max_steps"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        merge_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        merge_config([bad])


def test_a_yaml_list_and_a_directory_are_named_as_such(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- training.max_steps=3\n")
    with pytest.raises(ConfigError, match=f"config file '{listing}' holds a list, not a mapping of config sections"):
        merge_config([listing])
    with pytest.raises(ConfigError, match=f"--config '{tmp_path}' is a directory, not a YAML file"):
        merge_config([tmp_path])


def test_missing_required_keys_are_listed():
    with pytest.raises(ConfigError, match=r"data\.train_shards.*eval\.prompts_file"):
        load_config([])
    assert "model.frozen_checkpoint" in missing_keys(merge_config())


# What the closed division refuses: tests/config/test_closed_division.py.


@pytest.mark.parametrize("override, key", [
    ("model.unet.resblock_norm_groups=7", "model.unet.resblock_norm_groups"),
    ("model.unet.attention_levels=[5]", "model.unet.attention_levels"),
    ("training.micro_batch_size=0", "training.micro_batch_size"),
    ("optim.warmup_start_factor=2.0", "optim.warmup_start_factor"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction"),
    ("eval.ddim_steps=5000", "eval.ddim_steps"),
    ("eval.ddim_steps=1000", "eval.ddim_steps"),  # divides T, but its last timestep, 1000, is past alphas_cumprod
    ("eval.ddim_steps=30", "eval.ddim_steps"),  # in range, but the reference's spacing would give 31 steps
    ("run.num_threads=0", "run.num_threads"),
    ("model.vae.channel_mult=[1,2,4]", "model.vae.channel_mult"),  # f=4: the data's 8x moments would not fit
    ("model.vae.embed_dim=8", "model.vae.embed_dim"),
    ("model.unet.in_channels=8", "model.unet.in_channels"),
])
def test_cross_field_validation_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([REPO / "conf" / "smoke.yaml"], [override])


def test_derived_quantities_follow_the_512000_image_rule():
    cfg = load_config([REPO / "conf" / "smoke.yaml"], [
        "parallel.num_nodes=32", "parallel.gpus_per_node=8", "training.micro_batch_size=2",
        "training.checkpoint_every_samples=512000"])
    assert global_batch_size(cfg) == 512
    assert learning_rate(cfg) == pytest.approx(6.4e-5)  # the reference's lr at GBS 512
    assert steps_between_checkpoints(cfg) == 1000
    cfg.training.micro_batch_size = 3  # GBS 768: 512000/768 = 666.7 -> 667
    assert steps_between_checkpoints(cfg) == 667


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config([REPO / "conf" / "smoke.yaml"], ["training.max_steps=3"])
    path = save_resolved_config(cfg, tmp_path / "run")
    again = load_config([path])
    assert again == cfg
    assert "${" not in path.read_text()  # interpolations resolved in the saved copy


def test_yaml11_bool_words_stay_strings_for_string_fields_and_work_for_bools():
    cfg = merge_config([], ["logging.progress_bar=on", "eval.inline=no", "model.unet.channels_last=yes"])
    assert cfg.logging.progress_bar == "on"
    assert cfg.eval.inline is False and cfg.model.unet.channels_last is True
