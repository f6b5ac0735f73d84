"""The ``boxfiles`` command and servers as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio


@asynccontextmanager
async def started_process(
    argv: list[str], *, prompt: float, env: dict[str, str] | None = None
) -> AsyncIterator[trio.Process]:
    """``argv`` as a process, once it has printed "serving" on stderr or
    stdout (whichever it uses: both are read); killed and waited for on exit."""
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    try:
        assert process.stdout is not None
        seen = b""
        with trio.fail_after(prompt):
            while b"serving" not in seen:
                data = await process.stdout.receive_some()
                assert data, f"the process ended before serving: {seen.decode()}"
                seen += data
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


PROMPT = 10.0  # a process start included; never a speed claim


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXFILES_")}
    env.update(extra)
    return env


async def boxfiles_cmd(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "boxfiles", *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env or clean_env(),
            cwd=cwd,
        )


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    """The error output, which must be a single line with no traceback."""
    text = result.stderr.decode()
    assert text.count("\n") == 1, text
    assert text.startswith("boxfiles: "), text
    assert "Traceback" not in text
    return text.strip()


@asynccontextmanager
async def serve_process(root: Path, sock: Path, *extra: str) -> AsyncIterator[trio.Process]:
    """``boxfiles serve`` as a subprocess, up and listening."""
    argv = [sys.executable, "-m", "boxfiles", "serve", "--root", str(root)]
    argv += ["--listen", f"unix:{sock}", *extra]
    async with started_process(argv, prompt=PROMPT, env=clean_env()) as process:
        yield process
