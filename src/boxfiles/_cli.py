"""The ``boxfiles`` command: serve, cp and demo."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from ._client import describe_oserror, format_bytes, open_client
from ._errors import (
    FilesError,
    LocalIOError,
    RemoteError,
    Unavailable,
    UnsafeArchive,
)
from ._server import CONNECTION_IDLE_TIMEOUT, IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_TRANSFERS
from ._supervise import one_error
from ._target import TcpTarget, parse_target
from ._wire import check_container_id, check_path

if TYPE_CHECKING:
    from tqdm import tqdm

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_LOCAL = 3
EXIT_REMOTE = 4
EXIT_UNSAFE = 5

EXIT_CODES = f"""\
exit status:
  {EXIT_OK}    success (serve: also after Ctrl-C / SIGTERM, once shut down cleanly)
  {EXIT_INTERNAL}    internal error (a bug; set BOXFILES_DEBUG=1 for a traceback)
  {EXIT_USAGE}    usage error: bad arguments or options
  {EXIT_LOCAL}    local failure: reading or writing a path on this machine
  {EXIT_REMOTE}    remote failure: the server refused, failed or could not be reached
  {EXIT_UNSAFE}    the server sent an unsafe or corrupt archive (nothing was written)
  130  cp interrupted by Ctrl-C; 143: by SIGTERM (nothing half-written is left,
       but a tar being written to stdout stops where it was)
"""

BOX_PREFIX = "box:"

CP_DESCRIPTION = """\
Copy SRC to DST; exactly one of them is box:PATH.

