"""A scripted Files server for tests: real gRPC (grpclib via the asyncio edge), with
behaviour chosen per test and a record of what arrived on the wire."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from boxfiles._aio import ServerCall, serve
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from boxfiles._wire import DOWNLOAD, UPLOAD


@dataclass
class Record:
    """What the scripted server saw of one call."""

    chunks: list[UploadChunk] = field(default_factory=list)
    ended_cleanly: bool = False
    reset: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def data(self) -> bytes:
        return b"".join(c.data for c in self.chunks)


UploadScript = Callable[[ServerCall[UploadChunk, UploadResponse], Record], Awaitable[None]]
DownloadScript = Callable[[ServerCall[DownloadRequest, DownloadChunk]], Awaitable[None]]


async def recv_all(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
    """Receive until the client ends its side."""
    while (chunk := await call.recv()) is not None:
        record.chunks.append(chunk)
    record.ended_cleanly = True


async def accept_all(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
    await recv_all(call, record)
    await call.send(UploadResponse(success=True))


@dataclass
class Scripted:
    target: str
    records: list[Record]
    cancel: Callable[[], None]


@asynccontextmanager
async def scripted_server(
    sock_dir: Path,
    upload: UploadScript = accept_all,
    download: DownloadScript | None = None,
) -> AsyncIterator[Scripted]:
    records: list[Record] = []

    async def on_upload(call: ServerCall[Any, Any]) -> None:
        record = Record()
        records.append(record)
        try:
            await upload(call, record)
        except trio.Cancelled:
            record.reset.set()
            raise
        finally:
            record.done.set()

    async def on_download(call: ServerCall[Any, Any]) -> None:
        assert download is not None
        await download(call)

    path = str(sock_dir / "scripted.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    try:
        # The server gets a scope of its own so a test can stop it without
        # cancelling itself.
        server_scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with server_scope:
                await serve(
                    sock,
                    {UPLOAD: on_upload, DOWNLOAD: on_download},
                    max_connections=64,
                    connection_idle_timeout=300.0,
                    task_status=task_status,
                )

        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            yield Scripted(f"unix:{path}", records, server_scope.cancel)
            server_scope.cancel()
    finally:
        sock.close()
