"""Clients below the client: raw HTTP/2 and gRPC frames, to misbehave on purpose."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio
from google.protobuf.message import Message

from boxfiles._aio import Channel
from boxfiles._proto.files_pb2 import DownloadRequest, UploadChunk
from boxfiles._wire import DOWNLOAD, UPLOAD

from .archives import archive, member


def grpc_message(message: Message) -> bytes:
    body = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


class RawClient:
    """An HTTP/2 client speaking just enough gRPC to misbehave on purpose."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()

    async def start_upload(self, first: bytes) -> int:
        return await self.start_call("Upload", first)

    async def start_call(self, method: str, first: bytes, *, end: bool = False) -> int:
        """Open a call of ``method`` and send ``first`` (ending the request if ``end``)."""
        sid: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", f"/boxlite.v1.Files/{method}"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        self.conn.send_data(sid, first, end_stream=end)
        await self.stream.send_all(self.conn.data_to_send())
        return sid


def one_header(dest: str, *, overwrite: bool = False) -> bytes:
    """An upload's first message: a tar header, and part of the member's data."""
    data = archive(member("f", b"x" * 5000))[:1024]
    return grpc_message(
        UploadChunk(dest_path=dest, data=data, mkdir_parents=True, overwrite=overwrite)
    )


async def stall_upload(channel: Channel, first: bool) -> None:
    """An upload to /dest that sends a header (if ``first``) and no more;
    waits for the server's answer."""
    async with channel.open_call(UPLOAD) as call:
        if first:
            await call.send_encoded(one_header("/dest", overwrite=True))
        await call.recv()


async def stall_download(
    channel: Channel, request_sent: bool, received: list[int], pause: float = 2.0
) -> None:
    """A download of /big.bin that sends its request (if ``request_sent``),
    reads nothing for ``pause`` (well over the idle timeout), then all there is."""
    async with channel.open_call(DOWNLOAD) as call:
        if request_sent:
            await call.send(DownloadRequest(src_path="/big.bin"), end=True)
        await trio.sleep(pause)
        while (body := await call.recv_encoded()) is not None:
            received.append(len(body))
