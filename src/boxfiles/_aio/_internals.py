"""Every use of a private name of asyncio, grpclib, h2 or hyperframe, in one place.

Each exists because the public API cannot do the job, and says why. The
suite runs against the oldest and newest releases the dependency pins admit
(``nox -s deps``), so a change upstream shows there first. Nothing here does
I/O of its own.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, cast

import grpclib.client
import grpclib.exceptions
import grpclib.protocol
import grpclib.server
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hyperframe.exceptions
import hyperframe.frame
import trio

from .._wire import PREFIX_BYTES

# -- asyncio -------------------------------------------------------------------

# asyncio marks the loop that is running a callback in a per-thread slot that
# asyncio.get_running_loop(), current_task() and every Future/Event/Lock
# created without a loop read. A loop implementation sets it around its
# callbacks; these two functions (listed in asyncio.events.__all__, used by
# uvloop and trio-asyncio alike) are the only way to do so.
_get_running_loop = asyncio.events._get_running_loop
_set_running_loop = asyncio.events._set_running_loop


class running_loop:
    """Mark ``loop`` as the running asyncio loop for the block (cheap: it
    wraps every batch of callbacks)."""

    __slots__ = ("_loop", "_previous")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> None:
        self._previous = _get_running_loop()
        _set_running_loop(self._loop)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _set_running_loop(self._previous)


# -- hyperframe ----------------------------------------------------------------


def _cheap_data_frame_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


# h2 logs repr(frame) for every frame it receives, at trace level but built
# eagerly, and a DATA frame's repr copies and hex-encodes its whole payload:
# a quarter of a download's CPU. Only that debug text changes.
if "_body_repr" not in hyperframe.frame.DataFrame.__dict__:
    hyperframe.frame.DataFrame._body_repr = _cheap_data_frame_repr  # type: ignore[method-assign, assignment]


# -- h2: settings and DATA frames -------------------------------------------


def announce_frame_size(protocol: grpclib.protocol.H2Protocol, size: int) -> None:
    """Announce and accept DATA frames up to ``size`` on a new connection.

    grpclib has no setting for it; its H2Connection is ``connection._connection``.
    """
    h2_connection: h2.connection.H2Connection = protocol.connection._connection
    h2_connection.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: size})
    # Accept larger frames now rather than at the peer's ACK: h2 applies a new
    # limit only from its next receive_data call on, so a large frame read
    # together with the ACK would be refused as too long.
    h2_connection.max_inbound_frame_size = size
    protocol.connection.flush()


#: HTTP/2 frame header: 24-bit length (as 16 + 8 bits), type, flags, stream id.
_DATA_FRAME_HEADER = struct.Struct(">HBBBL")
_DATA_FRAME_TYPE = hyperframe.frame.DataFrame.type


def send_data_frame(
    h2_connection: h2.connection.H2Connection, stream_id: int, payload: memoryview
) -> tuple[bytes, memoryview]:
    """One DATA frame as h2's ``send_data`` would make it, without its copies.

    h2 copies a frame's payload five times on the way to the socket (to
    bytes, into the frame, behind its header, into its buffer, out of it);
    at upload rates that is most of the CPU an upload costs. This does h2's
    bookkeeping for the frame (state checks, both flow-control windows) through
    its state machines, and hands back what to write: whatever h2 had queued
    before it plus the frame header, then the payload itself. The caller
    checks the window and the peer's frame size limit first, as h2's
    ``send_data`` requires.

    Raises:
        h2.exceptions.ProtocolError: the connection or stream cannot send
            data (closed or reset), exactly as ``send_data`` would.
    """
    size = len(payload)
    h2_connection.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
    h2_stream = h2_connection.streams[stream_id]
    h2_stream.state_machine.process_input(h2.stream.StreamInputs.SEND_DATA)
    h2_stream.outbound_flow_control_window -= size
    h2_connection.outbound_flow_control_window -= size
    header = _DATA_FRAME_HEADER.pack(size >> 8, size & 0xFF, _DATA_FRAME_TYPE, 0, stream_id)
    return h2_connection.data_to_send() + header, payload


# -- h2: received frames as views ----------------------------------------------

#: A received DATA payload is kept as a view of the bytes the transport read
#: (no copy) only when it is at least this share of them: a view keeps the
#: whole read alive, so a peer sending tiny DATA frames among other bytes
#: cannot make the buffered data pin more than twice its size. (At 4, a
#: message's last, short frame kept much of a read alive: a copy_out held
#: 16 MiB where it now holds 12.)
VIEW_MIN_SHARE = 2

#: A DATA frame longer than this goes on in parts as its bytes arrive, a view
#: of each read (see ViewFrameBuffer); a shorter one is taken whole, joined
#: if it spans reads: copying up to 128 KiB costs less than h2's and
#: grpclib's handling of one more frame.
PARTS_ABOVE = 128 * 1024

#: Most bytes of a header block (HEADERS or PUSH_PROMISE and its
#: CONTINUATIONs), and of any one frame but DATA: those are buffered whole
#: until they end, so the frame size limit, far larger for the sake of DATA,
#: must not be theirs. gRPC's metadata is a few KiB (grpcio refuses over
#: 16 KiB). One over it ends the connection with ENHANCE_YOUR_CALM, on its
#: frame header, before its body is buffered.
MAX_HEADER_BLOCK_BYTES = 64 * 1024


class ViewFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's FrameBuffer without its copies of DATA payloads.

    h2 copies every received byte three times before its DataReceived event
    (into its bytearray, a slice of it per frame, ``tobytes`` in hyperframe's
    ``parse_body``): most of what a download costs in Python. This one keeps
    the reads and hands a DATA frame's payload on as a view of the read it
    came in. A frame over PARTS_ABOVE (unpadded: a padded one is refused)
    goes on in parts as its bytes arrive, one per read, as if the peer had
    sent it as several frames (the same bytes, flow-controlled in the same
    total, END_STREAM on the last part): it is never joined, nor held
    whole. Every other frame is held whole, and refused over
    MAX_HEADER_BLOCK_BYTES. Everything else is h2's: its
    frame-size check, its CONTINUATION handling, its frame classes. h2 has
    no option for it; its connection reads ``incoming_buffer`` on every
    ``receive_data``.
    """

    def __init__(self, old: h2.frame_buffer.FrameBuffer) -> None:
        super().__init__()
        self.max_frame_size = old.max_frame_size
        self._preamble = old._preamble
        self._preamble_len = old._preamble_len
        self._reads: deque[memoryview] = deque()  # received, not yet parsed
        self._size = 0  # bytes in _reads
        # A DATA frame handed on in parts: its bytes still to come, its
        # stream, and whether it ends the stream.
        self._data_left = 0
        self._data_stream = 0
        self._data_ends = False

    def add_data(self, data: Any) -> None:
        # A view of a mutable buffer would change under the frames it made.
        view = memoryview(data if type(data) is bytes else bytes(data))
        if self._preamble_len:  # as h2 checks a server's preamble
            n = min(self._preamble_len, len(view))
            if self._preamble[:n] != view[:n]:
                raise h2.exceptions.ProtocolError("Invalid HTTP/2 preamble.")
            view = view[n:]
            self._preamble_len -= n
            self._preamble = self._preamble[n:]
        if view:
            self._reads.append(view)
            self._size += len(view)

    def _take(self, size: int) -> memoryview:
        """The next ``size`` buffered bytes: a view of one read, or a join
        of the reads they span."""
        self._size -= size
        first = self._reads[0]
        if len(first) > size:
            self._reads[0] = first[size:]
            return first[:size]
        if len(first) == size:
            return self._reads.popleft()
        pieces = []
        while size:
            piece = self._reads.popleft()
            if len(piece) > size:
                self._reads.appendleft(piece[size:])
                piece = piece[:size]
            pieces.append(piece)
            size -= len(piece)
        return memoryview(b"".join(pieces))

    def _data_part(self, frame: hyperframe.frame.DataFrame | None) -> hyperframe.frame.DataFrame:
        """The next part of the DATA frame being handed on: what of it the
        first read holds. ``frame`` is the frame's own header for its first
        part, None for the parts after it."""
        size = min(self._data_left, len(self._reads[0]))
        self._data_left -= size
        if frame is None:
            frame = hyperframe.frame.DataFrame(self._data_stream)
            if self._data_ends and not self._data_left:
                frame.flags.add("END_STREAM")
        elif self._data_left:
            frame.flags.discard("END_STREAM")
        part = self._take(size)
        if size * VIEW_MIN_SHARE < len(cast(bytes, part.obj)):
            part = memoryview(part.tobytes())  # under its share of the read: copied
        frame.data = part  # type: ignore[assignment]
        frame.body_len = size
        return frame

    def __next__(self) -> hyperframe.frame.Frame:
        while True:  # a loop where h2 recurses past a CONTINUATION
            if self._data_left:
                if not self._size:
                    raise StopIteration
                frame: hyperframe.frame.Frame = self._data_part(None)
            else:
                frame = self._next_frame()
            complete = self._update_header_buffer(frame)
            if complete is not None:
                return complete

    def _next_frame(self) -> hyperframe.frame.Frame:
        """The next frame, or the first part of a DATA frame."""
        if self._size < 9:
            raise StopIteration
        first = self._reads[0]
        if len(first) >= 9:
            header = first[:9]
        else:  # a header split across reads: copy its nine bytes only
            joined = bytearray()
            for piece in self._reads:
                joined += piece[: 9 - len(joined)]
                if len(joined) == 9:
                    break
            header = memoryview(bytes(joined))
        try:
            frame, length = hyperframe.frame.Frame.parse_frame_header(header)
        except (
            hyperframe.exceptions.InvalidDataError,
            hyperframe.exceptions.InvalidFrameError,
        ) as err:
            raise h2.exceptions.ProtocolError(
                f"Received frame with invalid header: {err!s}"
            ) from err
        # Refused on its header, not once a frame too long is buffered.
        self._validate_frame_length(length)
        if not isinstance(frame, hyperframe.frame.DataFrame):
            block = length
            if isinstance(frame, hyperframe.frame.ContinuationFrame):
                block += sum(len(f.data) for f in self._headers_buffer)
            if block > MAX_HEADER_BLOCK_BYTES:
                raise h2.exceptions.DenialOfServiceError(
                    f"received a {type(frame).__name__} of {block} bytes"
                    f" (header block or frame), over {MAX_HEADER_BLOCK_BYTES}"
                )
        elif length > PARTS_ABOVE:
            if "PADDED" in frame.flags:  # held whole (its padding ends it): as small as others
                raise h2.exceptions.DenialOfServiceError(
                    f"received a padded DATA frame of {length} bytes, over {PARTS_ABOVE}"
                )
            if self._size == 9:
                raise StopIteration  # the header alone: parsed again with its data
            self._take(9)
            self._data_left = length
            self._data_stream = frame.stream_id
            self._data_ends = "END_STREAM" in frame.flags
            return self._data_part(frame)
        if self._size < 9 + length:
            raise StopIteration
        body = self._take(9 + length)[9:]
        try:
            if (
                isinstance(frame, hyperframe.frame.DataFrame)
                and "PADDED" not in frame.flags
                and length * VIEW_MIN_SHARE >= len(cast(bytes, body.obj))
            ):
                frame.data = body  # type: ignore[assignment]
                frame.body_len = length
            else:
                frame.parse_body(body)
        except hyperframe.exceptions.InvalidDataError as err:
            raise h2.exceptions.ProtocolError("Received frame with non-compliant data") from err
        except hyperframe.exceptions.InvalidFrameError as err:
            raise h2.exceptions.FrameDataMissingError("Frame data missing or invalid") from err
        return frame


