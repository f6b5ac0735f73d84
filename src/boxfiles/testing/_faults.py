"""A reference server that breaks on purpose, and records what it saw.

Faults are declared per call: each upload (or download) takes the next fault
queued for its kind, or behaves exactly as the reference server when none is
queued. A faulted call still runs the real service up to the moment the fault
strikes, so the server side of a failure is the real one too.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, final

import trio

from .._aio import Handler, ServerCall
from .._api import NoPublicConstructor
from .._errors import RemoteError, Status, remote_error
from .._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from .._server import IDLE_TIMEOUT, MAX_TRANSFERS, FilesService, serve_service
from .._supervise import one_error
from .._wire import (
    DEFAULT_CHUNK_SIZE,
    DOWNLOAD,
    PREFIX_BYTES,
    UPLOAD,
    Method,
    decode_upload_chunk,
)


@final
@dataclass(frozen=True)
class Reject:
    """Fail the call with ``status`` once ``after_chunks`` chunks (or
    ``after_bytes`` bytes) have gone by: received for an upload, sent for a
    download. ``after_chunks=0`` strikes before the first chunk."""

    status: Status
    after_chunks: int | None = None
    after_bytes: int | None = None
    message: str = "injected fault"

    def __post_init__(self) -> None:
        if (self.after_chunks is None) == (self.after_bytes is None):
            raise ValueError("Reject needs exactly one of after_chunks and after_bytes")
        if self.status is Status.OK:
            raise ValueError("Reject needs a status other than OK")


@final
@dataclass(frozen=True)
class ReplyFailure:
    """Upload only: read the whole stream, write nothing, answer
    ``UploadResponse(success=false, error=error)``."""

    error: str | None = "injected failure"


@final
@dataclass(frozen=True)
class Stall:
    """Stop reading (upload) or sending (download) after ``after_chunks``
    chunks, until the client gives up or the server's idle timeout ends the
    call (DEADLINE_EXCEEDED)."""

    after_chunks: int = 0


@final
@dataclass(frozen=True)
class Slow:
    """Wait ``delay`` seconds before each chunk is read or sent."""

    delay: float


@final
@dataclass(frozen=True)
class DropConnection:
    """Abort the whole connection (no status, no GOAWAY) once ``after_chunks``
    chunks (or ``after_bytes`` bytes) have gone by."""

    after_chunks: int | None = None
    after_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.after_chunks is None) == (self.after_bytes is None):
            raise ValueError("DropConnection needs exactly one of after_chunks and after_bytes")


@final
@dataclass(frozen=True)
class Corrupt:
    """Download only: replace every data byte sent with garbage (same length)."""


Fault = Reject | ReplyFailure | Stall | Slow | DropConnection | Corrupt

_UPLOAD_FAULTS = (Reject, ReplyFailure, Stall, Slow, DropConnection)
_DOWNLOAD_FAULTS = (Reject, Stall, Slow, DropConnection, Corrupt)


@final
@dataclass(eq=False)
class CallRecord:
    """What the fault server saw of one call."""

    method: Literal["upload", "download"]
    fault: Fault | None
    #: Upload: each chunk as received with its data removed; download: the request.
    messages: list[UploadChunk | DownloadRequest] = field(default_factory=list)
    #: Data bytes of each chunk, received (upload) or sent whole (download).
    sizes: list[int] = field(default_factory=list)
    #: The upload's data, when the server was asked to keep it.
    data: bytearray | None = None
    #: The client ended its side cleanly (upload: saw end of stream).
    client_ended: bool = False
    #: The handler was cancelled by a client reset or disconnect.
    reset: bool = False
    #: The status the call ended with (OK included); None when reset.
    status: Status | None = None
    finished: trio.Event = field(default_factory=trio.Event)

    @property
    def chunks(self) -> int:
        return len(self.sizes)

    @property
    def bytes(self) -> int:
        return sum(self.sizes)


@final
class _FaultyCall:
    """Wraps a server call to strike at the declared point."""

    def __init__(self, call: ServerCall[Any, Any], fault: Fault | None, record: CallRecord) -> None:
        self._call = call
        self._fault = fault
        self._record = record
        self.peer = call.peer
        self.metadata = call.metadata

    def _due(self, after_chunks: int | None, after_bytes: int | None) -> bool:
        if after_chunks is not None:
            return self._record.chunks >= after_chunks
        return after_bytes is not None and self._record.bytes >= after_bytes

    async def _strike(self) -> None:
        fault = self._fault
        if isinstance(fault, Reject) and self._due(fault.after_chunks, fault.after_bytes):
            raise remote_error(fault.status.value, fault.message)
        if isinstance(fault, Stall) and self._due(fault.after_chunks, None):
            await trio.sleep_forever()
        if isinstance(fault, DropConnection) and self._due(fault.after_chunks, fault.after_bytes):
            self._call.abort_connection()
            await trio.sleep_forever()
        if isinstance(fault, Slow):
            await trio.sleep(fault.delay)

    async def recv(self) -> Any:
        record = self._record
        if record.method == "upload":
            await self._strike()
        message = await self._call.recv()
        if message is None:
            record.client_ended = True
        elif isinstance(message, UploadChunk):
            self._received(_without_data(message), message.data)
        else:
            record.messages.append(message)
        return message

    async def recv_encoded(self) -> bytes | None:
        pieces = await self.recv_pieces()
        return None if pieces is None else b"".join(pieces)

    def recv_arrived(self) -> list[memoryview] | None:
        return None  # every message goes through recv_pieces, where faults strike

    async def recv_pieces(self) -> list[memoryview] | None:
        record = self._record
        if record.method == "upload":
            await self._strike()
        pieces = await self._call.recv_pieces()
        if pieces is None:
            record.client_ended = True
        elif record.method == "upload":
            try:
                metadata, data = decode_upload_chunk(pieces)
            except ValueError:
                pass  # malformed: the service refuses it, with its own status
            else:
                self._received(metadata, b"".join(data))
        return pieces

    def _received(self, metadata: UploadChunk, data: bytes) -> None:
        record = self._record
        if record.data is not None:
            record.data += data
        record.messages.append(metadata)
        record.sizes.append(len(data))

    async def send(self, message: Any, /) -> None:
        if isinstance(message, DownloadChunk):
            await self._strike()
            if isinstance(self._fault, Corrupt):
                message.data = bytes(0xA5 ^ (i & 0xFF) for i in range(len(message.data)))
            await self._call.send(message)
            # Counted once sent whole: a send still waiting for the client's
            # window when the call ends did not get its message out.
            self._record.sizes.append(len(message.data))
            return
        await self._call.send(message)

    async def send_framed(self, pieces: Sequence[bytes | memoryview], /) -> None:
        if self._record.method == "download":
            # Decoded (a copy: this is a test rig) for send to strike at,
            # corrupt and count.
            body = b"".join(pieces)[PREFIX_BYTES:]
            await self.send(DownloadChunk.FromString(body))
            return
        await self._call.send_framed(pieces)

    async def send_initial_metadata(self, metadata: Mapping[str, str], /) -> None:
        await self._call.send_initial_metadata(metadata)

    def abort_connection(self) -> None:
        self._call.abort_connection()


def _without_data(chunk: UploadChunk) -> UploadChunk:
    # Copy field by field: CopyFrom then ClearField would keep the data's
    # bytes alive in the message's arena for as long as the record lives.
    stripped = UploadChunk(
        dest_path=chunk.dest_path,
        container_id=chunk.container_id,
        mkdir_parents=chunk.mkdir_parents,
        overwrite=chunk.overwrite,
    )
    if chunk.HasField("source_is_dir"):
        stripped.source_is_dir = chunk.source_is_dir
    return stripped


@final
class FaultServer(metaclass=NoPublicConstructor):
    """A running fault-injecting Files server. Made by :func:`open_fault_server`.

    Attributes:
        target: the address to pass to :func:`boxfiles.open_client`.
        root: the container root (for a single-container server).
        calls: a :class:`CallRecord` per call, in arrival order.
    """

    _made_by = "boxfiles.testing.open_fault_server() or the fault_server fixture"

    def __init__(self, service: FilesService, root: Path, *, keep_data: bool) -> None:
        self.target = ""
        self.root = root
        self.calls: list[CallRecord] = []
        self._service = service
        self._keep_data = keep_data
        self._queued: dict[str, deque[Fault]] = {"upload": deque(), "download": deque()}

    def fail_next_upload(self, fault: Fault) -> None:
        """Apply ``fault`` to the next upload (faults queue up in order)."""
        if not isinstance(fault, _UPLOAD_FAULTS):
            raise TypeError(f"{type(fault).__name__} is not an upload fault")
        self._queued["upload"].append(fault)

    def fail_next_download(self, fault: Fault) -> None:
        """Apply ``fault`` to the next download (faults queue up in order)."""
        if not isinstance(fault, _DOWNLOAD_FAULTS):
            raise TypeError(f"{type(fault).__name__} is not a download fault")
        self._queued["download"].append(fault)

    def handlers(self) -> dict[Method[Any, Any], Handler]:
        return {UPLOAD: self._upload, DOWNLOAD: self._download}

    def _begin(self, method: Literal["upload", "download"]) -> CallRecord:
        queue = self._queued[method]
        record = CallRecord(method, queue.popleft() if queue else None)
        if self._keep_data and method == "upload":
            record.data = bytearray()
        self.calls.append(record)
        return record

    async def _run(self, record: CallRecord, body: Any) -> None:
        try:
            await body
        except RemoteError as exc:
            record.status = exc.status
            raise
        except trio.Cancelled:
            record.reset = True
            raise
        else:
            record.status = Status.OK
        finally:
            record.finished.set()

    async def _upload(self, call: ServerCall[UploadChunk, UploadResponse]) -> None:
        record = self._begin("upload")
        faulty = _FaultyCall(call, record.fault, record)
        if isinstance(record.fault, ReplyFailure):
            failure = record.fault
            await self._run(record, _reply_failure(faulty, failure))
        else:
            await self._run(record, self._service.upload(faulty))

    async def _download(self, call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        record = self._begin("download")
        faulty = _FaultyCall(call, record.fault, record)
        await self._run(record, _download_then_strike(self._service, faulty))


async def _reply_failure(call: _FaultyCall, fault: ReplyFailure) -> None:
    while await call.recv() is not None:
        pass
    response = UploadResponse(success=False)
    if fault.error is not None:
        response.error = fault.error
    await call.send(response)


async def _download_then_strike(service: FilesService, call: _FaultyCall) -> None:
    await service.download(call)
    # A fault due after the last chunk strikes once the archive is complete.
    await call._strike()


@asynccontextmanager
async def open_fault_server(
    root: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    listen: str,
    *,
    keep_data: bool = False,
    max_upload_bytes: int | None = None,
    max_transfers: int = MAX_TRANSFERS,
    idle_timeout: float = IDLE_TIMEOUT,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> AsyncIterator[FaultServer]:
    """Run a fault-injecting reference server for the block's duration.

    Args:
        root: as for :func:`boxfiles.serve_files`.
        listen: as for :func:`boxfiles.serve_files`.
        keep_data: keep every upload's bytes in :attr:`CallRecord.data`
            (memory grows with the uploads; for small test data).
        max_upload_bytes: as for :func:`boxfiles.serve_files`.
        max_transfers: as for :func:`boxfiles.serve_files`.
        idle_timeout: as for :func:`boxfiles.serve_files`; a :class:`Stall`
            lasts at most this long.
        chunk_size: as for :func:`boxfiles.serve_files`.

    On exit (or cancellation) the server stops: calls in flight are reset and
    the socket is removed.
    """
    servers: list[FaultServer] = []
    first_root = root if isinstance(root, (str, os.PathLike)) else next(iter(root.values()))

    def wrap(service: FilesService) -> Mapping[Method[Any, Any], Handler]:
        servers.append(
            FaultServer._create(service, Path(os.fspath(first_root)), keep_data=keep_data)
        )
        return servers[0].handlers()

    async def run(task_status: trio.TaskStatus[str]) -> None:
        await serve_service(
            wrap,
            root,
            listen,
            max_upload_bytes=max_upload_bytes,
            max_transfers=max_transfers,
            idle_timeout=idle_timeout,
            chunk_size=chunk_size,
            task_status=task_status,
        )

    with one_error():
        async with trio.open_nursery() as nursery:
            servers_target: str = await nursery.start(run)
            server = servers[0]
            server.target = servers_target
            yield server
            nursery.cancel_scope.cancel()
