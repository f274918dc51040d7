"""The README and docs/*.md taken literally: every `storm-vlm` command line in their shell blocks is
accepted by that command's own parser (flags, their values and choices, the required arguments),
every `storm-vlm COMMAND --flag` they mention inline is a flag of that command, every relative link
and repository path they give exists, every `storm_vlm.*` name they cite imports, and a figure they
quote from the code's own arithmetic is the one it gives. Nothing runs: no model is loaded."""

import argparse
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from storm_vlm.cli import COMMANDS, build_parser
from storm_vlm.perf.costmodel import DEFAULT_COMPRESSIONS, pipeline_cost, real_config
from storm_vlm.perf.profiler import load_model_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_SEPARATORS = {"|", "||", "&&", ";"}


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _shell_commands(page: Path) -> list[tuple[int, list[str]]]:
    """(line, argv after `storm-vlm`) for each `storm-vlm ...`, `python -m storm_vlm ...` or
    `torchrun ... -m storm_vlm ...` in the page's fenced blocks that are not Python or YAML;
    continuation lines joined, comments and what follows a pipe or `;` left out."""
    text = page.read_text()
    found = []
    for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if block.group(1) in ("python", "yaml", "json"):
            continue
        number = text[:block.start(2)].count("\n") + 1
        for chunk in re.split(r"(?<!\\)\n", block.group(2)):  # one shell line, continuations included
            start, number = number, number + chunk.count("\n") + 1
            line = chunk.replace("\\\n", " ")
            if "storm-vlm" not in line and "-m storm_vlm" not in line:
                continue
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if word == "storm-vlm" or (word == "storm_vlm" and words[i - 1] == "-m"):
                    argv = []
                    for arg in words[i + 1:]:
                        if arg in SHELL_SEPARATORS:
                            break
                        argv.append(arg)
                    found.append((start, argv))
    return found


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_storm_vlm_command_in_a_shell_block_parses(page):
    """A newcomer pastes these lines: each must get past the command's argument parser (a misspelt flag,
    a value outside a flag's choices, a missing required argument or a renamed command all fail)."""
    failures = []
    for line, argv in _shell_commands(page):
        if not argv or argv[0] not in COMMANDS:
            failures.append(f"{_page_id(page)}:{line}: unknown command in storm-vlm {shlex.join(argv)}")
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                build_parser(argv[0]).parse_args(argv)
        except SystemExit:
            failures.append(f"{_page_id(page)}:{line}: storm-vlm {shlex.join(argv)}\n  "
                            f"{stderr.getvalue().strip().splitlines()[-1]}")
    assert not failures, "\n".join(failures)


def test_the_shell_blocks_show_every_command_but_demo():
    """The scan above reads what it should: the pages' shell blocks run every command but `demo`,
    which they show as `make demo`."""
    shown = {argv[0] for page in PAGES for _, argv in _shell_commands(page) if argv}
    assert shown >= set(COMMANDS) - {"demo"}


def test_every_inline_storm_vlm_flag_is_a_flag_of_its_command():
    """`storm-vlm COMMAND ... --flag` written in running text or a table (a fragment, so only the flag
    names are checked), on every page."""
    options = {name: set(_subparser(name)._option_string_actions) for name in COMMANDS}
    wrong = []
    for page in PAGES:
        for command, rest in re.findall(r"storm-vlm (\w+)([^`\n]*)", page.read_text()):
            if command == "COMMAND":  # the README's generic `storm-vlm COMMAND --help`
                continue
            if command not in COMMANDS:
                wrong.append((_page_id(page), command))
                continue
            wrong += [(_page_id(page), command, flag) for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)
                      if flag not in options[command]]
    assert wrong == []


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_relative_link_and_repository_path_exists(page):
    text = page.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and anchor not in _anchors(linked)):
            broken.append(target)
    for path in re.findall(r"(?<![\w./-])((?:src|tests|benchmarks|configs|docs)/[\w./-]*\w)", text):
        if not (ROOT / path).exists():
            broken.append(path)
    assert broken == []


def test_every_storm_vlm_name_the_docs_cite_exists():
    """`storm_vlm.a.b.name` in the text: a module that imports, or an attribute of one."""
    missing = []
    for name in sorted({n for page in PAGES for n in re.findall(r"\bstorm_vlm(?:\.\w+)+", page.read_text())}):
        parts = name.split(".")
        for split in range(len(parts), 0, -1):
            with contextlib.suppress(ModuleNotFoundError):
                obj = importlib.import_module(".".join(parts[:split]))
                break
        for attribute in parts[split:]:
            obj = getattr(obj, attribute, None)
        if obj is None:
            missing.append(name)
    assert missing == []


def test_performance_page_quotes_the_cost_models_prefill_flop_shares():
    """The bench model's claim to keep the real model's proportions rests on these shares; they are
    the ones `benchmarks/cost_model.py` prints (one decimal), the real prompt 64 text tokens."""
    quoted = re.search(r"FLOP shares \(vision / projector / LLM\) are ([\d.]+) / ([\d.]+) / ([\d.]+) % at 128 "
                       r"frames vs ([\d.]+) / ([\d.]+) / ([\d.]+) %", (ROOT / "docs/performance.md").read_text())
    bench, defaults = load_model_config(ROOT / "configs" / "bench-cpu.yaml")
    computed = []
    for config, text_tokens in ((bench, defaults["text_tokens"]), (real_config(), 64)):
        cost = pipeline_cost(config, 128, DEFAULT_COMPRESSIONS[1], text_tokens)
        computed += [f"{100 * getattr(cost, part).flops / cost.prefill_flops:.1f}"
                     for part in ("vision_tower", "projector", "llm_prefill")]
    assert list(quoted.groups()) == computed