def receive_frames_as_views(protocol: grpclib.protocol.H2Protocol) -> None:
    """Give a new connection's h2 the copy-free frame buffer above (before
    it has received anything)."""
    h2_connection: h2.connection.H2Connection = protocol.connection._connection
    h2_connection.incoming_buffer = ViewFrameBuffer(h2_connection.incoming_buffer)


def goaway_on_protocol_errors(protocol: grpclib.protocol.H2Protocol) -> None:
    """Send the GOAWAY h2 queues for a connection error before grpclib
    closes the connection: grpclib closes on h2's ProtocolError without
    writing it, so the peer would never learn why (ENHANCE_YOUR_CALM for
    a header block over its bound, FRAME_SIZE_ERROR, ...)."""
    connection = protocol.connection
    feed = connection.feed

    def feed_or_say_why(data: bytes) -> list[h2.events.Event]:
        try:
            return feed(data)
        except h2.exceptions.ProtocolError:
            connection.flush()
            raise

    connection.feed = feed_or_say_why  # type: ignore[method-assign]


# -- grpclib: streams ----------------------------------------------------------
#
# grpclib's Stream hides the HTTP/2 stream it drives (``_stream``) and the
# Wrapper that turns a reset into an error in the waiting task (``_wrapper``);
# the fast paths below need both, and keep grpclib's bookkeeping as its own
# send_message / recv_message would.


