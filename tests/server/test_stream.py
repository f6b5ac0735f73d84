"""Streaming behaviour of the reference server, and a grpcio (C-core) peer."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
import trio

from boxfiles._aio import open_channel
from boxfiles._chunks import POOL_SIZE, BufferPool, ChunkSink, TransferBuffers
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from boxfiles._target import UnixTarget
from boxfiles._wire import ARRIVED_PER_TURN, DOWNLOAD, UPLOAD, Chunk

from ..helpers.archives import archive, files, member
from ..helpers.checks import TaskSteps

MiB = 1024 * 1024


async def test_download_starts_before_the_tree_is_read(server: str, root: Path) -> None:
    # Far more than the server buffers (channel, HTTP/2 window, socket), so
    # "b" cannot have been read when the first chunk arrives.
    (root / "t").mkdir()
    (root / "t" / "a").write_bytes(b"a" * (48 * MiB))
    (root / "t" / "b").write_bytes(b"before")
    received = bytearray()
    async with open_channel(UnixTarget(server.removeprefix("unix:"))) as channel:
        async with channel.open_call(DOWNLOAD) as call:
            await call.send(DownloadRequest(src_path="/t", include_parent=True), end=True)
            first = await call.recv()
            assert first is not None
            received += first.data
            (root / "t" / "b").write_bytes(b"after!")  # same size, new content
            while (chunk := await call.recv()) is not None:
                received += chunk.data
            await call.finish()
    with tarfile.open(fileobj=io.BytesIO(bytes(received))) as tar:
        b = tar.extractfile("t/b")
        assert b is not None
        assert b.read() == b"after!"


def grpcio_transfers(path: str, payload: bytes) -> tuple[UploadResponse, list[DownloadChunk]]:
    # As real peers do over a unix socket: :authority is "localhost".
    with grpc.insecure_channel(
        f"unix:{path}", options=[("grpc.default_authority", "localhost")]
    ) as channel:
        upload = channel.stream_unary(
            "/boxlite.v1.Files/Upload",
            request_serializer=UploadChunk.SerializeToString,
            response_deserializer=UploadResponse.FromString,
        )
        half = len(payload) // 2
        response = upload(
            iter(
                [
                    UploadChunk(
                        dest_path="/in/data.bin",
                        data=payload[:half],
                        mkdir_parents=True,
                        overwrite=True,
                        source_is_dir=False,
                    ),
                    UploadChunk(data=payload[half:]),
                ]
            ),
            timeout=30,
        )
        download = channel.unary_stream(
            "/boxlite.v1.Files/Download",
            request_serializer=DownloadRequest.SerializeToString,
            response_deserializer=DownloadChunk.FromString,
        )
        chunks = list(download(DownloadRequest(src_path="/in/data.bin"), timeout=30))
    return response, chunks


async def test_grpcio_client_interop(server: str, root: Path) -> None:
    content = os.urandom(3 * MiB)
    response, chunks = await trio.to_thread.run_sync(
        grpcio_transfers, server.removeprefix("unix:"), files(x=content)
    )
    assert response.success
    assert (root / "in" / "data.bin").read_bytes() == content
    assert chunks[0].HasField("source_is_dir")
    assert not chunks[0].source_is_dir
    with tarfile.open(fileobj=io.BytesIO(b"".join(c.data for c in chunks))) as tar:
        (info,) = tar.getmembers()
        data = tar.extractfile(info)
        assert data is not None
        assert (info.name, data.read()) == ("data.bin", content)


async def test_the_packer_reads_file_data_straight_into_the_chunks(tmp_path: Path) -> None:
    # Python copies no file data: the sink's reads fill the pooled chunk
    # buffers in place, and a buffer given back is reused for the next.
    chunk = MiB
    header = b"h" * 512
    content = os.urandom(3 * chunk + 100)
    (tmp_path / "f").write_bytes(content)
    buffers = TransferBuffers(BufferPool(limit=POOL_SIZE), chunk)
    sizes: list[int] = []
    digest = hashlib.sha256()

    async def hand_on(sent: Chunk) -> None:
        sizes.append(sent.size)
        digest.update(sent.data)
        sent.release()

    def pack() -> int:
        sink = ChunkSink(hand_on, buffers, chunk)
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        try:
            sink.write(header)
            copied = sink.copy_from(fd, len(content) + 1)  # one more than there is
        finally:
            os.close(fd)
        sink.flush()
        return copied

    assert await trio.to_thread.run_sync(pack) == len(content)  # made the buffer
    tracemalloc.start()
    try:
        assert await trio.to_thread.run_sync(pack) == len(content)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        buffers.close()
    assert sizes == 2 * [chunk, chunk, chunk, len(header) + 100]
    assert digest.digest() == hashlib.sha256(2 * (header + content)).digest()
    assert peak < chunk // 8  # nothing the size of a chunk


def _upload_messages(dest: str, data: bytes, size: int) -> list[bytes]:
    """An upload of ``data`` as one file, in encoded messages of ``size``
    bytes of archive each (the first carrying the metadata)."""
    whole = archive(member("f", data))
    messages = [
        UploadChunk(data=whole[at : at + size]).SerializeToString()
        for at in range(0, len(whole), size)
    ]
    messages[0] = UploadChunk(dest_path=dest, data=whole[:size]).SerializeToString()
    return [b"\0" + len(body).to_bytes(4, "big") + body for body in messages]


class _HeldWrites:
    """os.writev, counted, with the first call held until ``release``: the
    extraction thread stands still while the client's messages arrive."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._gate = threading.Event()
        writev = os.writev

        def held(fd: int, buffers: Sequence[bytes | memoryview], /) -> int:
            self.calls += 1
            self._gate.wait(timeout=30)
            return writev(fd, buffers)

        monkeypatch.setattr(os, "writev", held)

    def release(self) -> None:
        self._gate.set()


