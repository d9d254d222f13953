"""One-shot device checks: the UNet's GPU fast paths against the CPU twin, the CUDA-graph step against eager.

Run by tests/gpu/run_device_checks.sh on a machine with one NVIDIA GPU:

    python tests/gpu/device_checks.py [--out DIR] [--with-compile]
    python tests/gpu/device_checks.py --cpu-dry-run     # the same code on the CPU, tiny; GPU-only checks skip

Checks, most valuable first (each a row: check, status ok/FAIL/skipped, measured error, tolerance, detail):
- unet[...]: each fast-path combination loads the reference twin's weights with strict=True (same ldm
  names), then its forward output and all parameter gradients of a small UNet with real channel counts
  (128/256, so apex's kernel list covers them) on the device are compared with the reference twin's
  (CPU, fp32, math attention, torch GroupNorm, NCHW).
- step_no_host_sync: one eager training step under torch.cuda.set_sync_debug_mode("error"), with fp32 weights
  and with parallel.half_weights (fp16 weights, fp32 masters; the folded AdamW step either way).
- compile_one_graph: torch._dynamo.explain of the UNet with the auto backends (apex's GroupNorm through a custom
  op where installed): no graph break.
- cuda_graph_*: the trainer's step as the bench builds it (fp16, loss scaling, fused AdamW):
  GraphedTrainStep's warmup + capture change no weights, and 3 replayed steps match 3 EagerTrainStep steps.

A check is `skipped` only when a backend it names cannot run here (sd_mlperf.backends.BackendUnavailable:
the library is absent, or there is no CUDA device in the dry run); the reason is in the row. Any other
error (CUDA error, out of memory, strict-load mismatch, capture failure, assertion) is a FAIL whose
traceback goes to stderr. The JSON is rewritten after each check, so a run cut short keeps what it did.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from sd_mlperf.backends import BackendUnavailable
from sd_mlperf.bench.table import format_table
from sd_mlperf.bench.train import SINGLE_PROCESS, build_runner, synthetic_batch
from sd_mlperf.config import load_config
from sd_mlperf.config.schema import UNetConfig
from sd_mlperf.models.precision import autocast
from sd_mlperf.models.unet import build_unet

SMALL = ["model.unet.model_channels=128", "model.unet.channel_mult=[1,2]", "model.unet.attention_levels=[0,1]",
         "model.unet.head_channels=64", "model.unet.context_dim=256", "model.unet.resblock_norm_groups=16",
         "model.unet.transformer_norm_groups=32", "data.image_size=128", "training.micro_batch_size=4"]
TINY = ["model.unet.model_channels=32", "model.unet.channel_mult=[1,2]", "model.unet.attention_levels=[1]",
        "model.unet.head_channels=16", "model.unet.context_dim=32", "model.unet.resblock_norm_groups=4",
        "model.unet.transformer_norm_groups=8", "data.image_size=64", "training.micro_batch_size=2"]
# Relative L2 error allowed against the fp32 CPU reference. fp32 on the GPU may use TF32 convolutions
# (cuDNN's default), hence not 1e-6; bf16 keeps 8 mantissa bits, fp16 11.
TOLERANCE = {"fp32": 5e-3, "fp16": 2e-2, "bf16": 6e-2}
UNET_VARIANTS = [  # (name, precision, UNetConfig changes)
    ("fp32 sdpa nchw", "fp32", {"attention_backend": "sdpa", "norm_backend": "torch"}),
    ("fp16 sdpa nhwc", "fp16", {"attention_backend": "sdpa", "norm_backend": "torch", "channels_last": True}),
    ("bf16 sdpa nhwc", "bf16", {"attention_backend": "sdpa", "norm_backend": "torch", "channels_last": True}),
    ("fp16 te nhwc", "fp16", {"attention_backend": "te", "norm_backend": "torch", "channels_last": True}),
    ("fp16 apex nhwc", "fp16", {"attention_backend": "sdpa", "norm_backend": "apex", "channels_last": True}),
    ("fp16 auto nhwc", "fp16", {"attention_backend": "auto", "norm_backend": "auto", "channels_last": True}),
]
COMPILE_VARIANT = ("fp16 auto nhwc compile", "fp16", {"attention_backend": "auto", "norm_backend": "auto",
                                                      "channels_last": True, "compile": True})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32 on the CPU."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _row(check: str, status: str, error: float | None = None, tol: float | None = None, detail: str = "") -> dict:
    return {"check": check, "status": status, "rel_err": error, "tolerance": tol, "detail": detail}


def _one_line(exc: BaseException, limit: int = 160) -> str:
    return " ".join(str(exc).split())[:limit]


def error_row(check: str, exc: Exception) -> dict:
    """The row for a check that raised: skipped only for BackendUnavailable; else FAIL, traceback to stderr."""
    if isinstance(exc, BackendUnavailable):
        return _row(check, "skipped", detail=_one_line(exc))
    sys.stderr.write(f"device_checks: {check} raised:\n")
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return _row(check, "FAIL", detail=f"{type(exc).__name__}: {_one_line(exc)}")


def run_check(check: str, fn: Callable[[], dict | list[dict]]) -> list[dict]:
    """fn()'s rows, or one error_row named `check` if it raises."""
    try:
        rows = fn()
    except Exception as exc:  # error_row decides: skipped (backend absent) or FAIL
        return [error_row(check, exc)]
    return rows if isinstance(rows, list) else [rows]


