"""The asyncio edge's own HTTP/2 shortcut for DATA frames, checked against h2 doing the
same, and the sockets it sends through."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpclib.protocol
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest

import boxfiles
from boxfiles._aio import FRAME_LIMIT, RECEIVE_FRAME_LIMIT, UNIX_SEND_BUFFER
from boxfiles._aio._frames import SEND_BATCH_BYTES
from boxfiles._aio._internals import (
    COALESCE_BELOW,
    MAX_HEADER_BLOCK_BYTES,
    PARTS_ABOVE,
    VIEW_MIN_SHARE,
    ViewFrameBuffer,
    awaiting_data,
    buffered_message,
    send_data_frame,
)
from boxfiles._aio._loop import SocketTransport
from boxfiles._wire import MAX_MESSAGE_BYTES

from ..helpers.archives import BytesReader, files

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


#: The largest DATA frame sent_to_a_server sends: taken in parts.
BIG = 2 * PARTS_ABOVE + 1


def sent_to_a_server() -> tuple[bytes, int]:
    """What a client sends a server that accepts RECEIVE_FRAME_LIMIT frames: its
    preamble and settings, then on one stream HEADERS, DATA frames of many
    sizes (one padded), a PING between them, and END_STREAM."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({})  # a SETTINGS frame after the preamble's
    client.local_settings.acknowledge()
    client.max_outbound_frame_size = RECEIVE_FRAME_LIMIT
    client.outbound_flow_control_window = 2**30
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, HEADERS)
    client.streams[sid].outbound_flow_control_window = 2**30
    for size in (BIG, 1, 9, 16_384, PARTS_ABOVE, PARTS_ABOVE + 1, 70_000):
        client.send_data(sid, bytes([size % 251]) * size)
    client.send_data(sid, b"padded", pad_length=7)
    client.ping(b"8 bytes!")
    client.send_data(sid, b"x" * 50_000, end_stream=True)
    return client.data_to_send(), sid


def a_server(views: bool) -> h2.connection.H2Connection:
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    server.max_inbound_frame_size = RECEIVE_FRAME_LIMIT
    server.local_settings.max_frame_size = RECEIVE_FRAME_LIMIT
    server.local_settings.initial_window_size = 2**31 - 1
    server.local_settings.acknowledge()
    server.increment_flow_control_window(2**30)
    if views:
        server.incoming_buffer = ViewFrameBuffer(server.incoming_buffer)
    return server


def received(server: h2.connection.H2Connection, reads: list[bytes]) -> list[tuple[Any, ...]]:
    """The events ``reads`` give, a stream's DataReceived events in a row
    merged: a frame spanning reads is handed on in parts, one per read."""
    events: list[tuple[Any, ...]] = []
    for e in (event for read in reads for event in server.receive_data(read)):
        row = (
            type(e).__name__,
            getattr(e, "stream_id", None),
            bytes(getattr(e, "data", b"") or b""),
            getattr(e, "flow_controlled_length", None),
        )
        if row[0] == "DataReceived" and events and events[-1][:2] == row[:2]:
            _, sid, data, length = events.pop()
            row = (row[0], sid, data + row[2], length + row[3])
        events.append(row)
    return events


@pytest.mark.parametrize("read_size", [1, 5, 9, 10, 4096, 65_536, 256 * 1024, 1 << 30])
def test_received_views_give_h2s_events_at_every_split(read_size: int) -> None:
    sent, _ = sent_to_a_server()
    reads = [sent[i : i + read_size] for i in range(0, len(sent), read_size)]
    assert received(a_server(views=True), reads) == received(a_server(views=False), reads)


def test_a_data_payload_is_a_view_of_the_read_it_came_in() -> None:
    sent, _ = sent_to_a_server()
    server = a_server(views=True)
    # A read ending with the first DATA frame, most of it that frame.
    read = bytes(sent[: sent.index(bytes([BIG % 251]) * 64) + BIG])
    data = [e for e in server.receive_data(read) if isinstance(e, h2.events.DataReceived)]
    assert isinstance(data[0].data, memoryview)
    assert data[0].data.obj is read  # no copy of the first BIG bytes
    assert len(data[0].data) == BIG


def test_a_frame_spanning_reads_is_handed_on_in_parts_without_a_copy() -> None:
    sent, sid = sent_to_a_server()
    server = a_server(views=True)
    start = sent.index(bytes([BIG % 251]) * 64)  # the first DATA frame's payload
    reads = [
        bytes(sent[: start + 70_000]),
        bytes(sent[start + 70_000 : start + BIG + 9]),
    ]
    data = [
        e
        for read in reads
        for e in server.receive_data(read)
        if isinstance(e, h2.events.DataReceived)
    ]
    # The frame's two parts, each a view of its own read, then the next frame.
    assert [len(e.data) for e in data[:2]] == [70_000, BIG - 70_000]
    for event, read in zip(data[:2], reads, strict=True):
        assert isinstance(event.data, memoryview)
        assert event.data.obj is read
    assert [e.flow_controlled_length for e in data[:2]] == [70_000, BIG - 70_000]
    plain = a_server(views=False)
    for read in reads:
        plain.receive_data(read)
    assert server.local_flow_control_window(sid) == plain.local_flow_control_window(sid)
    assert server.inbound_flow_control_window == plain.inbound_flow_control_window


