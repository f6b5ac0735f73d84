"""The reference Files server: serve_files() and its two handlers.

An upload is extracted, while it is still arriving, into a hidden staging
directory on its destination's filesystem, then moved into place under a
per-container lock; whatever goes wrong, the staging is removed and the tree
is left as it was. A download is packed on the fly. Every path is resolved
inside the container root (see :mod:`boxfiles._server._confine`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar, final

import trio

from .._aio import Handler, Method, ServerCall, serve
from .._errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RemoteError,
    ResourceExhausted,
)
from .._fs import DIR_FLAGS, TreeWalk, remove_tree
from .._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from .._supervise import one_error, supervise
from .._tar._read import ChunkStream
from .._target import TcpTarget, UnixTarget, parse_target
from .._wire import (
    CHANNEL_CAPACITY,
    DEFAULT_CHUNK_SIZE,
    DOWNLOAD,
    MAX_PATH_BYTES,
    SIZE_HINT_KEY,
    UPLOAD,
    check_chunk_size,
    decode_upload_chunk,
)
from . import _pack
from ._confine import (
    STAGING_PREFIX,
    check_name,
    components,
    locate,
    locked_staging,
    make_dir,
    restore_times,
)
from ._extract import Placement, Staged, extract

log = logging.getLogger("boxfiles.server")

T = TypeVar("T")

#: Transfers (uploads and downloads together) one server runs at once; one
#: more is refused at once with RESOURCE_EXHAUSTED, never queued. Room for a
#: host's many parallel copies plus a few stalled clients. Each holds one
#: worker thread of its own, and a download whose client reads nothing holds
#: about 10 chunks of memory (measured), so this also bounds the server's
#: threads and buffers.
MAX_TRANSFERS = 128

#: Seconds a transfer may wait on its client without progress (no message
#: received for an upload, no message taken for a download) before it is
#: failed with DEADLINE_EXCEEDED and its slot, thread and staging are freed.
IDLE_TIMEOUT = 60.0


def _check_path(path: str) -> None:
    if "\x00" in path:
        raise InvalidArgument(f"path must not contain NUL: {path!r}")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidArgument(f"path is longer than {MAX_PATH_BYTES} bytes: {path[:64]}...")
    parts = components(path)  # keeps "..", drops "" and "."
    if ".." in parts:
        raise InvalidArgument(f"path must not contain ..: {path}")
    for part in parts:
        check_name(part, f"path {path}")


def _decode(body: bytes) -> tuple[UploadChunk, memoryview]:
    try:
        return decode_upload_chunk(body)
    except ValueError as err:
        raise InvalidArgument(f"malformed UploadChunk: {err}") from err


def _remote_from_os(err: OSError, what: str) -> RemoteError:
    message = f"{what}: {err.strerror or err}"
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(message)
    if err.errno == errno.EEXIST:
        return AlreadyExists(message)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(message)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(message)
    return Internal(f"storage error: {message}")


@final
class _Transfer:
    """One transfer's own resources: its worker-thread slot and its idle
    timeout; and its one log line: INFO when it succeeded or was a download
    of nothing (NOT_FOUND), WARNING with the status otherwise."""

    def __init__(self, kind: str, idle_timeout: float) -> None:
        self.kind = kind
        self.container = ""
        self.path = ""
        self.bytes = 0
        self._started = time.monotonic()
        self._idle_timeout = idle_timeout
        # A slot of its own rather than one of trio's shared 40: a transfer
        # parks its thread while it waits on its client, and that must never
        # hold up another client's transfer. Its thread work is sequential,
        # so one slot is enough; the admission cap bounds the total.
        self._limiter = trio.CapacityLimiter(1)

    async def run_sync(self, fn: Callable[[], T]) -> T:
        """Run blocking work in this transfer's own worker thread."""
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def from_client(self, waiting: Awaitable[T], stalled: str) -> T:
        """Await ``waiting`` (which waits on the client), failing the
        transfer when it makes no progress within the idle timeout."""
        with trio.move_on_after(self._idle_timeout):
            return await waiting
        raise DeadlineExceeded(
            f"{self.kind} of {self.path or 'an unnamed path'}: {stalled} "
            f"for {self._idle_timeout:g} s (the server's idle timeout)"
        )

    def _log(self, level: int, outcome: str) -> None:
        log.log(
            level,
            "%s container=%r path=%r bytes=%d duration=%.3fs outcome=%s",
            self.kind,
            self.container,
            self.path,
            self.bytes,
            time.monotonic() - self._started,
            outcome,
        )

    def __enter__(self) -> _Transfer:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self._log(logging.INFO, "ok")
        else:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, NotFound) and self.kind == "download":
            # Routine: copy_in probes its destination with a Download first.
            self._log(logging.INFO, f"{exc.status.name}: {exc.message}")
            return
        if isinstance(exc, RemoteError):
            outcome = f"{exc.status.name}: {exc.message}"
        elif isinstance(exc, trio.Cancelled):
            outcome = "CANCELLED: stream reset or server shutting down"
        else:
            outcome = f"INTERNAL: {exc!r}"
        self._log(logging.WARNING, outcome)


