"""The `ihd-node` command at first contact (issue 7 item 16): --version, help for every option, the README's
storescu example."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from ihd_node import __version__
from ihd_node.classes import SUBTYPES
from ihd_node.commands.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "ihd-node"


def parsers(parser: argparse.ArgumentParser, name: str = "ihd-node"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_version() -> None:
    proc = subprocess.run([str(EXE), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ihd-node {__version__}"


def test_every_option_and_argument_has_help() -> None:
    missing = []
    for name, parser in parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == [], f"options without help text: {missing}"


def test_subtypes_help_lists_the_valid_names() -> None:
    [(_, phantom)] = [(n, p) for n, p in parsers(build_parser()) if n == "ihd-node phantom"]
    [subtypes] = [a for a in phantom._actions if "--subtypes" in a.option_strings]
    for name in (*SUBTYPES, "none", "any"):
        assert name in subtypes.help, name


def test_readme_shows_storescu_with_recursion_for_phantom_folders() -> None:
    readme = (ROOT / "README.md").read_text()
    phantom = re.search(r"^ihd-node phantom (\S+).*$", readme, re.M)
    storescu = re.search(r"^storescu .*$", readme, re.M)
    assert phantom and storescu, "README lacks the phantom + storescu example"
    # The phantom command writes one folder per series: storescu needs +sd (scan folders) and +r (recurse).
    assert "+sd" in storescu.group(0) and "+r" in storescu.group(0)
    assert phantom.group(1).rstrip("/") in storescu.group(0)
    assert "-aec IHD_AI" in storescu.group(0)