#: DATA payloads shorter than this are joined, while unread, to the small
#: ones before them, up to COALESCE_UP_TO bytes: grpclib queues an entry per
#: frame, some 500 bytes each, and a peer sending 1-byte frames would make
#: a 1 MiB message cost 500 MiB. Larger payloads stay views (never copied).
COALESCE_BELOW = 4096
COALESCE_UP_TO = 64 * 1024


def _coalescing_add(self: grpclib.protocol.Buffer, data: bytes, ack_size: int) -> None:
    queue: deque[Any] = self._unacked._queue  # type: ignore[attr-defined]  # not yet read
    if 0 < len(data) < COALESCE_BELOW and queue:
        last = queue[-1]
        # Only small payloads, or ones already joined: a bytearray in the
        # queue has no view of it yet (read_pieces makes one when it takes
        # the entry), so it may grow; the end of the stream has no ack_size.
        joining = type(last.data) is bytearray
        if (
            last.ack_size
            and (joining or 0 < last.data_size < COALESCE_BELOW)
            and last.data_size < COALESCE_UP_TO
        ):
            joined = last.data if joining else bytearray(last.data)
            joined += data
            queue[-1] = grpclib.protocol.UnackedData(
                joined,  # type: ignore[arg-type]  # read as a view, as bytes are
                last.data_size + len(data),
                last.ack_size + ack_size,
            )
            _wake_readers(self)
            return
    self._unacked.put_nowait(grpclib.protocol.UnackedData(data, len(data), ack_size))
    _wake_readers(self)


