"""The reference Files server: serve_files() and its two handlers.

An upload is extracted, while it is still arriving, into a hidden staging
directory on its destination's filesystem, then moved into place under a
per-container lock; whatever goes wrong, the staging is removed and the tree
is left as it was. A download is packed on the fly. Every path is resolved
inside the container root (see :mod:`boxfiles._server._confine`).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, final

import trio

from .._aio import Handler, ServerCall
from .._chunks import BufferPool, ChunkSink, TransferBuffers
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
from .._fs import DIR_FLAGS
from .._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from .._supervise import supervise
from .._tar._read import ChunkStream
from .._wire import (
    ARRIVED_PER_TURN,
    CHANNEL_CAPACITY,
    DEFAULT_CHUNK_SIZE,
    DOWNLOAD,
    DOWNLOAD_DATA_FIELD,
    MAX_PATH_BYTES,
    PEEK_KEY,
    SIZE_HINT_KEY,
    UPLOAD,
    Chunk,
    Method,
    decode_upload_chunk,
)
from . import _pack
from ._confine import (
    check_name,
    components,
)
from ._extract import Staged, extract
from ._staging import Staging

log = logging.getLogger("boxfiles.server")

T = TypeVar("T")

#: Transfers (uploads and downloads together) one server runs at once; one
#: more is refused at once with RESOURCE_EXHAUSTED, never queued. Room for a
#: host's many parallel copies plus a few stalled clients. Each holds one
#: worker thread of its own and a chunk buffer of its own, so this also
#: bounds the server's threads and buffers.
MAX_TRANSFERS = 128

#: Spare chunk buffers (beyond each download's own one) that all of a
#: server's downloads hold at most, together: a download packs at most
#: POOL_SIZE chunks ahead of its client, and only while spares last.
SERVER_POOL_SIZE = 16

#: An upload's messages that have arrived are handed to extraction in
#: batches of up to this many bytes of data (or one message): small messages
#: then cost a hand-over, and the extraction thread a hop, per batch. What
#: the extraction channel holds stays within CHANNEL_CAPACITY batches.
EXTRACT_BATCH_BYTES = DEFAULT_CHUNK_SIZE

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


def _decode(pieces: list[memoryview]) -> tuple[UploadChunk, list[memoryview]]:
    try:
        return decode_upload_chunk(pieces)
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
    timeout; and its one log line: INFO when it succeeded, or was a download
    of nothing (NOT_FOUND) or one the client reset; WARNING with the status
    otherwise."""

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
        if isinstance(exc, RemoteError):
            outcome = f"{exc.status.name}: {exc.message}"
        elif isinstance(exc, trio.Cancelled):
            outcome = "CANCELLED: stream reset or server shutting down"
        else:
            outcome = f"INTERNAL: {exc!r}"
        # Routine: copy_in probes its destination with a Download that it
        # resets after the first message, or that finds nothing. A download
        # changes nothing, so a client stopping one is its own business.
        routine = self.kind == "download" and isinstance(exc, (NotFound, trio.Cancelled))
        self._log(logging.INFO if routine else logging.WARNING, outcome)


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
        self._buffers = BufferPool(SERVER_POOL_SIZE)
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
        body = await transfer.from_client(call.recv_pieces(), "the client sent nothing")
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
            staging = await transfer.run_sync(lambda: Staging.create(root, first.dest_path))
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
        first_data: list[memoryview],
        staging: Staging,
        transfer: _Transfer,
    ) -> Staged:
        # The messages' data as views of the frames they came in: extracted
        # from them, never joined.
        send_data, receive_data = trio.open_memory_channel[list[memoryview]](CHANNEL_CAPACITY)
        cap = self._max_upload_bytes
        staged: Staged | None = None

        async def hand_on(batch: list[memoryview]) -> bool:
            """Queue ``batch`` for extraction (a checkpoint); False if the
            extractor failed."""
            try:
                await send_data.send(batch)
            except trio.BrokenResourceError:
                return False  # the extractor failed; its error explains why
            return True

        async def pump() -> None:
            # Messages that have arrived whole are taken without a checkpoint,
            # up to ARRIVED_PER_TURN, and their data handed on in batches of up
            # to EXTRACT_BATCH_BYTES (or one message): small messages then cost
            # a turn and a hand-over per batch, not each.
            async with send_data:
                batch: list[memoryview] = []
                batch_size = taken = 0
                data = first_data
                while True:
                    size = sum(map(len, data))
                    transfer.bytes += size
                    if cap is not None and transfer.bytes > cap:
                        raise ResourceExhausted(
                            f"upload to {first.dest_path} exceeds the limit of {cap} bytes"
                        )
                    if batch and batch_size + size > EXTRACT_BATCH_BYTES:
                        if not await hand_on(batch):
                            return
                        batch, batch_size, taken = [], 0, 0
                    batch += data
                    batch_size += size
                    body = call.recv_arrived() if taken < ARRIVED_PER_TURN else None
                    if body is None:
                        if batch and not await hand_on(batch):
                            return
                        batch, batch_size, taken = [], 0, 0
                        body = await transfer.from_client(
                            call.recv_pieces(), "the client sent no more data"
                        )
                        if body is None:
                            return
                    taken += 1
                    data = _decode(body)[1]

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
                # as a share of it (a hint: real peers send none). Not for a
                # peek, which only reads the first message.
                if call.metadata.get(PEEK_KEY) != "1":
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
        send_chunks, receive_chunks = trio.open_memory_channel[Chunk](CHANNEL_CAPACITY)
        first_sent = trio.Event()
        buffers = TransferBuffers(self._buffers, self._chunk_size)

        async def hand_on(chunk: Chunk) -> None:
            await send_chunks.send(chunk)
            # Packing runs ahead of the client only once the client has
            # taken a whole chunk: one that resets after the first message
            # (copy_in's probe) costs one chunk of packing, not a pool's.
            await first_sent.wait()

        async def pack() -> None:
            async with send_chunks:
                sink = ChunkSink(hand_on, buffers, self._chunk_size)
                try:
                    await transfer.run_sync(lambda: _pack.pack(plan, sink))
                except OSError as err:
                    raise _remote_from_os(err, f"reading {transfer.path}") from err

        async def stream() -> None:
            # source_is_dir goes first, alone: a client that wants only that
            # (copy_in's probe) resets before any data is sent.
            await transfer.from_client(
                call.send(DownloadChunk(source_is_dir=plan.source_is_dir)),
                "the client took no data",
            )
            async with receive_chunks:
                async for chunk in receive_chunks:
                    try:
                        await transfer.from_client(
                            call.send_framed(chunk.framed(field=DOWNLOAD_DATA_FIELD)),
                            "the client took no data",
                        )
                    finally:
                        chunk.release()
                    transfer.bytes += chunk.size
                    first_sent.set()

        try:
            await supervise(pack, stream)
        finally:
            buffers.close()
