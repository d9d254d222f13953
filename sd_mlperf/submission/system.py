"""The system description (OUT/<org>/systems/<system>.json) from a user's YAML or JSON file.

The official `system_desc_checker` keeps its field list and availability options inside a function, so they
are copied here; tests/unit/submission checks the copies against the checker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# mlperf_logging/system_desc_checker/system_desc_checker.py, check_system_desc: required_fields (4.1.68).
REQUIRED_FIELDS = (
    "submitter", "division", "status", "system_name", "number_of_nodes", "host_processors_per_node",
    "host_processor_model_name", "host_processor_core_count", "host_processor_vcpu_count", "host_processor_frequency",
    "host_processor_caches", "host_processor_interconnect", "host_memory_capacity", "host_storage_type",
    "host_storage_capacity", "host_networking", "host_networking_topology", "host_memory_configuration",
    "accelerators_per_node", "accelerator_model_name", "accelerator_host_interconnect", "accelerator_frequency",
    "accelerator_on-chip_memories", "accelerator_memory_configuration", "accelerator_memory_capacity",
    "accelerator_interconnect", "accelerator_interconnect_topology", "cooling", "hw_notes", "framework",
    "other_software_stack", "operating_system", "sw_notes",
)
# Filled from the runs' logs; a user's file may set them, and then they must agree.
FROM_RUNS = ("submitter", "division")
# Fields that real system descriptions (and the official checker) allow as a mapping or a list.
STRUCTURED_FIELDS = ("other_software_stack",)
# The log's submission_status for each availability of the system description (mllog constants; preview: either).
STATUS_OF_AVAILABILITY = {"Available on-premise": ("onprem",), "Available cloud": ("cloud",),
                          "Research, Development, or Internal (RDI)": ("research",),
                          "Preview": ("preview", "onprem", "cloud")}
# The same function's availability_options for training rulesets >= 4.0 (the `status` field).
AVAILABILITY = tuple(STATUS_OF_AVAILABILITY)
# The result summarizer multiplies these with int(): they must be whole numbers.
INTEGER_FIELDS = ("number_of_nodes", "accelerators_per_node", "host_processors_per_node")
PLACEHOLDER = "<EDIT"


def load_system_config(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The user's system config (YAML, or JSON, which YAML reads too) and the problems reading it."""
    if not path.is_file():
        return {}, [f"--system-config {path}: no such file (conf/submission/dgx_h100_example.yaml is an example)"]
    try:
        fields = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        return {}, [f"--system-config {path}: not YAML or JSON: {exc}"]
    if not isinstance(fields, dict):
        return {}, [f"--system-config {path}: expected a mapping of field: value, got {type(fields).__name__}"]
    return fields, []


def system_description(fields: dict[str, Any], source: Path, *, org: str, system: str, division: str,
                       num_nodes: int | None, gpus_per_node: int | None,
                       submission_status: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """The system json (every value a string but STRUCTURED_FIELDS, as in published results) and what is wrong with
    the user's file.

    `system` is the runs' submission_platform: the default system_name, which a real description may set
    otherwise. `num_nodes` and `gpus_per_node` are the runs' parallel layout (None: unknown), which the
    description must match; `submission_status` is what the runs log, which must agree with `status`.
    """
    where = f"--system-config {source}"
    problems = []
    missing = [f for f in REQUIRED_FIELDS if f not in (*FROM_RUNS, "system_name") and f not in fields]
    if missing:
        problems.append(f"{where} lacks required field(s) {', '.join(missing)} (the official system description "
                        "checker requires them; an empty string is allowed for notes and links that do not apply)")
    desc: dict[str, Any] = {}
    for key, value in fields.items():
        if key in STRUCTURED_FIELDS and isinstance(value, (dict, list)):
            desc[str(key)] = value
            continue
        if isinstance(value, (dict, list)):
            problems.append(f"{where}: {key} must be a single value, got a {type(value).__name__}")
            continue
        desc[str(key)] = "" if value is None else str(value)
    placeholders = [k for k, v in desc.items() if PLACEHOLDER in str(v)]
    if placeholders:
        problems.append(f"{where} still holds the example's {PLACEHOLDER} placeholders in: {', '.join(placeholders)}")
    for key, wanted in (("submitter", org), ("division", division)):
        if key in desc and desc[key] != wanted:
            problems.append(f"{where}: {key} is {desc[key]!r} but the runs log {wanted!r} (drop the field to take "
                            "the runs' value)")
        desc[key] = wanted
    desc.setdefault("system_name", system)
    if "status" in desc and desc["status"] not in AVAILABILITY and PLACEHOLDER not in desc["status"]:
        problems.append(f"{where}: status {desc['status']!r} is not one of {', '.join(map(repr, AVAILABILITY))}")
    elif submission_status is not None and desc.get("status") in STATUS_OF_AVAILABILITY \
            and submission_status not in STATUS_OF_AVAILABILITY[desc["status"]]:
        problems.append(f"{where}: status {desc['status']!r} but the runs log submission_status "
                        f"{submission_status!r}; train with run.submission_status="
                        f"{STATUS_OF_AVAILABILITY[desc['status']][0]} or correct the status")
    for key in INTEGER_FIELDS:
        if key in desc and PLACEHOLDER not in desc[key] and not (desc[key].isdigit() and int(desc[key]) > 0):
            problems.append(f"{where}: {key} must be a positive whole number, got {desc[key]!r}")
    for key, used, name in (("number_of_nodes", num_nodes, "parallel.num_nodes"),
                            ("accelerators_per_node", gpus_per_node, "parallel.gpus_per_node")):
        if used is not None and desc.get(key, "").isdigit() and int(desc[key]) != used:
            problems.append(f"{where}: {key} is {desc[key]} but the runs trained with {name}={used}")
    ordered = {k: desc[k] for k in REQUIRED_FIELDS if k in desc}
    return {**ordered, **desc}, problems