def _forward_backward(unet: torch.nn.Module, batch: dict, precision: str, device: torch.device):
    x = batch["z0"].to(device)
    t = torch.arange(x.shape[0], device=device) * 997 % 1000
    ctx = batch["context"].to(device)
    unet.zero_grad(set_to_none=True)
    with autocast(precision, device):
        out = unet(x, t, ctx)
    out.float().square().mean().backward()
    grads = torch.cat([p.grad.detach().float().flatten().cpu() for p in unet.parameters()])
    return out.detach().float().cpu(), grads


def check_unet(base: UNetConfig, batch: dict, device: torch.device, variants: list) -> list[dict]:
    """Each fast-path combination on `device` against the CPU fp32 reference twin, same weights."""
    ref_cfg = dataclasses.replace(base, attention_backend="math", norm_backend="torch", channels_last=False,
                                  compile=False)
    torch.manual_seed(0)
    ref = build_unet(ref_cfg)
    with torch.no_grad():  # the zero-initialised output layers would make most gradients 0
        for p in ref.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    ref_out, ref_grads = _forward_backward(ref, batch, "fp32", torch.device("cpu"))
    rows = []
    for name, precision, changes in variants:
        unet = None
        try:
            cfg = dataclasses.replace(base, **changes)
            with torch.device(device):
                unet = build_unet(cfg)  # BackendUnavailable here is the only skip
            unet.load_state_dict(ref.state_dict(), strict=True)  # backends never rename parameters
            used = ", ".join(f"{r.role}={r.name}" for r in unet.backend_resolutions)
            out, grads = _forward_backward(unet, batch, precision, device)
        except Exception as exc:  # error_row: skipped if a backend is absent, else FAIL
            rows.append(error_row(f"unet[{name}]", exc))
            continue
        finally:
            del unet
        err = max(rel_err(out, ref_out), rel_err(grads, ref_grads))
        tol = TOLERANCE[precision]
        rows.append(_row(f"unet[{name}]", "ok" if err <= tol else "FAIL", err, tol, used))
    return rows