async def test_small_messages_that_have_arrived_are_extracted_in_batches(
    server: str, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(MiB)
    messages = _upload_messages("/small.bin", data, 4096)
    writes = _HeldWrites(monkeypatch)
    async with open_channel(UnixTarget(server.removeprefix("unix:"))) as channel:
        async with channel.open_call(UPLOAD) as call:
            # All of it fits in the stream's window: it arrives while the
            # extraction thread is held at its first write.
            await call.send_encoded(*messages)
            await call.end()
            await trio.sleep(0.2)
            writes.release()
            assert await call.recv() == UploadResponse(success=True)
            await call.finish()
    assert (root / "small.bin").read_bytes() == data
    # A channel item per message would take a write per REFILL_CHUNKS
    # messages: over 60.
    assert len(messages) > 250
    assert writes.calls <= 12, writes.calls


async def test_a_backlog_of_arrived_messages_is_taken_with_a_checkpoint_every_few(
    server: str, root: Path
) -> None:
    # Messages with no data are never handed on: with thousands of them at
    # hand, the server's receiving task must still yield every
    # ARRIVED_PER_TURN.
    backlog = 2000
    first, *rest = _upload_messages("/backlog.bin", b"x" * 100, 1024)
    empty = b"\0\0\0\0\0"
    arrived = trio.Event()
    counter = TaskSteps("_receive.<locals>.pump", after=arrived)
    async with open_channel(UnixTarget(server.removeprefix("unix:"))) as channel:
        async with channel.open_call(UPLOAD) as call:
            await call.send_encoded(first)
            await trio.sleep(0.2)  # the server waits for the next message
            with counter.counting():
                arrived.set()
                # One piece, so in one frame: all of it arrives in one read.
                await call.send_encoded(b"".join([empty] * backlog + rest))
                await call.end()
                assert await call.recv() == UploadResponse(success=True)
                await call.finish()
    assert (root / "backlog.bin").read_bytes() == b"x" * 100
    assert counter.steps >= backlog // ARRIVED_PER_TURN, counter.steps