@final
@dataclass
class _Staging:
    """An upload's hidden directory, with ``tree`` (what is extracted) in it.

    It is made on the destination's own filesystem, so placing is a rename
    even into a volume mounted inside the root: in the destination when that
    is an existing directory, else in the deepest existing directory on the
    way to it. Owns its fds. Its host directory's times are put back when it
    is removed, unless something else (placement, another upload) changed
    that directory meanwhile.
    """

    root_fd: int
    host_fd: int
    #: The host's (atime, mtime) before the staging was made, and its mtime
    #: just after.
    host_times: tuple[int, int]
    host_made_ns: int
    fd: int
    name: str
    tree_fd: int

    @classmethod
    def create(cls, root: Path, dest_path: str) -> _Staging:
        root_fd = os.open(root, DIR_FLAGS)
        try:
            host_fd = _staging_host(root_fd, dest_path)
            try:
                host = os.fstat(host_fd)
                fd, name = locked_staging(host_fd)
                made_ns = os.fstat(host_fd).st_mtime_ns
                try:
                    # Mode of a directory archive without a "./" entry: the
                    # staged tree may become the destination itself.
                    tree_fd = make_dir(fd, "tree", 0o755)
                except BaseException:
                    remove_tree(host_fd, name)
                    os.close(fd)
                    raise
            except BaseException:
                os.close(host_fd)
                raise
        except BaseException:
            os.close(root_fd)
            raise
        times = (host.st_atime_ns, host.st_mtime_ns)
        return cls(root_fd, host_fd, times, made_ns, fd, name, tree_fd)

    def place(
        self,
        staged: Staged,
        dest_path: str,
        *,
        file_mode: bool,
        mkdir_parents: bool,
        overwrite: bool,
    ) -> None:
        placement = Placement(self.root_fd, self.fd, overwrite=overwrite)
        try:
            placement.run(staged, dest_path, file_mode=file_mode, mkdir_parents=mkdir_parents)
        finally:
            placement.close()

    def remove(self) -> None:
        os.close(self.tree_fd)
        try:
            untouched = os.fstat(self.host_fd).st_mtime_ns == self.host_made_ns
            remove_tree(self.host_fd, self.name)  # still locked: no sweep races it
            if untouched:
                restore_times(self.host_fd, self.host_times)
        finally:
            os.close(self.fd)
            os.close(self.host_fd)
            os.close(self.root_fd)


