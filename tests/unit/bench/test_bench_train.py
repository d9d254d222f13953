"""`sd-mlperf bench train` on a CI-size config: a well-formed table (not a speed)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sd_mlperf.backends import BackendUnavailable
from sd_mlperf.bench import bench_seed
from sd_mlperf.bench.table import parse_text_table
from sd_mlperf.bench.train import COLUMNS, SINGLE_PROCESS, compare_variants, parse_variant
from sd_mlperf.cli import main
from sd_mlperf.config import load_config

SMOKE = "conf/smoke.yaml"
# Smaller than smoke: one level, 16 channels, 4x4 latents, batch 2 (a step takes milliseconds).
TINY = ["model.unet.model_channels=16", "model.unet.channel_mult=[1]", "model.unet.attention_levels=[0]",
        "model.unet.head_channels=8", "model.unet.context_dim=16", "model.unet.resblock_norm_groups=4",
        "model.unet.transformer_norm_groups=4", "data.image_size=32", "training.micro_batch_size=2",
        "training.precision=fp32", "run.device=cpu"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def _table(capsys, *argv: str, warmup: int = 0) -> tuple[list[str], list[dict[str, str]]]:
    assert main(["bench", "train", "--config", SMOKE, "--steps", "2", "--warmup", str(warmup), *argv, *TINY]) == 0
    header, cells = parse_text_table(capsys.readouterr().out)
    return header, [dict(zip(header, line)) for line in cells]


def test_bench_train_prints_a_well_formed_table(capsys):
    threads = torch.get_num_threads()
    header, rows = _table(capsys, "run.num_threads=1", warmup=1)
    assert torch.get_num_threads() == threads  # restored after the bench
    assert header == list(COLUMNS)
    assert len(rows) == 1
    row = rows[0]
    assert row["variant"] == "config" and row["status"] == "ok"
    assert (row["precision"], row["attention"], row["norm"], row["batch"], row["latent"]) == (
        "fp32", "sdpa", "torch", "2", "4")
    ms, images_per_s = float(row["ms_per_step"]), float(row["images_per_s"])
    assert ms > 0 and images_per_s == pytest.approx(2 / (ms / 1e3), rel=0.01)
    assert float(row["tflop_per_image"]) > 0 and float(row["tflop_per_s"]) > 0
    assert float(row["speedup"]) == 1.0
    assert row["mfu"] == "n/a" and row["peak_mem_gib"] == "n/a"  # CPU: no peak table entry, no CUDA memory stats
    assert float(row["loss"]) > 0
    assert row["device"].endswith(" x1")  # timed with run.num_threads, as training runs


def test_compare_rows_run_or_say_why_not(capsys, tmp_path):
    out = tmp_path / "rows.json"
    header, rows = _table(capsys, "--compare", "attention,cuda_graph", "--output", str(out),
                          "--variant", "nhwc: model.unet.channels_last=true", "--variant",
                          "te bf16: model.unet.attention_backend=te training.precision=bf16")
    by_name = {r["variant"]: r for r in rows}
    assert list(by_name) == ["config", "attention=math", "cuda_graph=true", "nhwc", "te bf16"]  # no te in fp32
    assert by_name["attention=math"]["status"] == "ok" and by_name["attention=math"]["attention"] == "math"
    assert by_name["te bf16"]["status"].startswith("skipped: model.unet.attention_backend=te cannot run here: ")
    assert by_name["cuda_graph=true"]["status"] == "skipped: training.cuda_graph=true needs a CUDA device"
    assert by_name["nhwc"]["channels_last"] == "yes" and by_name["nhwc"]["status"] == "ok"
    saved = json.loads(out.read_text())
    assert [r["variant"] for r in saved] == list(by_name)
    assert saved[0]["speedup"] == 1.0 and saved[-1]["speedup"] is None  # a skipped row has no speedup


def test_compare_variants_flip_one_choice_each():
    cfg = load_config([SMOKE], [*TINY, *SINGLE_PROCESS, "model.unet.attention_backend=sdpa"])
    names = [v.name for v in compare_variants(cfg)]
    assert len(names) == len(set(names))
    assert {"attention=math", "norm=apex", "channels_last=true", "compile=true", "cuda_graph=true",
            "precision=bf16"} <= set(names)
    assert "attention=sdpa" not in names and "precision=fp32" not in names
    assert "attention=te" not in names  # te computes in fp16/bf16 only: an fp32 config gets no te row
    bf16 = load_config([SMOKE], [*TINY, *SINGLE_PROCESS, "training.precision=bf16"])
    assert "attention=te" in [v.name for v in compare_variants(bf16, ["attention"])]
    apex = next(v for v in compare_variants(cfg, ["norm"]) if v.name == "norm=apex")
    assert "model.unet.channels_last=true" in apex.overrides
    with pytest.raises(ValueError, match="unknown group"):
        compare_variants(cfg, ["warp"])


def test_parse_variant():
    v = parse_variant("graph+cl: training.cuda_graph=true  model.unet.channels_last=true")
    assert v.name == "graph+cl" and v.overrides == ("training.cuda_graph=true", "model.unet.channels_last=true")
    with pytest.raises(ValueError, match="NAME"):
        parse_variant("training.cuda_graph=true")
    with pytest.raises(ValueError, match="not dotted"):
        parse_variant("x: training.cuda_graph")


def test_bad_arguments_exit_nonzero(capsys):
    assert main(["bench", "train", "--config", SMOKE, "--steps", "0", *TINY]) == 1
    assert main(["bench", "train", "--config", SMOKE, "--no-base", *TINY]) == 1


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                    reason="diffusers is an optional bench dependency (pip install 'sd_mlperf[bench]')")
def test_diffusers_rows_measure_the_same_function(capsys):
    header, rows = _table(capsys, "--no-base", "--diffusers")
    assert [r["variant"].split(" ")[0] for r in rows] == ["ours", "diffusers"]
    assert float(rows[0]["max_abs_diff"]) < 1e-4  # same weights, same outputs: the same model
    assert float(rows[1]["time_vs_diffusers"]) == 1.0 and float(rows[0]["time_vs_diffusers"]) > 0


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                    reason="diffusers is an optional bench dependency (pip install 'sd_mlperf[bench]')")
def test_diffusers_kwargs_match_our_parameter_count():
    from sd_mlperf.bench.diffusers_compare import DiffusersUNet
    from sd_mlperf.models.unet import build_unet

    cfg = load_config([SMOKE], TINY + ["model.unet.channel_mult=[1,2,2]", "model.unet.attention_levels=[0,1]"])
    with torch.device("meta"):
        ours, theirs = build_unet(cfg.model.unet), DiffusersUNet(cfg.model.unet)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_bench_runs_the_trainers_step_after_a_warmup_that_changes_nothing():
    from sd_mlperf.bench.train import build_runner, synthetic_batch
    from sd_mlperf.config.load import global_batch_size
    from sd_mlperf.models.unet import build_unet
    from sd_mlperf.parallel.data_parallel import apply_data_parallel
    from sd_mlperf.parallel.optimizer import LRSchedule
    from sd_mlperf.training.step import EagerTrainStep, build_train_step
    from sd_mlperf.utils.dist_info import DistInfo

    cfg = load_config([SMOKE], [*TINY, *SINGLE_PROCESS])
    device = torch.device("cpu")
    batch = synthetic_batch(cfg, device)
    torch.manual_seed(0)
    unet = build_unet(cfg.model.unet)
    start = {k: v.clone() for k, v in unet.state_dict().items()}
    _, _, runner = build_runner(cfg, device, batch, warmup_steps=2, unet=unet)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in start.items())
    bench_out = runner(batch)

    # The trainer's own step, built the same way, from the same weights and generator seed.
    torch.manual_seed(0)
    dp = apply_data_parallel(build_unet(cfg.model.unet), cfg, DistInfo(0, 1, 0, device, "none"))
    lr_schedule = LRSchedule(cfg.optim, global_batch_size(cfg))
    step = build_train_step(cfg, dp, conditioner=lambda b, generator, device: (b["z0"], b["context"]),
                            lr_schedule=lr_schedule, generator=torch.Generator().manual_seed(bench_seed(cfg)),
                            device=device)
    assert isinstance(step, EagerTrainStep)
    train_out = step([batch], lr_schedule.first_peak_step())
    assert torch.equal(bench_out["loss"], train_out["loss"])
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), dp.unwrapped.parameters()))
    assert any(not torch.equal(p, start[k]) for k, p in unet.named_parameters())  # the timed step did train


@pytest.mark.parametrize(("exc", "status"), [
    (BackendUnavailable("model.unet.attention_backend=te cannot run here: no CUDA device is visible"),
     "skipped: model.unet.attention_backend=te cannot run here: no CUDA device is visible"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"),
     "failed: RuntimeError: CUDA error: an illegal memory access was encountered"),
    (RuntimeError("Error(s) in loading state_dict for UNetModel: Missing key(s)"),
     "failed: RuntimeError: Error(s) in loading state_dict for UNetModel: Missing key(s)"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "failed: out of memory"),
    (ValueError("training.cuda_graph=true needs parallel.backend=torch"),
     "failed: ValueError: training.cuda_graph=true needs parallel.backend=torch"),
])
def test_only_an_unavailable_backend_skips_a_variant(monkeypatch, capsys, exc, status):
    import sd_mlperf.bench.train as bench
    from sd_mlperf.utils.logging import setup_logging

    def broken(*args):
        raise exc

    setup_logging("INFO")
    monkeypatch.setattr(bench, "measure", broken)
    rows = bench.bench_train([SMOKE], TINY, [bench.Variant("a"), bench.Variant("b")], bench.TrainBenchSettings(1, 0))
    assert [r["status"] for r in rows] == [status, status]  # a failure does not stop the other variants
    err = capsys.readouterr().err
    # A skip says why in one line; a failure logs its traceback.
    assert ("Traceback" in err and "in broken" in err) == status.startswith("failed")


def test_cuda_graph_without_cuda_is_an_unavailable_backend():
    from sd_mlperf.bench.train import build_runner, synthetic_batch

    cfg = load_config([SMOKE], [*TINY, *SINGLE_PROCESS, "training.cuda_graph=true"])
    with pytest.raises(BackendUnavailable, match="training.cuda_graph=true needs a CUDA device"):
        build_runner(cfg, torch.device("cpu"), synthetic_batch(cfg, torch.device("cpu")), warmup_steps=0)


@pytest.mark.parametrize(("exc", "code"), [(RuntimeError("CUDA error: misaligned address"), 1),
                                           (BackendUnavailable("no CUDA device is visible"), 0)])
def test_the_command_fails_when_a_row_failed(monkeypatch, capsys, exc, code):
    import sd_mlperf.bench.train as bench

    def broken(*args):
        raise exc

    monkeypatch.setattr(bench, "measure", broken)
    assert main(["bench", "train", "--config", SMOKE, "--steps", "1", "--warmup", "0", *TINY]) == code
