"""upload_tar over real gRPC: the original change's cases and every error rule."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles._aio import ServerCall
from boxfiles._proto.files_pb2 import UploadChunk, UploadResponse

from ..helpers.archives import BytesReader, files
from ..helpers.checks import Leaks, assert_no_asyncio_tasks
from ..helpers.scripted import Record, recv_all, scripted_server

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

MiB = 1024 * 1024
PROMPT = 5.0  # a generous guard for "returns promptly"; never a speed claim


class FailingReader:
    """Yields ``good`` chunks, then raises OSError (EIO)."""

    def __init__(self, good: int, size: int = 1024) -> None:
        self._left = good
        self._size = size

    async def read(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if self._left == 0:
            raise OSError(5, "Input/output error")
        self._left -= 1
        return b"r" * min(max_bytes, self._size)


class StallingReader:
    """One chunk, then blocks forever."""

    def __init__(self) -> None:
        self.cancelled = False
        self._sent = False

    async def read(self, max_bytes: int) -> bytes:
        if not self._sent:
            self._sent = True
            return b"s" * min(max_bytes, 1000)
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("size", "chunk_size", "chunks"),
    [
        pytest.param(3 * MiB, MiB, 3, id="multi-chunk-3MiB"),
        pytest.param(500, MiB, 1, id="single-chunk-500B"),
        pytest.param(2 * MiB + 123, MiB, 3, id="partial-last-chunk"),
    ],
)
async def test_chunking_and_integrity(
    sock_dir: Path, tmp_path: Path, size: int, chunk_size: int, chunks: int
) -> None:
    data = os.urandom(size)
    source = tmp_path / "src.tar"
    source.write_bytes(data)
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        await client.upload_tar(source, "/dest", chunk_size=chunk_size)
    (record,) = srv.records
    assert record.data == data
    assert [len(c.data) for c in record.chunks] == [
        min(chunk_size, size - i * chunk_size) for i in range(chunks)
    ]
    assert record.ended_cleanly


async def test_metadata_on_first_chunk_only(sock_dir: Path) -> None:
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        await client.upload_tar(
            BytesReader(b"x" * 2500), "/d", container_id="c1", source_is_dir=True, chunk_size=1000
        )
    first, *rest = srv.records[0].chunks
    assert (first.dest_path, first.container_id) == ("/d", "c1")
    assert first.HasField("source_is_dir")
    assert first.source_is_dir
    assert len(rest) == 2
    for chunk in rest:
        assert (chunk.dest_path, chunk.container_id) == ("", "")
        assert not chunk.HasField("source_is_dir")
        assert (chunk.mkdir_parents, chunk.overwrite) == (False, False)


@pytest.mark.parametrize(
    ("mkdir_parents", "overwrite"), [(True, True), (False, False), (True, False)]
)
async def test_booleans_arrive_as_given(
    sock_dir: Path, mkdir_parents: bool, overwrite: bool
) -> None:
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        await client.upload_tar(
            BytesReader(b"abc"), "/d", mkdir_parents=mkdir_parents, overwrite=overwrite
        )
    first = srv.records[0].chunks[0]
    assert (first.mkdir_parents, first.overwrite) == (mkdir_parents, overwrite)
    # proto3 drops a false bool from the wire, so "sent explicitly" (docs/contract.md)
    # means the client sets both to the caller's choice, True by default,
    # rather than leaving the proto default: the choice must arrive as given.
    assert not first.HasField("source_is_dir")


async def test_empty_source_sends_exactly_one_chunk(sock_dir: Path) -> None:
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        await client.upload_tar(BytesReader(b""), "/empty", source_is_dir=False)
    (record,) = srv.records
    assert len(record.chunks) == 1
    assert record.chunks[0].dest_path == "/empty"
    assert record.chunks[0].data == b""
    assert record.ended_cleanly


def evict(path: Path, start: int, end: int) -> bool:
    """Drop ``path``'s pages in [start, end) from the page cache; False if
    this file system keeps them (tmpfs does)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        try:
            os.preadv(fd, [bytearray(4096)], start, os.RWF_NOWAIT)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)


