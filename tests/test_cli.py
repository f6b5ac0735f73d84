"""The ``boxfiles`` command, run as a subprocess: serve, cp both ways,
tar on stdin/stdout, every error path's exit status and message, and clean
shutdown on signals."""

from __future__ import annotations

import fcntl
import importlib.metadata
import io
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import tarfile
import termios
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from boxfiles._aio import ServerCall
from boxfiles._cli import EXIT_LOCAL, EXIT_OK, EXIT_REMOTE, EXIT_UNSAFE, EXIT_USAGE
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from boxfiles._wire import SIZE_HINT_KEY

from .helpers import grpcio_sink as sink
from .helpers.grpcio_sink import start_grpcio_server
from .helpers.processes import PROMPT, boxfiles_cmd, clean_env, one_line_error, serve_process
from .helpers.scripted import Record, scripted_server

MiB = 1024 * 1024


@pytest.fixture
async def served(tmp_path: Path, sock_dir: Path) -> AsyncIterator[tuple[Path, str]]:
    root = tmp_path / "root"
    root.mkdir()
    sock = sock_dir / "cli.sock"
    async with serve_process(root, sock) as process:
        yield root, f"unix:{sock}"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(PROMPT):
            assert await process.wait() == EXIT_OK


# -------------------------------------------------------------- happy paths


async def test_cp_both_directions(served: tuple[Path, str], tmp_path: Path) -> None:
    root, target = served
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_bytes(b"hello")
    (tree / "link").symlink_to("sub/f.txt")
    result = await boxfiles_cmd("cp", "--connect", target, str(tree), "box:/in")
    assert (result.returncode, result.stderr) == (EXIT_OK, b"")
    assert (root / "in" / "sub" / "f.txt").read_bytes() == b"hello"
    assert os.readlink(root / "in" / "link") == "sub/f.txt"
    env = clean_env(BOXFILES_CONNECT=target)
    result = await boxfiles_cmd("cp", "box:/in", str(tmp_path / "out"), env=env)
    assert (result.returncode, result.stderr, result.stdout) == (EXIT_OK, b"", b"")
    assert (tmp_path / "out" / "sub" / "f.txt").read_bytes() == b"hello"