def check_no_host_sync(cfg, device: torch.device, name: str = "step_no_host_sync") -> dict:
    """One eager training step with CUDA's sync debug mode raising on any host sync."""
    if device.type != "cuda":
        return _row(name, "skipped", detail="needs CUDA")
    batch = synthetic_batch(cfg, device)
    _, _, runner = build_runner(cfg, device, batch, warmup_steps=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner(batch)  # a host sync raises RuntimeError here: run_check makes it a FAIL with the traceback
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return _row(name, "ok", detail="eager step ran with set_sync_debug_mode('error')")


def check_one_graph(cfg, device: torch.device) -> dict:
    """dynamo traces the UNet (auto backends, channels-last) forward without a graph break."""
    u = dataclasses.replace(cfg.model.unet, attention_backend="auto", norm_backend="auto", channels_last=True)
    with torch.device(device):
        unet = build_unet(u, compute_precisions={"training.precision": cfg.training.precision})
    batch = synthetic_batch(cfg, device)
    t = torch.zeros(batch["z0"].shape[0], dtype=torch.long, device=device)
    torch._dynamo.reset()
    with autocast(cfg.training.precision, device):
        explanation = torch._dynamo.explain(unet)(batch["z0"], t, batch["context"])
    torch._dynamo.reset()
    chosen = ", ".join(f"{r.role}={r.name}" for r in unet.backend_resolutions)
    breaks = explanation.graph_break_count
    detail = f"{explanation.graph_count} graph(s), {breaks} break(s) ({chosen})"
    if breaks:
        detail += ": " + "; ".join(str(b.reason)[:80] for b in explanation.break_reasons[:3])
    return _row("compile_one_graph", "ok" if breaks == 0 else "FAIL", breaks, 0, detail)


def check_cuda_graph(cfg, device: torch.device) -> list[dict]:
    """Warmup + capture change no weights; 3 replays match 3 eager steps from the same state and seed.

    On the CPU (dry run) both runs are eager: that checks this harness and the eager twin's warmup.
    """
    batch = synthetic_batch(cfg, device)
    results = {}
    for graphed in (False, True):
        use_graph = graphed and device.type == "cuda"
        run_cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, cuda_graph=use_graph))
        torch.manual_seed(1)
        with torch.device(device):
            unet = build_unet(cfg.model.unet)
        start = {k: v.clone() for k, v in unet.state_dict().items()}
        unet, _, runner = build_runner(run_cfg, device, batch, warmup_steps=2, unet=unet)
        restored = max((unet.state_dict()[k] - v).abs().max().item() for k, v in start.items())
        # Both runs draw timesteps and noise from the step's own generator, seeded from run.seed and put
        # back by the warmup, so they see the same draws.
        losses = [runner(batch)["loss"].clone() for _ in range(3)]
        weights = torch.cat([p.detach().float().flatten() for p in unet.parameters()])
        delta = weights - torch.cat([start[k].float().flatten() for k, _ in unet.named_parameters()])
        results[graphed] = (restored, torch.stack(losses).cpu(), delta)
        del unet, runner
    restored = results[True][0]
    loss_err = rel_err(results[True][1], results[False][1])
    delta_err = rel_err(results[True][2], results[False][2])
    tol = TOLERANCE["fp16"]
    dry = "" if device.type == "cuda" else " (dry run: eager twin both times)"
    detail = f"3 steps: loss rel err {loss_err:.2e}, weight-update rel err {delta_err:.2e}" + dry
    return [
        _row("cuda_graph_warmup_restores", "ok" if restored == 0 else "FAIL", restored, 0.0,
             "max abs(w - w0) after warmup + capture" + dry),
        _row("cuda_graph_matches_eager", "ok" if max(loss_err, delta_err) <= tol else "FAIL",
             max(loss_err, delta_err), tol, detail),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print the table (and write it as JSON under --out); 1 if any check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="run on the CPU at tiny size (no GPU needed)")
    parser.add_argument("--with-compile", action="store_true", help="also check the torch.compile'd UNet")
    parser.add_argument("--out", type=Path, help="write device_checks.json here")
    args = parser.parse_args(argv)

    if not args.cpu_dry_run and not torch.cuda.is_available():
        sys.stderr.write("device_checks: no CUDA device visible (use --cpu-dry-run to test the script on a CPU)\n")
        return 2
    device = torch.device("cpu") if args.cpu_dry_run else torch.device("cuda", 0)
    shape = TINY if args.cpu_dry_run else SMALL
    precision = "fp32" if args.cpu_dry_run else "fp16"
    cfg = load_config(["conf/smoke.yaml"], [*shape, *SINGLE_PROCESS, f"run.device={device.type}",
                                            f"training.precision={precision}", "parallel.backend=torch"])
    torch.manual_seed(0)
    batch = synthetic_batch(cfg, torch.device("cpu"))
    variants = UNET_VARIANTS + ([COMPILE_VARIANT] if args.with_compile else [])
    if args.cpu_dry_run:  # CPU fp16 autocast is slow and not what these checks are about: use bf16
        variants = [(n.replace("fp16", "bf16"), "bf16" if p == "fp16" else p, c) for n, p, c in variants]
        variants = list({name: (name, p, c) for name, p, c in variants}.values())
    checks = [  # most valuable first: the fast paths' numerics, then the training step, then its CUDA graph
        ("unet", lambda: check_unet(cfg.model.unet, batch, device, variants)),
        ("step_no_host_sync", lambda: check_no_host_sync(cfg, device)),
        ("step_no_host_sync[half weights]", lambda: check_no_host_sync(
            dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, half_weights=True)), device,
            "step_no_host_sync[half weights]")),
        ("compile_one_graph", lambda: check_one_graph(cfg, device)),
        ("cuda_graph", lambda: check_cuda_graph(cfg, device)),
    ]
    t0 = time.perf_counter()
    rows: list[dict] = []
    for check, fn in checks:
        rows += run_check(check, fn)
        if args.out:  # after each check: a run killed by the stage's timeout keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "device_checks.json").write_text(json.dumps(rows, indent=1))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    sys.stdout.write(f"device checks on {name}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s\n")
    sys.stdout.write(format_table(rows))
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