async def test_file_partly_outside_the_page_cache(sock_dir: Path, tmp_path: Path) -> None:
    # Cached data is read without blocking, the rest in a worker thread; the
    # chunk that straddles the two (1.5 to 2.25 MiB) still goes out whole.
    size, chunk = 4 * MiB + 123, 768 * 1024
    data = os.urandom(size)
    source = tmp_path / "src.tar"
    source.write_bytes(data)
    # From 2 MiB on: the kernel keeps file pages in folios of up to 2 MiB,
    # which it drops only whole.
    if not evict(source, 2 * MiB, size):
        pytest.skip("this file system cannot drop a file's pages from the page cache")
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        await client.upload_tar(source, "/dest", chunk_size=chunk)
    (record,) = srv.records
    assert record.data == data
    assert [len(c.data) for c in record.chunks] == [chunk] * 5 + [size - 5 * chunk]


async def test_fifo_is_a_source(sock_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, feed)
            await client.upload_tar(fifo, "/dest")
    (record,) = srv.records
    assert record.data == data
    assert all(0 < len(c.data) <= boxfiles.DEFAULT_CHUNK_SIZE for c in record.chunks)


async def test_trio_file_object_is_a_source(sock_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "a.tar").write_bytes(data)
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        async with await trio.open_file(tmp_path / "a.tar", "rb") as f:
            await client.upload_tar(f, "/d", chunk_size=65536)
    assert srv.records[0].data == data


async def test_missing_source_file_is_local_io_error(sock_dir: Path, tmp_path: Path) -> None:
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        with pytest.raises(boxfiles.LocalIOError, match=r"missing\.tar") as info:
            await client.upload_tar(tmp_path / "missing.tar", "/d")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert srv.records == []  # nothing was sent


async def test_read_error_propagates_and_resets_stream(sock_dir: Path) -> None:
    async with scripted_server(sock_dir, upload=recv_all) as srv:
        async with boxfiles.open_client(srv.target) as client:
            with pytest.raises(boxfiles.LocalIOError) as info:
                await client.upload_tar(FailingReader(good=2), "/d", chunk_size=1024)
            assert isinstance(info.value.__cause__, OSError)
            with trio.fail_after(PROMPT):
                await srv.records[0].done.wait()
    record = srv.records[0]
    # A truncated source must never look like a complete archive.
    assert not record.ended_cleanly
    assert record.reset.is_set()


