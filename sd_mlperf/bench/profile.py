"""`sd-mlperf bench train --profile`: where the training step's time goes, per step, by kernel class.

The step is the bench's own (`bench.train.build_runner`: the trainer's step object, warmed up and compiled or
graphed as configured). torch.profiler records `steps` steps; each kernel's self time (device time on a GPU,
CPU time of the operator on the CPU) is divided by `steps` and put in one class:

  convolution, gemm, attention, groupnorm/elementwise/triton, optimizer, copies/casts, other

The profile also names the SDPA backend(s) that ran (cudnn, flash, efficient, math), from the aten operators
the step called (eager and compiled steps both call them; TE's own kernels count as `te`).

On a GPU with a CUDA graph, the kernels of a replay are traced by CUPTI as kernels of the replaying stream.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

import torch

from sd_mlperf.config.schema import Config

TOP_KERNELS = 40
KERNEL_CLASSES = ("convolution", "gemm", "attention", "groupnorm/elementwise/triton", "optimizer", "copies/casts",
                  "other")
# First match wins: optimizer and attention before the generic gemm/elementwise patterns they contain.
_PATTERNS: list[tuple[str, re.Pattern]] = [(cls, re.compile(pattern, re.IGNORECASE)) for cls, pattern in (
    ("optimizer", r"adam|multi_tensor|foreach|_amp_|non_finite|amp_update_scale"),
    ("attention", r"flash|fmha|attention|attn|sdpa|_efficient_|cudnn.*mha|softmax"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd|im2col|col2im"),
    ("gemm", r"gemm|matmul|\bmm\b|aten::mm|aten::bmm|addmm|linear|cutlass|nvjet|cublas|sgemm|hgemm"),
    ("groupnorm/elementwise/triton", r"^triton|group_norm|groupnorm"),  # inductor's fused kernels, casts included
    ("copies/casts", r"copy|memcpy|memset|\bto\b|_to_copy|cast|contiguous|clone|fill|cat\b|aten::cat"),
    ("groupnorm/elementwise/triton", r"triton|group_norm|groupnorm|norm|elementwise|vectorized|reduce|silu|sigmoid|"
                                     r"aten::(add|mul|sub|div|sum|mean|exp|pow|sqrt|rsqrt|neg|where|clamp)"),
)]
_SDPA_OPS = {
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_attention_math": "math",
}


def classify(name: str) -> str:
    """The class of a kernel or operator name (KERNEL_CLASSES)."""
    for cls, pattern in _PATTERNS:
        if pattern.search(name):
            return cls
    return "other"


def sdpa_backends(op_names: Counter) -> dict[str, int]:
    """{backend: calls} from the aten operator names the profiler saw (forward ops only; backward pairs them)."""
    found: dict[str, int] = {}
    for name, calls in op_names.items():
        short = name.removeprefix("aten::")
        if short in _SDPA_OPS:
            found[_SDPA_OPS[short]] = found.get(_SDPA_OPS[short], 0) + calls
        elif "transformer_engine" in name.lower() or "fused_attn" in name.lower():
            found["te"] = found.get("te", 0) + calls
    return found


def summarize_events(events: list[tuple[str, float, int]], op_names: Counter, steps: int) -> dict[str, Any]:
    """Per-step class totals, the top kernels and the SDPA backends from (name, self us, calls) events."""
    total_us = sum(us for _, us, _ in events) or 1.0
    by_class: dict[str, float] = defaultdict(float)
    for name, us, _ in events:
        by_class[classify(name)] += us
    top = sorted(events, key=lambda e: -e[1])[:TOP_KERNELS]
    return {
        "steps": steps,
        "kernel_ms_per_step": total_us / 1e3 / steps,
        "by_class": [{"class": cls, "ms_per_step": by_class.get(cls, 0.0) / 1e3 / steps,
                      "share": by_class.get(cls, 0.0) / total_us} for cls in KERNEL_CLASSES],
        "top_kernels": [{"kernel": name, "class": classify(name), "ms_per_step": us / 1e3 / steps,
                         "calls_per_step": calls / steps, "share": us / total_us} for name, us, calls in top],
        "sdpa_backends": {k: v / steps for k, v in sdpa_backends(op_names).items()},
    }


def profile_train(cfg: Config, device: torch.device, *, steps: int = 3, warmup_steps: int = 2) -> dict[str, Any]:
    """Build and warm the bench's step for `cfg`, profile `steps` steps, return the summary (see module doc)."""
    from torch.profiler import ProfilerActivity, profile

    from sd_mlperf.bench import bench_seed
    from sd_mlperf.bench.train import build_runner, describe, synthetic_batch

    torch.manual_seed(bench_seed(cfg))
    batch = synthetic_batch(cfg, device)
    unet, _, runner = build_runner(cfg, device, batch, warmup_steps)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner(batch)
        if cuda:
            torch.cuda.synchronize(device)
    events, op_names = [], Counter()
    for avg in prof.key_averages():
        op_names[avg.key] += avg.count
        if cuda:
            us = avg.self_device_time_total
            if us > 0 and avg.device_type == torch.autograd.DeviceType.CUDA:
                events.append((avg.key, float(us), int(avg.count)))
        elif avg.key.startswith("aten::") and avg.self_cpu_time_total > 0:
            events.append((avg.key, float(avg.self_cpu_time_total), int(avg.count)))
    chosen = {r.role: r.name for r in unet.backend_resolutions}
    summary = {**describe(cfg, device), "attention": chosen["attention"], "norm": chosen["norm"],
               "time_source": "CUDA kernels (device time)" if cuda else "aten operators (CPU self time)"}
    summary.update(summarize_events(events, op_names, steps))
    return summary


def profile_tables(summary: dict[str, Any]) -> str:
    """The profile as text: a header line, the class table, the top-kernel table."""
    from sd_mlperf.bench.table import format_table

    sdpa = ", ".join(f"{k} x{v:g}/step" for k, v in summary["sdpa_backends"].items()) or "none seen"
    head = (f"profile: {summary['device']}, batch {summary['batch']}, {summary['precision']}, attention "
            f"{summary['attention']}, norm {summary['norm']}, compile {summary['compile']}, cuda_graph "
            f"{summary['cuda_graph']}: {summary['kernel_ms_per_step']:.2f} ms of {summary['time_source']} per step "
            f"over {summary['steps']} steps; SDPA backend: {sdpa}\n")
    kernels = [{**row, "kernel": row["kernel"][:100]} for row in summary["top_kernels"]]
    return head + format_table(summary["by_class"]) + "\n" + format_table(kernels)
