"""Tar archives built in memory, and readers that hand them out."""

from __future__ import annotations

import io
import tarfile

import trio


class BytesReader:
    """An async reader over ``data`` that hands out at most ``step`` per read."""

    def __init__(self, data: bytes, step: int | None = None) -> None:
        self._data = memoryview(data)
        self._step = step

    async def read(self, max_bytes: int) -> bytes:
        n = max_bytes if self._step is None else min(max_bytes, self._step)
        piece, self._data = self._data[:n], self._data[n:]
        await trio.lowlevel.checkpoint()
        return bytes(piece)


def member(
    name: str,
    data: bytes = b"",
    *,
    type: bytes = tarfile.REGTYPE,
    linkname: str = "",
    mode: int = 0o644,
    mtime: int = 1_600_000_000,
) -> tuple[tarfile.TarInfo, bytes]:
    """An entry of :func:`archive`: ``data`` is a regular file's content."""
    info = entry(name, type, linkname)
    info.mode = mode
    info.mtime = mtime
    return info, data if type == tarfile.REGTYPE else b""


def archive(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    """A PAX archive of ``members``: each a header and the data written after
    it (its size set from the data; None: no data, size as set)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def files(**contents: bytes) -> bytes:
    """An archive of regular files, name -> content."""
    return archive(*(member(name, data) for name, data in contents.items()))


def names(data: bytes | None) -> list[str]:
    assert data is not None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


def contents(data: bytes | None) -> dict[str, bytes]:
    assert data is not None
    found = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar.getmembers():
            if info.isfile():
                extracted = tar.extractfile(info)
                assert extracted is not None
                found[info.name] = extracted.read()
    return found


class Stalling:
    """``data``, then blocks until cancelled."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, max_bytes: int) -> bytes:
        if self._data:
            piece, self._data = self._data[:max_bytes], self._data[max_bytes:]
            return piece
        await trio.sleep_forever()
        raise AssertionError("unreachable")


def entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


class SlowReader:
    """``data`` in ``step`` pieces, ``pause`` seconds apart."""

    def __init__(self, data: bytes, step: int, pause: float) -> None:
        self._data = BytesReader(data)
        self._step = step
        self._pause = pause

    async def read(self, max_bytes: int) -> bytes:
        await trio.sleep(self._pause)
        return await self._data.read(min(max_bytes, self._step))