async def test_local_read_error_wins_over_grpc_failure(sock_dir: Path) -> None:
    # The server dies with the reader: the stream error that follows must not
    # hide the root cause.
    async def fail_on_second(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        await recv_all(call, record)

    async with scripted_server(sock_dir, upload=fail_on_second) as srv:
        async with boxfiles.open_client(srv.target) as client:
            with pytest.raises(boxfiles.LocalIOError):
                await client.upload_tar(FailingReader(good=1), "/d", chunk_size=1024)


async def test_server_status_after_first_chunk_keeps_its_class(sock_dir: Path) -> None:
    async def deny(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        record.chunks.append(await call.recv())  # type: ignore[arg-type]
        raise boxfiles.PermissionDenied("no writes under /etc")

    async with (
        scripted_server(sock_dir, upload=deny) as srv,
        boxfiles.open_client(srv.target) as client,
    ):
        with pytest.raises(boxfiles.PermissionDenied) as info:
            await client.upload_tar(BytesReader(os.urandom(8 * MiB)), "/etc/x", chunk_size=MiB)
    assert info.value.status is boxfiles.Status.PERMISSION_DENIED
    assert info.value.message == "no writes under /etc"


@pytest.mark.parametrize(
    "error",
    [
        boxfiles.InvalidArgument,
        boxfiles.NotFound,
        boxfiles.AlreadyExists,
        boxfiles.FailedPrecondition,
        boxfiles.ResourceExhausted,
        boxfiles.Unavailable,
        boxfiles.DeadlineExceeded,
        boxfiles.Internal,
    ],
)
async def test_status_classes_survive(sock_dir: Path, error: type[boxfiles.RemoteError]) -> None:
    async def fail(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        await call.recv()
        raise error("because")

    async with (
        scripted_server(sock_dir, upload=fail) as srv,
        boxfiles.open_client(srv.target) as client,
    ):
        with pytest.raises(error) as info:
            await client.upload_tar(BytesReader(b"x" * 10), "/d")
    assert type(info.value) is error
    assert info.value.message == "because"


async def test_unclassified_status_is_internal_keeping_its_code(sock_dir: Path) -> None:
    async def fail(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        await call.recv()
        raise boxfiles.RemoteError("nope", status=boxfiles.Status.UNAUTHENTICATED)

    async with (
        scripted_server(sock_dir, upload=fail) as srv,
        boxfiles.open_client(srv.target) as client,
    ):
        with pytest.raises(boxfiles.Internal) as info:
            await client.upload_tar(BytesReader(b"x"), "/d")
    assert info.value.status is boxfiles.Status.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("error", "message"), [("disk quota", "disk quota"), (None, "upload failed")]
)
async def test_success_false_is_upload_rejected(
    sock_dir: Path, error: str | None, message: str
) -> None:
    async def reject(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        await recv_all(call, record)
        response = UploadResponse(success=False)
        if error is not None:
            response.error = error
        await call.send(response)

    async with (
        scripted_server(sock_dir, upload=reject) as srv,
        boxfiles.open_client(srv.target) as client,
    ):
        with pytest.raises(boxfiles.UploadRejected) as info:
            await client.upload_tar(BytesReader(b"x" * 100), "/d")
    assert info.value.message == message
    assert isinstance(info.value, boxfiles.RemoteError)


async def test_failed_rpc_cancels_a_stalled_reader(sock_dir: Path) -> None:
    async def deny_after_first(
        call: ServerCall[UploadChunk, UploadResponse], record: Record
    ) -> None:
        record.chunks.append(await call.recv())  # type: ignore[arg-type]
        raise boxfiles.PermissionDenied("denied")

    reader = StallingReader()
    async with scripted_server(sock_dir, upload=deny_after_first) as srv:
        async with boxfiles.open_client(srv.target) as client:
            with trio.fail_after(PROMPT), pytest.raises(boxfiles.PermissionDenied):
                await client.upload_tar(reader, "/d")
    assert reader.cancelled


async def test_receiver_gone_is_an_error_not_success(sock_dir: Path) -> None:
    stop_server: list[Callable[[], None]] = []

    async def vanish(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        record.chunks.append(await call.recv())  # type: ignore[arg-type]
        stop_server[0]()  # the whole server goes away mid-upload
        await trio.sleep_forever()

    async with scripted_server(sock_dir, upload=vanish) as srv:
        stop_server.append(srv.cancel)
        async with boxfiles.open_client(srv.target) as client:
            with trio.fail_after(PROMPT), pytest.raises(boxfiles.FilesError) as info:
                await client.upload_tar(BytesReader(os.urandom(16 * MiB)), "/d", chunk_size=MiB)
    assert isinstance(info.value, (boxfiles.IncompleteTransfer, boxfiles.Unavailable))


async def test_caller_cancel_resets_stream_promptly(sock_dir: Path) -> None:
    async with scripted_server(sock_dir, upload=recv_all) as srv:
        leaks = Leaks()
        async with boxfiles.open_client(srv.target) as client:
            with trio.move_on_after(0.3) as scope:
                await client.upload_tar(StallingReader(), "/d")
            assert scope.cancelled_caught
            # The connection is still open: the server learns from RST_STREAM.
            with trio.fail_after(PROMPT):
                await srv.records[0].reset.wait()
            assert not srv.records[0].ended_cleanly
            assert_no_asyncio_tasks()
        await leaks.check()


@pytest.mark.parametrize("when", ["before-first-chunk", "mid-stream", "awaiting-response"])
async def test_cancel_at_any_moment(sock_dir: Path, when: str) -> None:
    got_all = trio.Event()

    async def slow(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        await recv_all(call, record)
        got_all.set()
        await trio.sleep_forever()  # never answers

    async with scripted_server(sock_dir, upload=slow) as srv:
        leaks = Leaks()
        async with boxfiles.open_client(srv.target) as client:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    if when == "before-first-chunk":
                        scope.cancel()
                    source: object = (
                        StallingReader() if when == "mid-stream" else BytesReader(b"y" * 5000)
                    )
                    nursery.start_soon(
                        lambda: client.upload_tar(source, "/d")  # type: ignore[arg-type]
                    )
                    if when == "mid-stream":
                        await trio.sleep(0.2)
                        scope.cancel()
                    elif when == "awaiting-response":
                        await got_all.wait()
                        scope.cancel()
            assert scope.cancelled_caught
            assert_no_asyncio_tasks()
            if srv.records:
                with trio.fail_after(PROMPT):
                    await srv.records[0].done.wait()
                assert srv.records[0].reset.is_set()
        await leaks.check()


async def test_fail_after_raises_too_slow(sock_dir: Path) -> None:
    async with scripted_server(sock_dir, upload=recv_all) as srv:
        async with boxfiles.open_client(srv.target) as client:
            with pytest.raises(trio.TooSlowError):
                with trio.fail_after(0.2):
                    await client.upload_tar(StallingReader(), "/d")
            with trio.fail_after(PROMPT):
                await srv.records[0].reset.wait()


async def test_client_timeout_is_deadline_exceeded(sock_dir: Path) -> None:
    async with scripted_server(sock_dir, upload=recv_all) as srv:
        async with boxfiles.open_client(srv.target, timeout=0.3) as client:
            with trio.fail_after(PROMPT), pytest.raises(boxfiles.DeadlineExceeded):
                await client.upload_tar(StallingReader(), "/d")


async def test_unreachable_server_is_unavailable(sock_dir: Path) -> None:
    async with boxfiles.open_client(f"unix:{sock_dir}/nobody.sock") as client:
        with pytest.raises(boxfiles.Unavailable):
            await client.upload_tar(BytesReader(b"x"), "/d")


async def test_never_an_exception_group(sock_dir: Path) -> None:
    # Both sides fail at once: the reader and the server.
    async def fail(call: ServerCall[UploadChunk, UploadResponse], record: Record) -> None:
        await call.recv()
        raise boxfiles.InvalidArgument("bad")

    async with (
        scripted_server(sock_dir, upload=fail) as srv,
        boxfiles.open_client(srv.target) as client,
    ):
        for _ in range(5):
            with pytest.raises(boxfiles.FilesError) as info:
                await client.upload_tar(FailingReader(good=1, size=10), "/d", chunk_size=10)
            assert not isinstance(info.value, BaseExceptionGroup)


async def test_round_trip_through_reference_server(server: str, root: Path, tmp_path: Path) -> None:
    payload = os.urandom(3 * MiB + 7)
    (tmp_path / "in.tar").write_bytes(files(**{"f.bin": payload}))
    async with boxfiles.open_client(server) as client:
        await client.upload_tar(tmp_path / "in.tar", "/data/f.bin")
        assert (root / "data" / "f.bin").read_bytes() == payload
        is_dir = await client.download_tar("/data/f.bin", tmp_path / "out.tar")
    assert is_dir is False


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"dest_path": ""}, ValueError),
        ({"dest_path": 5}, TypeError),
        ({"chunk_size": 0}, ValueError),
        ({"chunk_size": 64 * MiB}, ValueError),
        ({"container_id": 3}, TypeError),
        ({"source": 42}, TypeError),
    ],
)
async def test_bad_arguments_are_named_and_send_nothing(
    sock_dir: Path, kwargs: dict[str, object], exc: type[Exception]
) -> None:
    args: dict[str, object] = {"source": BytesReader(b"x"), "dest_path": "/d", **kwargs}
    async with scripted_server(sock_dir) as srv, boxfiles.open_client(srv.target) as client:
        with pytest.raises(exc, match=next(iter(kwargs))):
            await client.upload_tar(**args)  # type: ignore[arg-type]
    assert srv.records == []
