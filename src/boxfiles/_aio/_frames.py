"""Messages in and out of grpclib streams without its copies (asyncio side).

grpclib's own send path copies every message three more times (protobuf
serialisation, prefix concatenation, a BytesIO read per frame) before h2
copies it five more; its receive path copies each payload into a decoded
message and again when the field is read. These are grpclib's loops with
memoryview slices, DATA frames written straight to the transport, and
encoded messages handed out for the caller to decode.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from typing import Any

import grpclib.client
import grpclib.exceptions
import grpclib.protocol
import grpclib.server

from .._wire import MAX_MESSAGE_BYTES, PREFIX_BYTES
from . import _internals

#: Largest DATA frame sent. HTTP/2's default of 16 KiB makes a 1 MiB message
#: 64 frames, each flow-controlled and buffered on its own by h2 and grpclib
#: at both ends. Much larger frames cost the sender more than they save: the
#: socket takes about 200 KiB at a time, and the transport copies the rest of
#: a frame into its buffer, over glibc's mmap threshold (128 KiB), where
#: every such copy faults in fresh pages.
FRAME_LIMIT = 120 * 1024

#: Frames written to the transport at once, at most (and then more only to
#: finish a frame): small messages' frames share a system call and a wakeup
#: of the peer (two of 64 KiB), while a full-sized frame still goes alone:
#: larger writes cost the client more over TCP loopback (measured).
SEND_BATCH_BYTES = FRAME_LIMIT

#: Largest frame a client accepts (SETTINGS_MAX_FRAME_SIZE, announced to
#: servers). A large DATA frame is taken in parts as its bytes arrive, never
#: held or copied whole (``_internals.PARTS_ABOVE``), so this costs no
#: memory; other frames stay within ``_internals.MAX_HEADER_BLOCK_BYTES``. A
#: server that sends frames as large as allowed (grpcio's does) then sends a
#: 1 MiB message in one frame, and receiving costs per socket read, not per
#: 120 KiB: about an eighth less client CPU for a download from grpcio.
RECEIVE_FRAME_LIMIT = 1024 * 1024

#: Largest frame the server accepts (announced to clients): what boxfiles
#: sends itself. Clients that send frames as large as allowed (grpcio's and
#: grpclib's) then allocate each under glibc's mmap threshold, as
#: FRAME_LIMIT does for boxfiles: against 1 MiB, grpcio's aio client
#: uploads with a third of the CPU (1.0-1.2 against 3.1-3.6 s/GiB, 60-80k
#: page faults a GiB against 1.02M) at about twice the speed, and grpclib's
#: pays at most 180k faults a GiB instead of up to 1.07M.
SERVER_RECEIVE_FRAME_LIMIT = FRAME_LIMIT


class MessageTooLarge(Exception):
    """A peer declared a message over MAX_MESSAGE_BYTES (not yet mapped:
    the client and the server report it differently)."""


class FinishedEarly(Exception):
    """The peer completed its response and reset the stream: the request
    need not, and cannot, be sent on."""


async def send_encoded(
    stream: grpclib.client.Stream[Any, Any], pieces: Sequence[bytes | memoryview]
) -> None:
    """Send pieces of already-framed messages on a client stream."""
    with _internals.guarded(stream):
        await _send_data(_internals.h2_stream_of(stream), pieces)


async def send_reply(
    stream: grpclib.server.Stream[Any, Any], pieces: Sequence[bytes | memoryview]
) -> None:
    """grpclib's server send_message (its bookkeeping included) for a reply
    encoded by ``_wire.framed`` (or what send_now left of it), framed as the
    client frames its own."""
    if _internals.reply_headers_pending(stream):
        await stream.send_initial_metadata()
    await _send_data(_internals.h2_stream_of(stream), pieces)
    _internals.count_sent_reply(stream)


async def _send_data(
    h2_stream: grpclib.protocol.Stream, pieces: Sequence[bytes | memoryview]
) -> None:
    # The pieces are one byte stream: where a message or piece ends does not
    # matter to the frames.
    connection = h2_stream.connection
    h2_connection, _ = _internals.h2_parts(h2_stream)
    stream_id = h2_stream.id
    assert stream_id is not None  # headers went first
    writing = _write_lock(connection)
    views = [view for piece in pieces if (view := memoryview(piece))]
    while views:
        if _internals.finished_early(h2_stream):
            raise FinishedEarly
        if h2_connection.local_flow_control_window(stream_id) <= 0:
            h2_stream.window_updated.clear()
            await h2_stream.window_updated.wait()
            continue
        # The whole batch goes out in one turn while the window lasts (see
        # _WRITE_LOCKS). A stream out of window gives up its turn, so one
        # its peer is not reading never holds up the others.
        async with writing:
            while views:
                _write_frames(h2_stream, views)
                if not views or _internals.finished_early(h2_stream):
                    break
                if connection.write_ready.is_set():
                    break  # out of window: wait for it outside the turn
                await connection.write_ready.wait()


def send_now(
    stream: grpclib.client.Stream[Any, Any] | grpclib.server.Stream[Any, Any],
    pieces: Sequence[bytes | memoryview],
) -> list[memoryview]:
    """send_encoded (or send_reply, once the reply's headers are sent)
    without an asyncio task, as far as it goes without waiting: what is
    left of ``pieces`` (all of them if it could not start), for them to
    send. Creating and scheduling a task costs more than sending a 64 KiB
    message, and the window and the socket mostly have room."""
    h2_stream = _internals.h2_stream_of(stream)
    views = [view for piece in pieces if (view := memoryview(piece))]
    connection = h2_stream.connection
    if (
        not _internals.stream_failed(h2_stream)
        and connection.write_ready.is_set()
        and not _write_lock(connection).locked()
    ):
        _write_frames(h2_stream, views)
    return views


def _write_frames(h2_stream: grpclib.protocol.Stream, views: list[memoryview]) -> None:
    """Write frames from the front of ``views`` (taking what goes) while the
    stream's window lasts and the transport takes more, until the peer
    finished early. Frames go to the transport SEND_BATCH_BYTES at a time:
    each write is a system call and a wakeup of the peer."""
    connection = h2_stream.connection
    h2_connection, transport = _internals.h2_parts(h2_stream)
    stream_id = h2_stream.id
    assert stream_id is not None  # headers went first
    batch: list[bytes | memoryview] = []
    batched = 0
    try:
        while views and connection.write_ready.is_set():
            if _internals.finished_early(h2_stream):
                return
            # Other streams may have used the connection's window meanwhile.
            window = h2_connection.local_flow_control_window(stream_id)
            if window <= 0:
                return
            view = views[0]
            size = min(window, h2_connection.max_outbound_frame_size, len(view), FRAME_LIMIT)
            batch += _internals.send_data_frame(h2_connection, stream_id, view[:size])
            batched += size
            h2_stream.data_sent += size
            connection.data_sent += size
            connection.data_send_process()
            if size < len(view):
                views[0] = view[size:]
            else:
                del views[0]
            if batched >= SEND_BATCH_BYTES:
                transport.writelines(batch)
                batch, batched = [], 0
    finally:
        # Frames h2 has counted as sent are written, whatever stopped the loop.
        if batch:
            transport.writelines(batch)


#: One lock per connection for the streams writing to it: a transport that
#: drains wakes every waiter at once, and one frame can fill it again, so
#: the senders take turns instead of all waking to find it full. A turn is
#: a whole batch while the stream's window lasts: a hand-over per frame
#: cost 32 concurrent uploads a third more client CPU.
_WRITE_LOCKS: weakref.WeakKeyDictionary[grpclib.protocol.Connection, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _write_lock(connection: grpclib.protocol.Connection) -> asyncio.Lock:
    lock = _WRITE_LOCKS.get(connection)
    if lock is None:
        lock = _WRITE_LOCKS[connection] = asyncio.Lock()
    return lock


async def recv_pieces(stream: grpclib.client.Stream[Any, Any]) -> list[memoryview] | None:
    """grpclib's client recv_message without the decode or a copy: the next
    message as views of the frames it came in, or None once the peer ended
    its side."""
    if _internals.client_initial_metadata_pending(stream):
        await stream.recv_initial_metadata()
    with _internals.guarded(stream):
        return await _recv_body(_internals.h2_stream_of(stream))


def recv_buffered(stream: grpclib.client.Stream[Any, Any]) -> list[memoryview] | None:
    """recv_pieces without waiting, for a message that has arrived whole:
    its views, or None if recv_pieces would wait or raise (what has arrived
    of the message is acknowledged, as recv_pieces would). Creating and
    scheduling an asyncio task costs more than receiving a 64 KiB message;
    a download's messages have mostly arrived by the time they are asked
    for."""
    h2_stream = _internals.h2_stream_of(stream)
    if _internals.client_initial_metadata_pending(stream) or _internals.stream_failed(h2_stream):
        return None
    return _internals.buffered_message(h2_stream, MAX_MESSAGE_BYTES)


def awaiting_data(stream: grpclib.client.Stream[Any, Any]) -> bool:
    """After recv_buffered found no message: whether one can only come with
    data not received yet (else recv_pieces answers at once: the end, the
    headers' wait, or an error)."""
    return not _internals.client_initial_metadata_pending(stream) and _internals.awaiting_data(
        _internals.h2_stream_of(stream), MAX_MESSAGE_BYTES
    )


async def recv_trailers(stream: grpclib.client.Stream[Any, Any]) -> None:
    """Wait for the peer's trailers (or the end of a trailers-only response)."""
    with _internals.guarded(stream):
        h2_stream = _internals.h2_stream_of(stream)
        if _internals.client_initial_metadata_pending(stream):
            await stream.recv_initial_metadata()
        if h2_stream.headers is not None and any(k == "grpc-status" for k, _ in h2_stream.headers):
            return  # trailers-only: the status came with the headers
        await h2_stream.recv_trailers()


async def recv_pieces_from_client(
    stream: grpclib.server.Stream[Any, Any],
) -> list[memoryview] | None:
    """grpclib's server recv_message without the decode or a copy: the next
    message as views of the frames it came in."""
    pieces = await _recv_body(_internals.h2_stream_of(stream))
    if pieces is None:
        return None
    _internals.count_received_request(stream)
    return pieces


def recv_buffered_from_client(stream: grpclib.server.Stream[Any, Any]) -> list[memoryview] | None:
    """recv_pieces_from_client without waiting, as recv_buffered: the
    message's views, or None if recv_pieces_from_client would wait or raise."""
    h2_stream = _internals.h2_stream_of(stream)
    if _internals.stream_failed(h2_stream):
        return None
    pieces = _internals.buffered_message(h2_stream, MAX_MESSAGE_BYTES)
    if pieces is None:
        return None
    _internals.count_received_request(stream)
    return pieces


def awaiting_data_from_client(stream: grpclib.server.Stream[Any, Any]) -> bool:
    """awaiting_data, after recv_buffered_from_client found no message."""
    return _internals.awaiting_data(_internals.h2_stream_of(stream), MAX_MESSAGE_BYTES)


async def _recv_body(h2_stream: grpclib.protocol.Stream) -> list[memoryview] | None:
    prefix = b"".join(await _internals.read_pieces(h2_stream, PREFIX_BYTES))
    if not prefix:
        return None
    if prefix[0]:
        raise grpclib.exceptions.ProtocolError("compressed messages are not supported")
    size = int.from_bytes(prefix[1:], "big")
    if size > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(
            f"a message of {size} bytes is over the limit of {MAX_MESSAGE_BYTES} bytes"
        )
    body = await _internals.read_pieces(h2_stream, size)
    if size and not body:
        raise grpclib.exceptions.ProtocolError("the stream ended inside a message")
    return body
