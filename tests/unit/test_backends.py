"""Backend registry: auto picks the first available, named ones fail loudly with the fix."""

from __future__ import annotations

import sys

import pytest
import torch

from sd_mlperf import backends
from sd_mlperf.backends import Probe, attention_unsuitable, resolve_backend, summarize
from tests.unit.stand_ins import APEX_EXTENSIONS, fake_apex_site, write_fake_apex


@pytest.fixture
def apex_site(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    yield from fake_apex_site(tmp_path, monkeypatch)


def test_every_role_ends_with_an_always_available_reference():
    for role in backends.ROLES:
        reference = backends.backend_names(role)[-1]
        assert backends.ROLES[role][1][reference]().ok


def test_auto_on_cpu_takes_plain_pytorch_twins_and_says_why(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    att = resolve_backend("attention", "auto")
    assert att.name == "sdpa"
    assert "te skipped" in att.why
    assert resolve_backend("norm", "auto").name == "torch"
    assert resolve_backend("parallel", "auto").name == "torch"
    assert resolve_backend("decode", "auto").name == "pil"
    line = summarize([att])
    assert line.startswith("backends: attention=sdpa")


def test_auto_prefers_fast_backend_when_available(monkeypatch):
    key, table = backends.ROLES["attention"]
    monkeypatch.setitem(backends.ROLES, "attention", (key, {**table, "te": lambda: Probe(True)}))
    assert resolve_backend("attention", "auto").name == "te"


def test_named_unavailable_backend_error_names_key_reason_and_fix(monkeypatch):
    monkeypatch.setattr(backends, "package_available", lambda name: False)
    with pytest.raises(RuntimeError) as info:
        resolve_backend("attention", "te")
    msg = str(info.value)
    assert "model.unet.attention_backend=te" in msg
    assert "transformer_engine is not installed" in msg
    assert "model.unet.attention_backend=math" in msg  # the reference twin as the fix


def test_named_gpu_backend_without_cuda(monkeypatch):
    monkeypatch.setattr(backends, "package_available", lambda name: True)
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_backend("parallel", "mcore")


def test_dali_cpu_variant_only_when_allowed(monkeypatch):
    monkeypatch.setattr(backends, "package_available", lambda name: True)
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    res = resolve_backend("decode", "dali", allow_cpu_variant=True)
    assert res.name == "dali" and "CPU variant" in res.why
    with pytest.raises(RuntimeError):
        resolve_backend("decode", "dali")


def test_unsuitable_names_are_skipped_by_auto_and_refused_by_name(monkeypatch):
    key, table = backends.ROLES["attention"]
    monkeypatch.setitem(backends.ROLES, "attention", (key, {**table, "te": lambda: Probe(True)}))
    fp32 = attention_unsuitable({"training.precision": "fp16", "eval.precision": "fp32"})
    res = resolve_backend("attention", "auto", unsuitable=fp32)
    assert (res.name, res.why) == ("sdpa", "auto: te skipped (fp32 compute: TE's fused kernels need fp16/bf16)")
    assert resolve_backend("attention", "auto", unsuitable=attention_unsuitable({"training.precision": "bf16"})
                           ).name == "te"
    assert attention_unsuitable(None) == {}  # not stated: nothing ruled out
    with pytest.raises(ValueError, match="model.unet.attention_backend=te cannot serve this build: fp32 compute"):
        resolve_backend("attention", "te", unsuitable=fp32)


def test_unknown_name_is_a_config_error():
    with pytest.raises(ValueError, match="allowed: auto, te, sdpa, math"):
        resolve_backend("attention", "flash")


def test_probes_import_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys; from sd_mlperf import backends; backends.package_available('transformer_engine');"
            "backends.package_available('megatron.core'); backends.package_available('nvidia.dali');"
            "backends.ROLES['norm'][1]['apex']();"
            "heavy = ('megatron', 'nvidia.dali', 'transformer_engine', 'apex', 'group_norm');"
            "print(any(m.startswith(heavy) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_apex_without_its_compiled_group_norm_extensions_is_skipped_with_the_build_fix(apex_site):
    write_fake_apex(apex_site)  # the Python package only: apex built without --group_norm
    res = resolve_backend("norm", "auto")
    assert res.name == "torch"
    assert "apex skipped" in res.why and "group_norm_cuda, group_norm_v2_cuda" in res.why, res.why
    with pytest.raises(RuntimeError) as info:
        resolve_backend("norm", "apex")
    msg = str(info.value)
    assert "model.unet.norm_backend=apex cannot run here" in msg
    assert "--group_norm" in msg and "APEX_GROUP_NORM=1" in msg  # how to build it
    assert not [m for m in sys.modules if m.split(".")[0] in ("apex", *APEX_EXTENSIONS)]  # found on disk only


def test_apex_probe_names_only_the_missing_extension(apex_site):
    write_fake_apex(apex_site, built=("group_norm_cuda",))
    why = resolve_backend("norm", "auto").why
    assert "group_norm_v2_cuda" in why and "group_norm_cuda," not in why, why


@pytest.mark.parametrize("imports", [APEX_EXTENSIONS, ("group_norm_cuda",)])  # apex since 2025-03, and before
def test_apex_probe_passes_when_every_extension_its_group_norm_imports_is_built(apex_site, imports):
    write_fake_apex(apex_site, imports=imports, built=imports)
    assert resolve_backend("norm", "auto").name == "apex"


def test_compile_available_reports_a_reason(monkeypatch):
    ok, why = backends.compile_available(torch.device("cpu"))
    assert ok and why == ""  # g++ is part of this project's CPU environment
    monkeypatch.setattr("shutil.which", lambda name: None)
    ok, why = backends.compile_available(torch.device("cpu"))
    assert not ok and "model.unet.compile=false" in why
