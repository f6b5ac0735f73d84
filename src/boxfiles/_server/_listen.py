"""serve_files(): bind the address, sweep stale staging, serve until
cancelled, and clean the socket file up after."""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, final

import trio

from .._aio import Handler, serve
from .._supervise import one_error
from .._target import TcpTarget, UnixTarget, parse_target
from .._wire import (
    DEFAULT_CHUNK_SIZE,
    Method,
    check_chunk_size,
)
from ._service import IDLE_TIMEOUT, MAX_TRANSFERS, FilesService
from ._staging import sweep_stale_staging

log = logging.getLogger("boxfiles.server")

#: Connections one server holds open at once; one more is sent GOAWAY and
#: closed at once, never queued. Each costs a file descriptor and its HTTP/2
#: state: this keeps a flood of them below the process's descriptor limit
#: (1024 by default), with room left for the transfers' own files.
MAX_CONNECTIONS = 256

#: Seconds a connection may stay open receiving nothing and running no call
#: before it is closed (to half as long again: it is checked every half of
#: it), so that idle connections do not hold MAX_CONNECTIONS forever. A
#: client reconnects on its next call.
CONNECTION_IDLE_TIMEOUT = 300.0


@final
@dataclass(frozen=True)
class _Listener:
    sock: socket.socket
    address: str
    #: (path, st_dev, st_ino) of the unix socket file this server created.
    unix_file: tuple[str, int, int] | None


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a crashed server; refuse a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: stale
        return
    except BlockingIOError:
        pass  # listening, with a full backlog
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server is listening on this socket", path)