async def test_cp_tar_on_stdin_and_stdout(served: tuple[Path, str], tmp_path: Path) -> None:
    root, target = served
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("piped.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"piped"))
    result = await boxfiles_cmd(
        "cp", "--connect", target, "-", "box:/dir/", stdin=archive.getvalue()
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert (root / "dir" / "piped.txt").read_bytes() == b"piped"
    result = await boxfiles_cmd("cp", "--connect", target, "box:/dir", "-")
    assert result.returncode == EXIT_OK, result.stderr
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        assert sorted(tar.getnames()) == ["dir", "dir/piped.txt"]
        extracted = tar.extractfile("dir/piped.txt")
        assert extracted is not None
        assert extracted.read() == b"piped"


async def test_cp_no_overwrite_and_no_parents(served: tuple[Path, str], tmp_path: Path) -> None:
    root, target = served
    (root / "exists").write_bytes(b"old")
    (tmp_path / "exists").write_bytes(b"new")
    result = await boxfiles_cmd(
        "cp", "--connect", target, "--no-overwrite", str(tmp_path / "exists"), "box:/exists"
    )
    assert result.returncode == EXIT_REMOTE
    assert "ALREADY_EXISTS" in one_line_error(result)
    result = await boxfiles_cmd(
        "cp", "--connect", target, "--no-parents", str(tmp_path / "exists"), "box:/a/b/c"
    )
    assert result.returncode == EXIT_REMOTE
    assert "NOT_FOUND" in one_line_error(result)
    assert (root / "exists").read_bytes() == b"old"
    assert sorted(os.listdir(root)) == ["exists"]


# ------------------------------------------------------------------- errors


USAGE_ERRORS: list[tuple[list[str], str]] = [
    (["cp", "a", "b"], "exactly one of SRC and DST"),
    (["cp", "box:/a", "box:/b"], "exactly one of SRC and DST"),
    (["cp", "a", "box:"], "needs a path"),
    (["cp", "--connect", "unix:/x", "a", "box:rel/b"], "must be absolute: box:rel/b"),
    (["cp", "--connect", "unix:/x", "box:.", "a"], "must be absolute: box:."),
    (["cp", "--connect", "unix:/x", "a", "box:/b/../c"], "'..' component: box:/b/../c"),
    (["cp", "--connect", "unix:/x", "box:/..", "a"], "'..' component: box:/.."),
    (["cp", "a", "box:/b"], "pass --connect URI or set BOXFILES_CONNECT"),
    (["cp", "--connect", "ftp://x", "a", "box:/b"], "unsupported target scheme"),
    (["cp", "--connect", "unix:/x", "--no-overwrite", "box:/a", "b"], "into the box only"),
    (["cp", "--connect", "unix:/x", "--timeout", "0", "a", "box:/b"], "must be positive"),
    (["cp", "--bogus", "a", "box:/b"], "unrecognized arguments"),
    (["cp", "a"], "required: DST"),
    ([], "required: COMMAND"),
    (["serve", "--root", ".", "--listen", "10.1.2.3:5000"], "--allow-remote"),
    (["serve", "--root", "/no/such/dir", "--listen", "unix:/tmp/x.sock"], "not a directory"),
    (["serve", "--root", ".", "--listen", "x", "--max-upload-bytes", "-1"], "must be positive"),
]


async def test_usage_errors() -> None:
    """Each case in its own process, all at once (startup dominates)."""
    results: dict[int, subprocess.CompletedProcess[bytes]] = {}

    async def run(i: int, args: list[str]) -> None:
        results[i] = await boxfiles_cmd(*args)

    async with trio.open_nursery() as nursery:
        for i, (args, _) in enumerate(USAGE_ERRORS):
            nursery.start_soon(run, i, args)
    for i, (args, message) in enumerate(USAGE_ERRORS):
        assert results[i].returncode == EXIT_USAGE, args
        assert message in one_line_error(results[i]), args


async def test_local_errors(served: tuple[Path, str], tmp_path: Path) -> None:
    root, target = served
    (root / "f").write_bytes(b"f")
    result = await boxfiles_cmd("cp", "--connect", target, str(tmp_path / "missing"), "box:/x")
    assert result.returncode == EXIT_LOCAL
    assert f"cannot read {tmp_path / 'missing'}: No such file" in one_line_error(result)
    result = await boxfiles_cmd("cp", "--connect", target, "box:/f", str(tmp_path / "no" / "dir"))
    assert result.returncode == EXIT_LOCAL
    assert f"cannot write {tmp_path / 'no' / 'dir'}: No such file" in one_line_error(result)
    assert sorted(os.listdir(tmp_path)) == ["root"]


async def test_remote_errors(served: tuple[Path, str], sock_dir: Path, tmp_path: Path) -> None:
    _root, target = served
    result = await boxfiles_cmd("cp", "--connect", target, "box:/nope", str(tmp_path / "x"))
    assert result.returncode == EXIT_REMOTE
    assert (
        one_line_error(result)
        == "boxfiles: box:/nope: source path does not exist: /nope (NOT_FOUND)"
    )
    result = await boxfiles_cmd(
        "cp", "--connect", target, "--container", "c9", "box:/x", str(tmp_path / "x")
    )
    assert result.returncode == EXIT_REMOTE
    assert "container not found: c9 (FAILED_PRECONDITION)" in one_line_error(result)
    result = await boxfiles_cmd(
        "cp", "--connect", f"unix:{sock_dir}/absent.sock", "box:/x", str(tmp_path / "x")
    )
    assert result.returncode == EXIT_REMOTE
    # The address once, then the reason.
    assert (
        one_line_error(result)
        == f"boxfiles: cannot reach the server at unix:{sock_dir}/absent.sock: "
        "No such file or directory"
    )
    assert sorted(os.listdir(tmp_path)) == ["root"]


async def test_timeout_is_a_remote_error(sock_dir: Path, tmp_path: Path) -> None:
    async def stall(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        await trio.sleep_forever()

    async with scripted_server(sock_dir, download=stall) as srv:
        result = await boxfiles_cmd(
            "cp", "--connect", srv.target, "--timeout", "0.5", "box:/d", str(tmp_path / "out")
        )
    assert result.returncode == EXIT_REMOTE
    assert "(DEADLINE_EXCEEDED)" in one_line_error(result)
    assert list(tmp_path.iterdir()) == []


async def test_stdout_failure_names_stdout(served: tuple[Path, str], tmp_path: Path) -> None:
    root, target = served
    (root / "f").write_bytes(b"f" * MiB)
    with open("/dev/full", "wb") as full:  # every write: ENOSPC
        with trio.fail_after(60):
            result = await trio.run_process(
                [sys.executable, "-m", "boxfiles", "cp", "--connect", target, "box:/f", "-"],
                stdout=full,
                capture_stderr=True,
                check=False,
                env=clean_env(),
            )
    assert result.returncode == EXIT_LOCAL
    assert one_line_error(result) == "boxfiles: cannot write stdout: No space left on device"


async def test_stdin_failure_names_stdin(served: tuple[Path, str], tmp_path: Path) -> None:
    root, target = served
    # Open for writing only: reading it fails with EBADF.
    write_only = os.open(tmp_path / "w", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with trio.fail_after(60):
            result = await trio.run_process(
                [sys.executable, "-m", "boxfiles", "cp", "--connect", target, "-", "box:/x/"],
                stdin=write_only,
                capture_stderr=True,
                check=False,
                env=clean_env(),
            )
    finally:
        os.close(write_only)
    assert result.returncode == EXIT_LOCAL
    assert one_line_error(result) == "boxfiles: cannot read stdin: Bad file descriptor"
    assert list(root.iterdir()) == []


async def test_version() -> None:
    result = await boxfiles_cmd("--version")
    assert result.returncode == EXIT_OK
    assert result.stdout.decode() == f"boxfiles {importlib.metadata.version('boxfiles')}\n"
    assert re.fullmatch(r"boxfiles \d+\.\d+\.\d+\S*\n", result.stdout.decode())


async def test_unsafe_archive_exit_status(sock_dir: Path, tmp_path: Path) -> None:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))

    async def hostile(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        await call.send(DownloadChunk(data=archive.getvalue(), source_is_dir=False))

    async with scripted_server(sock_dir, download=hostile) as srv:
        result = await boxfiles_cmd("cp", "--connect", srv.target, "box:/f", str(tmp_path / "out"))
    assert result.returncode == EXIT_UNSAFE
    assert "contains ..: ../escape" in one_line_error(result)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_cp_interrupted_leaves_nothing(sock_dir: Path, tmp_path: Path, signum: int) -> None:
    started = trio.Event()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("d/big")
        info.size = 8 * MiB
        tar.addfile(info, io.BytesIO(b"z" * info.size))
    head = archive.getvalue()[: 4 * MiB]

    async def stall(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        for i in range(0, len(head), MiB):
            await call.send(DownloadChunk(data=head[i : i + MiB], source_is_dir=i == 0))
        started.set()
        await trio.sleep_forever()

    async with scripted_server(sock_dir, download=stall) as srv:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "boxfiles",
                "cp",
                "--connect",
                srv.target,
                "box:/d",
                str(tmp_path / "out"),
            ],
            stderr=subprocess.PIPE,
            env=clean_env(),
        )
        with trio.fail_after(PROMPT):
            await started.wait()
            await trio.sleep(0.2)  # the client is unpacking what it got
            process.send_signal(signum)
            assert await process.wait() == 128 + signum
        assert process.stderr is not None
        stderr = await process.stderr.receive_some()
    assert b"interrupted" in stderr
    assert list(tmp_path.iterdir()) == []


async def test_serve_sigterm_mid_upload_leaves_nothing(tmp_path: Path, sock_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    sock = sock_dir / "s.sock"
    async with serve_process(root, sock) as server:
        client = await trio.lowlevel.open_process(
            [sys.executable, "-m", "boxfiles", "cp", "--connect", f"unix:{sock}", "-", "box:/up/"],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
        )
        assert client.stdin is not None
        # Half an archive: the upload is in flight when the server stops.
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo("half")
            info.size = 4 * MiB
            tar.addfile(info, io.BytesIO(b"h" * info.size))
        await client.stdin.send_all(archive.getvalue()[: 2 * MiB])
        # Give the server a moment to start unpacking (its staging shows in
        # root while it does).
        with trio.move_on_after(2):
            while not any(root.iterdir()):
                await trio.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        with trio.fail_after(PROMPT):
            assert await server.wait() == EXIT_OK
            assert await client.wait() == EXIT_REMOTE
        await client.stdin.aclose()
    assert list(root.iterdir()) == []
    assert not sock.exists()


async def test_serve_sigint_removes_socket(tmp_path: Path, sock_dir: Path) -> None:
    sock = sock_dir / "i.sock"
    async with serve_process(tmp_path, sock) as server:
        assert sock.exists()
        server.send_signal(signal.SIGINT)
        with trio.fail_after(PROMPT):
            assert await server.wait() == EXIT_OK
    assert not sock.exists()


async def test_help_documents_exit_statuses() -> None:
    result = await boxfiles_cmd("cp", "--help")
    assert result.returncode == EXIT_OK
    text = result.stdout.decode()
    for code in (EXIT_USAGE, EXIT_LOCAL, EXIT_REMOTE, EXIT_UNSAFE):
        assert f"\n  {code}  " in text, text


async def test_demo_small(tmp_path: Path) -> None:
    result = await boxfiles_cmd("demo", "--big-mib", "3", "--small-files", "50")
    assert result.returncode == EXIT_OK, result.stderr
    text = result.stdout.decode()
    assert "round trip exact" in text
    for label in ("files", "bytes", "copy_in", "copy_out", "peak RSS"):
        assert label in text


async def on_terminal(
    *args: str, columns: int = 100, interrupt: trio.Event | None = None
) -> tuple[int, bytes]:
    """Run ``boxfiles ARGS`` with stdout and stderr on a pseudo-terminal of
    ``columns`` columns; SIGINT it once ``interrupt`` is set. Its exit status
    and everything it drew."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "boxfiles", *args],
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=terminal,
            env=clean_env(),
        )
        os.close(terminal)
        terminal = -1
        shown = b""

        async def read_all() -> None:
            nonlocal shown
            while True:
                try:
                    data = await trio.to_thread.run_sync(os.read, controller, 65536)
                except OSError:  # EIO: the terminal's other side closed
                    return
                if not data:
                    return
                shown += data

        async def signal_it() -> None:
            assert interrupt is not None
            await interrupt.wait()
            process.send_signal(signal.SIGINT)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                if interrupt is not None:
                    nursery.start_soon(signal_it)
                await read_all()
                nursery.cancel_scope.cancel()
            return await process.wait(), shown
    finally:
        os.close(controller)
        if terminal != -1:
            os.close(terminal)


async def test_progress_bar_only_on_a_terminal(served: tuple[Path, str], tmp_path: Path) -> None:
    _root, target = served
    (tmp_path / "data.bin").write_bytes(os.urandom(2 * MiB))
    status, shown = await on_terminal(
        "cp", "--connect", target, str(tmp_path / "data.bin"), "box:/data.bin"
    )
    assert status == EXIT_OK
    assert b"100%" in shown
    assert b"2.01 MiB/2.01 MiB" in shown  # archive bytes: the data plus tar headers
    # Counted in 1024s, so labelled in IEC units, the speed too.
    assert re.search(rb"\d MiB/s\]", shown), shown
    assert not re.search(rb"\d ?[kMG]B", shown), shown
    # Piped (as in every other test here) or --quiet: no bar at all.
    quiet = await boxfiles_cmd(
        "cp", "--connect", target, "-q", str(tmp_path / "data.bin"), "box:/q"
    )
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (EXIT_OK, b"", b"")


async def test_progress_bar_on_a_terminal_of_no_width(
    served: tuple[Path, str], tmp_path: Path
) -> None:
    _root, target = served
    (tmp_path / "data.bin").write_bytes(os.urandom(2 * MiB))
    status, shown = await on_terminal(
        "cp", "--connect", target, str(tmp_path / "data.bin"), "box:/d", columns=0
    )
    assert status == EXIT_OK
    # Drawn whole at a fallback width (80), not squeezed to nothing.
    last = shown.split(b"\r")[-2].decode()
    assert re.fullmatch(r"data\.bin: 100%\|█+\| 2\.01 MiB/2\.01 MiB \[.*/s\]", last), last
    assert len(last) == 80, last


async def test_progress_bar_copy_out_shows_the_hinted_total(sock_dir: Path, tmp_path: Path) -> None:
    def archive_of(name: str) -> bytes:
        # One file, named by the basename asked for, as real peers name it.
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = 3 * MiB
            tar.addfile(info, io.BytesIO(b"o" * info.size))
        return archive.getvalue()

    def download(request: DownloadRequest, context: Any) -> Iterator[DownloadChunk]:
        data = archive_of(request.src_path.lstrip("/"))
        if request.src_path == "/hinted":
            context.send_initial_metadata(((SIZE_HINT_KEY, str(len(data))),))
        for i in range(0, len(data), MiB):
            yield DownloadChunk(data=data[i : i + MiB], source_is_dir=False)

    server = start_grpcio_server(f"unix:{sock_dir}/g.sock", sink.upload, download)
    try:
        args = ("cp", "--connect", f"unix:{sock_dir}/g.sock")
        status, shown = await on_terminal(*args, "box:/hinted", str(tmp_path / "a"))
        assert status == EXIT_OK
        assert b"100%" in shown
        assert b"3.01 MiB/3.01 MiB" in shown  # archive bytes: data plus headers
        # Without the hint there is no total to show: no percentage.
        status, shown = await on_terminal(*args, "box:/plain", str(tmp_path / "b"))
        assert status == EXIT_OK
        assert b"%" not in shown
        assert b"3.01 MiB [" in shown
    finally:
        server.stop(grace=None).wait()
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == b"o" * 3 * MiB


async def test_progress_bar_interrupted_is_not_drawn_again(sock_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(os.urandom(16 * MiB))
    stalled = trio.Event()

    async def stall(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        await call.recv()
        stalled.set()
        await trio.sleep_forever()

    async with scripted_server(sock_dir, upload=stall) as srv:
        status, shown = await on_terminal(
            "cp", "--connect", srv.target, str(tmp_path / "data.bin"), "box:/d", interrupt=stalled
        )
    assert status == 128 + signal.SIGINT
    # The bar is cleared, not redrawn: after the "^C" a terminal echoes, a
    # redraw lands on a new line and the bar shows twice.
    assert re.search(rb"\r +\rboxfiles: interrupted; nothing was left half-written\r\n$", shown), (
        shown
    )


async def test_serve_cannot_listen_is_a_local_error(tmp_path: Path, sock_dir: Path) -> None:
    taken = sock_dir / "not-a-socket"
    taken.write_bytes(b"")
    result = await boxfiles_cmd("serve", "--root", str(tmp_path), "--listen", f"unix:{taken}")
    assert result.returncode == EXIT_LOCAL
    assert f"cannot listen on unix:{taken}" in one_line_error(result)
    assert taken.read_bytes() == b""
