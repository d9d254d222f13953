"""The benchmark config resolves to the fast backends where their libraries are present, and says when it cannot.

The libraries' presence is stubbed (every probe of ROLES passes and torch "sees" CUDA), so these tests mean the
same on this CPU machine and in an NGC container: what `conf/sd2_mlperf.yaml` plus each system overlay asks for,
through the resolution a training run uses.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from deploy_helpers import REPO

from sd_mlperf import backends
from sd_mlperf.backends import ROLES, Probe, Resolution
from sd_mlperf.cli import main

BASE = REPO / "conf" / "sd2_mlperf.yaml"
SYSTEMS = sorted((REPO / "conf" / "system").glob("*.yaml"))


@pytest.fixture
def ngc_machine(monkeypatch):
    """Every fast library present and a CUDA device visible."""
    for _, table in ROLES.values():
        for name in list(table):
            monkeypatch.setitem(table, name, lambda: Probe(True))
    monkeypatch.setattr(backends, "cuda_available", lambda: True)


def _report(capsys, *argv):
    rc = main(["backends", "--json", *argv])
    return rc, {r["role"]: r for r in json.loads(capsys.readouterr().out)["backends"]}


@pytest.mark.parametrize("system", [None, *SYSTEMS], ids=lambda p: p.stem if p else "base")
def test_benchmark_config_resolves_to_every_fast_path(ngc_machine, capsys, system):
    configs = ["--config", str(BASE)] + (["--config", str(system)] if system else [])
    rc, rows = _report(capsys, "--fast", *configs)
    assert rc == 0, rows
    # Compiled: sdpa (cuDNN attention, traced into the graph) rather than te, which would break the graph.
    assert {role: r["chosen"] for role, r in rows.items()} == {"attention": "sdpa", "norm": "apex",
                                                               "parallel": "torch", "step": "graph",
                                                               "compile": "inductor"}
    assert "compile" in rows["attention"]["why"]
    assert "decode" not in rows  # cached latents: no image is decoded in training


@pytest.mark.parametrize(("override", "role", "reason"), [
    ("training.precision=fp32", "attention", "fp32 compute"),
    ("model.unet.channels_last=false", "norm", "channels_last=false"),
])
def test_fast_fails_when_the_config_rules_a_fast_path_out(ngc_machine, capsys, override, role, reason):
    rc, rows = _report(capsys, "--fast", "--config", str(BASE), override)
    assert rc == 1 and rows[role]["status"] == "error"
    assert "fell back to a slower twin" in rows[role]["why"] and reason in rows[role]["why"]


def test_fast_fails_on_cuda_when_compile_is_off(ngc_machine, capsys):
    rc, rows = _report(capsys, "--fast", "--config", str(BASE), "model.unet.compile=false")
    assert rc == 1 and rows["compile"]["status"] == "error" and "model.unet.compile=true" in rows["compile"]["why"]
    assert rows["attention"]["chosen"] == "te"  # eager: TE's fused attention is the fast path again
    rc, rows = _report(capsys, "--config", str(BASE), "model.unet.compile=false")  # without --fast: reported only
    assert rc == 0 and rows["compile"]["status"] == "ok"


def test_fast_fails_without_cuda_for_the_graph_and_the_libraries(capsys):
    rc, rows = _report(capsys, "--fast", "--config", str(BASE))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the stubbed tests above cover it")
    assert rc == 1 and rows["step"] == {**rows["step"], "chosen": "eager", "status": "error"}


def test_auto_parallel_with_a_cuda_graph_takes_torch_and_says_why(ngc_machine):
    from sd_mlperf.backends import config_unsuitable
    from sd_mlperf.config import load_config

    cfg = load_config([BASE], ["parallel.backend=auto"])
    res = backends.resolve_backend("parallel", "auto", unsuitable=config_unsuitable(cfg)["parallel"])
    assert res.name == "torch" and "found_inf" in res.why


def test_a_benchmark_run_on_a_gpu_warns_about_slow_twins(caplog):
    from sd_mlperf.config import load_config
    from sd_mlperf.training.build import _warn_slow_twins
    from sd_mlperf.utils.dist_info import DistInfo

    slow = Resolution("attention", "model.unet.attention_backend", "auto", "sdpa", "auto: te skipped (not installed)")
    fast = Resolution("norm", "model.unet.norm_backend", "auto", "apex", "auto: first choice available")
    named = Resolution("parallel", "parallel.backend", "torch", "torch", "requested")
    gpu = DistInfo(0, 1, 0, torch.device("cuda", 0), "none")
    with caplog.at_level(logging.WARNING, logger="sd_mlperf"):
        _warn_slow_twins(load_config([BASE]), gpu, [slow, fast, named])
        _warn_slow_twins(load_config([BASE]), DistInfo(0, 1, 0, torch.device("cpu"), "none"), [slow])
        _warn_slow_twins(load_config([BASE], ["run.division=open"]), gpu, [slow])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model.unet.attention_backend=sdpa" in warnings[0]
    assert "norm_backend" not in warnings[0] and "parallel.backend" not in warnings[0]
