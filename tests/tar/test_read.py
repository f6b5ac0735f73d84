"""The archive reader both sides share, driven directly with a real ChunkStream."""

from __future__ import annotations

import itertools
import os
import random
import tarfile
from pathlib import Path

import trio

from boxfiles._tar._read import (
    ChunkStream,
    _checksum_matches,
    next_member,
    open_archive,
    write_member,
)

from ..helpers import tarshapes
from ..helpers.archives import archive, member
from ..helpers.checks import rss

MiB = 1024 * 1024


async def test_memory_does_not_grow_with_the_number_of_entries() -> None:
    # tarfile keeps every header (about 490 B each, measured): 100k entries
    # would hold some 47 MiB. Reading them must hold next to nothing.
    entries = 100_000
    send, receive = trio.open_memory_channel[tuple[bytes]](4)
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
                await send.send((b"".join(tarshapes.member_bytes(n, b"") for n in names),))
            await send.send((tarshapes.END,))

    before = rss()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        count, after = await trio.to_thread.run_sync(read_all)
    assert count == entries
    assert after - before < 16 * MiB


async def test_chunks_of_pieces_read_as_their_bytes(tmp_path: Path) -> None:
    """A download hands the reader each message as the frames it came in:
    headers, PAX records, file data and the end marker split anywhere, across
    pieces and chunks, empty pieces included, read as the joined bytes."""
    data = os.urandom(300_000)
    long = "/".join(["n" * 200] * 20)
    whole = archive(
        member(long, b"abc"),
        member("d", type=tarfile.DIRTYPE),
        member("d/big", data),
        member("d/empty", b""),
    )
    rng = random.Random(7)
    cuts = sorted({0, len(whole), *(rng.randrange(len(whole)) for _ in range(400))})
    pieces = [memoryview(whole)[a:b] for a, b in itertools.pairwise(cuts)]
    send, receive = trio.open_memory_channel[list[memoryview]](1)
    stream = ChunkStream(receive)

    def read_all() -> dict[str, bytes]:
        tar = open_archive(stream)
        got: dict[str, bytes] = {}
        while (info := next_member(tar)) is not None:
            if info.isfile():
                path = tmp_path / str(len(got))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT)
                try:
                    write_member(info, stream, fd)
                finally:
                    os.close(fd)
                got[info.name] = path.read_bytes()
            else:
                got[info.name] = b""
        return got

    async def feed() -> None:
        async with send:
            at = 0
            while at < len(pieces):
                count = rng.randrange(1, 12)
                chunk = pieces[at : at + count]
                chunk.insert(rng.randrange(len(chunk) + 1), memoryview(b""))
                await send.send(chunk)
                at += count

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        got = await trio.to_thread.run_sync(read_all)
    assert got == {long: b"abc", "d": b"", "d/big": data, "d/empty": b""}


def test_a_header_checksum_is_taken_unsigned_or_signed_as_tarfile_takes_it() -> None:
    info = tarfile.TarInfo("caf\xe9")  # a byte over 127 in the name (PAX keeps it, ustar a "?")
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "latin-1", "strict"))
    assert max(block) > 127
    unsigned = sum(block[:148]) + 256 + sum(block[156:])
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    for checksum, accepted in ((unsigned, True), (signed, True), (unsigned + 1, False)):
        block[148:156] = b"%06o\0 " % checksum
        assert _checksum_matches(bytes(block)) is accepted
        try:
            tarfile.TarInfo.frombuf(bytes(block), "latin-1", "strict")
        except tarfile.HeaderError:
            assert not accepted
        else:
            assert accepted
