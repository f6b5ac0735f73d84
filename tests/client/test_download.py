"""download_tar over real gRPC: integrity, statuses, atomic destination, cancellation."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles._aio import ServerCall
from boxfiles._client._local import WRITE_BATCH_BYTES
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest
from boxfiles._wire import ARRIVED_PER_TURN, CHANNEL_CAPACITY

from ..helpers.archives import contents
from ..helpers.checks import Leaks, TaskSteps, assert_no_asyncio_tasks
from ..helpers.scripted import scripted_server

MiB = 1024 * 1024
PROMPT = 5.0


def chunks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def sender(
    pieces: list[bytes],
    *,
    source_is_dir: bool | None = False,
    then: BaseException | None = None,
    requests: list[DownloadRequest] | None = None,
) -> object:
    async def script(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        request = await call.recv()
        if requests is not None and request is not None:
            requests.append(request)
        for i, piece in enumerate(pieces):
            chunk = DownloadChunk(data=piece)
            if i == 0 and source_is_dir is not None:
                chunk.source_is_dir = source_is_dir
            await call.send(chunk)
        if then is not None:
            raise then

    return script


def endless_download(
    reset: trio.Event,
) -> Callable[[ServerCall[DownloadRequest, DownloadChunk]], Awaitable[None]]:
    """A download script that sends forever and sets ``reset`` when the
    client's reset cancels it."""

    async def endless(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        try:
            while True:
                await call.send(DownloadChunk(data=b"z" * 65536))
        except trio.Cancelled:
            reset.set()
            raise

    return endless


class ListWriter:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.parts.append(data)


async def test_download_to_path_is_byte_exact(sock_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 3)
    requests: list[DownloadRequest] = []
    script = sender(chunks_of(data, MiB), source_is_dir=True, requests=requests)
    async with scripted_server(sock_dir, download=script) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            result = await client.download_tar(
                "/src/.",
                tmp_path / "out.tar",
                container_id="c",
                include_parent=False,
                follow_symlinks=True,
            )
    assert result is True
    assert (tmp_path / "out.tar").read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["out.tar"]  # no staging left
    (request,) = requests
    assert (request.src_path, request.container_id) == ("/src/.", "c")
    assert (request.include_parent, request.follow_symlinks) == (False, True)


@pytest.mark.parametrize(("flag", "expected"), [(False, False), (True, True), (None, None)])
async def test_returns_source_is_dir_of_first_chunk(
    sock_dir: Path, flag: bool | None, expected: bool | None
) -> None:
    script = sender([b"a", b"b"], source_is_dir=flag)
    async with scripted_server(sock_dir, download=script) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            writer = ListWriter()
            assert await client.download_tar("/x", writer) is expected
    assert b"".join(writer.parts) == b"ab"


class HeldWriter:
    """Records each write; the first one waits for ``release`` and then a
    moment more, so whatever the server sent meanwhile has arrived."""

    def __init__(self, release: trio.Event) -> None:
        self.release = release
        self.writes: list[bytes] = []

    async def write(self, data: bytes) -> None:
        if not self.writes:
            await self.release.wait()
            await trio.sleep(0.2)
        await trio.lowlevel.checkpoint()
        self.writes.append(data)


async def test_small_messages_that_have_arrived_are_written_in_batches(sock_dir: Path) -> None:
    pieces = [os.urandom(4096) for _ in range(256)]
    sent = trio.Event()

    async def script(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        for piece in pieces:
            await call.send(DownloadChunk(data=piece))
        sent.set()

    writer = HeldWriter(sent)
    async with scripted_server(sock_dir, download=script) as srv:
        async with boxfiles.open_client(srv.target) as client:
            await client.download_tar("/x", writer)
    assert b"".join(writer.writes) == b"".join(pieces)
    # A channel item per message, and a write of at most CHANNEL_CAPACITY + 1
    # items, would take 52 writes or more.
    assert len(writer.writes) <= 12, [len(w) for w in writer.writes]


async def test_a_backlog_of_arrived_messages_is_taken_with_a_checkpoint_every_few(
    sock_dir: Path,
) -> None:
    # The writer holds its first batch while the channel fills and the
    # server sends a backlog of empty messages; then the receiving task has
    # them all at hand, and must still yield every ARRIVED_PER_TURN.
    backlog = 2000
    sent = trio.Event()

    async def script(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        for _ in range(CHANNEL_CAPACITY + 2):
            await call.send(DownloadChunk(data=b"d" * WRITE_BATCH_BYTES))
        for _ in range(backlog):
            await call.send(DownloadChunk())
        sent.set()

    writer = HeldWriter(sent)
    counter = TaskSteps("_download.<locals>.receive", after=sent)
    async with scripted_server(sock_dir, download=script) as srv:
        async with boxfiles.open_client(srv.target) as client:
            with counter.counting():
                await client.download_tar("/x", writer)
    assert sum(map(len, writer.writes)) == (CHANNEL_CAPACITY + 2) * WRITE_BATCH_BYTES
    assert counter.steps >= backlog // ARRIVED_PER_TURN, counter.steps


async def test_failure_mid_stream_leaves_nothing_and_keeps_status(
    sock_dir: Path, tmp_path: Path
) -> None:
    script = sender([b"x" * MiB] * 3, then=boxfiles.PermissionDenied("unreadable: /src/secret"))
    async with scripted_server(sock_dir, download=script) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            with pytest.raises(boxfiles.PermissionDenied, match="/src/secret"):
                await client.download_tar("/src", tmp_path / "out.tar")
    assert list(tmp_path.iterdir()) == []


async def test_failure_leaves_existing_file_untouched(sock_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out.tar").write_bytes(b"previous")
    script = sender([b"new"], then=boxfiles.Internal("disk on fire"))
    async with scripted_server(sock_dir, download=script) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            with pytest.raises(boxfiles.Internal):
                await client.download_tar("/src", tmp_path / "out.tar")
    assert (tmp_path / "out.tar").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.tar"]


async def test_success_replaces_existing_file(sock_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out.tar").write_bytes(b"previous")
    script = sender([b"new"])
    async with scripted_server(sock_dir, download=script) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            await client.download_tar("/src", tmp_path / "out.tar")
    assert (tmp_path / "out.tar").read_bytes() == b"new"


async def test_cancel_leaves_nothing_and_resets(sock_dir: Path, tmp_path: Path) -> None:
    reset = trio.Event()
    endless = endless_download(reset)

    async with scripted_server(sock_dir, download=endless) as srv:
        leaks = Leaks()
        async with boxfiles.open_client(srv.target) as client:
            with trio.move_on_after(0.3) as scope:
                await client.download_tar("/src", tmp_path / "out.tar")
            assert scope.cancelled_caught
            with trio.fail_after(PROMPT):
                await reset.wait()
            assert_no_asyncio_tasks()
        await leaks.check()
    assert list(tmp_path.iterdir()) == []


async def test_local_write_error_wins_and_resets(sock_dir: Path) -> None:
    reset = trio.Event()
    endless = endless_download(reset)

    class DiskFull:
        async def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

    async with scripted_server(sock_dir, download=endless) as srv:
        async with boxfiles.open_client(srv.target) as client:
            with pytest.raises(boxfiles.LocalIOError, match="No space") as info:
                await client.download_tar("/src", DiskFull())
            assert isinstance(info.value.__cause__, OSError)
            with trio.fail_after(PROMPT):
                await reset.wait()


async def test_unwritable_destination_dir_is_local_io_error(sock_dir: Path, tmp_path: Path) -> None:
    async with scripted_server(sock_dir, download=sender([b"x"])) as srv:  # type: ignore[arg-type]
        async with boxfiles.open_client(srv.target) as client:
            with pytest.raises(boxfiles.LocalIOError, match="no-such-dir"):
                await client.download_tar("/src", tmp_path / "no-such-dir" / "out.tar")


async def test_connection_lost_mid_download_is_an_error(sock_dir: Path, tmp_path: Path) -> None:
    stop: list[object] = []

    async def vanish(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        await call.send(DownloadChunk(data=b"partial", source_is_dir=False))
        stop[0]()  # type: ignore[operator]
        await trio.sleep_forever()

    async with scripted_server(sock_dir, download=vanish) as srv:
        stop.append(srv.cancel)
        async with boxfiles.open_client(srv.target) as client:
            with trio.fail_after(PROMPT), pytest.raises(boxfiles.FilesError) as info:
                await client.download_tar("/src", tmp_path / "out.tar")
    assert isinstance(info.value, (boxfiles.IncompleteTransfer, boxfiles.Unavailable))
    assert list(tmp_path.iterdir()) == []


async def test_reference_server_round_trip(server: str, root: Path, tmp_path: Path) -> None:
    (root / "dir").mkdir()
    (root / "dir" / "a.txt").write_bytes(b"alpha")
    async with boxfiles.open_client(server) as client:
        assert await client.download_tar("/dir", tmp_path / "dir.tar") is True
        with pytest.raises(boxfiles.NotFound, match="does not exist"):
            await client.download_tar("/missing", tmp_path / "m.tar")
        with pytest.raises(boxfiles.InvalidArgument, match=r"\.\."):
            await client.download_tar("/dir/../..", tmp_path / "m.tar")
    assert contents((tmp_path / "dir.tar").read_bytes()) == {"dir/a.txt": b"alpha"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.tar", "root"]
