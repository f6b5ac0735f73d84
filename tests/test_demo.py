"""``boxfiles demo`` on a filesystem too small for it: refused up front with
the directory and both amounts named, and any later failure names a path."""

from __future__ import annotations

import fnmatch
import logging
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from boxfiles import _demo
from boxfiles._cli import EXIT_LOCAL, EXIT_OK, EXIT_REMOTE, main
from boxfiles._client._progress import format_bytes

from .helpers.processes import clean_env, one_line_error

MiB = 1024 * 1024


@contextmanager
def tmpfs(mount: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes at ``mount``, unmounted on exit."""
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "tiny", 4 * MiB) as mount:
        yield mount


async def run_demo(tmpdir: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "boxfiles", "demo", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=clean_env(TMPDIR=str(tmpdir)),
        )


async def test_demo_fits_in_what_it_asks_for(tmp_path: Path) -> None:
    # Exactly the space it says it needs is enough, on a filesystem that
    # lists a directory's names in another order than they were made.
    needed = _demo.space_needed(big_mib=3, small_files=50)
    with tmpfs(tmp_path / "fits", needed) as mount:
        result = await run_demo(mount, "--big-mib", "3", "--small-files", "50")
        assert result.returncode == EXIT_OK, result.stderr
        assert b"round trip exact" in result.stdout
        assert list(mount.iterdir()) == []


async def test_demo_refuses_when_tmpdir_is_too_small(tiny_tmpfs: Path) -> None:
    result = await run_demo(tiny_tmpfs)
    assert result.returncode == EXIT_LOCAL
    needed = format_bytes(_demo.space_needed(big_mib=256, small_files=2000))
    assert needed == "871.31 MiB"  # measured peak: 833.1 MiB (see the README)
    assert one_line_error(result) == (
        f"boxfiles: demo: {tiny_tmpfs}: the demo needs {needed} free here, there is 4.00 MiB "
        "(set TMPDIR to a roomier directory, or pass a smaller --big-mib)"
    )
    assert result.stdout == b""  # refused before building anything
    assert list(tiny_tmpfs.iterdir()) == []


@pytest.mark.parametrize(
    ("size", "big_mib", "status", "message"),
    [
        # Building the sample tree fails: the work directory is named.
        pytest.param(
            4 * MiB,
            8,
            EXIT_LOCAL,
            "demo: {tmpdir}/boxfiles-demo-*: No space left on device",
            id="build",
        ),
        # The embedded server's copy fails: where it was working is named.
        pytest.param(
            30 * MiB,
            8,
            EXIT_REMOTE,
            "demo (working in {tmpdir}): extracting into /sample: No space left on device*",
            id="copy-in",
        ),
    ],
)
def test_demo_failing_for_space_names_the_directory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    size: int,
    big_mib: int,
    status: int,
    message: str,
) -> None:
    # The probe lies, as on a filesystem that fills up after the check.
    monkeypatch.setattr(_demo, "free_bytes", lambda directory: 1 << 40)
    server_log = logging.getLogger("boxfiles.server")
    level = server_log.level
    with tmpfs(tmp_path / "small", size) as mount:
        monkeypatch.setattr(tempfile, "tempdir", str(mount))
        try:
            assert main(["demo", "--big-mib", str(big_mib), "--small-files", "50"]) == status
        finally:
            server_log.setLevel(level)  # the demo quietens it, for good in its process
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert fnmatch.fnmatchcase(err, "boxfiles: " + message.format(tmpdir=mount) + "\n"), err
        assert list(mount.iterdir()) == []