Both ways, like docker cp: a directory lands inside the destination when
that is an existing directory, else becomes it; DIR/. merges its contents
into the destination; a file becomes the destination or lands inside
it. '-' as the local side streams a tar archive on stdin (SRC) or stdout
(DST). A progress bar is shown when stdout is a terminal."""


class UsageError(Exception):
    """Bad command-line arguments; exit status EXIT_USAGE."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error (argparse prints usage too).
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="boxfiles",
        description="Move files in and out of sandboxes over the boxlite.v1.Files gRPC service.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the reference Files server",
        description="Serve ROOT over the Files service until Ctrl-C or SIGTERM.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--root", required=True, metavar="DIR", help="the container root")
    serve.add_argument(
        "--listen",
        required=True,
        metavar="URI",
        help="unix:PATH, unix:///abs/path or [tcp://]host:port",
    )
    serve.add_argument(
        "--container-id",
        metavar="ID",
        default="",
        help="serve ROOT as this container id (default: the sole, unnamed container)",
    )
    serve.add_argument(
        "--max-upload-bytes",
        type=_positive_int,
        metavar="N",
        help="refuse uploads larger than N archive bytes (RESOURCE_EXHAUSTED)",
    )
    serve.add_argument(
        "--max-transfers",
        type=_positive_int,
        default=MAX_TRANSFERS,
        metavar="N",
        help=f"run at most N transfers at once, refuse more: RESOURCE_EXHAUSTED ({MAX_TRANSFERS})",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=IDLE_TIMEOUT,
        metavar="SECONDS",
        help="fail a transfer whose client makes no progress for this long: "
        f"DEADLINE_EXCEEDED ({IDLE_TIMEOUT:g})",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive_int,
        default=MAX_CONNECTIONS,
        metavar="N",
        help=f"hold at most N connections open, close more at once ({MAX_CONNECTIONS})",
    )
    serve.add_argument(
        "--connection-idle-timeout",
        type=_positive_float,
        default=CONNECTION_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that receives nothing and runs no call for this long "
        f"({CONNECTION_IDLE_TIMEOUT:g})",
    )
    serve.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback TCP address (there is no authentication)",
    )

    cp = commands.add_parser(
        "cp",
        help="copy files between this machine and a box",
        description=CP_DESCRIPTION,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dst", metavar="DST")
    cp.add_argument(
        "--connect",
        metavar="URI",
        default=os.environ.get("BOXFILES_CONNECT"),
        help="the server: unix:PATH or host:port (default: $BOXFILES_CONNECT)",
    )
    cp.add_argument("--container", metavar="ID", help="the container (default: the sole one)")
    cp.add_argument(
        "-L",
        "--follow-symlinks",
        action="store_true",
        help="copy what a symlink SRC points to, not the link",
    )
    cp.add_argument(
        "--no-overwrite",
        action="store_true",
        help="into the box: fail instead of replacing what exists",
    )
    cp.add_argument(
        "--no-parents",
        action="store_true",
        help="into the box: fail instead of creating missing parent directories",
    )
    cp.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar (there is none unless on a terminal)",
    )
    cp.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS", help="give up after this long"
    )

    demo = commands.add_parser(
        "demo",
        help="copy a sample tree in and out of an embedded server and report",
        description=(
            "Start a reference server in this process on a temporary unix socket, build a "
            "sample tree, copy it in and back out, check the round trip is exact, print a "
            "short report and clean up."
        ),
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--big-mib", type=_positive_int, default=256, metavar="N", help="size of the big file (256)"
    )
    demo.add_argument(
        "--small-files", type=_positive_int, default=2000, metavar="N", help="small files (2000)"
    )
    return parser


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, once installed)."""
    try:
        return importlib.metadata.version("boxfiles")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _fail(message: str) -> None:
    print(f"boxfiles: {message}", file=sys.stderr)


# ------------------------------------------------------------------ signals


@dataclass
class _Interrupt:
    signum: int | None = None


async def _until_signal(body: Callable[[], Awaitable[None]]) -> _Interrupt:
    """Run ``body``; SIGINT or SIGTERM cancels it (so it cleans up) and is
    reported instead of killing the process."""
    interrupt = _Interrupt()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals, one_error():
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    interrupt.signum = signum
                    nursery.cancel_scope.cancel()
                    return

            async def run() -> None:
                await body()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(run)
    return interrupt


# -------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    from ._server import serve_files

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        target = parse_target(args.listen, listen=True)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if isinstance(target, TcpTarget) and not target.is_loopback and not args.allow_remote:
        raise UsageError(
            f"{args.listen} is not a loopback address; the service has no authentication "
            "(pass --allow-remote to serve it anyway)"
        )
    root = {args.container_id: args.root} if args.container_id else args.root

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(
                lambda task_status: serve_files(
                    root,
                    args.listen,
                    max_upload_bytes=args.max_upload_bytes,
                    max_transfers=args.max_transfers,
                    idle_timeout=args.idle_timeout,
                    max_connections=args.max_connections,
                    connection_idle_timeout=args.connection_idle_timeout,
                    allow_remote=args.allow_remote,
                    task_status=task_status,
                )
            )
            print(f"boxfiles: serving {args.root} at {address}", file=sys.stderr, flush=True)

    try:
        interrupt = trio.run(_until_signal, body)
    except ValueError as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        _fail(f"cannot listen on {args.listen}: {err.strerror or err}")
        return EXIT_LOCAL
    if interrupt.signum is not None:
        print("boxfiles: server stopped", file=sys.stderr)
    return EXIT_OK


# ----------------------------------------------------------------------- cp


@dataclass(frozen=True)
class _Copy:
    into_box: bool
    local: str  # a path, or "-" for a tar on stdin/stdout
    remote: str


def _copy_plan(src: str, dst: str) -> _Copy:
    src_box, dst_box = src.startswith(BOX_PREFIX), dst.startswith(BOX_PREFIX)
    if src_box == dst_box:
        raise UsageError("exactly one of SRC and DST must be box:PATH")
    remote = (src if src_box else dst)[len(BOX_PREFIX) :]
    local = dst if src_box else src
    if not remote:
        raise UsageError("box:PATH needs a path after 'box:'")
    # A box has no working directory (the server would take it from "/"),
    # and a ".." would be refused by the server anyway: both are usage errors.
    if not remote.startswith("/"):
        raise UsageError(f"box:PATH must be absolute: box:{remote} (did you mean box:/{remote}?)")
    if ".." in remote.split("/"):
        raise UsageError(f"box:PATH must not contain a '..' component: box:{remote}")
    if not local:
        raise UsageError("the local path is empty")
    return _Copy(into_box=dst_box, local=local, remote=remote)


#: The bar's layout once the total is known, and before (or without) it;
#: ``done``, ``whole`` and ``speed`` are in IEC units (see _BarTqdm).
_BAR_WITH_TOTAL = (
    "{desc}: {percentage:3.0f}%|{bar}| {done}/{whole} [{elapsed}<{remaining}, {speed}]"
)
_BAR_NO_TOTAL = "{desc}: {done} [{elapsed}, {speed}]"


def _bar_class() -> type[tqdm[NoReturn]]:
    from tqdm import tqdm

    class _BarTqdm(tqdm):  # type: ignore[type-arg]  # generic only in its stubs
        # tqdm's monitor is a thread that would outlive the copy.
        monitor_interval = 0

        @property
        def format_dict(self) -> MutableMapping[str, Any]:
            found = super().format_dict
            # tqdm's smoothed rate, else (too early for one) the average.
            elapsed = found["elapsed"]
            rate = found["rate"] or (self.n / elapsed if elapsed else None)
            found.update(
                # tqdm takes a terminal reporting 0 columns at its word and
                # draws nothing useful; shutil falls back to 80 then (since
                # 3.11; on 3.10 it passes the 0 on).
                ncols=shutil.get_terminal_size().columns or 80,
                done=format_bytes(self.n),
                whole=format_bytes(self.total or 0),
                speed=f"{format_bytes(rate)}/s" if rate else "? B/s",
            )
            return found

    return _BarTqdm


class _Bar:
    """A tqdm progress bar fed by the progress callback."""

    def __init__(self, label: str) -> None:
        self._bar = _bar_class()(
            total=None, desc=label, file=sys.stderr, leave=True, bar_format=_BAR_NO_TOTAL
        )

    def __call__(self, done: int, total: int | None) -> None:
        if total is not None and self._bar.total != total:
            self._bar.total = total
            self._bar.bar_format = _BAR_WITH_TOTAL
        self._bar.update(done - self._bar.n)

    def close(self, *, interrupted: bool = False) -> None:
        # After Ctrl-C the terminal has echoed "^C" after the bar, which can
        # wrap the line: redrawing it there would show the bar twice.
        if interrupted:
            self._bar.leave = False
        self._bar.close()


class _StdinReader:
    def __init__(self) -> None:
        self._file = open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)

    async def read(self, max_bytes: int) -> bytes:
        # A pipe read can block forever; on cancellation the thread is left
        # to it (the process is about to exit) rather than waited for.
        try:
            data = await trio.to_thread.run_sync(self._file.read, max_bytes, abandon_on_cancel=True)
        except OSError as err:
            raise LocalIOError(f"cannot read stdin: {describe_oserror(err)}") from err
        return data or b""


class _StdoutWriter:
    def __init__(self) -> None:
        self._fd = sys.stdout.fileno()

    async def write(self, data: bytes) -> None:
        def write_all() -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]

        try:
            await trio.to_thread.run_sync(write_all, abandon_on_cancel=True)  # as for stdin
        except OSError as err:
            raise LocalIOError(f"cannot write stdout: {describe_oserror(err)}") from err


def _cp(args: argparse.Namespace) -> int:
    plan = _copy_plan(args.src, args.dst)
    if not args.connect:
        raise UsageError("no server given: pass --connect URI or set BOXFILES_CONNECT")
    try:
        # Checked here, so that a ValueError later on is never taken for a
        # usage error.
        parse_target(args.connect)
        check_path(plan.remote, "box:PATH")
        check_container_id(args.container)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not plan.into_box and (args.no_overwrite or args.no_parents):
        raise UsageError("--no-overwrite and --no-parents apply to copies into the box only")
    if plan.local == "-" and not plan.into_box and sys.stdout.isatty():
        raise UsageError("refusing to write a tar archive to a terminal; redirect stdout")
    bar: _Bar | None = None
    if not args.quiet and plan.local != "-" and sys.stdout.isatty() and sys.stderr.isatty():
        bar = _Bar(os.path.basename(plan.local.rstrip("/")) or plan.local)

    async def body() -> None:
        async with open_client(args.connect, timeout=args.timeout) as client:
            if plan.into_box and plan.local == "-":
                await client.upload_tar(
                    _StdinReader(),
                    plan.remote,
                    container_id=args.container,
                    mkdir_parents=not args.no_parents,
                    overwrite=not args.no_overwrite,
                    progress=bar,
                )
            elif plan.into_box:
                await client.copy_in(
                    plan.local,
                    plan.remote,
                    container_id=args.container,
                    follow_symlinks=args.follow_symlinks,
                    mkdir_parents=not args.no_parents,
                    overwrite=not args.no_overwrite,
                    progress=bar,
                )
            elif plan.local == "-":
                await client.download_tar(
                    plan.remote,
                    _StdoutWriter(),
                    container_id=args.container,
                    follow_symlinks=args.follow_symlinks,
                )
            else:
                await client.copy_out(
                    plan.remote,
                    plan.local,
                    container_id=args.container,
                    follow_symlinks=args.follow_symlinks,
                    progress=bar,
                )

    try:
        interrupt = trio.run(_until_signal, body)
    except FilesError as err:
        if bar is not None:
            bar.close()
        return _report(err, f"box:{plan.remote}", args.connect)
    if bar is not None:
        bar.close(interrupted=interrupt.signum is not None)
    if interrupt.signum is not None:
        if plan.local == "-" and not plan.into_box:
            _fail("interrupted; the archive written to stdout is incomplete")
        else:
            _fail("interrupted; nothing was left half-written")
        return 128 + interrupt.signum
    return EXIT_OK


def _report(err: FilesError, where: str, connect: str) -> int:
    """Print ``err`` as one line; its exit status."""
    if isinstance(err, UnsafeArchive):
        _fail(f"{where}: {err}")
        return EXIT_UNSAFE
    if isinstance(err, LocalIOError):
        _fail(str(err))
        return EXIT_LOCAL
    if isinstance(err, Unavailable):
        # A connection failure's message repeats the address; say it once.
        cause = err.__cause__
        reason = describe_oserror(cause) if isinstance(cause, OSError) else err.message
        _fail(f"cannot reach the server at {connect}: {reason or err.status.name}")
        return EXIT_REMOTE
    if isinstance(err, RemoteError):
        _fail(f"{where}: {err.message or 'failed'} ({err.status.name})")
        return EXIT_REMOTE
    _fail(f"{where}: {err}")  # IncompleteTransfer: the stream ended with no status
    return EXIT_REMOTE


# --------------------------------------------------------------------- demo


def _demo(args: argparse.Namespace) -> int:
    from ._demo import demo

    # The demo reports failures itself; the embedded server's per-transfer
    # warnings (a copy cancelled by Ctrl-C, say) would only repeat them.
    logging.getLogger("boxfiles.server").setLevel(logging.ERROR)
    status = EXIT_OK

    async def body() -> None:
        nonlocal status
        status = await demo(big_mib=args.big_mib, small_files=args.small_files)

    try:
        interrupt = trio.run(_until_signal, body)
    except FilesError as err:
        # The embedded server names paths in the box: say where that is.
        return _report(err, f"demo (working in {tempfile.gettempdir()})", "the embedded server")
    except OSError as err:  # building or checking the sample tree
        where = f"{err.filename}: " if err.filename else ""
        _fail(f"demo: {where}{err.strerror or err}")
        return EXIT_LOCAL
    if interrupt.signum is not None:
        _fail("interrupted; the sample files were removed")
        return 128 + interrupt.signum
    return status


# --------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "serve":
            return _serve(args)
        if args.command == "cp":
            return _cp(args)
        return _demo(args)
    except UsageError as err:
        _fail(str(err))
        return EXIT_USAGE
    except Exception as err:
        if os.environ.get("BOXFILES_DEBUG"):
            raise
        _fail(f"internal error: {err!r}")
        return EXIT_INTERNAL
