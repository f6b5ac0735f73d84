"""Local sources and destinations: files on this machine or caller objects.

Blocking file calls run in trio worker threads, except reads of file data
the page cache already holds. Chunks are read into pooled buffers
(``boxfiles._chunks``), made and freed in the trio thread.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import stat
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Protocol, cast, final, runtime_checkable

import trio

from .._chunks import BufferPool, TransferBuffers
from .._errors import FilesError, LocalIOError
from .._wire import DEFAULT_CHUNK_SIZE, HEADER_ROOM, IOV_MAX, Chunk


@runtime_checkable
class AsyncReader(Protocol):
    """Anything with ``async def read(max_bytes) -> bytes`` (``b""`` at end)."""

    async def read(self, max_bytes: int, /) -> bytes: ...


@runtime_checkable
class AsyncWriter(Protocol):
    """Anything with ``async def write(data)``; a ``trio.open_file`` object fits."""

    async def write(self, data: bytes, /) -> object: ...


def _has_method(value: object, name: str) -> bool:
    # Not isinstance(value, AsyncReader): since Python 3.12 that looks for
    # the method statically, and misses one provided by __getattr__, as
    # trio.open_file's wrapper provides all of its file's methods.
    return not isinstance(value, (str, os.PathLike)) and callable(getattr(value, name, None))


Source = str | os.PathLike[str] | AsyncReader
Destination = str | os.PathLike[str] | AsyncWriter


def describe_oserror(err: OSError) -> str:
    """An OSError as a short reason for a message (no errno, no path)."""
    return err.strerror or str(err)


def local_error(
    err: OSError, path: str | os.PathLike[str], what: str = "cannot read"
) -> LocalIOError:
    """``err`` as the LocalIOError that names the local path it concerns."""
    name = err.filename if isinstance(err.filename, str) else os.fspath(path)
    return LocalIOError(f"{what} {name}: {describe_oserror(err)}")


def local_path(value: object, what: str) -> str:
    """A local path argument as a str; TypeError/ValueError naming it."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path, not {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what} must be a non-empty str path")
    return text


@final
class ChunkReader:
    """Reads a source in chunks of at most ``chunk_size`` bytes."""

    def __init__(self, read: _ReadFn, chunk_size: int) -> None:
        self._read = read
        self.chunk_size = chunk_size

    async def read_chunk(self) -> Chunk:
        """The next chunk; an empty one at the end. Raises LocalIOError."""
        return await self._read(self.chunk_size)


class _ReadFn(Protocol):
    async def __call__(self, max_bytes: int, /) -> Chunk: ...


#: Whether this platform can read without blocking on the disk (Linux 4.14+).
_HAVE_NOWAIT = hasattr(os, "RWF_NOWAIT") and hasattr(os, "preadv")

#: Spare chunk buffers (beyond each upload's own one) that all of one
#: client's uploads hold at most, together. One HTTP/2 connection carries
#: them all, so past a few concurrent uploads more buffered chunks would not
#: go out any sooner; they would only add memory per upload.
CLIENT_POOL_SIZE = 16

#: A download writes every chunk already queued, while the batch is under
#: this many bytes, in one write: small chunks then cost one thread hop per
#: batch rather than each. At the default chunk size a batch is one chunk.
WRITE_BATCH_BYTES = DEFAULT_CHUNK_SIZE


def _read_nowait(fd: int, view: memoryview, offset: int) -> int:
    """Read what the page cache already holds, without blocking.

    Returns the bytes read: possibly fewer than asked for, and 0 when
    nothing is cached, RWF_NOWAIT is unsupported here, or at the end of the
    file. Raises OSError for a real read error.
    """
    try:
        return os.preadv(fd, [view], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return 0
        raise


def _file_read_fn(file: io.FileIO, name: str, buffers: TransferBuffers) -> _ReadFn:
    fd = file.fileno()
    # Regular files are read at an offset of our own, first without blocking:
    # a chunk the page cache holds is copied right here, which costs less
    # than a round trip through a worker thread (and the GIL hand-offs it
    # brings) by an order of magnitude. Anything else (pipes, devices) is
    # read in a worker thread.
    offset: int | None = 0 if _HAVE_NOWAIT and stat.S_ISREG(os.fstat(fd).st_mode) else None

    def read_blocking(view: memoryview, at: int | None) -> int:
        if at is None:
            return file.readinto(view) or 0
        return os.preadv(fd, [view], at)

    async def read(max_bytes: int) -> Chunk:
        nonlocal offset
        buffer = await buffers.take()
        view = memoryview(buffer)[HEADER_ROOM : HEADER_ROOM + max_bytes]
        try:
            got = _read_nowait(fd, view, offset) if offset is not None else 0
            if got < max_bytes:
                # The rest is not cached, or this is the end of the file:
                # only a blocking read can tell which.
                at = None if offset is None else offset + got
                got += await trio.to_thread.run_sync(read_blocking, view[got:], at)
        except BaseException as exc:
            buffers.give_back(buffer)
            if isinstance(exc, OSError):
                raise LocalIOError(f"cannot read {name}: {describe_oserror(exc)}") from exc
            raise
        if offset is not None:
            offset += got
        return Chunk(buffer, got, buffers.give_back)

    return read


def _object_read_fn(reader: AsyncReader) -> _ReadFn:
    async def read(max_bytes: int) -> Chunk:
        try:
            data = await reader.read(max_bytes)
        except FilesError:
            raise
        except Exception as err:  # the caller's reader failed: a local read error
            raise LocalIOError(f"reading the source failed: {err!r}") from err
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"source.read() must return bytes, not {type(data).__name__}")
        if len(data) > max_bytes:
            raise ValueError(f"source.read({max_bytes}) returned {len(data)} bytes")
        return Chunk.of(data)

    return read