def test_a_frame_up_to_parts_above_spanning_reads_is_taken_whole() -> None:
    sent, _ = sent_to_a_server()
    start = sent.index(bytes([PARTS_ABOVE % 251]) * PARTS_ABOVE)
    reads = [bytes(sent[: start + 1000]), bytes(sent[start + 1000 : start + PARTS_ABOVE])]
    server = a_server(views=True)
    data = [
        e
        for read in reads
        for e in server.receive_data(read)
        if isinstance(e, h2.events.DataReceived)
    ]
    assert len(data[-1].data) == PARTS_ABOVE  # one event, joined once


def test_small_payloads_do_not_keep_large_reads_alive() -> None:
    # Large reads holding frames of every size: a payload under a
    # 1/VIEW_MIN_SHARE share of its read is copied out, so it pins nothing.
    sent, _ = sent_to_a_server()
    server = a_server(views=True)
    events = [
        e for i in range(0, len(sent), 200_000) for e in server.receive_data(sent[i : i + 200_000])
    ]
    data = [e.data for e in events if isinstance(e, h2.events.DataReceived)]
    assert any(isinstance(d, memoryview) for d in data)
    for d in data:
        held = len(d.obj) if isinstance(d, memoryview) else len(d)
        assert held <= VIEW_MIN_SHARE * max(len(d), 1)


def test_an_overlong_frame_is_refused_on_its_header() -> None:
    sent, sid = sent_to_a_server()
    server = a_server(views=True)
    # Up to the padded frame: its 9-byte header and pad length come before b"padded".
    server.receive_data(sent[: sent.index(b"padded") - 10])
    header = (RECEIVE_FRAME_LIMIT + 1).to_bytes(3, "big") + bytes([0, 0]) + sid.to_bytes(4, "big")
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        server.receive_data(header)  # its body need not arrive first


