"""Streaming behaviour of the reference server, and a grpcio (C-core) peer."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tracemalloc
from pathlib import Path

import grpc
import trio

from boxfiles._aio import open_channel
from boxfiles._chunks import POOL_SIZE, BufferPool, ChunkSink, TransferBuffers
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from boxfiles._target import UnixTarget
from boxfiles._wire import DOWNLOAD, Chunk

from ..helpers.archives import files

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
