"""The `storm-vlm` command (also `python -m storm_vlm`).

Each subcommand lives in its own module under `storm_vlm.commands`, exposing
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their
subcommand runs, so `storm-vlm --help` stays fast and a missing optional dependency of
one command never breaks another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from storm_vlm import __version__
from storm_vlm.errors import StormError
from storm_vlm.perf.allocator import tune_cpu_allocator
from storm_vlm.utils import did_you_mean

# name -> (module under storm_vlm.commands, one-line help)
COMMANDS = {
    "demo": ("demo", "test the paper's claims: STORM vs the VILA baseline on the synthetic benchmark, with CIs"),
    "chat": ("chat", "ask a model a question about a video"),
    "train": ("train", "train a stage (align / sft / long) from a YAML config"),
    "eval": ("evaluate", "evaluate a model on a video benchmark"),
    "profile": ("profile", "per-module latency breakdown (vision tower / projector / LLM)"),
    "build": ("build", "assemble a STORM model from local SigLIP and LLM folders"),
    "synth": ("synth", "generate the synthetic temporal-reasoning video benchmark"),
    "web": ("web", "web demo (gradio)"),
    "serve": ("serve", "HTTP API (FastAPI)"),
    "watch": ("watch", "watch a growing or live video (causal projector) and answer questions while it runs"),
    "plan": ("plan", "which frames x (pool, sample) choices fit an LLM context, with predicted prefill and memory"),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    return importlib.import_module(f"storm_vlm.commands.{module_name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="storm-vlm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"storm-vlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _load(name).add_arguments(p)
    return parser


def _check_words(parser: argparse.ArgumentParser, argv: list[str], command: str | None) -> None:
    """A misspelt command or `--flag` is one error naming it with the closest right spelling, from the
    parser it belongs to (so the right usage is shown). Left to argparse, a command's unknown flag is
    reported by the top-level parser after the command's required arguments were checked, so
    `plan --modle DIR` would only say that --model is missing."""
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if command is None and first < len(argv):
        parser.error(f"unknown command {argv[first]!r}{did_you_mean(argv[first], COMMANDS)}; "
                     f"commands: {', '.join(COMMANDS)}")
    parts = [(parser, argv[:first])]
    if command is not None:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        parts.append((sub, argv[first + 1:]))
    for owner, tokens in parts:
        flags = [f for action in owner._actions for f in action.option_strings]
        for token in tokens:
            if token == "--":
                break
            name = token.split("=", 1)[0]
            if name.startswith("--") and not any(f.startswith(name) for f in flags):  # argparse takes prefixes
                owner.error(f"unrecognized argument {name}{did_you_mean(name, flags)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    _check_words(parser, argv, command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        module = _load(args.command)
    except ModuleNotFoundError as exc:
        print(f"storm-vlm {args.command}: not available ({exc})", file=sys.stderr)
        return 2
    if not getattr(args, "no_tune_malloc", False):
        tune_cpu_allocator()  # freed tensors reused, not page-faulted in again (see storm_vlm.perf.allocator)
    try:
        return int(module.run(args) or 0)
    except StormError as exc:
        print(f"storm-vlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"storm-vlm {args.command}: interrupted", file=sys.stderr)
        return 130
