"""What the asyncio edge does with exact frame sequences: a response completed
before the request (RFC 9113 §8.1), resets, and the message size limit.

Peers: grpcio's C-core server, and a scripted h2 peer where the frames matter.
"""

from __future__ import annotations

import logging
import os
import socket
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio

import boxfiles
from boxfiles._aio import PEEK_WINDOW, STREAM_WINDOW
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest, UploadChunk, UploadResponse
from boxfiles._wire import DOWNLOAD, MAX_MESSAGE_BYTES, UPLOAD

from ..helpers.archives import BytesReader
from ..helpers.h2peer import GRPC_HEADERS, Peer, framed, h2_server
from ..helpers.servers import grpcio_server, no_download

MiB = 1024 * 1024
PROMPT = 10.0


def answers_after_two_chunks(response: UploadResponse) -> Any:
    def upload(chunks: Iterator[UploadChunk], context: Any) -> UploadResponse:
        next(chunks)
        next(chunks)
        return response  # grpcio then resets the stream (NO_ERROR)

    return upload


@pytest.mark.parametrize("attempt", range(5))
async def test_early_rejection_from_grpcio_is_kept(sock_dir: Path, attempt: int) -> None:
    upload = answers_after_two_chunks(UploadResponse(success=False, error="nope"))
    with grpcio_server(sock_dir / "g.sock", upload, no_download) as target:
        async with boxfiles.open_client(target) as client:
            with trio.fail_after(PROMPT), pytest.raises(boxfiles.UploadRejected, match="nope"):
                await client.upload_tar(BytesReader(os.urandom(64 * MiB)), "/d")


@pytest.mark.parametrize("attempt", range(5))
async def test_early_success_from_grpcio_is_success(sock_dir: Path, attempt: int) -> None:
    upload = answers_after_two_chunks(UploadResponse(success=True))
    with grpcio_server(sock_dir / "g.sock", upload, no_download) as target:
        async with boxfiles.open_client(target) as client:
            with trio.fail_after(PROMPT):
                await client.upload_tar(BytesReader(os.urandom(64 * MiB)), "/d")
            # The connection is still good for the next call.
            with trio.fail_after(PROMPT):
                await client.upload_tar(BytesReader(os.urandom(64 * MiB)), "/e")


async def answer_then_reset(
    peer: Peer,
    *,
    response: UploadResponse | None,
    trailers: bool,
    code: h2.errors.ErrorCodes,
) -> int:
    """Take the request's HEADERS and first DATA, answer, reset; return the
    stream id."""
    request = await peer.until(h2.events.RequestReceived)
    sid: int = request.stream_id
    await peer.until(h2.events.DataReceived)
    peer.h2.send_headers(sid, GRPC_HEADERS)
    if response is not None:
        peer.h2.send_data(sid, framed(response.SerializeToString()))
    if trailers:
        peer.h2.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    peer.h2.reset_stream(sid, code)
    await peer.flush()
    return sid


async def upload_against(sock_dir: Path, **script: Any) -> boxfiles.FilesError | None:
    """Upload 16 MiB to a peer that answers as ``script`` says; the error
    the upload raised, if any."""
    async with h2_server(sock_dir / "h2.sock") as (target, peers), trio.open_nursery() as nursery:

        async def serve() -> None:
            peer = await peers.receive()
            await answer_then_reset(peer, **script)
            await trio.sleep_forever()

        nursery.start_soon(serve)
        try:
            async with boxfiles.open_client(target) as client:
                with trio.fail_after(PROMPT):
                    await client.upload_tar(BytesReader(os.urandom(16 * MiB)), "/d")
        except boxfiles.FilesError as err:
            return err
        finally:
            nursery.cancel_scope.cancel()
    return None


async def test_complete_answer_then_no_error_reset_is_success(sock_dir: Path) -> None:
    error = await upload_against(
        sock_dir,
        response=UploadResponse(success=True),
        trailers=True,
        code=h2.errors.ErrorCodes.NO_ERROR,
    )
    assert error is None


@pytest.mark.parametrize(
    ("response", "trailers", "code"),
    [
        # No END_STREAM before the reset: the response is not complete.
        (UploadResponse(success=True), False, h2.errors.ErrorCodes.NO_ERROR),
        (None, False, h2.errors.ErrorCodes.NO_ERROR),
        # A complete answer, but a reset that says something went wrong.
        (UploadResponse(success=True), True, h2.errors.ErrorCodes.INTERNAL_ERROR),
        (UploadResponse(success=True), True, h2.errors.ErrorCodes.CANCEL),
    ],
    ids=["no-trailers", "headers-only", "internal-error", "cancel"],
)
async def test_incomplete_answer_or_error_reset_stays_an_error(
    sock_dir: Path,
    response: UploadResponse | None,
    trailers: bool,
    code: h2.errors.ErrorCodes,
) -> None:
    error = await upload_against(sock_dir, response=response, trailers=trailers, code=code)
    assert isinstance(error, boxfiles.IncompleteTransfer)
    assert f"error_code: {int(code)}" in str(error)