def _bind_unix(target: UnixTarget) -> _Listener:
    _clear_stale_socket(target.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(target.path)
        # Before listen(), nobody can connect: restrict first, so there is
        # no moment when another user could (and no process-wide umask).
        os.chmod(target.path, 0o600)
        st = os.stat(target.path)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return _Listener(sock, f"unix:{target.path}", (target.path, st.st_dev, st.st_ino))


def _bind_tcp(target: TcpTarget, allow_remote: bool) -> _Listener:
    if not target.is_loopback and not allow_remote:
        raise ValueError(
            f"refusing to listen on {target}, which is not a loopback address: the Files "
            "protocol has no authentication; pass allow_remote=True to do it anyway"
        )
    family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((target.host, target.port))
        sock.listen(128)
        host, port = sock.getsockname()[:2]
    except BaseException:
        sock.close()
        raise
    return _Listener(sock, str(TcpTarget(host, port)), None)


def _remove_socket_file(unix_file: tuple[str, int, int]) -> None:
    path, dev, ino = unix_file
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == (dev, ino):  # still ours, not a successor's
        os.unlink(path)


def _resolve_roots(
    root: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
) -> dict[str, Path]:
    roots = {"": root} if isinstance(root, (str, os.PathLike)) else dict(root)
    if not roots:
        raise ValueError("no container roots to serve")
    resolved = {cid: Path(os.fspath(path)).resolve() for cid, path in roots.items()}
    for cid, path in resolved.items():
        if not path.is_dir():
            raise ValueError(f"container root is not a directory: {path} (container {cid!r})")
    if "" in resolved and len(resolved) > 1:
        raise ValueError("a container id must not be empty when serving several containers")
    return resolved


async def serve_files(
    root: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    listen: str,
    *,
    max_upload_bytes: int | None = None,
    max_transfers: int = MAX_TRANSFERS,
    idle_timeout: float = IDLE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    connection_idle_timeout: float = CONNECTION_IDLE_TIMEOUT,
    allow_remote: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the Files service for ``root`` on ``listen`` until cancelled.

    Use with ``await nursery.start(serve_files, root, listen)``, which returns
    the address clients can pass to :func:`open_client` once the server is
    accepting calls.

    Args:
        root: the container root directory (served as the sole container,
            id ""), or a mapping of container ids to root directories.
        listen: ``unix:PATH`` / ``unix:///abs/path`` or ``[tcp://]host:port``.
            A unix socket is created owner-only
            (0600); a stale socket file nobody listens on is replaced.
        max_upload_bytes: uploads with more archive bytes than this fail
            with RESOURCE_EXHAUSTED, nothing written; None for no limit.
        max_transfers: uploads and downloads running at once; one more is
            refused at once with RESOURCE_EXHAUSTED. Each runs its blocking
            work in one worker thread of its own, so this also caps the
            server's threads.
        idle_timeout: seconds a transfer may wait on its client for the
            next message (upload) or for taking the next one (download);
            past that it fails with DEADLINE_EXCEEDED, nothing placed.
        max_connections: connections open at once; one more is sent an
            HTTP/2 GOAWAY and closed at once (its client sees Unavailable).
        connection_idle_timeout: seconds a connection may receive nothing
            and run no call before it is closed (checked every half of it).
        allow_remote: allow a TCP address that is not loopback. The protocol
            has no authentication: anyone who can connect can read and write
            every container root.
        chunk_size: bytes of data per download message.

    On cancellation the listener closes, transfers in flight are reset (their
    staging is removed), the unix socket file is removed, and trio.Cancelled
    propagates.

    Raises:
        ValueError: ``listen`` is malformed, a root is not a directory, an
            option is out of range, or a TCP address is not loopback and
            ``allow_remote`` is false.
        OSError: the address cannot be bound (EADDRINUSE when a live server
            owns the unix socket; FileExistsError when the path is not a
            socket).
    """
    await serve_service(
        FilesService.handlers,
        root,
        listen,
        max_upload_bytes=max_upload_bytes,
        max_transfers=max_transfers,
        idle_timeout=idle_timeout,
        max_connections=max_connections,
        connection_idle_timeout=connection_idle_timeout,
        allow_remote=allow_remote,
        chunk_size=chunk_size,
        task_status=task_status,
    )


async def serve_service(
    handlers_for: Callable[[FilesService], Mapping[Method[Any, Any], Handler]],
    root: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    listen: str,
    *,
    max_upload_bytes: int | None = None,
    max_transfers: int = MAX_TRANSFERS,
    idle_timeout: float = IDLE_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    connection_idle_timeout: float = CONNECTION_IDLE_TIMEOUT,
    allow_remote: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """:func:`serve_files`, with the handlers chosen by ``handlers_for``
    (given the service); the fault-injecting test server wraps them."""
    resolved = _resolve_roots(root)
    if max_upload_bytes is not None and (
        isinstance(max_upload_bytes, bool)
        or not isinstance(max_upload_bytes, int)
        or max_upload_bytes < 0
    ):
        raise ValueError(f"max_upload_bytes must be None or an int >= 0, got {max_upload_bytes!r}")
    if isinstance(max_transfers, bool) or not isinstance(max_transfers, int) or max_transfers < 1:
        raise ValueError(f"max_transfers must be an int >= 1, got {max_transfers!r}")
    if (
        isinstance(max_connections, bool)
        or not isinstance(max_connections, int)
        or max_connections < 1
    ):
        raise ValueError(f"max_connections must be an int >= 1, got {max_connections!r}")
    for name, seconds in (
        ("idle_timeout", idle_timeout),
        ("connection_idle_timeout", connection_idle_timeout),
    ):
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not 0 < seconds < math.inf
        ):
            raise ValueError(f"{name} must be a finite number of seconds > 0, got {seconds!r}")
    service = FilesService(
        resolved,
        chunk_size=check_chunk_size(chunk_size),
        max_upload_bytes=max_upload_bytes,
        max_transfers=max_transfers,
        idle_timeout=idle_timeout,
    )
    target = parse_target(listen, listen=True)
    listener = (
        _bind_unix(target) if isinstance(target, UnixTarget) else _bind_tcp(target, allow_remote)
    )
    try:
        for cid, path in resolved.items():
            for name in await trio.to_thread.run_sync(sweep_stale_staging, path):
                log.warning("removed stale staging %s of container %r", name, cid)
        with one_error():
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(
                        serve,
                        listener.sock,
                        handlers_for(service),
                        max_connections=max_connections,
                        connection_idle_timeout=connection_idle_timeout,
                    )
                )
                task_status.started(listener.address)
                await trio.sleep_forever()
    finally:
        listener.sock.close()
        if listener.unix_file is not None:
            _remove_socket_file(listener.unix_file)
    raise AssertionError("unreachable")
