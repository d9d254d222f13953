"""docker/: the Dockerfile installs exactly what docs/cluster-and-container.md's "GPU container" section says;
build/launch dry runs."""

from __future__ import annotations

import os
import re
import shlex

import pytest
from deploy_helpers import REPO, run_script

DOCKERFILE = REPO / "docker" / "Dockerfile"
README_HEADING = "## GPU container"
CONTAINER_DOC = REPO / "docs" / "cluster-and-container.md"
# Flags that only change how pip runs in an image layer, not what it installs.
PIP_NOISE = {"--no-cache-dir", "-q", "--quiet"}


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """Each `pip install ...` among shell commands, as words without noise flags."""
    found = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                found.append([w for w in words if w not in PIP_NOISE])
    return found


def dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(instruction, arguments) of docker/Dockerfile in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text() if text is None else text)
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def dockerfile_run_commands() -> list[str]:
    """The RUN instructions of docker/Dockerfile, continuation lines joined."""
    return [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"]


def readme_gpu_container_section(text: str | None = None) -> str:
    """The text of docs/cluster-and-container.md under `## GPU container`, up to the next level-2 heading."""
    text = CONTAINER_DOC.read_text() if text is None else text
    start = text.find(f"\n{README_HEADING}\n")
    if start < 0:
        pytest.fail(f"{CONTAINER_DOC.relative_to(REPO)} has no '{README_HEADING}' section. Add one holding a "
                    "```bash block with the container's install line, exactly: pip install -e '.[gpu]'  "
                    "(and the base image tag)")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def readme_pip_installs(section: str) -> list[list[str]]:
    """The pip install lines of the fenced shell blocks in a README section."""
    blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", section, flags=re.S)
    return _pip_installs([line.strip().removeprefix("$ ") for block in blocks for line in block.splitlines()])


def test_drift_check_reads_the_section_and_ignores_other_sections():
    text = ("# x\n\n## CPU\n\n```bash\npip install -e '.[dev]'\n```\n\n## GPU container\n\nIn the image:\n\n"
            "```bash\n$ pip install -e '.[gpu]' && sd-mlperf backends --fast\n```\n\n## Next\n\n"
            "```bash\npip install other\n```\n")
    assert readme_pip_installs(readme_gpu_container_section(text)) == [["pip", "install", "-e", ".[gpu]"]]
    assert _pip_installs(["pip install --no-cache-dir -e '.[gpu]'"]) == [["pip", "install", "-e", ".[gpu]"]]
    assert _pip_installs(["pip install -e '.[gpu,bench]'"]) != [["pip", "install", "-e", ".[gpu]"]]


CODE_INSTALL = ["pip", "install", "--no-deps", "-e", "."]
"""The Dockerfile's last install: the package alone, on top of the dependencies installed before the code."""


def test_dockerfile_installs_what_the_readme_says():
    readme = readme_pip_installs(readme_gpu_container_section())
    docker = _pip_installs(dockerfile_run_commands())
    assert docker, "docker/Dockerfile has no pip install step"
    # The dependency install is the README's line; the second only puts the copied code in place.
    assert docker == [*readme, CODE_INSTALL], f"README {README_HEADING} says {readme}, docker/Dockerfile runs {docker}"


def _install_order(text: str | None = None) -> tuple[list[list[str]], list[int], int, int]:
    """COPY sources, then the indices of: each COPY, the first pip install, the last pip install."""
    steps = dockerfile_instructions(text)
    copies = [(i, shlex.split(rest)[:-1]) for i, (keyword, rest) in enumerate(steps) if keyword == "COPY"]
    installs = [i for i, (keyword, rest) in enumerate(steps) if keyword == "RUN" and _pip_installs([rest])]
    return [src for _, src in copies], [i for i, _ in copies], installs[0], installs[-1]


def _check_dependencies_before_code(text: str | None = None) -> None:
    sources, at, deps, code = _install_order(text)
    before = [src for src, i in zip(sources, at) if i < deps]
    assert before == [["pyproject.toml"]], (
        f"only pyproject.toml may be copied before the dependency install (else every edit reinstalls them): {before}")
    assert all(i < code for i in at), "the package install (--no-deps) must follow every COPY"
    assert _pip_installs([dockerfile_instructions(text)[code][1]]) == [CODE_INSTALL]


def test_dockerfile_installs_dependencies_before_copying_the_code():
    _check_dependencies_before_code()
    # ... and the check catches the old order: everything copied, then one install.
    old = ("FROM x\nCOPY pyproject.toml README.md ./\nCOPY sd_mlperf/ sd_mlperf/\n"
           "RUN pip install --no-cache-dir -e '.[gpu]'\n")
    with pytest.raises(AssertionError, match="only pyproject.toml"):
        _check_dependencies_before_code(old)


def test_readme_names_the_dockerfile_base_image():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), flags=re.M).group(1)
    assert base in readme_gpu_container_section()


def test_base_image_is_an_ngc_pytorch_release_with_python_3_12_or_newer():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), flags=re.M).group(1)
    m = re.fullmatch(r"nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3", base)
    assert m, base
    # NGC PyTorch moved to Python 3.12 with 25.01; megatron-core after 0.16.1 needs it.
    assert (int(m.group(1)), int(m.group(2))) >= (25, 1)
    assert "FROM ${BASE_IMAGE}" in DOCKERFILE.read_text()


