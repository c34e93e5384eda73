"""The README is the manual: every CLI command and option, and every magic, is documented;
it starts with what the tool is and exactly two set-up commands (DEVELOPERS' brief)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from nbrunbook.engine.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MAGICS = ["start", "attach", "status", "journal", "instances", "rerun", "resolve", "stop", "dashboard"]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_readme_starts_with_two_setup_commands() -> None:
    head = README.split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", head, re.S)
    assert block, "no set-up commands at the top of the README"
    commands = [ln for ln in block.group(1).splitlines() if ln.strip()]
    assert len(commands) == 2
    assert commands[0].startswith("pip install -e . && nbrunbook run ")
    assert commands[1] == "pip install -e '.[test]' && pytest"
    assert "pip install -e '.[test]' && pytest" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_cli_command_and_option_is_documented(command: str) -> None:
    assert re.search(rf"nbrunbook {re.escape(command)}\b", README), f"`nbrunbook {command}` is not in the README"
    section = README.split(f"### nbrunbook {command}", 1)
    assert len(section) == 2, f"no '### nbrunbook {command}' reference section"
    body = section[1].split("\n### ", 1)[0]
    for action in _subcommands()[command]._actions:
        longest = max(action.option_strings, key=len, default=None)
        if longest in (None, "--help"):
            continue
        assert longest in body, f"option {longest} of `nbrunbook {command}` is not documented in its section"


@pytest.mark.parametrize("magic", MAGICS)
def test_every_magic_is_documented(magic: str) -> None:
    assert f"%runbook {magic}" in README


def test_magic_list_matches_the_extension() -> None:
    from nbrunbook.kernel_ext.magics import RunbookMagics

    doc = RunbookMagics.runbook.__doc__ or ""
    for magic in MAGICS:
        assert re.search(rf"\b{magic}\b", doc), f"{magic} is not a %runbook command any more"


def test_readme_links_point_to_files() -> None:
    for target in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / target).exists(), f"README links to missing {target}"
