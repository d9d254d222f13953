"""Backend registry: auto picks the first available, named ones fail loudly with the fix."""

from __future__ import annotations

import pytest

from sd_mlperf import backends
from sd_mlperf.backends import Probe, resolve_backend, summarize


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


def test_unknown_name_is_a_config_error():
    with pytest.raises(ValueError, match="allowed: auto, te, sdpa, math"):
        resolve_backend("attention", "flash")


def test_probes_import_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys; from sd_mlperf import backends; backends.package_available('transformer_engine');"
            "backends.package_available('megatron.core'); backends.package_available('nvidia.dali');"
            "print(any(m.startswith(('megatron', 'nvidia.dali', 'transformer_engine')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