async def test_a_cancelled_call_is_reset_with_cancel(sock_dir: Path) -> None:
    codes: list[int] = []
    async with h2_server(sock_dir / "h2.sock") as (target, peers), trio.open_nursery() as nursery:

        async def serve() -> None:
            peer = await peers.receive()
            await peer.until(h2.events.RequestReceived)
            reset = await peer.until(h2.events.StreamReset)
            codes.append(reset.error_code)

        nursery.start_soon(serve)
        async with boxfiles.open_client(target) as client:
            with trio.move_on_after(0.5):
                await client.upload_tar(BytesReader(os.urandom(MiB)), "/d")
            with trio.fail_after(PROMPT):
                while not codes:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert codes == [h2.errors.ErrorCodes.CANCEL]


async def test_client_refuses_an_oversized_message(sock_dir: Path, tmp_path: Path) -> None:
    async with h2_server(sock_dir / "h2.sock") as (target, peers), trio.open_nursery() as nursery:

        async def serve() -> None:
            peer = await peers.receive()
            sid = await peer.answer()
            # Declares 384 MiB; sends a little of it.
            peer.h2.send_data(sid, framed(b"x" * 1000, declared=384 * MiB))
            await peer.flush()
            await trio.sleep_forever()

        nursery.start_soon(serve)
        async with boxfiles.open_client(target) as client:
            with (
                trio.fail_after(PROMPT),
                pytest.raises(
                    boxfiles.IncompleteTransfer, match=f"over the limit of {MAX_MESSAGE_BYTES}"
                ),
            ):
                await client.download_tar("/d", tmp_path / "out.tar")
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "out.tar").exists()


#: A message sent in 1-byte DATA frames: grpclib queued an entry per frame
#: (some 500 bytes each: 50 MB for these) until small payloads were joined.
TINY_FRAMES = 100_000


async def test_a_message_in_tiny_frames_costs_little_memory(sock_dir: Path) -> None:
    data = os.urandom(TINY_FRAMES - 11)
    message = framed(DownloadChunk(data=data, source_is_dir=False).SerializeToString())
    assert len(message) == TINY_FRAMES
    async with h2_server(sock_dir / "h2.sock") as (target, peers), trio.open_nursery() as nursery:

        async def serve() -> None:
            peer = await peers.receive()
            sid = await peer.answer()
            for start in range(0, len(message), 4096):
                for i in range(start, min(start + 4096, len(message))):
                    peer.h2.send_data(sid, message[i : i + 1])
                await peer.flush()
            peer.h2.send_headers(sid, [("grpc-status", "0")], end_stream=True)
            await peer.flush()
            await trio.sleep_forever()

        nursery.start_soon(serve)
        got = bytearray()

        class Sink:
            async def write(self, piece: bytes) -> None:
                got.extend(piece)

        async with boxfiles.open_client(target) as client:
            tracemalloc.start()
            try:
                with trio.fail_after(60):
                    await client.download_tar("/d", Sink())
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        nursery.cancel_scope.cancel()
    assert got == data
    # The h2 peer's own bookkeeping for its frames is traced too.
    assert peak < 8 * MiB, peak