def _staging_host(root_fd: int, dest_path: str) -> int:
    """A new fd of the directory an upload to ``dest_path`` stages in."""
    try:
        dest = locate(root_fd, dest_path, follow=True, missing="stop")
    except RemoteError:
        # Placement will refuse this destination, once the upload is read
        # (see SPEC); until then, stage at the root.
        return os.dup(root_fd)
    try:
        st = dest.lstat()
        if st is not None and stat.S_ISDIR(st.st_mode):
            return dest.open_dir()
        return os.dup(dest.dir_fd)
    finally:
        dest.close()


#: Filesystem types a sweep does not walk into: kernel views, not storage an
#: upload could have staged in (a container root may have them mounted).
_PSEUDO_FS = frozenset(
    "proc sysfs cgroup cgroup2 devpts mqueue debugfs tracefs securityfs pstore bpf "
    "fusectl configfs binfmt_misc autofs hugetlbfs devtmpfs nsfs efivarfs".split()
)


def _pseudo_devices() -> set[int]:
    """st_dev of every mounted pseudo filesystem (from /proc/self/mountinfo)."""
    found = set()
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields = line.split()
                fstype = fields[fields.index("-") + 1]
                if fstype in _PSEUDO_FS:
                    major, minor = fields[2].split(":")
                    found.add(os.makedev(int(major), int(minor)))
    except OSError:
        pass  # no /proc: nothing to skip
    return found


def sweep_stale_staging(root: Path) -> list[str]:
    """Remove staging left in ``root`` by a server that died mid-upload.

    Staging can be made anywhere in the tree, so the whole tree is walked
    (without recursion, never following a symlink, skipping kernel pseudo
    filesystems). Staging whose lock is held belongs to a live upload (of
    this or another server on the same root) and is kept; any other is a
    dead server's, whatever its age. Returns the paths removed.
    """
    removed = []
    skip = _pseudo_devices()
    root_fd = os.open(root, DIR_FLAGS)
    try:
        walk = TreeWalk(root_fd)
    finally:
        os.close(root_fd)
    try:
        for name, st, leaving in walk:
            if leaving or not stat.S_ISDIR(st.st_mode):
                continue
            if not name.startswith(STAGING_PREFIX):
                if st.st_dev not in skip:
                    try:
                        walk.descend(name)
                    except OSError:
                        pass  # unreadable: nothing of ours can be in it
                continue
            path = "/".join([*walk.path, name])
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=walk.fd)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                remove_tree(walk.fd, name)  # holding the lock: see locked_staging
            except BlockingIOError:
                continue  # in use
            except Exception as err:  # a server must start even beside debris it cannot remove
                log.warning("could not remove stale staging %s: %r", path, err)
                continue
            finally:
                os.close(fd)
            removed.append(path)
    finally:
        walk.close()
    return removed


