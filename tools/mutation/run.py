"""Mutation testing of the math core with mutmut, one module at a time: `python tools/mutation/run.py [MODULE ...]`.

Each module gets its own scratch copy of the checkout under `.mutation/<module>/` (gitignored) with a
`[tool.mutmut]` section that mutates only that module's files and selects only its tests; mutmut then runs,
per mutant, just the selected tests that reach the mutated function (its coverage map). A mutant counts as
killed when a test fails or times out; survivors are errors unless `tools/mutation/equivalent.txt` lists
them as equivalent, with why. The script prints the per-module table that the README's Development
section shows and exits 1 if a survivor is neither killed nor listed (or a listed one has gone stale).

Run it with the machine shared: `nice -n 15 python tools/mutation/run.py` (about 15 minutes on 2 cores for all
modules; `--max-children 1` halves the CPU it takes). Needs `pip install -c tests/constraints-cpu.txt -e '.[dev]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EQUIVALENT_FILE = REPO / "tools/mutation/equivalent.txt"
SCRATCH = REPO / ".mutation"


@dataclass(frozen=True)
class Module:
    """One mutation target: the files mutmut mutates and the tests it may run against them."""

    files: tuple[str, ...]
    tests: tuple[str, ...]


# Tests per module: the unit tests of the module plus the ones that exercise it through its callers. mutmut
# narrows these further, per mutated function, to the tests that call it. Integration tests stay out (slow).
MODULES: dict[str, Module] = {
    "diffusion": Module(("sd_mlperf/diffusion/*",), ("tests/unit/diffusion",)),
    # Other model tests (UNet, VAE, text encoder, checkpoints, precision) reach attention and norm through every
    # block but check nothing more about them, and would multiply the run time; the UNet's test holds the apex
    # stand-in cases of the norm builder.
    "attention": Module(("sd_mlperf/models/attention.py",),
                        ("tests/unit/models/test_attention.py", "tests/parity/test_attention_parity.py")),
    "norm": Module(("sd_mlperf/models/norm.py",),
                   ("tests/unit/models/test_norm.py", "tests/unit/models/test_unet.py",
                    # The opaque (custom op) apex path; its torch.compile test cannot run under mutmut's trampolines.
                    "tests/unit/models/test_group_norm_op.py::test_op_matches_torch_group_norm_forward_and_backward",
                    "tests/unit/models/test_group_norm_op.py::test_an_apex_without_custom_ops_runs_through_ours",
                    "tests/unit/models/test_norm_opaque_path.py")),
    # Not tests/unit/eval as a whole: the evaluator tests reach mean_clip_score too, and at tens of seconds each
    # (times mutmut's 15x timeout) they would take most of the budget for what test_metrics.py checks directly.
    "metrics": Module(("sd_mlperf/eval/metrics.py",),
                      ("tests/unit/eval/test_metrics.py", "tests/unit/eval/test_fid_stats.py")),
    "closed_division": Module(("sd_mlperf/config/closed_division.py",),
                              ("tests/config/test_closed_division.py", "tests/unit/training/test_run_identity.py")),
    "optimizer": Module(("sd_mlperf/parallel/optimizer.py",),
                        ("tests/unit/parallel/test_optimizer.py", "tests/unit/parallel/test_torch_adapter.py",
                         "tests/unit/parallel/test_optim_state_placement.py")),
    "loss_scaling": Module(("sd_mlperf/parallel/loss_scaling.py",),
                           ("tests/unit/parallel/test_loss_scaling.py", "tests/unit/parallel/test_torch_adapter.py",
                            "tests/unit/parallel/test_nonfinite_steps.py")),
    "step": Module(("sd_mlperf/training/step.py",),
                   ("tests/unit/training/test_step.py", "tests/unit/training/test_step_wiring.py",
                    "tests/unit/training/test_cuda_graph_step.py",
                    "tests/unit/parallel/test_nonfinite_steps.py")),
    # The trainer-loop and offline-evaluation tests train tiny runs (tens of seconds each, times mutmut's 15x
    # timeout per surviving mutant): too slow here; the step's and the final log's own tests carry the checks.
    "final_log": Module(("sd_mlperf/training/final_log.py",),
                        ("tests/unit/training/test_final_log.py", "tests/unit/training/test_final_log_stitching.py")),
}

# What the selected tests read besides sd_mlperf/ and tests/ (mutmut copies those two itself).
ALSO_COPY = ("conf", "examples", "README.md")
RESULT_LINE = re.compile(r"^\s*(\S+): (.+)$")
KILLED = {"killed", "timeout"}
# equivalent.txt reasons that start so: the mutant changes behaviour only on a GPU (a device argument dropped),
# which the CPU suite cannot observe. Counted apart from true equivalents, and out of the score like them.
GPU_ONLY = "GPU-only:"


def read_equivalents() -> dict[str, tuple[str, bool]]:
    """mutant name -> (the mutated line it must still show, GPU-only?) from equivalent.txt (`name | line | why`)."""
    out = {}
    for raw in EQUIVALENT_FILE.read_text(encoding="utf-8").splitlines():
        if raw.strip() and not raw.startswith("#"):
            name, line, why = (part.strip() for part in raw.split(" | ", 2))
            out[name] = (line, why.startswith(GPU_ONLY))
    return out


def prepare(name: str, module: Module) -> Path:
    """A fresh scratch checkout whose pyproject.toml carries this module's [tool.mutmut] section."""
    work = SCRATCH / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for item in ("sd_mlperf", "tests", *ALSO_COPY):
        src = REPO / item
        (shutil.copytree(src, work / item, ignore=ignore) if src.is_dir() else shutil.copy2(src, work / item))
    quoted = lambda items: "[" + ", ".join(f'"{i}"' for i in items) + "]"  # noqa: E731
    section = (
        "\n[tool.mutmut]\n"
        'source_paths = ["sd_mlperf"]\n'
        f"only_mutate = {quoted(module.files)}\n"
        f"also_copy = {quoted(ALSO_COPY)}\n"
        f"pytest_add_cli_args_test_selection = {quoted(module.tests)}\n"
        # -p no:randomly is not needed (not installed); no cache writes from many forked runs at once.
        'pytest_add_cli_args = ["-q", "-x", "-p", "no:cacheprovider"]\n'
    )
    # Code that runs at import (FIXED's table) runs once, before mutmut forks a process per mutant, so its
    # mutants are killed only by tests that call it again (see test_schema_default_rows_are_built_per_field).

    (work / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + section)
    return work


