"""A scripted HTTP/2 peer on h2, for cases where the exact frames matter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import trio

GRPC_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


def framed(body: bytes, declared: int | None = None) -> bytes:
    """A gRPC message: its 5-byte prefix (declaring ``declared`` bytes if
    given), then ``body``."""
    size = len(body) if declared is None else declared
    return b"\x00" + size.to_bytes(4, "big") + body


@dataclass
class Peer:
    """One accepted connection, driven by a test."""

    conn: trio.socket.SocketType
    h2: h2.connection.H2Connection
    events: list[Any] = field(default_factory=list)

    async def flush(self) -> None:
        data = memoryview(self.h2.data_to_send())
        while data:  # a socket may take part of a large write
            data = data[await self.conn.send(data) :]

    async def answer(self) -> int:
        """Wait for a call and send its response headers; its stream id."""
        request = await self.until(h2.events.RequestReceived)
        sid: int = request.stream_id
        self.h2.send_headers(sid, GRPC_HEADERS)
        return sid

    async def until(self, kind: type[Any]) -> Any:
        """Read until an event of ``kind`` arrives (EOF raises EOFError)."""
        while True:
            for event in self.events:
                if isinstance(event, kind):
                    self.events.remove(event)
                    return event
            data = await self.conn.recv(1 << 20)
            if not data:
                raise EOFError(f"connection closed before {kind.__name__}")
            self.events.extend(self.h2.receive_data(data))
            await self.flush()


@asynccontextmanager
async def h2_server(path: Path) -> AsyncIterator[tuple[str, trio.MemoryReceiveChannel[Peer]]]:
    """Listen on ``path``; yields the target and a channel of accepted peers."""
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(4)
    send, receive = trio.open_memory_channel[Peer](4)
    accepted: list[trio.socket.SocketType] = []

    async def accept() -> None:
        while True:
            conn, _ = await listener.accept()
            accepted.append(conn)
            peer = Peer(
                conn, h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            )
            peer.h2.initiate_connection()
            await peer.flush()
            await send.send(peer)

    with listener:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept)
                yield f"unix:{path}", receive
                nursery.cancel_scope.cancel()
        finally:
            for conn in accepted:
                conn.close()
