"""The reference Files server: serve_files() and its two handlers."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn, final

import trio

from . import _tar
from ._bridge import Handler, Method, ServerCall, serve
from ._errors import (
    AlreadyExists,
    FailedPrecondition,
    FilesError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RemoteError,
)
from ._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from ._target import TcpTarget, UnixTarget, parse_target
from ._wire import CHANNEL_CAPACITY, DEFAULT_CHUNK_SIZE, DOWNLOAD, UPLOAD

log = logging.getLogger("boxfiles.server")

#: Prefix of the staging directories an upload creates inside the container
#: root; removed when the upload ends, whatever the outcome.
STAGING_PREFIX = ".boxfiles-staging-"


def _has_dotdot(path: str) -> bool:
    return ".." in path.split("/")


def _remote_from_os(err: OSError, what: str) -> RemoteError:
    message = f"{what}: {err.strerror or err}"
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(message)
    if err.errno == errno.EEXIST:
        return AlreadyExists(message)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(message)
    return Internal(f"storage error: {message}")


@final
class FilesService:
    """Upload and Download over container roots on this machine."""

    def __init__(self, roots: Mapping[str, Path], *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self._roots = dict(roots)
        self._chunk_size = chunk_size

    def handlers(self) -> dict[Method[Any, Any], Handler]:
        return {UPLOAD: self.upload, DOWNLOAD: self.download}

    def _root(self, container_id: str) -> Path:
        if container_id:
            try:
                return self._roots[container_id]
            except KeyError:
                raise FailedPrecondition(f"container not found: {container_id}") from None
        if len(self._roots) != 1:
            raise FailedPrecondition(
                f"container_id is required: this server has {len(self._roots)} containers"
            )
        return next(iter(self._roots.values()))

    async def upload(self, call: ServerCall[UploadChunk, UploadResponse]) -> None:
        started = time.monotonic()
        first = await call.recv()
        if first is None:
            raise InvalidArgument("empty upload stream")
        if not first.dest_path:
            raise InvalidArgument("dest_path is required in first chunk")
        if _has_dotdot(first.dest_path):
            raise InvalidArgument(f"path must not contain ..: {first.dest_path}")
        root = self._root(first.container_id)
        received = 0
        staging = Path(
            await trio.to_thread.run_sync(lambda: _make_staging(root))
        )
        try:
            archive = staging / "archive.tar"
            with archive.open("wb") as out:
                chunk: UploadChunk | None = first
                while chunk is not None:
                    if chunk.data:
                        received += len(chunk.data)
                        await trio.to_thread.run_sync(out.write, chunk.data)
                    chunk = await call.recv()
            source_is_dir = first.source_is_dir if first.HasField("source_is_dir") else None
            try:
                await trio.to_thread.run_sync(
                    lambda: _tar.extract_archive(
                        archive,
                        staging / "tree",
                        root,
                        first.dest_path,
                        source_is_dir=source_is_dir,
                        mkdir_parents=first.mkdir_parents,
                        overwrite=first.overwrite,
                    )
                )
            except OSError as err:
                raise _remote_from_os(err, first.dest_path) from err
        except BaseException as exc:
            log.warning(
                "upload %s bytes=%d failed after %.3fs: %r",
                first.dest_path, received, time.monotonic() - started, exc,
            )
            raise
        finally:
            await trio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))
        log.info(
            "upload %s bytes=%d ok in %.3fs", first.dest_path, received, time.monotonic() - started
        )
        await call.send(UploadResponse(success=True))

    async def download(self, call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        started = time.monotonic()
        request = await call.recv()
        if request is None:
            raise InvalidArgument("empty download request")
        if not request.src_path:
            raise InvalidArgument("src_path is required")
        if _has_dotdot(request.src_path):
            raise InvalidArgument(f"path must not contain ..: {request.src_path}")
        root = self._root(request.container_id)
        try:
            plan = await trio.to_thread.run_sync(
                lambda: _tar.plan_pack(
                    root,
                    request.src_path,
                    include_parent=request.include_parent,
                    follow_symlinks=request.follow_symlinks,
                )
            )
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NotFound(f"source path does not exist: {request.src_path}") from err
            raise _remote_from_os(err, request.src_path) from err
        send_chunks, receive_chunks = trio.open_memory_channel[bytes](CHANNEL_CAPACITY)
        sent = 0

        async def pack() -> None:
            async with send_chunks:
                await trio.to_thread.run_sync(
                    _tar.pack, plan, _tar.ChannelWriter(send_chunks, self._chunk_size)
                )

        async def stream() -> None:
            nonlocal sent
            first = True
            async with receive_chunks:
                async for data in receive_chunks:
                    message = DownloadChunk(data=data)
                    if first:
                        message.source_is_dir = plan.source_is_dir
                        first = False
                    sent += len(data)
                    await call.send(message)

        from ._client import supervise

        try:
            await supervise(pack, stream)
        except OSError as err:
            raise _remote_from_os(err, request.src_path) from err
        except FilesError:
            log.warning("download %s failed", request.src_path)
            raise
        log.info(
            "download %s bytes=%d ok in %.3fs", request.src_path, sent, time.monotonic() - started
        )


def _make_staging(root: Path) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root)


def _bind(listen: str) -> socket.socket:
    target = parse_target(listen)
    if isinstance(target, UnixTarget):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(target.path) and stat.S_ISSOCK(os.lstat(target.path).st_mode):
                os.unlink(target.path)
            old = os.umask(0o177)
            try:
                sock.bind(target.path)
            finally:
                os.umask(old)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        return sock
    assert isinstance(target, TcpTarget)
    family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((target.host, target.port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_files(
    root: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    listen: str,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the Files service for ``root`` on ``listen`` until cancelled.

    Use with ``await nursery.start(serve_files, root, listen)``, which returns
    the address clients can pass to :func:`open_client` once the server is
    accepting calls.

    Args:
        root: the container root directory, or a mapping of container ids
            to root directories.
        listen: ``unix:PATH`` / ``unix:///abs/path`` or ``[tcp://]host:port``.

    On cancellation the listener closes, transfers in flight are reset (their
    staging is removed), a unix socket file is removed, and trio.Cancelled
    propagates.

    Raises:
        ValueError: ``listen`` is malformed or a root is not a directory.
        OSError: the address cannot be bound.
    """
    roots = {"": root} if isinstance(root, (str, os.PathLike)) else dict(root)
    resolved = {cid: Path(os.fspath(path)).resolve() for cid, path in roots.items()}
    for cid, path in resolved.items():
        if not path.is_dir():
            raise ValueError(f"container root is not a directory: {path} (container {cid!r})")
    if "" in resolved and len(resolved) > 1:
        raise ValueError("a container id must not be empty when serving several containers")
    service = FilesService({k: v for k, v in resolved.items()})
    sock = _bind(listen)
    target = parse_target(listen)
    if isinstance(target, TcpTarget):
        host, port = sock.getsockname()[:2]
        address = str(TcpTarget(host, port))
    else:
        address = f"unix:{target.path}"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, sock, service.handlers())
            task_status.started(address)
            await trio.sleep_forever()
    finally:
        sock.close()
        if isinstance(target, UnixTarget):
            with_suppressed = os.path.exists(target.path)
            if with_suppressed:
                os.unlink(target.path)
    raise AssertionError("unreachable")
