"""Reading a tar stream in an extraction thread, with file data left uncopied.

tarfile's stream mode (``r|``) reads ahead in its own buffer and hands each
member's data out through two more copies. Here tarfile reads only headers,
in its seekable mode, through a stream whose seeks go forward only (all
that mode does while members are taken in order); a regular member's data
goes from the received chunks to its file descriptor by ``os.write`` on
slices of them, copied by nothing but the kernel.
"""

from __future__ import annotations

import os
import tarfile
from typing import final

import trio

#: Most bytes tarfile may ask for at once: a header block, or the body of a
#: PAX or GNU long-name header. A hostile archive declaring a larger header
#: is refused rather than read into memory.
MAX_HEADER_READ = 1024 * 1024

#: Bytes per read of a GNU sparse member's data (holes included).
SPARSE_PIECE = 64 * 1024


@final
class ChunkStream:
    """A forward-only, blocking byte stream over a trio channel of chunks.

    Used from a worker thread. Each chunk is received, and the one before it
    released, in the trio thread that allocated it (glibc then reuses that
    memory for the next chunk rather than faulting in fresh pages). A receive
    inherits the host task's cancellation, so a cancelled transfer stops the
    thread at its next chunk.
    """

    def __init__(self, channel: trio.MemoryReceiveChannel[bytes | memoryview]) -> None:
        self._channel = channel
        self._chunk: bytes | memoryview = b""
        self._start = 0
        #: Bytes handed out or skipped so far.
        self.taken = 0
        #: The channel has ended: every byte has been received.
        self.eof = False

    async def _refill(self) -> None:
        try:
            chunk = await self._channel.receive()
        except trio.EndOfChannel:
            self.eof = True
            chunk = b""
        self._chunk, self._start = chunk, 0

    def _available(self) -> int:
        """Bytes left in the current chunk, refilling it when used up (0 at the end)."""
        while self._start == len(self._chunk) and not self.eof:
            trio.from_thread.run(self._refill)
        return len(self._chunk) - self._start

    def _advance(self, count: int) -> None:
        self._start += count
        self.taken += count

    def read(self, size: int = -1, /) -> bytes:
        """Exactly ``size`` bytes, fewer only at the end (for tarfile's headers).

        Raises:
            tarfile.ReadError: ``size`` is negative or over MAX_HEADER_READ.
        """
        if size > MAX_HEADER_READ:
            raise tarfile.ReadError(f"archive header of {size} bytes is too large")
        if size < 0:
            raise tarfile.ReadError(f"archive header declares a negative size ({size})")
        pieces = []
        left = size
        while left and (got := self._available()):
            take = min(left, got)
            pieces.append(self._chunk[self._start : self._start + take])
            self._advance(take)
            left -= take
        return b"".join(pieces)

    def tell(self) -> int:
        return self.taken

    def seekable(self) -> bool:
        return True  # forward, which is all tarfile asks of it

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        """Skip forward to ``offset``, or to the end if the stream ends first.

        Raises:
            tarfile.ReadError: a seek backwards, or relative to the end; the
                seekable mode only makes those on an archive it cannot
                stream (it is corrupt).
        """
        if whence == os.SEEK_CUR:
            offset += self.taken
        elif whence != os.SEEK_SET:
            raise tarfile.ReadError("cannot seek relative to the end of a stream")
        if offset < self.taken:
            raise tarfile.ReadError("archive would have to be read backwards")
        while self.taken < offset and (got := self._available()):
            self._advance(min(got, offset - self.taken))
        return self.taken

    def drain(self) -> None:
        """Skip to the end."""
        while got := self._available():
            self._advance(got)

    def write_to(self, fd: int, size: int) -> None:
        """Write the next ``size`` bytes to ``fd``.

        Raises:
            tarfile.ReadError: the stream ended first.
            OSError: writing failed.
        """
        left = size
        while left:
            got = self._available()
            if not got:
                raise tarfile.ReadError("unexpected end of data")
            take = min(left, got)
            self._write_piece(fd, take)
            left -= take

    def _write_piece(self, fd: int, count: int) -> None:
        # A function of its own: its views are gone when it returns, so the
        # chunk is released in the trio thread by the next refill, not here.
        view = memoryview(self._chunk)[self._start : self._start + count]
        while view:
            view = view[os.write(fd, view) :]
        self._advance(count)


def open_archive(stream: ChunkStream) -> tarfile.TarFile:
    """A TarFile reading headers from ``stream``; its first header is read now.

    Raises:
        tarfile.ReadError: the stream does not start with a tar header.
    """
    return tarfile.open(fileobj=stream, mode="r:")  # type: ignore[call-overload, no-any-return]


def next_member(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    """The next member's header, or None at the end of the archive.

    Raises what ``TarFile.next`` raises: tarfile.ReadError for a corrupt or
    truncated header, ValueError or OverflowError for absurd numbers in one.
    """
    member = tar.next()
    # tarfile keeps every header it read; drop them so memory does not grow
    # with the number of entries.
    tar.members.clear()  # type: ignore[attr-defined]
    return member


def write_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, stream: ChunkStream, fd: int
) -> None:
    """Write a regular member's data to ``fd``; the stream must be at its data.

    Raises:
        tarfile.ReadError: the data ended early.
        OSError: writing failed.
    """
    if member.sparse is None:
        stream.write_to(fd, member.size)
        return
    # GNU sparse members are rare: tarfile maps their holes, a piece at a time.
    data = tar.extractfile(member)
    assert data is not None  # a regular member always has data
    while piece := data.read(SPARSE_PIECE):
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view) :]