# grpclib's Buffer.add, with small payloads joined (see COALESCE_BELOW); the
# same bytes, in the same order, acknowledged in the same total.
grpclib.protocol.Buffer.add = _coalescing_add  # type: ignore[method-assign]


# -- grpclib: a stream's data waited for in trio ----------------------------------
#
# A message still arriving is waited for by the trio task that wants it, not
# by an asyncio task per message (creating and scheduling one costs more than
# a 64 KiB message). grpclib has no hook for "something arrived for this
# stream", so its three ways of saying so are wrapped: Buffer.add (data),
# Buffer.eof (the stream's end) and Stream.__terminated__ (a reset, a GOAWAY
# or the connection's loss). Each wakes only the tasks waiting on that
# stream. A grpclib deadline is not among them: the trio deadline set with
# it ends the wait.

_READERS = "_boxfiles_readers"  # a Buffer's trio ParkingLot, once waited on


def _wake_readers(buffer: grpclib.protocol.Buffer) -> None:
    readers: trio.lowlevel.ParkingLot | None = getattr(buffer, _READERS, None)
    if readers:
        readers.unpark_all()


async def data_arrival(h2_stream: grpclib.protocol.Stream) -> None:
    """Wait until something arrives for the stream: data, its end, or its
    failure. Cancellation: a plain trio checkpoint; nothing is lost."""
    buffer = h2_stream.buffer
    readers: trio.lowlevel.ParkingLot | None = getattr(buffer, _READERS, None)
    if readers is None:
        readers = trio.lowlevel.ParkingLot()
        setattr(buffer, _READERS, readers)
    await readers.park()


