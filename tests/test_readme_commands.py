"""Every `swarm ...` command line the README shows parses as written, with the meaning it
shows: the prompt after ``--initial-peers`` stays the prompt, each flag gets its value."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from peers.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    """`swarm ...` lines of the README's code blocks, continuation lines joined."""
    commands, in_code, pending = [], False, ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code, pending = not in_code, ""
            continue
        if not in_code:
            continue
        text = pending + line.split("  #", 1)[0].strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        if re.match(r"^swarm \w", text):
            commands.append(text)
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands():
    assert any(c.startswith("swarm generate") for c in COMMANDS)
    assert any(c.startswith("swarm api") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses_as_written(command):
    words = shlex.split(command)[1:]
    args = build_parser().parse_args(words)
    if getattr(args, "fix_arguments", None) is not None:
        args.fix_arguments(args)
    if args.command == "generate":  # the quoted prompt is the prompt, not another peer
        assert args.prompt == words[-1] and all(peer.startswith("/") for peer in args.initial_peers)
    for flag, value in itertools.pairwise(words):
        if flag.startswith("--") and not value.startswith("-") and hasattr(args, flag[2:].replace("-", "_")):
            parsed = getattr(args, flag[2:].replace("-", "_"))
            if isinstance(parsed, bool):  # a switch: the next word is not its value
                continue
            if isinstance(parsed, int | float):  # "1e-3" is 0.001
                assert float(value) == parsed, f"{flag} {value!r} parsed as {parsed!r}"
                continue
            assert value == parsed or value in (
                parsed if isinstance(parsed, list | tuple) else [str(parsed)]
            ), f"{flag} {value!r} parsed as {parsed!r}"
