"""An archive holds at most MAX_ARCHIVE_ENTRIES entries, on both sides, and
what placement keeps per entry stays small: its journal grows with the
entries an archive replaces, so both together bound it."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

import boxfiles
from boxfiles._aio import ServerCall
from boxfiles._client import _copy_out, _place
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest
from boxfiles._server import _extract
from boxfiles._tar._rules import MAX_ARCHIVE_ENTRIES

from ..helpers.archives import files
from ..helpers.scripted import scripted_server
from ..helpers.servers import serving, upload
from ..helpers.trees import copy_listing, wait_for_no_staging

#: The bound the tests set, to exceed it cheaply.
LOW = 5


def many(count: int, data: bytes = b"x") -> bytes:
    return files(**{f"f{i:05}": data for i in range(count)})


def test_the_bound_is_stated() -> None:
    assert MAX_ARCHIVE_ENTRIES == 1_000_000


async def test_the_server_refuses_an_archive_past_the_bound(
    root: Path, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_extract, "MAX_ARCHIVE_ENTRIES", LOW)
    (root / "d").mkdir()
    (root / "d" / "f00000").write_bytes(b"old")
    before = copy_listing(root)
    async with serving(root, sock_dir) as target:
        with pytest.raises(boxfiles.ResourceExhausted, match=f"more than {LOW} entries"):
            await upload(target, many(LOW + 1, b"new"), "/d", overwrite=True)
        await wait_for_no_staging(root)
        assert copy_listing(root) == before
        await upload(target, many(LOW, b"new"), "/d", overwrite=True)  # at the bound: taken
    assert (root / "d" / "f00000").read_bytes() == b"new"


async def test_copy_out_refuses_an_archive_past_the_bound(
    root: Path, sock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_copy_out, "MAX_ARCHIVE_ENTRIES", LOW)
    src = root / "src"
    src.mkdir()
    for i in range(LOW):  # with src itself, LOW + 1 entries
        (src / f"f{i}").write_bytes(b"new")
    dest = tmp_path / "dest"
    (dest / "src").mkdir(parents=True)
    (dest / "src" / "f0").write_bytes(b"old")
    before = copy_listing(dest)
    async with serving(root, sock_dir) as target, boxfiles.open_client(target) as client:
        with pytest.raises(boxfiles.UnsafeArchive, match=f"more than {LOW} entries"):
            await client.copy_out("/src", dest)
        assert copy_listing(dest) == before
        assert sorted(p.name for p in dest.iterdir()) == ["src"]  # no staging left
        (src / "f0").unlink()  # now LOW entries: taken
        await client.copy_out("/src", dest)
    assert (dest / "src" / "f1").read_bytes() == b"new"


#: Two merges are measured, of these many entries each: what placement
#: keeps per entry is the slope between them.
SIZES = (2_000, 8_000)
#: What a server merge may keep per replaced entry (about 200 bytes
#: measured; 830 when each journal step was a closure).
BYTES_PER_ENTRY = 400
#: The same for copy_out (about 250 bytes measured).
CLIENT_BYTES_PER_ENTRY = 400


def held_when_done(cls: type, method: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Have ``cls.method`` note the memory traced when it returns: placement
    has done every step then and still holds its journal, its largest."""
    held: list[int] = []
    original = getattr(cls, method)

    def noting(*args: object, **kwargs: object) -> None:
        original(*args, **kwargs)
        if tracemalloc.is_tracing():
            held.append(tracemalloc.get_traced_memory()[0])

    monkeypatch.setattr(cls, method, noting)
    return held


def per_entry(held: list[int]) -> float:
    assert len(held) == len(SIZES), held
    return (held[1] - held[0]) / (SIZES[1] - SIZES[0])


async def test_a_merge_keeps_little_per_entry_on_the_server(
    root: Path, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = held_when_done(_extract.Placement, "run", monkeypatch)
    async with serving(root, sock_dir) as target:
        for size in SIZES:
            archive = many(size)
            await upload(target, archive, f"/{size}", mkdir_parents=True)
            tracemalloc.start()
            try:
                await upload(target, archive, f"/{size}", overwrite=True)  # replaces every entry
            finally:
                tracemalloc.stop()
    print(f"server merge: {per_entry(held):.0f} B/entry held")
    assert 0 < per_entry(held) < BYTES_PER_ENTRY, held


async def test_a_merge_keeps_little_per_entry_in_copy_out(
    sock_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = held_when_done(_place.Placement, "place", monkeypatch)
    chunk = boxfiles.DEFAULT_CHUNK_SIZE
    archives = {str(size): many(size) for size in SIZES}

    async def stream(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        request = await call.recv()
        assert request is not None
        archive = archives[request.src_path.split("/")[1]]
        for start in range(0, len(archive), chunk):
            await call.send(DownloadChunk(data=archive[start : start + chunk]))

    async with scripted_server(sock_dir, download=stream) as srv:
        async with boxfiles.open_client(srv.target) as client:
            for size in SIZES:
                dest = tmp_path / str(size)
                dest.mkdir()
                await client.copy_out(f"/{size}/.", dest)
                tracemalloc.start()
                try:
                    await client.copy_out(f"/{size}/.", dest)  # replaces every entry
                finally:
                    tracemalloc.stop()
                assert len(list(dest.iterdir())) == size
    print(f"copy_out merge: {per_entry(held):.0f} B/entry held")
    assert 0 < per_entry(held) < CLIENT_BYTES_PER_ENTRY, held
