"""Independent peers: grpcio (C-core) as the server, and the raw HTTP/2 headers."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import trio

import boxfiles
from boxfiles._aio import RECEIVE_FRAME_LIMIT
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse

from ..helpers.archives import BytesReader
from ..helpers.servers import grpcio_server, no_download

MiB = 1024 * 1024
PROMPT = 5.0


async def test_upload_to_grpcio(sock_dir: Path) -> None:
    received: list[UploadChunk] = []

    def upload(chunks: Iterator[UploadChunk], context: Any) -> UploadResponse:
        received.extend(chunks)
        return UploadResponse(success=True)

    data = os.urandom(3 * MiB + 5)
    with grpcio_server(sock_dir / "g.sock", upload, no_download) as target:
        async with boxfiles.open_client(target) as client:
            await client.upload_tar(BytesReader(data), "/d", overwrite=False, source_is_dir=False)
    assert b"".join(c.data for c in received) == data
    assert len(received) == 4
    assert received[0].dest_path == "/d"
    assert received[0].HasField("source_is_dir")
    assert (received[0].mkdir_parents, received[0].overwrite) == (True, False)


async def test_grpcio_abort_keeps_status_class(sock_dir: Path) -> None:
    def upload(chunks: Iterator[UploadChunk], context: Any) -> UploadResponse:
        next(chunks)
        context.abort(grpc.StatusCode.ALREADY_EXISTS, "exists: /d")
        raise AssertionError("unreachable")

    with grpcio_server(sock_dir / "g.sock", upload, no_download) as target:
        async with boxfiles.open_client(target) as client:
            with trio.fail_after(PROMPT), pytest.raises(boxfiles.AlreadyExists, match="exists: /d"):
                await client.upload_tar(BytesReader(os.urandom(16 * MiB)), "/d")


async def test_cancel_is_seen_by_grpcio_as_a_reset(sock_dir: Path) -> None:
    cancelled = threading.Event()

    def upload(chunks: Iterator[UploadChunk], context: Any) -> UploadResponse:
        context.add_callback(cancelled.set)
        for _ in chunks:
            pass
        return UploadResponse(success=True)

    class Stall:
        sent = False

        async def read(self, max_bytes: int) -> bytes:
            if not self.sent:
                self.sent = True
                return b"x" * 100
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    with grpcio_server(sock_dir / "g.sock", upload, no_download) as target:
        async with boxfiles.open_client(target) as client:
            with trio.move_on_after(0.3):
                await client.upload_tar(Stall(), "/d")
            # Still connected: only RST_STREAM can have told the server.
            with trio.fail_after(PROMPT):
                while not cancelled.is_set():
                    await trio.sleep(0.01)


async def test_an_unread_upload_never_holds_up_another(sock_dir: Path) -> None:
    # Uploads on one connection take turns at writing, a batch of chunks a
    # turn. One whose stream the server leaves unread runs out of window
    # mid-turn: it must give its turn up, or every call would wait on it.
    unread_started = threading.Event()
    read_done = threading.Event()
    received: dict[str, int] = {}

    def upload(chunks: Iterator[UploadChunk], context: Any) -> UploadResponse:
        first = next(chunks)
        if first.dest_path == "/unread":
            unread_started.set()
            read_done.wait(PROMPT * 4)
        received[first.dest_path] = len(first.data) + sum(len(c.data) for c in chunks)
        return UploadResponse(success=True)

    with grpcio_server(sock_dir / "g.sock", upload, no_download) as target:
        async with boxfiles.open_client(target) as client, trio.open_nursery() as nursery:
            nursery.start_soon(client.upload_tar, BytesReader(os.urandom(32 * MiB)), "/unread")
            try:
                assert await trio.to_thread.run_sync(unread_started.wait, PROMPT)
                with trio.fail_after(PROMPT):
                    await client.upload_tar(BytesReader(os.urandom(4 * MiB)), "/read")
                assert received == {"/read": 4 * MiB}  # done while the other sat unread
            finally:
                read_done.set()
    assert received == {"/read": 4 * MiB, "/unread": 32 * MiB}


async def test_download_from_grpcio(sock_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 11)

    def download(request: DownloadRequest, context: Any) -> Iterator[DownloadChunk]:
        if request.src_path == "/missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "gone")
        for i in range(0, len(data), MiB):
            chunk = DownloadChunk(data=data[i : i + MiB])
            if i == 0:
                chunk.source_is_dir = True
            yield chunk

    def upload(chunks: Iterator[UploadChunk], context: Any) -> UploadResponse:
        return UploadResponse(success=True)

    with grpcio_server(sock_dir / "g.sock", upload, download) as target:
        async with boxfiles.open_client(target) as client:
            assert await client.download_tar("/dir", tmp_path / "o.tar") is True
            with pytest.raises(boxfiles.NotFound, match="gone"):
                await client.download_tar("/missing", tmp_path / "m.tar")
    assert (tmp_path / "o.tar").read_bytes() == data
    assert not (tmp_path / "m.tar").exists()


async def test_bare_h2_view_of_a_call(sock_dir: Path) -> None:
    # Read the client's SETTINGS and the request's HEADERS off the socket
    # with a bare h2 server.
    path = sock_dir / "raw.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)
    headers: dict[bytes, bytes] = {}
    settings: dict[int, int] = {}

    async def accept_one() -> None:
        conn, _ = await listener.accept()
        with conn:
            h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            h2conn.initiate_connection()
            await conn.send(h2conn.data_to_send())
            while not headers:
                data = await conn.recv(65536)
                if not data:
                    return
                for event in h2conn.receive_data(data):
                    if isinstance(event, h2.events.RemoteSettingsChanged):
                        settings.update({k: v.new_value for k, v in event.changed_settings.items()})
                    if isinstance(event, h2.events.RequestReceived):
                        headers.update(dict(event.headers or []))
                await conn.send(h2conn.data_to_send())

    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_one)
            async with boxfiles.open_client(f"unix://{path}") as client:
                with trio.move_on_after(PROMPT):
                    try:
                        await client.upload_tar(BytesReader(b"x"), "/d")
                    except boxfiles.FilesError:
                        pass  # the bare server never answers properly
    assert headers[b":authority"] == b"localhost"
    assert headers[b":path"] == b"/boxlite.v1.Files/Upload"
    # Peers may send frames of up to RECEIVE_FRAME_LIMIT, not HTTP/2's 16 KiB.
    assert settings[h2.settings.SettingCodes.MAX_FRAME_SIZE] == RECEIVE_FRAME_LIMIT