_grpclib_eof = grpclib.protocol.Buffer.eof
_grpclib_terminated = grpclib.protocol.Stream.__terminated__


def _eof_and_wake(self: grpclib.protocol.Buffer) -> None:
    _grpclib_eof(self)
    _wake_readers(self)


def _terminated_and_wake(self: grpclib.protocol.Stream, reason: str) -> None:
    _grpclib_terminated(self, reason)
    _wake_readers(self.buffer)


grpclib.protocol.Buffer.eof = _eof_and_wake  # type: ignore[method-assign]
grpclib.protocol.Stream.__terminated__ = _terminated_and_wake  # type: ignore[method-assign]


async def read_pieces(h2_stream: grpclib.protocol.Stream, size: int) -> list[memoryview]:
    """grpclib's ``Buffer.read`` without its final join: the next ``size``
    bytes of the stream as views of the DATA frames they came in (a
    message's data is then written from them, never copied in Python).
    Acknowledged to the peer as Buffer.read does. Buffer has no way to
    take its chunks but its private fields (the same from 0.4.7 to 0.4.9).

    An empty list when the stream ended before any of them.

    Raises:
        grpclib.exceptions.ProtocolError: the stream ended partway.
    """
    buffer = h2_stream.buffer
    if not buffer._eof or not buffer._unacked.empty():
        while buffer._acked_size < size:
            data, data_size, ack_size = await buffer._unacked.get()
            if not ack_size:  # the end of the stream
                break
            buffer._acked.append(grpclib.protocol.AckedData(memoryview(data), data_size))
            buffer._acked_size += data_size
            buffer._ack_callback(ack_size)
    if buffer._acked_size == 0:
        return []
    if buffer._acked_size < size:
        raise grpclib.exceptions.ProtocolError("the stream ended inside a message")
    return _take_acked(buffer, size)


def buffered_message(h2_stream: grpclib.protocol.Stream, max_size: int) -> list[memoryview] | None:
    """The next gRPC message's body, taken as read_pieces takes it, if its
    5-byte prefix and all of its body have arrived, the prefix says it is
    uncompressed and its size is at most ``max_size``; otherwise None.

    What has arrived of the message is acknowledged meanwhile, as
    read_pieces would (never past the message's end, nor past a prefix
    that read_pieces refuses), so a message larger than the flow-control
    window still comes whole."""
    buffer = h2_stream.buffer
    size = _acceptable_size(buffer, max_size)
    if size is None or not _ack_arrived(buffer, PREFIX_BYTES + size):
        return None
    _take_acked(buffer, PREFIX_BYTES)
    return _take_acked(buffer, size)


def awaiting_data(h2_stream: grpclib.protocol.Stream, max_size: int) -> bool:
    """Whether the next message (buffered_message found none) can only come
    with data not received yet, which read_pieces would wait for: the stream
    has neither ended nor failed, and the next message's prefix, as far as
    it has arrived, is one read_pieces accepts."""
    buffer = h2_stream.buffer
    if stream_failed(h2_stream) or buffer._eof:
        return False
    return buffer._acked_size < PREFIX_BYTES or _acceptable_size(buffer, max_size) is not None


def _acceptable_size(buffer: grpclib.protocol.Buffer, max_size: int) -> int | None:
    """The next message's size, once its prefix has arrived (acknowledged)
    and says it is uncompressed and at most ``max_size``; else None."""
    if not _ack_arrived(buffer, PREFIX_BYTES):
        return None
    prefix = bytearray()
    for chunk, _ in buffer._acked:
        prefix += chunk[: PREFIX_BYTES - len(prefix)]
        if len(prefix) == PREFIX_BYTES:
            break
    size = int.from_bytes(prefix[1:], "big")
    return None if prefix[0] or size > max_size else size


