"""Closed division = the rules: every fixed key is refused when changed, the free ones are not (config only)."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml

from sd_mlperf.config import Config, ConfigError, global_batch_size, learning_rate, load_config, merge_config, validate
from sd_mlperf.config.closed_division import (
    ANY_PATH,
    FIXED,
    FREE,
    FREE_SECTIONS,
    FROZEN_CHECKPOINT_SHA256,
    HYPERPARAMETERS,
    MODEL,
    Fixed,
    OneOf,
    allows,
    check_closed_division,
)
from sd_mlperf.training.mlperf_log import MLPerfLogger

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "conf" / "sd2_mlperf.yaml"
SMOKE = REPO / "conf" / "smoke.yaml"
SYSTEM_FILES = sorted((REPO / "conf" / "system").glob("*.yaml"))

# A value of the right type that the closed division refuses, for the keys whose reference is null.
NULL_REFERENCE_CHANGES = {"data.synthetic_dir": "/data/synthetic", "optim.grad_clip_norm": 1.0, "eval.seed": 1234}
STRING_CHANGES = {"zero_one": "minus1_1", "sqrtm": "eigh", "adamw": "sgd"}


def _changed(key: str):
    """A value for `key` that differs from what the closed division allows."""
    ref = FIXED[key].value
    if ref is ANY_PATH:
        return None  # random weights
    if isinstance(ref, OneOf):
        return "0" * 64  # another file's sha256
    if ref is None:
        return NULL_REFERENCE_CHANGES[key]
    if isinstance(ref, bool):
        return not ref
    if isinstance(ref, int):
        return ref + 1
    if isinstance(ref, float):
        return ref * 2 if ref else 0.5
    if isinstance(ref, list):
        return [*ref, ref[-1]]
    if isinstance(ref, dict):
        return {**ref, "toy_background_acc": 0.5}  # training.target_toy: no toy target in the closed division
    return STRING_CHANGES[ref]


def _set(cfg: Config, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, value)


def _leaf_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(node):
        value = getattr(node, f.name)
        keys += _leaf_keys(value, f"{prefix}{f.name}.") if is_dataclass(value) else [f"{prefix}{f.name}"]
    return keys


@pytest.fixture(scope="module")
def benchmark() -> Config:
    return load_config([BASE])


def test_benchmark_config_is_closed_and_passes(benchmark):
    assert benchmark.run.division == "closed"
    check_closed_division(benchmark)


@pytest.mark.parametrize("system", SYSTEM_FILES, ids=lambda p: p.stem)
def test_benchmark_with_each_system_overlay_passes_as_closed(system):
    cfg = load_config([BASE, system])
    assert cfg.run.division == "closed"


@pytest.mark.parametrize("key", sorted(FIXED))
def test_changing_a_fixed_key_is_refused_with_key_values_rule_and_fix(benchmark, key):
    cfg = copy.deepcopy(benchmark)
    value = _changed(key)
    _set(cfg, key, value)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    lines = [line for line in str(info.value).splitlines() if f"'{key}'" in line]
    assert len(lines) == 1, str(info.value)  # the only violation, on a line of its own
    line = lines[0]
    assert "closed division" in line and "set run.division=open to change it" in line
    assert FIXED[key].rule in line
    shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    assert f"'{key}': {shown};" in line
    ref = FIXED[key].value
    assert (repr(ref) if ref is ANY_PATH or isinstance(ref, OneOf) else "null" if ref is None
            else str(ref).lower() if isinstance(ref, bool) else repr(ref)) in line


@pytest.mark.parametrize("override, key, rule", [
    ("model.unet.model_channels=256", "model.unet.model_channels", MODEL),
    ("model.unet.channel_mult=[1,2,4]", "model.unet.channel_mult", MODEL),
    ("model.vae.scale_factor=0.13025", "model.vae.scale_factor", MODEL),
    ("model.text_encoder.skip_last_layers=0", "model.text_encoder.skip_last_layers", MODEL),
    ("model.frozen_checkpoint=null", "model.frozen_checkpoint", "weight initialization"),
    ("model.frozen_checkpoint_sha256=abc", "model.frozen_checkpoint_sha256", "weight initialization"),
    ("diffusion.beta_end=0.02", "diffusion.beta_end", "noise schedule"),
    ("data.synthetic_dir=/tmp/synthetic", "data.synthetic_dir", "LAION-400M"),
    ("data.num_train_samples=1000", "data.num_train_samples", "LAION-400M"),
    ("data.image_range=minus1_1", "data.image_range", "preprocessing"),
    ("data.image_size=256", "data.image_size", "data representation"),
    ("optim.weight_decay=0.1", "optim.weight_decay", HYPERPARAMETERS),
    ("optim.warmup_start_factor=0.01", "optim.warmup_start_factor", HYPERPARAMETERS),
    ("optim.grad_clip_norm=1.0", "optim.grad_clip_norm", HYPERPARAMETERS),
    ("training.checkpoint_every_samples=256000", "training.checkpoint_every_samples", "every 512,000 images"),
    ("training.target_fid=100", "training.target_fid", "FID <= 90"),
    ("training.target_clip=0.1", "training.target_clip", "CLIP >= 0.15"),
    ("eval.num_prompts=10000", "eval.num_prompts", "30,000 prompts"),
    ("eval.guidance_scale=7.5", "eval.guidance_scale", "DDIM sampler"),
    ("eval.inception_weights=null", "eval.inception_weights", "FID InceptionV3"),
    ("eval.clip_tiny=true", "eval.clip_tiny", "CLIP ViT-H-14"),
    ("eval.fid_method=eigh", "eval.fid_method", "sqrtm"),
    ("eval.seed=7", "eval.seed", "logged run seed"),
])
def test_cli_override_of_each_family_is_refused(override, key, rule):
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}'.*closed division.*{re.escape(rule)}.*"
                                          r"run\.division=open"):
        load_config([BASE], [override])
    load_config([BASE], [override, "run.division=open"])


def test_every_violation_is_listed_in_one_message():
    with pytest.raises(ConfigError) as info:
        load_config([SMOKE], ["run.division=closed"])
    message = str(info.value)
    listed = re.findall(r"invalid value for '([\w.]+)'", message)
    assert len(listed) == len(set(listed)) >= 20
    assert f"refuses {len(listed)} value(s)" in message.splitlines()[0]
    for key in ("model.unet.model_channels", "model.frozen_checkpoint", "data.synthetic_dir", "eval.clip_tiny"):
        assert key in listed


def test_floats_compare_to_a_relative_1e_12(benchmark):
    cfg = copy.deepcopy(benchmark)
    cfg.optim.beta2 = 0.999 * (1 + 1e-14)
    cfg.eval.guidance_scale = 8  # an int where the schema says float
    check_closed_division(cfg)
    for rel in (1e-9, 1e-10):  # 1e-10: inside math.isclose's default 1e-9, outside our 1e-12
        cfg.optim.beta2 = 0.999 * (1 + rel)
        with pytest.raises(ConfigError, match=r"optim\.beta2"):
            check_closed_division(cfg)


def test_values_compare_by_type_as_yaml_writes_them():
    """A bool is not the number 1; an int reference accepts a float within 1e-12; a list is never a scalar."""
    assert not allows(Fixed(1, MODEL), True) and not allows(Fixed(True, MODEL), 1)
    assert allows(Fixed(1, MODEL), 1.0 + 1e-13) and not allows(Fixed(1, MODEL), 1.0 + 1e-10)
    assert not allows(Fixed([1], MODEL), 1) and not allows(Fixed(1, MODEL), [1])
    assert allows(Fixed([1, 2], MODEL), (1, 2)) and not allows(Fixed([1, 2], MODEL), [1, 2, 3])


def test_messages_show_values_as_yaml_and_name_the_rule_and_fix(benchmark):
    """The exact text a user sees for the rules that are not one value: a path, and null or the pinned sha256."""
    cfg = copy.deepcopy(benchmark)
    cfg.eval.inception_weights = None
    cfg.model.frozen_checkpoint_sha256 = "0" * 64
    cfg.data.image_range = "minus1_1"
    with pytest.raises(ConfigError) as info:
        check_closed_division(cfg)
    lines = str(info.value).splitlines()
    assert lines[0] == "run.division=closed refuses 3 value(s) that the MLPerf rules fix:"
    assert (f"  invalid value for 'model.frozen_checkpoint_sha256': '{'0' * 64}'; the MLPerf closed division fixes "
            f"it to null or '{FROZEN_CHECKPOINT_SHA256}' (training_rules.adoc, closed division: weight "
            "initialization (the VAE and text encoder are the reference's pre-trained 512-base-ema.ckpt)); set "
            "run.division=open to change it.") in lines
    assert ("  invalid value for 'eval.inception_weights': null; the MLPerf closed division fixes it to a path "
            "(not null) (training_rules.adoc, closed division: quality measure (the reference's FID InceptionV3 "
            "and CLIP ViT-H-14 weights)); set run.division=open to change it.") in lines
    assert ("  invalid value for 'data.image_range': 'minus1_1'; the MLPerf closed division fixes it to 'zero_one' "
            "(training_rules.adoc, closed division: the reference's preprocessing (VAE input in [0, 1], the "
            "reference's known bug that the quality target was set with)); set run.division=open to change it."
            ) in lines


def test_the_reference_sha256_and_null_pass(benchmark):
    assert benchmark.model.frozen_checkpoint_sha256 == FROZEN_CHECKPOINT_SHA256  # conf/sd2_mlperf.yaml pins it
    load_config([BASE], ["model.frozen_checkpoint_sha256=null"])  # no verification is allowed


@pytest.mark.parametrize("overrides", [
    ["training.micro_batch_size=32"],                                          # global batch
    ["parallel.num_nodes=4", "parallel.gpus_per_node=8"],                      # global batch
    ["training.grad_accumulation_steps=2"],                                    # global batch
    ["optim.base_lr_per_sample=2.5e-7"],                                       # opt_base_learning_rate
    ["optim.warmup_steps=500"],                                                # opt_learning_rate_warmup_steps
    ["optim.warmup_steps=0", "optim.base_lr_per_sample=1e-6", "training.micro_batch_size=16",
     "training.grad_accumulation_steps=4"],
])
def test_the_three_free_hyperparameters_change_freely(overrides):
    cfg = load_config([BASE, REPO / "conf" / "system" / "01x08x08.yaml"], overrides)
    assert cfg.run.division == "closed"
    gbs = cfg.training.micro_batch_size * cfg.parallel.num_nodes * cfg.parallel.gpus_per_node \
        * cfg.training.grad_accumulation_steps
    assert global_batch_size(cfg) == gbs
    assert learning_rate(cfg) == cfg.optim.base_lr_per_sample * gbs


def test_the_free_hyperparameters_are_logged_under_their_mlperf_keys(tmp_path):
    cfg = load_config([BASE, REPO / "conf" / "system" / "01x08x08.yaml"], [
        "training.micro_batch_size=16", "training.grad_accumulation_steps=2", "optim.base_lr_per_sample=2e-7",
        "optim.warmup_steps=250", "run.seed=1"])
    log = MLPerfLogger(tmp_path / "mlperf.log")
    # The arguments the trainer passes (training/build.py: plan.global_batch_size is global_batch_size(cfg)).
    log.hyperparameters(cfg, global_batch_size=global_batch_size(cfg))
    log.close()
    events = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in (tmp_path / "mlperf.log").read_text().splitlines()
              if ":::MLLOG" in line]
    logged = {e["key"]: e["value"] for e in events}
    assert logged["global_batch_size"] == 16 * 8 * 2 and logged["gradient_accumulation_steps"] == 2
    # The lr after warmup (per-sample base x global batch), as the reference and every v5.0 submission log it.
    assert logged["opt_base_learning_rate"] == pytest.approx(2e-7 * 16 * 8 * 2, rel=1e-12)
    assert logged["opt_learning_rate_warmup_steps"] == 250


def test_execution_choices_stay_free_in_closed_division():
    load_config([BASE], [
        "model.unet.attention_backend=sdpa", "model.unet.norm_backend=torch", "model.unet.channels_last=true",
        "model.unet.compile=true", "model.unet.activation_checkpointing=true", "training.precision=bf16",
        "training.cuda_graph=true", "training.stop_at_target=false", "training.max_steps=10",
        "data.train_format=moments_embeddings", "data.shuffle_buffer_samples=5000", "data.num_workers=8",
        "data.decode_backend=pil", "eval.inline=false", "eval.batch_size=32", "eval.precision=bf16",
        "run.seed=1234", "parallel.backend=torch"])


def test_open_division_allows_every_fixed_key_changed_at_once(benchmark):
    cfg = copy.deepcopy(benchmark)
    for key in FIXED:
        _set(cfg, key, _changed(key))
    with pytest.raises(ConfigError, match=rf"refuses {len(FIXED)} value\(s\)"):
        check_closed_division(cfg)
    cfg.run.division = "open"
    check_closed_division(cfg)


def test_open_division_loads_the_benchmark_with_open_only_changes():
    cfg = load_config([BASE], [
        "run.division=open", "data.image_range=minus1_1", "optim.grad_clip_norm=1.0", "optim.weight_decay=0.1",
        "eval.fid_method=eigh", "eval.num_prompts=1000", "model.frozen_checkpoint=null", "eval.clip_tiny=true"])
    assert (cfg.data.image_range, cfg.optim.weight_decay, cfg.eval.num_prompts) == ("minus1_1", 0.1, 1000)


def test_smoke_config_says_open():
    assert yaml.safe_load(SMOKE.read_text())["run"]["division"] == "open"
    load_config([SMOKE])


def test_unset_paths_are_left_to_the_missing_key_report():
    validate(merge_config())  # `sd-mlperf config` with no files: closed, frozen checkpoint etc. still ???
    validate(Config())


def test_every_config_key_is_fixed_or_free_and_not_both():
    keys = _leaf_keys(Config())
    in_free_section = {k for k in keys if any(k.startswith(f"{s}.") for s in FREE_SECTIONS)}
    free = in_free_section | set(FREE)
    assert not set(FIXED) & free, "a key is both fixed and free"
    assert set(FREE) <= set(keys) and set(FIXED) <= set(keys), "the tables name a key the schema lacks"
    unclassified = sorted(set(keys) - set(FIXED) - free)
    assert not unclassified, f"classify these keys in sd_mlperf/config/closed_division.py (FIXED or FREE): " \
                             f"{unclassified}"


def test_fixed_values_are_the_schema_defaults_where_the_default_is_the_reference():
    reference = Config()
    for key, fixed in FIXED.items():
        if fixed.value is ANY_PATH or isinstance(fixed.value, OneOf):
            continue
        node = reference
        for part in key.split("."):
            node = getattr(node, part)
        assert node == fixed.value, key
    assert FIXED["model.unet.model_channels"].value == 320 and FIXED["optim.weight_decay"].value == 0.01
    assert FIXED["training.checkpoint_every_samples"].value == 512000 and FIXED["eval.num_prompts"].value == 30000


def test_a_closed_config_that_matches_no_rcp_is_warned_naming_the_nearest(caplog):
    from sd_mlperf.config.closed_division import closed_division_rcp_mismatch
    from sd_mlperf.utils.logging import reset_log_once

    system = REPO / "conf" / "system"
    assert closed_division_rcp_mismatch(load_config([BASE, system / "01x08x32.yaml"])) is None
    off = load_config([BASE, system / "01x08x32.yaml"], ["optim.base_lr_per_sample=1.25e-7"])
    message = closed_division_rcp_mismatch(off)
    assert "sd_ref_256" in message and "optim.base_lr_per_sample=2.8e-07" in message
    warm = closed_division_rcp_mismatch(load_config([BASE, system / "01x08x32.yaml"], ["optim.warmup_steps=500"]))
    assert "sd_ref_256" in warm and "optim.warmup_steps=1000" in warm
    assert "sd_ref_1024" in closed_division_rcp_mismatch(load_config([BASE], ["training.micro_batch_size=1000"]))
    assert closed_division_rcp_mismatch(load_config([BASE, system / "01x08x32.yaml"], [
        "run.division=open", "optim.base_lr_per_sample=1e-6"])) is None
    reset_log_once()
    import logging

    from sd_mlperf.utils.logging import logger
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="sd_mlperf"):
            load_config([BASE, system / "01x08x32.yaml"], ["optim.base_lr_per_sample=1.25e-7"])
    finally:
        logger.removeHandler(caplog.handler)
    assert any("matches no RCP" in r.getMessage() and "sd_ref_256" in r.getMessage() for r in caplog.records)


def test_the_rcp_check_multiplies_every_factor_of_the_global_batch():
    from sd_mlperf.config.closed_division import closed_division_rcp_mismatch

    # 32 x 4 nodes x 4 GPUs x 2 accumulation steps = 1024, sd_ref_1024's batch (a quotient gives 256 or 64).
    assert closed_division_rcp_mismatch(load_config([BASE], [
        "training.micro_batch_size=32", "parallel.num_nodes=4", "parallel.gpus_per_node=4",
        "training.grad_accumulation_steps=2"])) is None


def test_each_distinct_rcp_mismatch_is_warned_once(caplog):
    import logging

    from sd_mlperf.utils.logging import logger, reset_log_once

    system = REPO / "conf" / "system" / "01x08x32.yaml"
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # each record once, however the logger propagates
    reset_log_once()
    logger.addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, logger="sd_mlperf"):
            for overrides in (["optim.base_lr_per_sample=1.25e-7"], ["optim.warmup_steps=500"],
                              ["optim.base_lr_per_sample=1.25e-7"]):
                load_config([BASE, system], overrides)
    finally:
        logger.removeHandler(handler)
    warned = [r.getMessage() for r in records if "matches no RCP" in r.getMessage()]
    assert len(warned) == 2 and "base_lr_per_sample=2.8e-07" in warned[0] and "warmup_steps=1000" in warned[1]


def test_schema_default_rows_are_built_per_field():
    """FIXED's builder, called here so that a bug in it shows in a test (FIXED itself is built at import)."""
    from sd_mlperf.config.closed_division import SAMPLER, UNET_EXECUTION_KEYS, _schema_defaults

    assert _schema_defaults("eval", SAMPLER, ["ddim_steps", "guidance_scale", "eta"]) == {
        "eval.ddim_steps": (50, SAMPLER), "eval.guidance_scale": (8.0, SAMPLER), "eval.eta": (0.0, SAMPLER)}
    unet = _schema_defaults("model.unet", MODEL, skip=UNET_EXECUTION_KEYS)
    assert not {f"model.unet.{k}" for k in UNET_EXECUTION_KEYS} & set(unet)
    assert unet["model.unet.channel_mult"] == Fixed([1, 2, 4, 4], MODEL)
    assert type(unet["model.unet.channel_mult"].value) is list and unet["model.unet.num_res_blocks"].value == 2
    assert len(unet) == len(fields(Config().model.unet)) - len(UNET_EXECUTION_KEYS)
    with pytest.raises(AssertionError, match=r"^model\.unet is a section or has no default$"):
        _schema_defaults("model", MODEL, ["unet"])
    with pytest.raises(AssertionError, match=r"^model\.frozen_checkpoint is a section or has no default$"):
        _schema_defaults("model", MODEL, ["frozen_checkpoint"])


def test_interpolated_list_values_are_compared_resolved(benchmark):
    """A list written with ${...} references is checked by its resolved value, as the run would use it."""
    cfg = merge_config([BASE])
    cfg.model.unet.channel_mult = [1, "${model.unet.num_res_blocks}", 4, 4]  # num_res_blocks = 2: the reference
    check_closed_division(cfg)
    cfg.model.unet.channel_mult = [1, "${model.unet.num_res_blocks}", "${model.unet.num_res_blocks}", 4]
    with pytest.raises(ConfigError, match=r"invalid value for 'model\.unet\.channel_mult': \[1, 2, 2, 4\]"):
        check_closed_division(cfg)