def mutmut(work: Path, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    """Run mutmut in `work` with the scratch copy (not this checkout) first on the import path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # One intra-op thread: mutmut forks a child per mutant, and a child forked after torch started its
    # OpenMP pool can hang for ever on its first parallel op (seen here as mutants "timing out").
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mutmut", *args]
    return subprocess.run(cmd, cwd=work, env=env, check=False, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)


def results(work: Path) -> dict[str, str]:
    """mutant name -> status (killed, survived, timeout, no tests, ...)."""
    proc = mutmut(work, "results", "--all", "true", capture=True)
    found = {m.group(1): m.group(2).strip() for m in map(RESULT_LINE.match, proc.stdout.splitlines()) if m}
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"`mutmut results` in {work} failed or listed nothing:\n{proc.stdout[-2000:]}")
    return found


# `mutmut show` for many mutants in one process (one `mutmut show` each costs seconds of start-up).
_DIFFS = """
import json, sys
from mutmut.__main__ import find_mutant
from mutmut.mutation.diff_apply import get_diff_for_mutant
print(json.dumps({n: get_diff_for_mutant(n, path=find_mutant(n).path) for n in json.loads(sys.stdin.read())}))
"""


def diffs(work: Path, mutants: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """mutant -> (removed lines, added lines) of its diff, stripped."""
    if not mutants:
        return {}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _DIFFS], cwd=work, env=env, input=json.dumps(mutants), text=True,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"reading the mutants' diffs in {work} failed:\n{proc.stderr[-2000:]}")
    out = {}
    for name, diff in json.loads(proc.stdout).items():
        lines = diff.splitlines()
        out[name] = tuple([ln[1:].strip() for ln in lines if ln.startswith(sign) and not ln.startswith(sign * 3)]
                          for sign in "-+")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the chosen modules (all by default) and print the score table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"any of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant runs (default 2)")
    parser.add_argument("--report-only", action="store_true",
                        help="no new run: score the last run's results in .mutation/ (after editing equivalent.txt)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    equivalents = read_equivalents()
    rows, problems = [], []
    for name in args.modules or list(MODULES):
        work = SCRATCH / name
        start = time.monotonic()
        if not args.report_only:
            work = prepare(name, MODULES[name])
            if mutmut(work, "run", "--max-children", str(args.max_children)).returncode != 0:
                problems.append(f"{name}: mutmut run failed (see its output above)")
                continue
        status = results(work)
        killed = sum(s in KILLED for s in status.values())
        equivalent, gpu_only, unexplained = 0, 0, []
        alive = sorted(m for m, s in status.items() if s not in KILLED)
        changes = diffs(work, alive)
        for mutant in alive:
            before, after = changes[mutant]
            if mutant in equivalents:
                line, on_gpu = equivalents[mutant]
                if line not in after:
                    problems.append(f"{mutant}: listed as equivalent for `{line}`, but the mutant now changes "
                                    "another line; review it and update equivalent.txt")
                gpu_only += on_gpu
                equivalent += not on_gpu
            else:
                unexplained.append(f"{mutant} ({status[mutant]}):\n    - {' / '.join(before)}\n"
                                   f"    + {' / '.join(after)}")
        problems += [f"{m}: listed in equivalent.txt but now killed by a test; remove its line" for m in
                     sorted(m for m, s in status.items() if s == "killed" and m in equivalents)]  # not a timeout
        total = len(status)
        score = killed / max(total - equivalent - gpu_only, 1)
        minutes = "-" if args.report_only else f"{(time.monotonic() - start) / 60:.1f}"
        rows.append(f"| {name} | {total} | {killed} | {equivalent} | {gpu_only} | {len(unexplained)} | "
                    f"{100 * score:.1f}% | {minutes} |")
        module_problems = [f"{name}: survived, not listed as equivalent: {m}" for m in unexplained]
        print(f"\n{rows[-1]}", *module_problems, sep="\n", flush=True)  # as each module ends: runs are long
        problems += module_problems
    print("\n| module | mutants | killed | equivalent | GPU-only | survived | score | minutes |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