def _ack_arrived(buffer: grpclib.protocol.Buffer, size: int) -> bool:
    """Move arrived data to the acknowledged side, as read_pieces does,
    until ``size`` bytes are there: whether they are. One acknowledgement
    (h2's bookkeeping, maybe a WINDOW_UPDATE) for all of it."""
    queue: deque[grpclib.protocol.UnackedData] = buffer._unacked._queue  # type: ignore[attr-defined]
    ack_size = 0
    while buffer._acked_size < size and queue and queue[0].ack_size:
        entry = buffer._unacked.get_nowait()
        buffer._acked.append(grpclib.protocol.AckedData(memoryview(entry.data), entry.data_size))
        buffer._acked_size += entry.data_size
        ack_size += entry.ack_size
    if ack_size:
        buffer._ack_callback(ack_size)
    return buffer._acked_size >= size


def _take_acked(buffer: grpclib.protocol.Buffer, size: int) -> list[memoryview]:
    pieces = []
    taken = 0
    while taken < size:
        chunk, chunk_size = buffer._acked[0]
        if taken + chunk_size <= size:
            pieces.append(chunk)
            taken += chunk_size
            buffer._acked.popleft()
        else:
            offset = size - taken
            pieces.append(chunk[:offset])
            buffer._acked[0] = grpclib.protocol.AckedData(chunk[offset:], chunk_size - offset)
            taken = size
    buffer._acked_size -= size
    return pieces


def stream_failed(h2_stream: grpclib.protocol.Stream) -> bool:
    """The stream was reset, its connection lost or its deadline passed:
    waiting inside its grpclib Wrapper (the client's, or the server
    handler's) would raise why."""
    wrapper = h2_stream.wrapper
    return wrapper is not None and wrapper._error is not None


def h2_stream_of(
    stream: grpclib.client.Stream[Any, Any] | grpclib.server.Stream[Any, Any],
) -> grpclib.protocol.Stream:
    return stream._stream


def guarded(stream: grpclib.client.Stream[Any, Any]) -> Any:
    """grpclib's Wrapper for a client stream: a reset, a lost connection or
    the deadline raises in whichever task is waiting inside it."""
    return stream._wrapper


def h2_parts(
    h2_stream: grpclib.protocol.Stream,
) -> tuple[h2.connection.H2Connection, asyncio.Transport]:
    return h2_stream._h2_connection, h2_stream._transport


def widen_receive_window(stream: grpclib.client.Stream[Any, Any], increment: int) -> None:
    """Let the peer send ``increment`` more bytes on this stream than its
    opening window: h2's WINDOW_UPDATE, sent now, right behind the HEADERS,
    so the peer has it before the request and never waits on it. grpclib
    sets one window for all streams (a setting), none per stream."""
    h2_stream = stream._stream
    assert h2_stream.id is not None  # headers went first
    h2_stream._h2_connection.increment_flow_control_window(increment, stream_id=h2_stream.id)
    h2_stream.connection.flush()


def client_initial_metadata_pending(stream: grpclib.client.Stream[Any, Any]) -> bool:
    return not stream._recv_initial_metadata_done


def count_sent_reply(stream: grpclib.server.Stream[Any, Any]) -> None:
    """The bookkeeping of grpclib's server send_message, for a reply sent
    by the fast path."""
    stream._send_message_done = True
    stream._messages_sent += 1
    stream._stream.connection.messages_sent += 1
    stream._stream.connection.last_message_sent = time.monotonic()


def reply_headers_pending(stream: grpclib.server.Stream[Any, Any]) -> bool:
    return not stream._send_initial_metadata_done


def count_received_request(stream: grpclib.server.Stream[Any, Any]) -> None:
    """The bookkeeping of grpclib's server recv_message, for a message read
    by the fast path (but not its RecvMessage event, which carries a decoded
    message)."""
    stream._messages_received += 1
    stream._stream.connection.messages_received += 1
    stream._stream.connection.last_message_received = time.monotonic()


def status_received(stream: grpclib.client.Stream[Any, Any]) -> grpclib.exceptions.GRPCError | None:
    """The non-OK status the peer already sent, if any, without waiting.

    grpclib reads a status only by awaiting it; after a reset or a lost
    connection that await raises StreamTerminatedError even though the
    status arrived first (``_maybe_raise`` reads the headers it kept).
    """
    try:
        stream._maybe_raise()
    except grpclib.exceptions.GRPCError as status:
        return status
    except Exception:  # malformed headers: no status to report
        return None
    return None


