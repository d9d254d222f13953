"""`sd-mlperf bench train --profile` and the attention / GroupNorm probes on the tiny UNet (CPU): well-formed
output with every class, the SDPA backend named, and skipped rows only for kernels this machine lacks."""

from __future__ import annotations

import json

import pytest

from sd_mlperf.backends import BackendUnavailable
from sd_mlperf.bench.probes import probe_attention, probe_group_norm, unet_shapes
from sd_mlperf.bench.profile import KERNEL_CLASSES, TOP_KERNELS, classify
from sd_mlperf.cli import main
from sd_mlperf.config import load_config
from tests.unit.bench.test_bench_train import SMOKE, TINY


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


@pytest.mark.parametrize(("name", "cls"), [
    ("sm90_xmma_fprop_implicit_gemm_indexed_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("sm90_xmma_dgrad_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "attention"),
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_TNN", "gemm"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64", "gemm"),
    ("triton_per_fused_native_group_norm_silu_0", "groupnorm/elementwise/triton"),
    ("triton_poi_fused__to_copy_add_12", "groupnorm/elementwise/triton"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
     "optimizer"),
    ("void at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)", "copies/casts"),
    ("Memset (Device)", "copies/casts"),
    ("aten::mkldnn_convolution", "convolution"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
])
def test_kernel_classes(name, cls):
    assert classify(name) == cls


def test_profile_writes_classes_top_kernels_and_the_sdpa_backend(capsys, tmp_path):
    out = tmp_path / "profile.json"
    assert main(["bench", "train", "--profile", "--config", SMOKE, "--steps", "1", "--warmup", "0",
                 "--output", str(out), *TINY, "run.num_threads=1"]) == 0
    text = capsys.readouterr().out
    assert "SDPA backend: flash (cpu)" in text and "kernel" in text and "convolution" in text
    (profile,) = json.loads(out.read_text())
    assert [row["class"] for row in profile["by_class"]] == list(KERNEL_CLASSES)
    assert abs(sum(row["share"] for row in profile["by_class"]) - 1) < 1e-6
    assert 0 < len(profile["top_kernels"]) <= TOP_KERNELS
    assert profile["by_class"][0]["ms_per_step"] > 0  # the tiny UNet's convolutions took time
    attention_layers = sum(unet_shapes(load_config([SMOKE], TINY))[0].values())
    assert profile["sdpa_backends"] == {"flash (cpu)": attention_layers}  # each attention layer once per step


def test_probes_cover_every_unet_shape():
    cfg = load_config([SMOKE], TINY)
    attention, norms = unet_shapes(cfg)
    assert sorted(attention) == [(2, 16, 16, 2, 8), (2, 16, 77, 2, 8)]  # self and cross, 4x4 latents, 2 heads of 8
    assert sum(norms.values()) >= 4 and all(groups == 4 for *_, groups, _ in norms)
    rows = probe_attention(cfg, cfg_device(), kernels=("flash", "math", "cudnn"), steps=1, warmup=0)
    assert len(rows) == 2 * 3
    assert all(r["status"] == "ok" and r["fwd_bwd_ms"] > 0 for r in rows if r["kernel"] != "cudnn")
    assert all(r["status"].startswith("skipped: No viable backend") for r in rows if r["kernel"] == "cudnn")
    rows = probe_group_norm(cfg, cfg_device(), kernels=("torch", "apex"), steps=1, warmup=0)
    assert len(rows) == 2 * len(norms)
    assert all(r["status"] == "ok" for r in rows if r["kernel"] == "torch")
    assert all(r["status"].startswith("skipped") for r in rows if r["kernel"] == "apex")


def cfg_device():
    import torch

    return torch.device("cpu")


@pytest.mark.parametrize(("exc", "status"), [
    (RuntimeError("No available kernel. Aborting execution."), "skipped: No available kernel. Aborting execution."),
    (RuntimeError("No viable backend for scaled_dot_product_attention was found."), "skipped: No viable backend"),
    (BackendUnavailable("transformer_engine is not installed"), "skipped: transformer_engine is not installed"),
    (ImportError("cannot import name 'X' from 'sd_mlperf.models'"), "failed: ImportError: cannot import name"),
    (NotImplementedError("no bf16 kernel"), "skipped: no bf16 kernel"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"),
     "failed: RuntimeError: CUDA error: an illegal memory access was encountered"),
    (ValueError("shape mismatch"), "failed: ValueError: shape mismatch"),
])
def test_probe_skips_only_a_missing_or_refusing_kernel(exc, status):
    from sd_mlperf.bench.probes import _status_of

    assert _status_of(exc).startswith(status)


def test_a_probe_kernel_that_breaks_fails_the_command(capsys, monkeypatch, caplog):
    from sd_mlperf.bench import probes

    real = probes._sdpa

    def broken_math(kernel, q, k, v):
        if kernel == "math":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(kernel, q, k, v)

    monkeypatch.setattr(probes, "_sdpa", broken_math)
    assert main(["bench", "attention", "--config", SMOKE, "--kernels", "flash,math", "--steps", "1",
                 "--warmup", "0", *TINY]) == 1  # every row is printed, then the command fails
    lines = capsys.readouterr().out.splitlines()[2:]
    flash = [line for line in lines if " flash " in line]
    math = [line for line in lines if " math " in line]
    assert len(flash) == len(math) == 2 and all(line.endswith(" ok") for line in flash)
    assert all(line.endswith("failed: RuntimeError: CUDA error: an illegal memory access was encountered")
               for line in math)
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "bench probe" in r.getMessage()]
    assert len(logged) == 2 and all(m.startswith("bench probe: math B2 L16 S") for m in logged)  # kernel and shape
