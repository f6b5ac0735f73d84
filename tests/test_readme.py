"""The README's newcomer path, as a newcomer meets it: the set-up commands come
first and verbatim, the round-trip example runs, every command-line option is
documented, and every link into the repository resolves."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import trio

from boxfiles._cli import _parser

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()

SET_UP = [
    "python3 -m venv .venv && .venv/bin/pip install -q nox && .venv/bin/nox -s demo",
    "python3 -m venv .venv && .venv/bin/pip install -q nox && .venv/bin/nox -s tests",
]


def test_set_up_commands_come_first_and_verbatim() -> None:
    # The first commands a reader meets, as indented lines (CI runs the
    # second one from the README as it stands).
    first_code = re.findall(r"```sh\n(.*?)```", README, re.S)[:2]
    assert [block.strip() for block in first_code] == SET_UP
    for command in SET_UP:
        assert f"\n  {command}\n" in README


async def test_round_trip_example_runs(tmp_path: Path) -> None:
    match = re.search(r"<!-- round-trip -->\n```python\n(.*?)```", README, re.S)
    assert match, "README lost its round-trip example"
    script = tmp_path / "example.py"
    script.write_text(match.group(1))
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, str(script)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={"PATH": "/usr/bin:/bin", "TMPDIR": "/tmp"},
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"<h1>hello, box</h1>\n"
    # Nothing on stderr: copy_in's probe of a destination that does not
    # exist yet is routine, and the server logs it below WARNING.
    assert result.stderr == b""


def command_options(name: str) -> set[str]:
    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    command = subparsers.choices[name]
    return {
        option
        for action in command._actions
        for option in action.option_strings
        if option not in ("-h", "--help")
    }


def test_every_option_is_in_the_readme() -> None:
    section = README[
        README.index("## The `boxfiles` command") : README.index("## Using a real box")
    ]
    for name in ("cp", "serve"):
        for option in command_options(name):
            assert re.search(rf"`{option}[ `]", section), f"{name} {option} is not documented"


def test_links_into_the_repository_resolve() -> None:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README):
        assert (REPO / target).exists(), target
    for doc in (REPO / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), (doc.name, target)
