"""The archive reader both sides share, driven directly with a real ChunkStream."""

from __future__ import annotations

import trio

from boxfiles._tar._read import ChunkStream, next_member, open_archive

from ..helpers import tarshapes
from ..helpers.checks import rss

MiB = 1024 * 1024


async def test_memory_does_not_grow_with_the_number_of_entries() -> None:
    # tarfile keeps every header (about 490 B each, measured): 100k entries
    # would hold some 47 MiB. Reading them must hold next to nothing.
    entries = 100_000
    send, receive = trio.open_memory_channel[bytes](4)
    stream = ChunkStream(receive)

    def read_all() -> tuple[int, int]:
        tar = open_archive(stream)
        count = 0
        while next_member(tar) is not None:
            count += 1
        return count, rss()  # while the TarFile is still alive

    async def feed() -> None:
        async with send:
            for start in range(0, entries, 500):
                names = (f"d{i // 1000}/f{i}" for i in range(start, start + 500))
                await send.send(b"".join(tarshapes.member_bytes(n, b"") for n in names))
            await send.send(tarshapes.END)

    before = rss()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        count, after = await trio.to_thread.run_sync(read_all)
    assert count == entries
    assert after - before < 16 * MiB