def test_a_header_block_over_its_bound_is_refused_on_its_frame_header() -> None:
    # HEADERS without END_HEADERS, then CONTINUATIONs: refused once the block
    # would pass MAX_HEADER_BLOCK_BYTES, before the frame's body arrives.
    server = a_server(views=True)
    server.receive_data(sent_to_a_server()[0][:24])  # the preamble
    hpack_block = bytes(16_384)
    headers = len(hpack_block).to_bytes(3, "big") + bytes([1, 0]) + (1).to_bytes(4, "big")
    server.receive_data(headers + hpack_block)
    continuation = len(hpack_block).to_bytes(3, "big") + bytes([9, 0]) + (1).to_bytes(4, "big")
    for _ in range(MAX_HEADER_BLOCK_BYTES // len(hpack_block) - 1):
        server.receive_data(continuation + hpack_block)
    with pytest.raises(h2.exceptions.DenialOfServiceError, match="header block"):
        server.receive_data(continuation)
    goaway = server.data_to_send()[-17:]
    assert goaway[:9] == bytes([0, 0, 8, 7, 0, 0, 0, 0, 0])
    assert int.from_bytes(goaway[-4:], "big") == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert server.state_machine.state == h2.connection.ConnectionState.CLOSED


@pytest.mark.parametrize("kind", [7, 0xBB])  # GOAWAY; an extension type h2 ignores
def test_a_large_frame_other_than_data_is_refused_on_its_header(kind: int) -> None:
    server = a_server(views=True)
    server.receive_data(sent_to_a_server()[0][:24])
    header = (MAX_HEADER_BLOCK_BYTES + 1).to_bytes(3, "big") + bytes([kind, 0]) + bytes(4)
    with pytest.raises(h2.exceptions.DenialOfServiceError):
        server.receive_data(header)
    server = a_server(views=True)
    server.receive_data(sent_to_a_server()[0][:24])
    header = (MAX_HEADER_BLOCK_BYTES).to_bytes(3, "big") + bytes([kind, 0]) + bytes(4)
    server.receive_data(header)  # at the bound: waits for its body


def test_a_padded_data_frame_over_parts_above_is_refused_on_its_header() -> None:
    # Held whole until its padding ends it, so bounded as a frame held whole.
    sent, sid = sent_to_a_server()
    server = a_server(views=True)
    server.receive_data(sent[: sent.index(b"padded") - 10])
    header = (PARTS_ABOVE + 1).to_bytes(3, "big") + bytes([0, 8]) + sid.to_bytes(4, "big")
    with pytest.raises(h2.exceptions.DenialOfServiceError, match="padded"):
        server.receive_data(header)


def test_a_reused_read_buffer_does_not_change_received_data() -> None:
    sent, _ = sent_to_a_server()
    server = a_server(views=True)
    buffer = bytearray(sent)
    data = [e.data for e in server.receive_data(buffer) if isinstance(e, h2.events.DataReceived)]
    expected = [bytes(d) for d in data]
    buffer[:] = bytes(len(buffer))
    assert [bytes(d) for d in data] == expected


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
        await client.upload_tar(BytesReader(files(**{"f": b"x"})), "/d")
        ends: dict[str, int] = {}
        for sock in unix_sockets_of_this_process():
            peer = peer_name(sock)
            if peer is not None and path in (peer, sock.getsockname()):
                side = "client" if peer == path else "server"
                ends[side] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert ends == {"client": expected, "server": expected}


async def test_an_upload_of_small_chunks_writes_several_per_system_call(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each write is a system call and a wakeup of the peer: queued chunks go
    # out together, frames batched up to SEND_BATCH_BYTES per write.
    writes: list[int] = []
    real = SocketTransport.writelines

    def counted(self: SocketTransport, list_of_data: Any) -> None:
        pieces = list(list_of_data)
        writes.append(sum(len(piece) for piece in pieces))
        real(self, pieces)

    monkeypatch.setattr(SocketTransport, "writelines", counted)
    chunk, chunks = 64 * 1024, 64
    async with boxfiles.open_client(server) as client:
        await client.upload_tar(
            BytesReader(files(f=os.urandom(chunk * chunks))), "/d", chunk_size=chunk
        )
    data_writes = [size for size in writes if size >= chunk]
    print(f"{chunks + 1} chunks in {len(data_writes)} writes: {data_writes}")
    assert sum(writes) > chunk * chunks
    assert len(data_writes) <= chunks * 3 // 4  # one each, before
    assert max(data_writes) <= SEND_BATCH_BYTES + FRAME_LIMIT


def grpc_frame(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


def test_a_message_is_acknowledged_as_it_arrives_never_past_its_end() -> None:
    # The client waits for a message's data without an asyncio task; what
    # has arrived must be acknowledged meanwhile (as grpclib's read would),
    # or a message larger than the window would never come whole.
    acks: list[int] = []
    stream = SimpleNamespace(buffer=grpclib.protocol.Buffer(acks.append), wrapper=None)
    h2_stream = cast(grpclib.protocol.Stream, stream)
    first, second = os.urandom(100_000), os.urandom(50)
    wire = grpc_frame(first) + grpc_frame(second)
    entries = [wire[:40_000], wire[40_000:80_000], wire[80_000:100_010]]
    for entry in entries[:2]:
        stream.buffer.add(entry, len(entry))
        assert buffered_message(h2_stream, MAX_MESSAGE_BYTES) is None
        assert awaiting_data(h2_stream, MAX_MESSAGE_BYTES)
    assert acks == [40_000, 40_000]
    stream.buffer.add(entries[2], len(entries[2]))
    pieces = buffered_message(h2_stream, MAX_MESSAGE_BYTES)
    assert pieces is not None
    assert b"".join(pieces) == first
    assert acks == [40_000, 40_000, 20_010]  # the frame holding its end, whole
    assert buffered_message(h2_stream, MAX_MESSAGE_BYTES) is None  # 5 of 55 bytes
    assert awaiting_data(h2_stream, MAX_MESSAGE_BYTES)
    rest = wire[100_010:]
    stream.buffer.add(rest, len(rest))
    last = buffered_message(h2_stream, MAX_MESSAGE_BYTES)
    assert last is not None
    assert b"".join(last) == second
    stream.buffer.eof()
    assert buffered_message(h2_stream, MAX_MESSAGE_BYTES) is None
    assert not awaiting_data(h2_stream, MAX_MESSAGE_BYTES)  # read_pieces answers at once


@pytest.mark.parametrize("prefix", [b"\x01\x00\x00\x00\x10", b"\x00\x00\x40\x00\x01"])
def test_a_refused_prefix_is_not_waited_on_nor_acknowledged_past(prefix: bytes) -> None:
    # Compressed, or over MAX_MESSAGE_BYTES (4 MiB): read_pieces refuses it.
    acks: list[int] = []
    stream = SimpleNamespace(buffer=grpclib.protocol.Buffer(acks.append), wrapper=None)
    h2_stream = cast(grpclib.protocol.Stream, stream)
    for entry in (prefix, b"x" * COALESCE_BELOW):  # not joined to the prefix
        stream.buffer.add(entry, len(entry))
    assert buffered_message(h2_stream, MAX_MESSAGE_BYTES) is None
    assert not awaiting_data(h2_stream, MAX_MESSAGE_BYTES)
    assert acks == [5]