def abort_connection(stream: grpclib.server.Stream[Any, Any]) -> None:
    """Drop a server stream's whole connection at once (fault injection)."""
    stream._stream.connection._transport.abort()


def serves_no_call(protocol: grpclib.protocol.H2Protocol) -> bool:
    """Whether a server connection has no call in flight. grpclib tracks its
    handler tasks for its own close (``Handler.check_closed``, public in
    name but undocumented) and offers no other count."""
    return cast(grpclib.server.Handler, protocol.handler).check_closed()


def set_authority(channel: grpclib.client.Channel, authority: str) -> None:
    """grpclib derives ``:authority`` from host and port, and for a unix
    socket from neither; peers behind a unix socket (tonic/hyper) reset
    calls whose ``:authority`` is not a plain host name."""
    channel._authority = authority


# -- grpclib: a reset after a complete response ----------------------------


def keep_complete_responses(protocol: grpclib.protocol.H2Protocol) -> None:
    """Keep a response the peer completed before resetting the stream.

    RFC 9113 §8.1: a server may answer before the request is complete and
    then send RST_STREAM(NO_ERROR); the client must not discard that
    response. grpclib terminates the stream on any reset, which poisons
    every later read and drops the buffered reply. Here a NO_ERROR reset of
    a stream whose response already ended (END_STREAM received: grpclib's
    ``buffer._eof``) only marks it :func:`finished_early`; any other reset
    is grpclib's as before. grpclib has no hook for it but its processor's
    dispatch table.
    """
    processor = protocol.processor
    on_reset: Callable[[h2.events.StreamReset], None] = processor.processors[  # type: ignore[assignment]
        h2.events.StreamReset
    ]

    def stream_reset(event: h2.events.StreamReset) -> None:
        stream = processor.streams.get(event.stream_id) if event.stream_id is not None else None
        if (
            stream is not None
            and stream.buffer._eof
            and event.remote_reset
            and event.error_code == h2.errors.ErrorCodes.NO_ERROR
        ):
            stream.boxfiles_finished_early = True  # type: ignore[attr-defined]
            stream.window_updated.set()  # a sender waiting for window looks again
            return
        on_reset(event)

    processor.processors[h2.events.StreamReset] = stream_reset


def finished_early(h2_stream: grpclib.protocol.Stream) -> bool:
    """The peer completed its response and then reset the stream (NO_ERROR):
    it wants nothing more of the request."""
    return getattr(h2_stream, "boxfiles_finished_early", False)


# -- grpclib: why a connection went away -----------------------------------


def remember_goaway(protocol: grpclib.protocol.H2Protocol) -> None:
    """Keep the GOAWAY a peer sends on its connection, for :func:`refused_by_goaway`.

    grpclib turns a GOAWAY into "Connection lost" for every stream, and
    forgets its code, its last stream id and its text. grpclib has no hook
    for it but its processor's dispatch table.
    """
    processor = protocol.processor
    on_goaway: Callable[[h2.events.ConnectionTerminated], None] = processor.processors[  # type: ignore[assignment]
        h2.events.ConnectionTerminated
    ]

    def connection_terminated(event: h2.events.ConnectionTerminated) -> None:
        processor.connection.boxfiles_goaway = event  # type: ignore[attr-defined]
        on_goaway(event)

    processor.processors[h2.events.ConnectionTerminated] = connection_terminated


def refused_by_goaway(h2_stream: grpclib.protocol.Stream) -> str | None:
    """Why the peer refused this stream, if a GOAWAY it sent names no stream
    of this one's or later (nothing of it was processed)."""
    event: h2.events.ConnectionTerminated | None = getattr(
        h2_stream.connection, "boxfiles_goaway", None
    )
    if event is None or h2_stream.id is None or h2_stream.id <= (event.last_stream_id or 0):
        return None
    code = event.error_code or 0
    name = code.name if isinstance(code, h2.errors.ErrorCodes) else str(code)
    text = (event.additional_data or b"").decode("utf-8", "replace")
    return f"{text} (GOAWAY {name})" if text else f"GOAWAY {name}"
