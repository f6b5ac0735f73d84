"""Progress reporting: a throttled counter behind every ``progress=`` argument."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import trio

from .._wire import Chunk
from ._local import ChunkReader, ChunkWriter, Source

#: ``progress(bytes_so_far, total_or_None)``; its return value is ignored.
Progress = Callable[[int, "int | None"], object]

#: Seconds between two reports (the final one is always made).
INTERVAL = 0.2


#: Binary prefixes, as the bar and the demo count: 1 KiB = 1024 B.
_IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(count: float) -> str:
    """``count`` bytes in IEC units: ``512 B``, ``1.50 KiB``, ``3.25 GiB``."""
    step = 0
    while abs(count) >= 1024 and step < len(_IEC_UNITS) - 1:
        count /= 1024
        step += 1
    return f"{count:.0f} B" if step == 0 else f"{count:.2f} {_IEC_UNITS[step]}"


def check_progress(progress: Progress | None) -> Progress | None:
    """Validate a ``progress`` argument; raise TypeError naming it."""
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable or None, not {type(progress).__name__}")
    return progress


class Meter:
    """Counts bytes and reports them to ``progress`` at most every INTERVAL.

    Called from the trio thread only. A callback that raises fails the
    transfer with that exception, untouched.
    """

    def __init__(self, progress: Progress | None, total: int | None) -> None:
        self._progress = progress
        self.total = total
        self.done = 0
        self._last = -INTERVAL

    def add(self, count: int) -> None:
        self.done += count
        if self._progress is None:
            return
        now = time.monotonic()
        if now - self._last >= INTERVAL:
            self._last = now
            self._progress(self.done, self._total())

    def finish(self) -> None:
        """Report the final figure (whatever the throttle says)."""
        if self._progress is not None:
            self._progress(self.done, self._total())

    def _total(self) -> int | None:
        # An estimate made before the transfer (copy_in's pre-walk) can be
        # overtaken by files that grew meanwhile; never report done > total.
        return None if self.total is None else max(self.total, self.done)


async def metered_reader(
    reader: ChunkReader, progress: Progress | None, source: Source
) -> ChunkReader:
    """``reader``, reporting each chunk read; the total is a path source's size."""
    if progress is None:
        return reader
    total: int | None = None
    if isinstance(source, (str, os.PathLike)):
        try:
            total = (await trio.to_thread.run_sync(os.stat, source)).st_size
        except OSError:
            total = None  # open_source already succeeded; the size is only a hint
    meter = Meter(progress, total)

    async def read(max_bytes: int) -> Chunk:
        chunk = await reader.read_chunk()
        if chunk.size:
            meter.add(chunk.size)
        else:
            meter.finish()
        return chunk

    return ChunkReader(read, reader.chunk_size)


def metered_writer(writer: ChunkWriter, meter: Meter) -> ChunkWriter:
    """``writer``, counting each chunk written into ``meter``."""

    async def write(pieces: Sequence[bytes | memoryview]) -> None:
        await writer.write(pieces)
        meter.add(sum(len(data) for data in pieces))

    return ChunkWriter(write)
