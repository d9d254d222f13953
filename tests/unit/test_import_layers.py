"""Layers only look down: no module under sd_mlperf/ imports from a layer above its own (STYLE.md principle 9).

Every import counts, inside functions and under TYPE_CHECKING too: a lazy import is still a dependency. Siblings
on one layer (diffusion, parallel, data; bench, submission) do not import each other. A lower layer that needs
something from above takes it as an argument.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sd_mlperf"

LAYERS: list[set[str]] = [
    {"utils", "__init__"},
    {"config"},
    {"backends"},
    {"models"},
    {"diffusion", "parallel", "data"},
    {"eval"},
    {"training"},
    {"bench", "submission"},
    {"report"},
    {"commands"},
    {"cli"},
    {"__main__"},
]
"""Lowest first; a module's part is its first name under sd_mlperf (a package or a top-level module)."""

LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def part_of(module: str) -> str:
    """`sd_mlperf.eval.fid` -> `eval`; `sd_mlperf` -> `__init__`."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every sd_mlperf import in `source`, relative imports resolved against `module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name == "sd_mlperf" or name.startswith("sd_mlperf.")]


def crossings(source: str, module: str) -> list[str]:
    """The imports of `module` that reach a higher layer or a sibling on its own layer."""
    own = part_of(module)
    bad = []
    for line, target in imported_modules(source, module):
        other = part_of(target)
        if other == own or target == "sd_mlperf":
            continue
        if other not in LAYER_OF:
            bad.append(f"{module}:{line} imports {target}: `{other}` has no layer in LAYERS")
        elif LAYER_OF[other] >= LAYER_OF[own]:
            kind = "a sibling" if LAYER_OF[other] == LAYER_OF[own] else "a higher layer"
            bad.append(f"{module}:{line} imports {target} ({kind}: {own} is layer {LAYER_OF[own]}, "
                       f"{other} is layer {LAYER_OF[other]})")
    return bad


def package_modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(module) for module, _ in package_modules()}
    assert parts - set(LAYER_OF) == set(), "add the new package or module to LAYERS"


def test_no_module_imports_from_a_higher_layer_or_a_sibling():
    bad = [line for module, path in package_modules() for line in crossings(path.read_text(), module)]
    assert bad == [], "layer crossings (pass what is needed down as an argument instead):\n" + "\n".join(bad)


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("sd_mlperf.data.laion", "from sd_mlperf.training.trainer import Trainer", "a higher layer"),
    ("sd_mlperf.diffusion.ddim", "def f():\n    from sd_mlperf.parallel import loss_scaling", "a sibling"),
    ("sd_mlperf.utils.files", "import sd_mlperf.config.schema", "a higher layer"),
    ("sd_mlperf.models.unet", "from ..eval import fid", "a higher layer"),
    ("sd_mlperf.models.unet", "from sd_mlperf.newpart import x", "has no layer"),
])
def test_the_check_catches_a_crossing(module, source, expected):
    (found,) = crossings(source, module)
    assert expected in found


def test_the_check_allows_downward_and_same_package_imports():
    source = "from sd_mlperf.config.schema import Config\nfrom sd_mlperf.eval.metrics import x\nfrom . import fid"
    assert crossings(source, "sd_mlperf.eval.evaluator") == []
