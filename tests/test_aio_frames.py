"""The asyncio edge's own HTTP/2 shortcut for DATA frames, checked against h2 doing the
same, and the sockets it sends through."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

import boxfiles
from boxfiles._aio import FRAME_LIMIT, UNIX_SEND_BUFFER
from boxfiles._aio._internals import send_data_frame

from .conftest import BytesReader, tar_of

HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/boxlite.v1.Files/Upload"),
    (":authority", "localhost"),
]


def open_stream() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection, int]:
    """A client with one open stream (its HEADERS still unsent) and its server."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    codes = h2.settings.SettingCodes
    server.update_settings(
        {codes.MAX_FRAME_SIZE: FRAME_LIMIT, codes.INITIAL_WINDOW_SIZE: 4 * FRAME_LIMIT}
    )
    server.increment_flow_control_window(4 * FRAME_LIMIT)
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, HEADERS)
    return client, server, sid


@pytest.mark.parametrize("size", [1, 16_384, 65_535, FRAME_LIMIT])
def test_same_bytes_and_windows_as_h2(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    by_h2, server, sid = open_stream()
    ours, _, same_sid = open_stream()
    assert sid == same_sid

    by_h2.send_data(sid, payload)
    expected = by_h2.data_to_send()
    written = b"".join(send_data_frame(ours, sid, memoryview(payload)))

    assert written == expected  # HEADERS h2 held back, then the frame
    assert ours.local_flow_control_window(sid) == by_h2.local_flow_control_window(sid)
    assert ours.outbound_flow_control_window == by_h2.outbound_flow_control_window
    assert ours.data_to_send() == b""
    received = [e for e in server.receive_data(written) if isinstance(e, h2.events.DataReceived)]
    assert [e.data for e in received] == [payload]


def test_refused_on_a_stream_that_has_ended() -> None:
    conn, _, sid = open_stream()
    conn.end_stream(sid)
    window = conn.outbound_flow_control_window
    with pytest.raises(h2.exceptions.ProtocolError):
        send_data_frame(conn, sid, memoryview(b"late"))
    assert conn.outbound_flow_control_window == window


def unix_sockets_of_this_process() -> Iterator[socket.socket]:
    """Every unix stream socket this process has open, each as a duplicate."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            dup = os.dup(int(fd))
        except OSError:
            continue  # closed meanwhile (e.g. the listing's own descriptor)
        with socket.socket(fileno=dup) as sock:
            if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
                yield sock


def peer_name(sock: socket.socket) -> str | None:
    try:
        name: str = sock.getpeername()
    except OSError:
        return None  # a listener
    return name


async def test_unix_connections_send_through_a_chunk_sized_buffer(server: str) -> None:
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as plain:
        default = plain.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    # Linux doubles the size asked for (room for its bookkeeping) and caps the
    # request at net.core.wmem_max.
    expected = 2 * min(UNIX_SEND_BUFFER, wmem_max)
    if expected <= default:
        pytest.skip(f"net.core.wmem_max ({wmem_max}) allows no more than the default buffer")
    path = server.removeprefix("unix:")
    async with boxfiles.open_client(server) as client:
        await client.upload_tar(BytesReader(tar_of({"f": b"x"})), "/d")
        ends: dict[str, int] = {}
        for sock in unix_sockets_of_this_process():
            peer = peer_name(sock)
            if peer is not None and path in (peer, sock.getsockname()):
                side = "client" if peer == path else "server"
                ends[side] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert ends == {"client": expected, "server": expected}
