"""The README's two opening commands are what CI runs: they must not drift apart. Every relative link and every
`sd-mlperf` command line that README.md and docs/ document resolves."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_readme_opens_with_run_and_test_commands():
    run_cmd, test_cmd = _readme_commands()
    assert "sd-mlperf train --config conf/smoke.yaml" in run_cmd
    assert "pytest" in test_cmd
    assert "-c tests/constraints-cpu.txt" in run_cmd and "-c tests/constraints-cpu.txt" in test_cmd


def test_ci_installs_and_tests_as_the_readme_says():
    _, test_cmd = _readme_commands()
    ci = (REPO / ".ci" / "run").read_text()
    steps = [s.strip() for s in test_cmd.split("&&")]
    install = next(s for s in steps if s.startswith("pip install"))
    pytest_cmd = next(s for s in steps if "pytest" in s)
    assert install.replace("pip install", "pip install -q") in ci
    assert pytest_cmd in ci


def test_constraints_pin_torch_exactly_and_pyproject_does_not():
    pins = (REPO / "tests" / "constraints-cpu.txt").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", pins, flags=re.M)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert not re.search(r'"torch==', pyproject)


# --- every relative link and every documented `sd-mlperf` command line of README.md and docs/ resolves ---------

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```.*?^```[ \t]*$", flags=re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CLI_CALL = re.compile(r"(?:(?<![\w/.-])sd-mlperf|-m sd_mlperf)(?=\s|$)(.*)")
ALTERNATIVES = re.compile(r"\[([^\[\]]*\|[^\[\]]*)\]")  # `[--all | --last-two]`: optional, one of


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), flags=re.M):
        slug = _slug(heading)
        seen[slug] = seen.get(slug, -1) + 1
        seen.setdefault(f"{slug}-{seen[slug]}" if seen[slug] else slug, 0)
    return set(seen)


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """Relative links (and #anchors) of a markdown file that point nowhere."""
    text = path.read_text() if text is None else text
    broken = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked here
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            broken.append(f"{target}: {dest.name} has no heading with anchor #{anchor}")
    return broken


def documented_cli_lines(text: str) -> list[tuple[str, bool]]:
    """(arguments after `sd-mlperf`, complete?) for each command line a markdown text documents.

    Lines of code blocks (fenced, or indented 4+ spaces) are complete command lines unless they elide
    arguments with `...`; an inline `sd-mlperf ...` span in prose names a command and some of its flags."""
    found = []
    code = [line for block in FENCE.findall(text) for line in block.splitlines()[1:-1]]
    code += [line for line in FENCE.sub("", text).splitlines() if line.startswith("    ")]
    for line in re.sub(r"\\\n\s*", " ", "\n".join(code)).splitlines():
        if m := CLI_CALL.search(line):
            args = re.split(r"\s#|;|&&", m.group(1))[0].strip()
            found.append((args, "..." not in args))
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", FENCE.sub("", text)):
        if m := CLI_CALL.match(re.sub(r"\s+", " ", span)):
            found.append((m.group(1).strip(), False))
    return found


def _variants(args: str) -> list[str]:
    """`evaluate --run-dir RUN [--all | --watch]` -> without the group, and with each choice."""
    m = ALTERNATIVES.search(args)
    if not m:
        return [args]
    choices = ["", *(c.strip() for c in m.group(1).split("|"))]
    return [v for c in choices for v in _variants(args[:m.start()] + c + args[m.end():])]


def cli_line_problems(args: str, complete: bool) -> list[str]:
    """Why `sd-mlperf ARGS` would not run as documented: unknown command or flag, a line argparse refuses,
    a conf/ file that does not exist. An incomplete line (inline, or with `...`) is checked flag by flag."""
    import argparse
    import contextlib
    import io
    import shlex

    from sd_mlperf.cli import build_parser, parse_args

    problems = []
    for variant in _variants(args):
        words = shlex.split(variant.replace("...", " "))
        problems += [f"{w}: no such file" for w in words if re.fullmatch(r"conf/\S+\.yaml", w)
                     and not (REPO / w).exists()]
        if complete:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    parse_args(words)
            except SystemExit as exc:
                if exc.code:
                    problems.append(f"sd-mlperf {variant}: {err.getvalue().strip().splitlines()[-1]}")
            continue
        parser, previous = build_parser(), None
        for word in words:
            if word == "--":
                break
            positional = [a for a in parser._actions if not a.option_strings and a.choices]
            if word.startswith("-"):
                if word.split("=")[0] not in parser._option_string_actions:
                    problems.append(f"sd-mlperf {variant}: {parser.prog} has no option {word.split('=')[0]}")
            elif positional and previous is None:
                # The word right after a command is its subcommand or first positional; `unet|vae`: each must exist.
                missing = [c for c in word.split("|") if c not in positional[0].choices]
                if missing:
                    problems.append(f"sd-mlperf {variant}: {parser.prog} has no {positional[0].metavar or 'choice'} "
                                    f"{', '.join(missing)}")
                    break
                if isinstance(positional[0], argparse._SubParsersAction):
                    parser = positional[0].choices[word.split("|")[0]]
                    previous = None
                    continue
            previous = word
    return problems


def test_every_relative_link_resolves():
    broken = [f"{path.relative_to(REPO)}: {b}" for path in DOC_FILES for b in broken_links(path)]
    assert not broken, "\n".join(broken)


def test_every_documented_command_line_parses():
    lines = [(path, args, complete) for path in DOC_FILES for args, complete in documented_cli_lines(path.read_text())]
    assert sum(complete for _, _, complete in lines) >= 15, "the docs' command lines were not found"
    problems = [f"{path.relative_to(REPO)}: {p}" for path, args, complete in lines
                for p in cli_line_problems(args, complete)]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_broken_link_and_a_bogus_flag(tmp_path):
    (tmp_path / "page.md").write_text("# Page\n\n## A section\n")
    text = ("# Doc\n\n[ok](page.md#a-section) [gone](missing.md) [bad anchor](page.md#nope) [self](#doc)\n\n"
            "    sd-mlperf train --config conf/smoke.yaml --no-such-flag     # a comment\n"
            "```bash\nsd-mlperf evaluate --run-dir RUN [--all | --bogus]\n```\n"
            "Inline: `sd-mlperf bench train --compare all`, `sd-mlperf traim`, `sd-mlperf report --nope X`,\n"
            "`sd-mlperf inspect unet|vea`, `sd-mlperf config --config conf/none.yaml ...`\n")
    (tmp_path / "doc.md").write_text(text)
    assert broken_links(tmp_path / "doc.md") == [
        f"missing.md: no such file {tmp_path / 'missing.md'}", "page.md#nope: page.md has no heading with anchor #nope"]
    lines = documented_cli_lines(text)
    assert lines == [("evaluate --run-dir RUN [--all | --bogus]", True),
                     ("train --config conf/smoke.yaml --no-such-flag", True), ("bench train --compare all", False),
                     ("traim", False), ("report --nope X", False), ("inspect unet|vea", False),
                     ("config --config conf/none.yaml ...", False)]
    problems = [p for args, complete in lines for p in cli_line_problems(args, complete)]
    assert len(problems) == 6, problems
    assert "--bogus" in problems[0] and "evaluate --run-dir RUN --all" not in " ".join(problems)
    assert "unrecognized arguments: --no-such-flag" in problems[1]
    assert "no COMMAND traim" in problems[2] and "sd-mlperf report has no option --nope" in problems[3]
    assert "no choice vea" in problems[4] and problems[5] == "conf/none.yaml: no such file"


def test_the_front_page_lists_every_command():
    import argparse

    from sd_mlperf.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    section = (REPO / "README.md").read_text().split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([a-z-]+)` \|", section, flags=re.M)
    assert sorted(listed) == sorted(sub.choices), f"README's table lists {listed}, the CLI has {sorted(sub.choices)}"
