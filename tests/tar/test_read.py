"""The archive reader both sides share, driven directly with a real ChunkStream."""

from __future__ import annotations

import itertools
import os
import random
import tarfile
from pathlib import Path
from typing import Any, cast

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from boxfiles._tar._read import (
    REFILL_CHUNKS,
    ChunkStream,
    _checksum_matches,
    _TarInfo,
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


def _header_outcome(cls: type[tarfile.TarInfo], block: bytes) -> object:
    try:
        info = cls.frombuf(block, "utf-8", "surrogateescape")
    except Exception as exc:  # the outcome compared is the error itself
        return type(exc), str(exc)
    return {slot: getattr(info, slot, None) for slot in tarfile.TarInfo.__slots__}


@given(
    name=st.text(st.sampled_from("ab/.é\udcff"), max_size=180),
    kind=st.sampled_from(list(b"0125x34678gLK\0S")),
    size=st.integers(0, 2**40),
    uid=st.integers(0, 2**24),
    mtime=st.integers(-(2**34), 2**36),
    flips=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=4),
    fix_checksum=st.booleans(),
)
def test_headers_are_read_as_tarfile_reads_them(
    name: str,
    kind: int,
    size: int,
    uid: int,
    mtime: int,
    flips: list[tuple[int, int]],
    fix_checksum: bool,
) -> None:
    # Every block of a header (its PAX header, the entry) as written, then
    # with bytes changed, the checksum kept right or not: _TarInfo and
    # tarfile read each into the same object, or refuse it the same way.
    info = tarfile.TarInfo(name)
    info.type, info.size, info.uid, info.mtime = bytes([kind]), size, uid, mtime
    if info.ischr() or info.isblk():
        info.devmajor, info.devminor = 8, 1
    blocks = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    for start in range(0, len(blocks), tarfile.BLOCKSIZE):
        block = bytearray(blocks[start : start + tarfile.BLOCKSIZE])
        for at, value in flips:
            block[at] = value
        if fix_checksum:
            block[148:156] = b"%06o\0 " % (sum(block[:148]) + 256 + sum(block[156:]))
        expected = _header_outcome(tarfile.TarInfo, bytes(block))
        assert _header_outcome(_TarInfo, bytes(block)) == expected


def test_no_header_and_the_end_marker_are_refused_as_tarfile_refuses_them() -> None:
    for block in (b"", bytes(100), bytes(tarfile.BLOCKSIZE)):
        assert _header_outcome(_TarInfo, block) == _header_outcome(tarfile.TarInfo, block)


def test_a_plain_header_is_read_without_tarfile(monkeypatch: pytest.MonkeyPatch) -> None:
    info = tarfile.TarInfo("tree/dir/file.txt")
    info.size, info.mode, info.mtime = 1024, 0o644, 1_733_300_000
    block = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    expected = _header_outcome(tarfile.TarInfo, block)

    def refuse(cls: type[tarfile.TarInfo], *args: object) -> tarfile.TarInfo:
        raise AssertionError("tarfile read a plain header")

    monkeypatch.setattr(tarfile.TarInfo, "frombuf", classmethod(refuse))
    assert _header_outcome(_TarInfo, block) == expected


async def test_data_in_more_pieces_than_one_writev_takes(tmp_path: Path) -> None:
    data = os.urandom(3000)
    whole = archive(member("f", data))
    start = whole.index(data)
    chunk = [
        memoryview(whole)[:start],
        *(memoryview(whole)[i : i + 1] for i in range(start, start + len(data))),
        memoryview(whole)[start + len(data) :],
    ]
    send, receive = trio.open_memory_channel[list[memoryview]](1)
    stream = ChunkStream(receive)
    path = tmp_path / "f"

    async def feed() -> None:
        async with send:
            await send.send(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        await trio.to_thread.run_sync(_read_one_file, stream, path)
    assert path.read_bytes() == data


def _read_one_file(stream: ChunkStream, path: Path) -> None:
    """Read an archive of one regular file from ``stream`` into ``path``."""
    tar = open_archive(stream)
    info = next_member(tar)
    assert info is not None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        write_member(info, stream, fd)
    finally:
        os.close(fd)
    assert next_member(tar) is None


async def test_chunks_queued_behind_are_taken_in_the_same_hop(tmp_path: Path) -> None:
    """A hop to the trio thread takes the chunk waited for and up to
    REFILL_CHUNKS - 1 more already queued: never more, so the reading
    thread holds at most REFILL_CHUNKS chunks."""
    data = os.urandom(40_000)
    whole = archive(member("f", data))
    chunks = [(memoryview(whole)[at : at + 4096],) for at in range(0, len(whole), 4096)]
    send, receive = trio.open_memory_channel[tuple[memoryview]](len(chunks))
    for chunk in chunks:
        send.send_nowait(chunk)
    send.close()
    per_hop: list[int] = []

    class Counting:
        async def receive(self) -> tuple[memoryview]:
            got = await receive.receive()
            per_hop.append(1)
            return got

        def receive_nowait(self) -> tuple[memoryview]:
            got = receive.receive_nowait()
            per_hop[-1] += 1
            return got

    stream = ChunkStream(cast(Any, Counting()))
    path = tmp_path / "f"

    await trio.to_thread.run_sync(_read_one_file, stream, path)
    assert path.read_bytes() == data
    assert len(chunks) > 2 * REFILL_CHUNKS
    assert per_hop[0] == REFILL_CHUNKS  # all were queued: as many as allowed
    assert max(per_hop) == REFILL_CHUNKS
    assert sum(per_hop) <= len(chunks)