@asynccontextmanager
async def open_source(
    source: Source, chunk_size: int, pool: BufferPool
) -> AsyncIterator[ChunkReader]:
    """Open ``source`` (a path, or an object with async ``read``) for reading.

    A file is read into buffers from ``pool``.

    Raises:
        LocalIOError: a path that cannot be opened, or is a directory.
        TypeError: ``source`` is neither a path nor a reader.
    """
    if _has_method(source, "read"):
        yield ChunkReader(_object_read_fn(cast(AsyncReader, source)), chunk_size)
        return
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a path or have async read(max_bytes), not {type(source).__name__}"
        )
    name = os.fspath(source)

    def open_file() -> io.FileIO:
        file = io.FileIO(name, "rb")
        if os.path.isdir(name):
            file.close()
            raise IsADirectoryError(21, "Is a directory (upload a tar file, or use copy_in)")
        return file

    try:
        file = await trio.to_thread.run_sync(open_file)
    except OSError as err:
        raise LocalIOError(f"cannot open {name}: {describe_oserror(err)}") from err
    buffers = TransferBuffers(pool, chunk_size)
    try:
        yield ChunkReader(_file_read_fn(file, name, buffers), chunk_size)
    finally:
        buffers.close()
        file.close()


@final
class ChunkWriter:
    """Writes chunks to a destination, a batch of them at a time, in order."""

    def __init__(self, write: _WriteFn) -> None:
        self.write = write


class _WriteFn(Protocol):
    async def __call__(self, pieces: Sequence[bytes | memoryview], /) -> None: ...


def _object_write_fn(writer: AsyncWriter) -> _WriteFn:
    async def write(pieces: Sequence[bytes | memoryview]) -> None:
        try:
            # The caller's writer is promised bytes, not views into buffers:
            # one copy, and one write, for the whole batch.
            await writer.write(b"".join(pieces))
        except FilesError:
            raise
        except Exception as err:  # the caller's writer failed: a local write error
            raise LocalIOError(f"writing the destination failed: {err!r}") from err

    return write


def _file_write_fn(fd: int, name: str) -> _WriteFn:
    def write_all(pieces: Sequence[bytes | memoryview]) -> None:
        views = [memoryview(data) for data in pieces]
        while views:
            written = os.writev(fd, views[:IOV_MAX])
            while views and written >= len(views[0]):
                written -= len(views.pop(0))
            if views:
                views[0] = views[0][written:]

    async def write(pieces: Sequence[bytes | memoryview]) -> None:
        try:
            # One thread hop for the whole batch: with small chunks the hop,
            # not the copy, is what a write costs.
            await trio.to_thread.run_sync(write_all, pieces)
        except OSError as err:
            raise LocalIOError(f"cannot write {name}: {describe_oserror(err)}") from err

    return write


def part_name(final_path: Path) -> Path:
    """A fresh hidden name next to ``final_path`` for staging its content."""
    return final_path.with_name(f".{final_path.name}.{secrets.token_hex(6)}.boxfiles-part")


@asynccontextmanager
async def open_destination(dest: Destination | ChunkWriter) -> AsyncIterator[ChunkWriter]:
    """Open ``dest`` (a path, or an object with async ``write``) for writing;
    a ChunkWriter (copy_out's extractor) is used as it is.

    A path is written through a hidden temporary file in the same directory
    that replaces ``dest`` only when the block exits cleanly; on any error or
    cancellation it is removed and ``dest`` is untouched.

    Raises:
        LocalIOError: the temporary file cannot be created, written or renamed.
        TypeError: ``dest`` is neither a path nor a writer.
    """
    if isinstance(dest, ChunkWriter):
        yield dest
        return
    if _has_method(dest, "write"):
        yield ChunkWriter(_object_write_fn(cast(AsyncWriter, dest)))
        return
    if not isinstance(dest, (str, os.PathLike)):
        raise TypeError(f"dest must be a path or have async write(data), not {type(dest).__name__}")
    final_path = Path(os.fspath(dest))
    part = part_name(final_path)

    def create() -> int:
        if final_path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        return os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)

    try:
        fd = await trio.to_thread.run_sync(create)
    except OSError as err:
        raise LocalIOError(f"cannot write {final_path}: {describe_oserror(err)}") from err
    committed = False
    try:
        yield ChunkWriter(_file_write_fn(fd, str(final_path)))
        os.close(fd)
        fd = -1
        try:
            # In a thread: replacing a large file frees its blocks, which can
            # take long enough to stall every other task.
            await trio.to_thread.run_sync(os.replace, part, final_path)
        except OSError as err:
            raise LocalIOError(f"cannot write {final_path}: {describe_oserror(err)}") from err
        committed = True
    finally:
        if fd != -1:
            os.close(fd)
        if not committed:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(partial(part.unlink, missing_ok=True))