async def raw_call_status(server: str, path: str, body: bytes) -> int:
    """One call from a raw h2 client sending ``body`` as its request; the
    grpc-status it gets back."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(server.removeprefix("unix:"))
    with sock:
        peer = Peer(sock, h2.connection.H2Connection(h2.config.H2Configuration(client_side=True)))
        peer.h2.initiate_connection()
        sid = peer.h2.get_next_available_stream_id()
        peer.h2.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        peer.h2.send_data(sid, body)
        await peer.flush()
        with trio.fail_after(PROMPT):
            while True:
                event = await peer.until(h2.events.Event)
                if isinstance(event, (h2.events.TrailersReceived, h2.events.ResponseReceived)):
                    status = dict(event.headers or []).get(b"grpc-status")
                    if status is not None:
                        return int(status)


async def test_server_refuses_an_oversized_message(server: str, root: Path) -> None:
    # One UploadChunk declaring 384 MiB, of which a little is sent.
    first = UploadChunk(dest_path="/d", data=b"x" * 1000).SerializeToString()
    status = await raw_call_status(server, UPLOAD.path, framed(first, declared=384 * MiB))
    assert status == boxfiles.Status.RESOURCE_EXHAUSTED
    assert list(root.iterdir()) == []


async def test_server_refuses_a_malformed_request(server: str) -> None:
    # Field 1 (src_path) declared 100 bytes long, with 1 byte after it.
    status = await raw_call_status(server, DOWNLOAD.path, framed(b"\x0a\x64x"))
    assert status == boxfiles.Status.INVALID_ARGUMENT


async def test_a_client_gone_mid_download_costs_one_line(
    server: str, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (root / "big").write_bytes(os.urandom(32 * MiB))

    class Stall:
        async def write(self, data: bytes) -> None:
            await trio.sleep_forever()

    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        async with boxfiles.open_client(server) as client:
            with trio.move_on_after(0.3):
                await client.download_tar("/big", Stall())
    # Let the server see each connection go.
    await trio.sleep(0.5)
    # The server's own line for each cancelled call (INFO: a client may stop
    # a download), and nothing loud from below it.
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    ours = [r.getMessage() for r in caplog.records if r.name == "boxfiles.server"]
    assert len(ours) == 3
    assert all("outcome=CANCELLED" in line for line in ours)


@pytest.mark.parametrize("peek", [False, True])
async def test_a_call_has_its_whole_window_before_its_request(sock_dir: Path, peek: bool) -> None:
    # The peer can send STREAM_WINDOW as soon as it has the request: no
    # round trip to widen it. Only a peek keeps HTTP/2's opening window.
    async with h2_server(sock_dir / "h2.sock") as (target, peers), trio.open_nursery() as nursery:
        windows: list[int] = []

        async def serve() -> None:
            peer = await peers.receive()
            sid = (await peer.until(h2.events.RequestReceived)).stream_id
            await peer.until(h2.events.StreamEnded)
            windows.append(peer.h2.local_flow_control_window(sid))
            peer.h2.send_headers(sid, [*GRPC_HEADERS, ("grpc-status", "0")], end_stream=True)
            await peer.flush()
            await trio.sleep_forever()

        nursery.start_soon(serve)
        async with boxfiles.open_client(target) as client:
            with trio.fail_after(PROMPT):
                async with client._calls.channel.open_call(DOWNLOAD, peek=peek) as call:
                    await call.send(DownloadRequest(src_path="/d"), end=True)
                    assert await call.recv() is None
                    await call.finish()
        nursery.cancel_scope.cancel()
    assert windows == [PEEK_WINDOW if peek else STREAM_WINDOW]


@pytest.mark.parametrize("ending", ["reset", "end-stream", "close", "goaway", "stall"])
async def test_a_message_cut_short_ends_the_download_at_once(
    sock_dir: Path, tmp_path: Path, ending: str
) -> None:
    # The client waits for the rest of a message without an asyncio task:
    # whatever stops it arriving must end that wait, and a stall must still
    # give way to the caller's cancellation.
    async with h2_server(sock_dir / "h2.sock") as (target, peers), trio.open_nursery() as nursery:

        async def serve() -> None:
            peer = await peers.receive()
            sid = await peer.answer()
            first = DownloadChunk(source_is_dir=False).SerializeToString()
            body = DownloadChunk(data=os.urandom(100_000)).SerializeToString()
            peer.h2.send_data(sid, framed(first) + framed(body)[:30_000])
            await peer.flush()
            await trio.sleep(0.2)  # the client is waiting for the rest by now
            if ending == "reset":
                peer.h2.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            elif ending == "end-stream":
                peer.h2.send_headers(sid, [("grpc-status", "0")], end_stream=True)
            elif ending == "goaway":
                peer.h2.close_connection(h2.errors.ErrorCodes.INTERNAL_ERROR)
            await peer.flush()
            if ending in ("close", "goaway"):
                peer.conn.close()
            await trio.sleep_forever()

        nursery.start_soon(serve)
        async with boxfiles.open_client(target) as client:
            with trio.fail_after(PROMPT):
                if ending == "stall":
                    with trio.move_on_after(0.5) as waited:
                        await client.download_tar("/d", tmp_path / "out.tar")
                    assert waited.cancelled_caught
                else:
                    with pytest.raises(boxfiles.FilesError) as info:
                        await client.download_tar("/d", tmp_path / "out.tar")
                    assert isinstance(
                        info.value, (boxfiles.IncompleteTransfer, boxfiles.Unavailable)
                    )
        nursery.cancel_scope.cancel()
    assert list(tmp_path.iterdir()) == []
