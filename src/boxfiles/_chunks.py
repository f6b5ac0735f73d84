"""Chunk buffers: pooled, reused, and filled in place by a packing thread.

Shared by the two packers that turn a tree into chunks (the client's
copy_in and the server's downloads). A chunk's buffer keeps HEADER_ROOM
free bytes in front of its data, so it is framed for the wire in place
(``_wire.Chunk``): the packer's reads are the only copies of the data.

Every buffer is made and freed in the trio thread and reused: allocating
each chunk in a worker thread and freeing it in the trio thread defeats
glibc's allocator and turns every chunk into fresh page faults
(docs/contract.md, "What real peers do").
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import final

import trio

from ._wire import CHANNEL_CAPACITY, HEADER_ROOM, Chunk

#: Chunk buffers one transfer holds at most: one being filled,
#: CHANNEL_CAPACITY queued, one being sent.
POOL_SIZE = CHANNEL_CAPACITY + 2


@final
class BufferPool:
    """Chunk buffers shared by the transfers of one client or one server,
    made on demand and reused.

    Spares handed out, and free buffers kept, are each at most ``limit``;
    a pool with no transfer running keeps none.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._spares_out = 0
        self._free: list[bytearray] = []
        self._transfers = 0

    def join(self) -> None:
        """A transfer starts drawing on the pool."""
        self._transfers += 1

    def leave(self, own: bytearray | None, spares: int) -> None:
        """A transfer ends: its own buffer (None if not free) and ``spares``
        spares still counted as out (in chunks dropped on the way) return."""
        self._transfers -= 1
        self.give_back(own, spares=spares)
        if not self._transfers:
            self._free.clear()

    def own(self, size: int) -> bytearray:
        """A buffer for a transfer to keep to itself while it runs."""
        for i in range(len(self._free) - 1, -1, -1):
            if len(self._free[i]) == size:
                return self._free.pop(i)
        return bytearray(size)

    def spare(self, size: int) -> bytearray | None:
        """A spare buffer, or None while ``limit`` are out."""
        if self._spares_out >= self._limit:
            return None
        self._spares_out += 1
        return self.own(size)

    def give_back(self, buffer: bytearray | None, *, spares: int = 0) -> None:
        """Take back ``buffer`` (None: nothing to reuse) and count ``spares``
        (among them ``buffer``, if it is one) as no longer out."""
        self._spares_out -= spares
        if buffer is not None:
            if len(self._free) >= self._limit:
                self._free.pop(0)
            self._free.append(buffer)


@final
class TransferBuffers:
    """One transfer's buffers: one of its own, and spares from the pool
    while it has them, POOL_SIZE in all at most.

    A transfer only ever waits for its own buffers to come back. Were it
    to wait on the shared pool, transfers a peer is not reading yet (it
    serves a few calls at a time, say) could hold every spare, and the
    ones it is reading would wait for ever.
    """

    def __init__(self, pool: BufferPool, chunk_size: int) -> None:
        self._pool = pool
        self._size = HEADER_ROOM + chunk_size
        self._own: bytearray | None = None
        self._own_free = False
        self._spares = 0
        self._returned = trio.lowlevel.ParkingLot()
        self._closed = False
        pool.join()

    async def take(self) -> bytearray:
        while True:
            if self._own is None:
                self._own, self._own_free = self._pool.own(self._size), True
            if self._own_free:
                self._own_free = False
                return self._own
            if self._spares < POOL_SIZE - 1:
                spare = self._pool.spare(self._size)
                if spare is not None:
                    self._spares += 1
                    return spare
            await self._returned.park()

    def give_back(self, buffer: bytearray) -> None:
        if self._closed:
            return  # a chunk outlived its transfer: its buffer is not reused
        if buffer is self._own:
            self._own_free = True
        else:
            self._spares -= 1
            self._pool.give_back(buffer, spares=1)
        self._returned.unpark_all()

    def close(self) -> None:
        self._closed = True
        self._pool.leave(self._own if self._own_free else None, self._spares)


@final
class ChunkSink:
    """Used from a packing thread: fills a transfer's buffers in place and
    hands each full one on as a Chunk, through ``hand_on`` (run in the trio
    thread, as are the buffers' take and give back). Handing on inherits
    the host task's cancellation: a cancelled transfer stops the thread at
    its next chunk."""

    def __init__(
        self,
        hand_on: Callable[[Chunk], Awaitable[None]],
        buffers: TransferBuffers,
        chunk_size: int,
    ) -> None:
        self._hand_on = hand_on
        self._buffers = buffers
        self._size = chunk_size
        self._buffer: bytearray | None = None
        self._used = 0

    async def _next(self, full: Chunk | None) -> bytearray:
        if full is not None:
            await self._hand_on(full)
        return await self._buffers.take()

    def _room(self) -> memoryview:
        """The free part of the current buffer; a full one is handed on first."""
        if self._buffer is None or self._used == self._size:
            full = None if self._buffer is None else self._chunk()
            self._buffer = trio.from_thread.run(self._next, full)
            self._used = 0
        return memoryview(self._buffer)[HEADER_ROOM + self._used : HEADER_ROOM + self._size]

    def _chunk(self) -> Chunk:
        assert self._buffer is not None
        return Chunk(self._buffer, self._used, self._buffers.give_back)

    def flush(self) -> None:
        """Hand on what the current buffer holds."""
        if self._used:
            trio.from_thread.run(self._hand_on, self._chunk())
            self._buffer, self._used = None, 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            room = self._room()
            take = min(len(room), len(view))
            room[:take] = view[:take]
            self._used += take
            view = view[take:]

    def copy_from(self, fd: int, size: int) -> int:
        """Append up to ``size`` bytes read from ``fd``, straight into the
        buffers: the bytes copied, fewer than ``size`` only if the file
        ended first (the caller decides what a shrunk file means).

        Raises:
            OSError: reading failed.
        """
        left = size
        while left:
            room = self._room()
            got = os.readv(fd, [room[:left]])
            if got == 0:
                break
            self._used += got
            left -= got
        return size - left