def test_build_context_leaves_out_the_venv_and_results():
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*"  # everything is excluded first ...
    copied = re.findall(r"^COPY (\S+)", DOCKERFILE.read_text(), flags=re.M)
    for src in copied:  # ... then exactly what the image copies is let back in
        assert f"!{src.rstrip('/')}" in ignore, f"{src} is copied but excluded from the build context"
    assert "!.venv" not in ignore and "!results" not in ignore


def test_build_dry_run():
    proc = run_script("docker/build.sh", "--dry-run", "--tag", "reg.example.com/t/sd_mlperf:1", "--base-image",
                      "nvcr.io/nvidia/pytorch:25.01-py3", "--push", "--sqsh", "/shared/sd.sqsh")
    assert proc.returncode == 0, proc.stderr
    build, push, sqsh = (shlex.split(line) for line in proc.stdout.splitlines())
    assert build == ["docker", "build", "-f", f"{REPO}/docker/Dockerfile", "-t", "reg.example.com/t/sd_mlperf:1",
                     "--build-arg", "BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3", str(REPO)]
    assert push == ["docker", "push", "reg.example.com/t/sd_mlperf:1"]
    assert sqsh == ["enroot", "import", "-o", "/shared/sd.sqsh", "dockerd://reg.example.com/t/sd_mlperf:1"]


@pytest.mark.parametrize("args, message", [
    (["--tag", "Bad Tag"], "not a valid image reference"),
    (["--push"], "--push needs a tag with a registry"),
    (["--sqsh", "image.tar"], "--sqsh must name a .sqsh file"),
    (["--what"], "unknown argument"),
])
def test_build_rejects_bad_flags(args, message):
    proc = run_script("docker/build.sh", "--dry-run", *args)
    assert proc.returncode != 0 and message in proc.stderr


def test_launch_dry_run_mounts_gpu_ipc_and_folders(tmp_path):
    proc = run_script("docker/launch.sh", "--dry-run", "--dataset-dir", "/lustre/mlc", "--results-dir", "res",
                      "--", "sd-mlperf", "backends", "--fast", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert words[:6] == ["docker", "run", "--rm", "--gpus", "all", "--ipc=host"]
    mounts = [words[i + 1] for i, w in enumerate(words) if w == "-v"]
    assert mounts == ["/lustre/mlc:/lustre/mlc", f"{tmp_path}/res:/results", f"{REPO}:/workspace/sd_mlperf"]
    assert words[-4:] == ["sd_mlperf:latest", "sd-mlperf", "backends", "--fast"]
    interactive = run_script("docker/launch.sh", "--dry-run", "--code-in-image")
    words = shlex.split(interactive.stdout)
    assert words[-3:] == ["-it", "sd_mlperf:latest", "bash"] and f"{REPO}:/workspace/sd_mlperf" not in words


def test_launch_checks_the_dataset_folder(tmp_path):
    proc = run_script("docker/launch.sh", "--dataset-dir", str(tmp_path / "none"))
    assert proc.returncode != 0 and "--dataset-dir directory" in proc.stderr


def test_launch_without_gpus_as_another_user(tmp_path):
    proc = run_script("docker/launch.sh", "--dry-run", "--dataset-dir", "/d", "--results-dir", str(tmp_path),
                      "--gpus", "none", "--user", "4242:4242", "--code-in-image", "--", "sd-mlperf", "--version")
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert "--gpus" not in words and words[:3] == ["docker", "run", "--rm"]
    assert words[words.index("--user") + 1] == "4242:4242" and "HOME=/tmp" in words
    me = shlex.split(run_script("docker/launch.sh", "--dry-run", "--user", "me", "--", "true").stdout)
    assert me[me.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    bad = run_script("docker/launch.sh", "--dry-run", "--user", "alice")
    assert bad.returncode != 0 and "--user must be UID[:GID]" in bad.stderr
    assert "memlock=-1" in words and "stack=67108864" in words  # NGC's limits by default ...
    kept = shlex.split(run_script("docker/launch.sh", "--dry-run", "--memlock", "default", "--", "true").stdout)
    assert not any(w.startswith("memlock=") for w in kept) and "stack=67108864" in kept  # ... or the daemon's


def test_standin_base_dry_run_bootstraps_then_installs_the_cpu_pins():
    proc = run_script("docker/standin_base.sh", "--dry-run", "--mirror", "http://mirror.example/debian")
    assert proc.returncode == 0, proc.stderr
    boot, imported, build = proc.stdout.splitlines()
    assert shlex.split(boot)[:2] == ["debootstrap", "--variant=minbase"] and boot.endswith(
        "bookworm " + shlex.split(boot)[-2] + " http://mirror.example/debian")
    assert "python3-pip" in boot and imported.endswith("- sd_mlperf-standin-minbase:bookworm")
    assert shlex.split(build)[:5] == ["docker", "build", "--network", "host", "-t"]
    assert shlex.split(build)[5] == "sd_mlperf-standin:bookworm"


def test_dockerfile_builds_without_docker_hub():
    # A `# syntax=` line makes BuildKit pull its frontend image from Docker Hub before anything else, which fails on
    # an offline build host (and did here); the built-in frontend reads this Dockerfile and its .dockerignore.
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), flags=re.M | re.I)