@final
class FilesService:
    """Upload and Download over container roots on this machine."""

    def __init__(
        self,
        roots: Mapping[str, Path],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_upload_bytes: int | None = None,
        max_transfers: int = MAX_TRANSFERS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._roots = dict(roots)
        self._chunk_size = chunk_size
        self._max_upload_bytes = max_upload_bytes
        self._max_transfers = max_transfers
        self._idle_timeout = idle_timeout
        self._transfers = 0
        # Placements into one container run one at a time, so each applies
        # (or is undone) as a whole against a tree no other upload changes.
        self._locks = {cid: trio.Lock() for cid in self._roots}

    def handlers(self) -> dict[Method[Any, Any], Handler]:
        return {UPLOAD: self.upload, DOWNLOAD: self.download}

    def _container(self, container_id: str) -> tuple[str, Path]:
        if container_id:
            if container_id not in self._roots:
                raise FailedPrecondition(f"container not found: {container_id}")
            return container_id, self._roots[container_id]
        if len(self._roots) != 1:
            raise FailedPrecondition(
                f"container_id is required: this server has {len(self._roots)} containers"
            )
        return next(iter(self._roots.items()))

    @contextmanager
    def _admit(self, kind: str) -> Iterator[_Transfer]:
        """Run one transfer within the cap, or refuse it with RESOURCE_EXHAUSTED."""
        with _Transfer(kind, self._idle_timeout) as transfer:
            if self._transfers >= self._max_transfers:
                raise ResourceExhausted(
                    f"server busy: {self._max_transfers} transfers are running; try again later"
                )
            self._transfers += 1
            try:
                yield transfer
            finally:
                self._transfers -= 1

    async def upload(self, call: ServerCall[UploadChunk, UploadResponse]) -> None:
        """Handle one Upload; docs/contract.md tabulates every answer.

        Raises:
            RemoteError: the status the client gets (InvalidArgument,
                NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted
                (too large, or the server is at its transfer cap),
                DeadlineExceeded (the client stalled past the idle timeout),
                PermissionDenied, Internal), always with the tree unchanged.

        A client reset, or the deadline the client sent (grpc-timeout),
        cancels this handler; the staging is then removed (shielded) and
        nothing is placed, unless placement had already started, in which
        case it completes as a whole first.
        """
        with self._admit("upload") as transfer:
            await self._upload(call, transfer)

    async def _upload(
        self, call: ServerCall[UploadChunk, UploadResponse], transfer: _Transfer
    ) -> None:
        body = await transfer.from_client(call.recv_encoded(), "the client sent nothing")
        if body is None:
            raise InvalidArgument("empty upload stream")
        first, data = _decode(body)
        transfer.path = first.dest_path
        if not first.dest_path:
            raise InvalidArgument("dest_path is required in first chunk")
        _check_path(first.dest_path)
        cid, root = self._container(first.container_id)
        transfer.container = cid
        source_is_dir = first.source_is_dir if first.HasField("source_is_dir") else None
        try:
            staging = await transfer.run_sync(lambda: _Staging.create(root, first.dest_path))
        except OSError as err:
            raise _remote_from_os(err, first.dest_path) from err
        try:
            staged = await self._receive(call, first, data, staging, transfer)
            if source_is_dir is False and not staged.single_file:
                raise InvalidArgument(
                    f"source_is_dir is false but the archive for {first.dest_path} is not a single file"
                )
            file_mode = (
                staged.single_file
                and source_is_dir is not True
                and not first.dest_path.endswith("/")
            )
            async with self._locks[cid]:
                try:
                    await transfer.run_sync(
                        lambda: staging.place(
                            staged,
                            first.dest_path,
                            file_mode=file_mode,
                            mkdir_parents=first.mkdir_parents,
                            overwrite=first.overwrite,
                        )
                    )
                except OSError as err:
                    raise _remote_from_os(err, first.dest_path) from err
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await transfer.run_sync(staging.remove)
                except Exception as err:  # never let clean-up replace the real outcome
                    log.warning("could not remove staging for %s: %r", first.dest_path, err)
        await transfer.from_client(
            call.send(UploadResponse(success=True)), "placed, but the client took no reply"
        )

    async def _receive(
        self,
        call: ServerCall[UploadChunk, UploadResponse],
        first: UploadChunk,
        first_data: memoryview,
        staging: _Staging,
        transfer: _Transfer,
    ) -> Staged:
        send_data, receive_data = trio.open_memory_channel[memoryview](CHANNEL_CAPACITY)
        cap = self._max_upload_bytes
        staged: Staged | None = None

        async def pump() -> None:
            async with send_data:
                data: memoryview | None = first_data
                while data is not None:
                    if data:
                        transfer.bytes += len(data)
                        if cap is not None and transfer.bytes > cap:
                            raise ResourceExhausted(
                                f"upload to {first.dest_path} exceeds the limit of {cap} bytes"
                            )
                        try:
                            await send_data.send(data)
                        except trio.BrokenResourceError:
                            return  # the extractor failed; its error explains why
                    body = await transfer.from_client(
                        call.recv_encoded(), "the client sent no more data"
                    )
                    data = None if body is None else _decode(body)[1]

        async def unpack() -> None:
            nonlocal staged
            async with receive_data:
                try:
                    stream = ChunkStream(receive_data)
                    staged = await transfer.run_sync(lambda: extract(stream, staging.tree_fd))
                except OSError as err:
                    raise _remote_from_os(err, f"extracting into {first.dest_path}") from err

        await supervise(pump, unpack)
        assert staged is not None
        return staged

    async def download(self, call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        """Handle one Download: pack ``src_path`` on the fly.

        Raises:
            RemoteError: InvalidArgument, FailedPrecondition, NotFound
                (missing source), ResourceExhausted (the server is at its
                transfer cap), DeadlineExceeded (the client stalled past the
                idle timeout), PermissionDenied or Internal; once chunks
                have been sent, the status ends an incomplete archive.

        A client reset or its deadline cancels this handler, which stops the
        packing thread at its next chunk.
        """
        with self._admit("download") as transfer:
            await self._download(call, transfer)

    async def _download(
        self, call: ServerCall[DownloadRequest, DownloadChunk], transfer: _Transfer
    ) -> None:
        request = await transfer.from_client(call.recv(), "the client sent no request")
        if request is None:
            raise InvalidArgument("empty download request")
        transfer.path = request.src_path
        if not request.src_path:
            raise InvalidArgument("src_path is required")
        _check_path(request.src_path)
        cid, root = self._container(request.container_id)
        transfer.container = cid
        try:
            root_fd = await transfer.run_sync(lambda: os.open(root, DIR_FLAGS))
        except OSError as err:
            raise _remote_from_os(err, request.src_path) from err
        try:
            try:
                plan = await transfer.run_sync(
                    lambda: _pack.plan(
                        root_fd,
                        request.src_path,
                        include_parent=request.include_parent,
                        follow_symlinks=request.follow_symlinks,
                    )
                )
            except OSError as err:
                raise _remote_from_os(err, request.src_path) from err
            try:
                # The archive's size, sent ahead so a client can show progress
                # as a share of it (a hint: real peers send none).
                try:
                    size = await transfer.run_sync(lambda: _pack.measure(plan))
                except OSError as err:
                    raise _remote_from_os(err, f"reading {request.src_path}") from err
                if size is not None:
                    await call.send_initial_metadata({SIZE_HINT_KEY: str(size)})
                await self._stream(call, root_fd, plan, transfer)
            finally:
                plan.source.close()
        finally:
            os.close(root_fd)

    async def _stream(
        self,
        call: ServerCall[DownloadRequest, DownloadChunk],
        root_fd: int,
        plan: _pack.PackPlan,
        transfer: _Transfer,
    ) -> None:
        send_chunks, receive_chunks = trio.open_memory_channel[bytes](CHANNEL_CAPACITY)

        async def pack() -> None:
            async with send_chunks:
                try:
                    await transfer.run_sync(
                        lambda: _pack.pack(plan, _pack.Sink(send_chunks, self._chunk_size))
                    )
                except OSError as err:
                    raise _remote_from_os(err, f"reading {transfer.path}") from err

        async def stream() -> None:
            first = True
            async with receive_chunks:
                async for data in receive_chunks:
                    message = DownloadChunk(data=data)
                    if first:
                        message.source_is_dir = plan.source_is_dir
                        first = False
                    transfer.bytes += len(data)
                    await transfer.from_client(call.send(message), "the client took no data")

        await supervise(pack, stream)


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
        isinstance(idle_timeout, bool)
        or not isinstance(idle_timeout, (int, float))
        or not 0 < idle_timeout < math.inf
    ):
        raise ValueError(
            f"idle_timeout must be a finite number of seconds > 0, got {idle_timeout!r}"
        )
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
                await nursery.start(serve, listener.sock, handlers_for(service))
                task_status.started(listener.address)
                await trio.sleep_forever()
    finally:
        listener.sock.close()
        if listener.unix_file is not None:
            _remove_socket_file(listener.unix_file)
    raise AssertionError("unreachable")
